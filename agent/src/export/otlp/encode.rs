//! `tapwire::model::Span` -> OTLP `ExportTraceServiceRequest`.

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource as ProtoResource,
    trace::v1::{ResourceSpans, ScopeSpans, Span as ProtoSpan, Status as ProtoStatus, span::SpanKind as ProtoKind, status::StatusCode},
};

use crate::model::{Attributes, Resource, Span, SpanKind, Status, Value};

/// Instrumentation scope name on every span.
pub const SCOPE_NAME: &str = "tapwire";
/// Instrumentation scope version: the agent's version.
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One request for a batch: one `ResourceSpans` per distinct resource (by value, in order of
/// first appearance), each with a single `tapwire` scope.
pub fn encode_request(spans: &[Span]) -> ExportTraceServiceRequest {
    // Batches are small (<= 512) and resources few, so a linear scan beats hashing floats.
    let mut groups: Vec<(&Arc<Resource>, Vec<ProtoSpan>)> = Vec::new();
    for span in spans {
        let proto = encode_span(span);
        match groups
            .iter_mut()
            .find(|(r, _)| Arc::ptr_eq(r, &span.resource) || ***r == *span.resource)
        {
            Some((_, list)) => list.push(proto),
            None => groups.push((&span.resource, vec![proto])),
        }
    }
    let resource_spans = groups
        .into_iter()
        .map(|(resource, spans)| ResourceSpans {
            resource: Some(ProtoResource {
                attributes: encode_attributes(&resource.attributes),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.to_owned(),
                    version: SCOPE_VERSION.to_owned(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

/// One span. The parent id is empty for a root span, as OTLP requires.
pub fn encode_span(span: &Span) -> ProtoSpan {
    ProtoSpan {
        trace_id: span.trace_id.to_vec(),
        span_id: span.span_id.to_vec(),
        trace_state: span.trace_state.clone(),
        parent_span_id: span.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        // W3C trace flags in the low 8 bits (SPAN_FLAGS_TRACE_FLAGS_MASK).
        flags: u32::from(span.flags),
        name: span.name.clone(),
        kind: match span.kind {
            SpanKind::Server => ProtoKind::Server,
            SpanKind::Client => ProtoKind::Client,
        } as i32,
        start_time_unix_nano: span.start_unix_nano,
        end_time_unix_nano: span.end_unix_nano,
        attributes: encode_attributes(&span.attributes),
        status: Some(match &span.status {
            Status::Unset => ProtoStatus {
                message: String::new(),
                code: StatusCode::Unset as i32,
            },
            Status::Ok => ProtoStatus {
                message: String::new(),
                code: StatusCode::Ok as i32,
            },
            Status::Error { message } => ProtoStatus {
                message: message.clone(),
                code: StatusCode::Error as i32,
            },
        }),
        ..Default::default()
    }
}

/// Attributes in their original order.
pub fn encode_attributes(attributes: &Attributes) -> Vec<KeyValue> {
    attributes
        .0
        .iter()
        .map(|(key, value)| KeyValue {
            key: key.to_string(),
            value: Some(encode_value(value)),
            ..Default::default()
        })
        .collect()
}

/// `model::Value` -> `AnyValue`.
pub fn encode_value(value: &Value) -> AnyValue {
    let v = match value {
        Value::Str(s) => any_value::Value::StringValue(s.to_string()),
        Value::Int(i) => any_value::Value::IntValue(*i),
        Value::Double(d) => any_value::Value::DoubleValue(*d),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
    };
    AnyValue { value: Some(v) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Attributes;

    fn resource(name: &str) -> Arc<Resource> {
        let mut attributes = Attributes::default();
        attributes.push("service.name", name);
        attributes.push("process.pid", 42i64);
        Arc::new(Resource {
            service_name: name.to_owned(),
            attributes,
        })
    }

    fn span(resource: &Arc<Resource>, id: u8, parent: Option<u8>, status: Status) -> Span {
        let mut attributes = Attributes::default();
        attributes.push("http.request.method", "GET");
        attributes.push("http.response.status_code", 503i64);
        attributes.push("network.peer.tls", false);
        attributes.0.push(("ratio".into(), Value::Double(0.25)));
        Span {
            resource: resource.clone(),
            trace_id: [0xab; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            trace_state: "vendor=x".to_owned(),
            flags: 0x01,
            name: format!("GET /{id}"),
            kind: if parent.is_some() { SpanKind::Client } else { SpanKind::Server },
            start_unix_nano: 1_000,
            end_unix_nano: 2_500,
            attributes,
            status,
        }
    }

    #[test]
    fn groups_by_resource_value_in_order() {
        let a = resource("a");
        let a_copy = Arc::new((*a).clone()); // equal value, different allocation
        let b = resource("b");
        let spans = vec![
            span(&a, 1, None, Status::Unset),
            span(&b, 2, None, Status::Unset),
            span(&a_copy, 3, None, Status::Unset),
        ];
        let req = encode_request(&spans);
        assert_eq!(req.resource_spans.len(), 2);
        let names: Vec<Vec<u8>> = req
            .resource_spans
            .iter()
            .map(|rs| rs.scope_spans[0].spans.iter().map(|s| s.span_id[0]).collect())
            .collect();
        assert_eq!(names, vec![vec![1, 3], vec![2]]);
        let res = req.resource_spans[1].resource.as_ref().unwrap();
        assert_eq!(res.attributes[0].key, "service.name");
        assert_eq!(
            res.attributes[0].value,
            Some(AnyValue {
                value: Some(any_value::Value::StringValue("b".into()))
            })
        );
        assert_eq!(
            res.attributes[1].value,
            Some(AnyValue {
                value: Some(any_value::Value::IntValue(42))
            })
        );
        for rs in &req.resource_spans {
            assert_eq!(rs.scope_spans.len(), 1);
            let scope = rs.scope_spans[0].scope.as_ref().unwrap();
            assert_eq!(
                (scope.name.as_str(), scope.version.as_str()),
                ("tapwire", env!("CARGO_PKG_VERSION"))
            );
        }
        assert!(encode_request(&[]).resource_spans.is_empty());
    }

    #[test]
    fn maps_ids_parent_kind_status_and_attributes() {
        let r = resource("svc");
        let root = encode_span(&span(&r, 7, None, Status::Ok));
        assert_eq!(root.trace_id, vec![0xab; 16]);
        assert_eq!(root.span_id, vec![7; 8]);
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.kind, ProtoKind::Server as i32);
        assert_eq!(
            root.status,
            Some(ProtoStatus {
                message: String::new(),
                code: StatusCode::Ok as i32
            })
        );
        assert_eq!((root.start_time_unix_nano, root.end_time_unix_nano), (1_000, 2_500));
        assert_eq!(root.trace_state, "vendor=x");
        assert_eq!(root.flags, 1);
        assert_eq!(root.name, "GET /7");

        let child = encode_span(&span(
            &r,
            8,
            Some(7),
            Status::Error {
                message: "HTTP 503".into(),
            },
        ));
        assert_eq!(child.parent_span_id, vec![7; 8]);
        assert_eq!(child.kind, ProtoKind::Client as i32);
        assert_eq!(
            child.status,
            Some(ProtoStatus {
                message: "HTTP 503".into(),
                code: StatusCode::Error as i32
            })
        );
        let values: Vec<(&str, Option<any_value::Value>)> = child
            .attributes
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.clone().and_then(|v| v.value)))
            .collect();
        assert_eq!(
            values,
            vec![
                ("http.request.method", Some(any_value::Value::StringValue("GET".into()))),
                ("http.response.status_code", Some(any_value::Value::IntValue(503))),
                ("network.peer.tls", Some(any_value::Value::BoolValue(false))),
                ("ratio", Some(any_value::Value::DoubleValue(0.25))),
            ]
        );
        let unset = encode_span(&span(&r, 9, None, Status::Unset));
        assert_eq!(unset.status.unwrap().code, StatusCode::Unset as i32);
    }
}
