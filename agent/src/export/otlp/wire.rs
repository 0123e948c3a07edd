//! `tapwire::model::Span` -> the protobuf bytes of an OTLP `ExportTraceServiceRequest`, written
//! straight from the model: byte for byte what prost makes of [`super::encode::encode_request`]
//! (the tests check it), without building and dropping the message structs and their copies of
//! every string on the way (at 10k spans/s that was a third of the agent's CPU).
//!
//! Field numbers and wire types are those of opentelemetry-proto's `trace.proto`,
//! `common.proto` and `resource.proto`; fields are written in field-number order and proto3
//! defaults (empty strings and bytes, zeros) are left out, as prost does.

use std::sync::Arc;

use super::encode::{SCOPE_NAME, SCOPE_VERSION};
use crate::model::{Attributes, Resource, Span, SpanKind, Status, Value};

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// `span.proto` SpanKind and `Status.StatusCode` numbers.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
const STATUS_OK: u64 = 1;
const STATUS_ERROR: u64 = 2;

/// Appends the request for `spans` to `out`: one `ResourceSpans` per distinct resource (by
/// value, in order of first appearance), each with a single `tapwire` scope.
pub fn encode_request(spans: &[Span], out: &mut Vec<u8>) {
    // Batches are small (<= 512) and resources few: a linear scan, as in encode::encode_request.
    let mut groups: Vec<(&Arc<Resource>, Vec<&Span>)> = Vec::new();
    for span in spans {
        match groups.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &span.resource) || ***r == *span.resource) {
            Some((_, list)) => list.push(span),
            None => groups.push((&span.resource, vec![span])),
        }
    }
    let mut sizes = Vec::with_capacity(spans.len());
    for (resource, spans) in &groups {
        sizes.clear();
        sizes.extend(spans.iter().map(|s| span_len(s)));
        let resource_len = attributes_len(1, &resource.attributes);
        let scope_len = scope_len();
        let scope_spans_len = field_len(1, scope_len) + sizes.iter().map(|&n| field_len(2, n)).sum::<usize>();
        let resource_spans_len = field_len(1, resource_len) + field_len(2, scope_spans_len);
        // ExportTraceServiceRequest.resource_spans = 1
        tag_len(out, 1, resource_spans_len);
        // ResourceSpans.resource = 1
        tag_len(out, 1, resource_len);
        write_attributes(out, 1, &resource.attributes);
        // ResourceSpans.scope_spans = 2
        tag_len(out, 2, scope_spans_len);
        // ScopeSpans.scope = 1: InstrumentationScope { name = 1, version = 2 }
        tag_len(out, 1, scope_len);
        write_str(out, 1, SCOPE_NAME);
        write_str(out, 2, SCOPE_VERSION);
        // ScopeSpans.spans = 2
        for (span, &len) in spans.iter().zip(&sizes) {
            tag_len(out, 2, len);
            write_span(out, span);
        }
    }
}

fn scope_len() -> usize {
    str_len(1, SCOPE_NAME) + str_len(2, SCOPE_VERSION)
}

fn span_len(span: &Span) -> usize {
    let mut n = field_len(1, span.trace_id.len()) + field_len(2, span.span_id.len());
    n += str_len(3, &span.trace_state);
    if let Some(parent) = &span.parent_span_id {
        n += field_len(4, parent.len());
    }
    n += str_len(5, &span.name);
    n += 1 + varint_len(kind(span.kind)); // kind = 6
    n += if span.start_unix_nano != 0 { 1 + 8 } else { 0 }; // start = 7
    n += if span.end_unix_nano != 0 { 1 + 8 } else { 0 }; // end = 8
    n += attributes_len(9, &span.attributes);
    n += field_len(15, status_len(&span.status));
    if span.flags != 0 {
        n += 2 + 4; // flags = 16, fixed32: a two-byte key
    }
    n
}

fn write_span(out: &mut Vec<u8>, span: &Span) {
    write_bytes(out, 1, &span.trace_id);
    write_bytes(out, 2, &span.span_id);
    write_str(out, 3, &span.trace_state);
    if let Some(parent) = &span.parent_span_id {
        write_bytes(out, 4, parent);
    }
    write_str(out, 5, &span.name);
    key(out, 6, VARINT);
    varint(out, kind(span.kind));
    if span.start_unix_nano != 0 {
        key(out, 7, FIXED64);
        out.extend_from_slice(&span.start_unix_nano.to_le_bytes());
    }
    if span.end_unix_nano != 0 {
        key(out, 8, FIXED64);
        out.extend_from_slice(&span.end_unix_nano.to_le_bytes());
    }
    write_attributes(out, 9, &span.attributes);
    tag_len(out, 15, status_len(&span.status));
    let (code, message) = status(&span.status);
    write_str(out, 2, message);
    if code != 0 {
        key(out, 3, VARINT);
        varint(out, code);
    }
    if span.flags != 0 {
        key(out, 16, FIXED32);
        out.extend_from_slice(&u32::from(span.flags).to_le_bytes());
    }
}

fn kind(kind: SpanKind) -> u64 {
    match kind {
        SpanKind::Server => KIND_SERVER,
        SpanKind::Client => KIND_CLIENT,
    }
}

