//! W3C Trace Context: the incoming `traceparent` decides the trace a span joins.

use rand::{Rng, RngCore};

use crate::capture::event::{KernelTrace, ParentSource, Role};

/// Ids and flags of a span about to be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub flags: u8,
    pub trace_state: String,
}

/// A valid `traceparent` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// Parses `00-<32 hex>-<16 hex>-<2 hex>`: version 00 only, lower-case hex, non-zero ids.
pub(crate) fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let b = value.trim_matches([' ', '\t']).as_bytes();
    if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let lower_hex = |s: &[u8]| s.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    let (trace, span, flags) = (&b[3..35], &b[36..52], &b[53..55]);
    if !lower_hex(trace) || !lower_hex(span) || !lower_hex(flags) {
        return None;
    }
    let mut tp = TraceParent { trace_id: [0; 16], span_id: [0; 8], flags: 0 };
    hex::decode_to_slice(trace, &mut tp.trace_id).ok()?;
    hex::decode_to_slice(span, &mut tp.span_id).ok()?;
    let mut f = [0u8; 1];
    hex::decode_to_slice(flags, &mut f).ok()?;
    tp.flags = f[0];
    if tp.trace_id == [0; 16] || tp.span_id == [0; 8] {
        return None;
    }
    Some(tp)
}

/// Ids of a span whose context the kernel decided (see ebpf-probes/src/context.rs): the kernel
/// drew them before the request went on, so they are the ones any injected `traceparent`
/// carries. Returns the ids and whether a `traceparent` was present but invalid.
///
/// A CLIENT request that carries the application's own `traceparent` was not injected; what
/// its span becomes depends on where that header came from. `server_parent` is what tapwire
/// knows of the server request the kernel found in flight on the sending thread or process:
/// `Some(parent)` with that request's own parent (`None` when it started the trace), `None`
/// when no such request is known.
/// - The application made a new span id in the trace of the request it serves (it has its own
///   tracing): the CLIENT span takes that id, so the downstream SERVER span, whose parent is
///   that id, nests under it; its parent is the server span in flight.
/// - The application passed on the header it received, unchanged: the CLIENT span keeps the
///   kernel's ids, under the server span in flight (the downstream SERVER span names the
///   caller's caller as parent, as the header says).
/// - Otherwise (no request in flight, or one of another trace): the CLIENT span joins the
///   header's trace as a child of the span it names, with the kernel's span id.
pub(crate) fn kernel_span_ids(
    k: &KernelTrace,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
    server_parent: Option<Option<[u8; 8]>>,
) -> (SpanIds, bool) {
    let state = || tracestate.unwrap_or_default().trim().to_owned();
    let parsed = traceparent.map(parse_traceparent);
    let invalid = matches!(parsed, Some(None));
    if k.side == Role::Client
        && let Some(Some(tp)) = parsed
    {
        let in_flight = k.parent_span_id.filter(|_| server_parent.is_some() && k.trace_id == tp.trace_id);
        let ids = match in_flight {
            Some(server) if server_parent != Some(Some(tp.span_id)) => SpanIds {
                trace_id: tp.trace_id,
                span_id: tp.span_id,
                parent_span_id: Some(server),
                flags: tp.flags,
                trace_state: state(),
            },
            Some(server) => SpanIds {
                trace_id: k.trace_id,
                span_id: k.span_id,
                parent_span_id: Some(server),
                flags: k.flags,
                trace_state: state(),
            },
            None => SpanIds {
                trace_id: tp.trace_id,
                span_id: k.span_id,
                parent_span_id: Some(tp.span_id),
                flags: tp.flags,
                trace_state: state(),
            },
        };
        return (ids, false);
    }
    let trace_state = if k.source == ParentSource::Header { state() } else { String::new() };
    (
        SpanIds { trace_id: k.trace_id, span_id: k.span_id, parent_span_id: k.parent_span_id, flags: k.flags, trace_state },
        invalid,
    )
}

/// A random non-zero id.
pub(crate) fn random_id<const N: usize>(rng: &mut impl RngCore) -> [u8; N] {
    loop {
        let id: [u8; N] = rng.random();
        if id != [0; N] {
            return id;
        }
    }
}