fn status(status: &Status) -> (u64, &str) {
    match status {
        Status::Unset => (0, ""),
        Status::Ok => (STATUS_OK, ""),
        Status::Error { message } => (STATUS_ERROR, message),
    }
}

fn status_len(s: &Status) -> usize {
    let (code, message) = status(s);
    str_len(2, message) + if code != 0 { 1 + varint_len(code) } else { 0 }
}

/// Every attribute as a repeated `KeyValue` field `field`.
fn attributes_len(field: u32, attributes: &Attributes) -> usize {
    attributes.0.iter().map(|(k, v)| field_len(field, key_value_len(k, v))).sum()
}

fn write_attributes(out: &mut Vec<u8>, field: u32, attributes: &Attributes) {
    for (k, v) in &attributes.0 {
        tag_len(out, field, key_value_len(k, v));
        write_str(out, 1, k);
        tag_len(out, 2, any_value_len(v));
        match v {
            // A oneof member is written even when it holds its type's default.
            Value::Str(s) => {
                tag_len(out, 1, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Bool(b) => {
                key(out, 2, VARINT);
                out.push(u8::from(*b));
            }
            Value::Int(i) => {
                key(out, 3, VARINT);
                varint(out, *i as u64);
            }
            Value::Double(d) => {
                key(out, 4, FIXED64);
                out.extend_from_slice(&d.to_le_bytes());
            }
        }
    }
}

/// KeyValue { key = 1, value = 2 (AnyValue, always present) }.
fn key_value_len(k: &str, v: &Value) -> usize {
    str_len(1, k) + field_len(2, any_value_len(v))
}

fn any_value_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => field_len(1, s.len()),
        Value::Bool(_) => 2,
        Value::Int(i) => 1 + varint_len(*i as u64),
        Value::Double(_) => 1 + 8,
    }
}

/// A string field, left out when empty (proto3 default).
fn str_len(field: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { field_len(field, s.len()) }
}

fn write_str(out: &mut Vec<u8>, field: u32, s: &str) {
    write_bytes(out, field, s.as_bytes());
}

fn write_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    if !b.is_empty() {
        tag_len(out, field, b.len());
        out.extend_from_slice(b);
    }
}

/// Size of a length-delimited field with a `len`-byte body.
fn field_len(field: u32, len: usize) -> usize {
    varint_len(u64::from(field << 3)) + varint_len(len as u64) + len
}

fn tag_len(out: &mut Vec<u8>, field: u32, len: usize) {
    key(out, field, LEN);
    varint(out, len as u64);
}

fn key(out: &mut Vec<u8>, field: u32, wire_type: u32) {
    varint(out, u64::from((field << 3) | wire_type));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // 1 byte per started group of 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::{export::otlp::encode, model::Attributes};

    fn resource(name: &str, pid: i64) -> Arc<Resource> {
        let mut attributes = Attributes::default();
        attributes.push("service.name", name);
        attributes.push("process.pid", pid);
        attributes.push("host.name", "");
        Arc::new(Resource { service_name: name.to_owned(), attributes })
    }

    fn span(resource: &Arc<Resource>, i: u64) -> Span {
        let mut a = Attributes::default();
        a.push("http.request.method", "GET");
        a.push("url.path", "/a/".repeat(i as usize % 60));
        a.push("http.response.status_code", [200i64, 0, -1, i64::MIN, i64::MAX][i as usize % 5]);
        a.push("network.peer.tls", i.is_multiple_of(2));
        a.0.push(("ratio".into(), Value::Double([0.25, 0.0, -1.5][i as usize % 3])));
        a.push("", "empty key");
        a.push("empty value", "");
        Span {
            resource: resource.clone(),
            trace_id: [i as u8; 16],
            span_id: [(i as u8).wrapping_add(1); 8],
            parent_span_id: (!i.is_multiple_of(3)).then_some([7; 8]),
            trace_state: if i.is_multiple_of(4) { String::new() } else { "vendor=x".into() },
            flags: (i % 2) as u8,
            name: if i.is_multiple_of(5) { String::new() } else { format!("GET /{i}") },
            kind: if i.is_multiple_of(2) { SpanKind::Server } else { SpanKind::Client },
            start_unix_nano: if i.is_multiple_of(7) { 0 } else { 1_700_000_000_000_000_000 + i },
            end_unix_nano: if i.is_multiple_of(11) { 0 } else { 1_700_000_000_000_000_500 + i * 1_000 },
            attributes: a,
            status: match i % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::Error { message: if i.is_multiple_of(2) { String::new() } else { "no response".into() } },
            },
        }
    }

    fn wire(spans: &[Span]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(spans, &mut out);
        out
    }

    #[test]
    fn same_bytes_as_prost() {
        let (a, b, a_copy) = (resource("a", 42), resource("b", 300_000), resource("a", 42));
        assert_eq!(wire(&[]), encode::encode_request(&[]).encode_to_vec());
        for n in [1usize, 2, 3, 17, 200] {
            let spans: Vec<Span> = (0..n as u64)
                .map(|i| span([&a, &b, &a_copy][i as usize % 3], i))
                .collect();
            assert_eq!(wire(&spans), encode::encode_request(&spans).encode_to_vec(), "{n} spans");
        }
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }
}