/// Ids for a new span: joins the incoming trace when `traceparent` is valid, otherwise starts
/// a sampled trace. Returns the ids and whether a `traceparent` was present but invalid.
pub(crate) fn span_ids(traceparent: Option<&str>, tracestate: Option<&str>, rng: &mut impl RngCore) -> (SpanIds, bool) {
    let parsed = traceparent.map(parse_traceparent);
    let span_id = random_id(rng);
    match parsed {
        Some(Some(tp)) => (
            SpanIds {
                trace_id: tp.trace_id,
                span_id,
                parent_span_id: Some(tp.span_id),
                flags: tp.flags,
                trace_state: tracestate.unwrap_or_default().trim().to_owned(),
            },
            false,
        ),
        other => (
            SpanIds { trace_id: random_id(rng), span_id, parent_span_id: None, flags: 1, trace_state: String::new() },
            matches!(other, Some(None)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::SmallRng};

    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_traceparent() {
        let tp = parse_traceparent(VALID).unwrap();
        assert_eq!(hex::encode(tp.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(tp.span_id), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().flags, 0);
    }

    #[test]
    fn invalid_traceparents() {
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    fn kernel(side: Role, source: ParentSource) -> KernelTrace {
        KernelTrace {
            side,
            trace_id: [0x11; 16],
            span_id: [0x22; 8],
            parent_span_id: Some([0x33; 8]),
            source,
            flags: 1,
            injected: false,
        }
    }

    #[test]
    fn kernel_ids_are_taken_as_they_are() {
        let (ids, invalid) = kernel_span_ids(&kernel(Role::Client, ParentSource::Thread), None, None, None);
        assert!(!invalid);
        assert_eq!((ids.trace_id, ids.span_id, ids.parent_span_id, ids.flags), ([0x11; 16], [0x22; 8], Some([0x33; 8]), 1));
        // SERVER span with an incoming header: its tracestate is kept.
        let (ids, _) = kernel_span_ids(&kernel(Role::Server, ParentSource::Header), Some(VALID), Some("congo=t61"), None);
        assert_eq!((ids.span_id, ids.trace_state.as_str()), ([0x22; 8], "congo=t61"));
    }

    #[test]
    fn application_traceparent_on_client_spans() {
        let tp = parse_traceparent(VALID).unwrap();
        let mut k = kernel(Role::Client, ParentSource::AppHeader);
        k.trace_id = tp.trace_id; // the server request in flight is in the header's trace
        let server = k.parent_span_id.unwrap();
        // A new span id made by the application: the client span is that span.
        for incoming in [None, Some([0x44; 8])] {
            let (ids, _) = kernel_span_ids(&k, Some(VALID), None, Some(incoming));
            assert_eq!((ids.trace_id, ids.span_id, ids.parent_span_id), (tp.trace_id, tp.span_id, Some(server)));
        }
        // The header the server request came with, passed on: the kernel's own span id.
        let (ids, _) = kernel_span_ids(&k, Some(VALID), None, Some(Some(tp.span_id)));
        assert_eq!((ids.trace_id, ids.span_id, ids.parent_span_id), (tp.trace_id, k.span_id, Some(server)));
        // Nothing known in flight, or a request of another trace: a child of the header's span.
        let other_trace = kernel(Role::Client, ParentSource::AppHeader);
        for (k, known) in [(&k, None), (&other_trace, Some(None))] {
            let (ids, _) = kernel_span_ids(k, Some(VALID), None, known);
            assert_eq!((ids.trace_id, ids.span_id, ids.parent_span_id), (tp.trace_id, k.span_id, Some(tp.span_id)));
        }
    }

    #[test]
    fn ids_join_or_start_a_trace() {
        let mut rng = SmallRng::seed_from_u64(1);
        let (ids, invalid) = span_ids(Some(VALID), Some("congo=t61rcWkgMzE"), &mut rng);
        assert!(!invalid);
        assert_eq!(hex::encode(ids.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ids.parent_span_id.map(hex::encode).as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(ids.trace_state, "congo=t61rcWkgMzE");
        assert_ne!(ids.span_id, [0; 8]);

        let (ids, invalid) = span_ids(Some("garbage"), Some("congo=x"), &mut rng);
        assert!(invalid);
        assert_eq!((ids.parent_span_id, ids.flags, ids.trace_state.as_str()), (None, 1, ""));
        assert_ne!(ids.trace_id, [0; 16]);

        let (a, invalid) = span_ids(None, None, &mut rng);
        let (b, _) = span_ids(None, None, &mut rng);
        assert!(!invalid);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
    }
}
