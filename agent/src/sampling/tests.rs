use std::sync::Arc;

use super::*;
use crate::model::{Attributes, Resource, SpanKind, Status, Value};

/// A trace id whose randomness (low 56 bits) is `r`.
fn trace_with(r: u64) -> [u8; 16] {
    let mut t = [0x5au8; 16];
    t[9..].copy_from_slice(&r.to_be_bytes()[1..]);
    t
}

fn span(trace_id: [u8; 16], parent: Option<u8>, kind: SpanKind, duration_ns: u64, status: Status) -> Span {
    let mut attributes = Attributes::default();
    attributes.push("http.route", "/items/{id}");
    Span {
        resource: Arc::new(Resource { service_name: "shop".into(), attributes: Attributes::default() }),
        trace_id,
        span_id: [7; 8],
        parent_span_id: parent.map(|_| [9; 8]),
        trace_state: String::new(),
        flags: parent.unwrap_or(1),
        name: "GET /items/{id}".into(),
        kind,
        start_unix_nano: 1_000_000,
        end_unix_nano: 1_000_000 + duration_ns,
        attributes,
        status,
    }
}

fn sampler(head: HeadSampler, keep_errors: bool, keep_slower_than: Vec<LatencyRule>) -> (Sampler, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let config = SamplingConfig { head, per_service: Vec::new(), keep_errors, keep_slower_than };
    (Sampler::new(config, counters.clone()), counters)
}

fn counts(c: &Counters) -> (u64, u64, u64) {
    (Counters::get(&c.spans_sampled_out), Counters::get(&c.spans_kept_error), Counters::get(&c.spans_kept_latency))
}

const HALF: HeadSampler = HeadSampler { root: Root::Ratio { ratio: 0.5, threshold: 1 << 55 }, parent_based: true };

#[test]
fn head_sampled_spans_pass_unchanged_with_the_flag_set() {
    let (s, c) = sampler(HALF, true, Vec::new());
    let kept = trace_with(1 << 55);
    let out = s.apply(span(kept, None, SpanKind::Server, 10, Status::Unset)).unwrap();
    assert_eq!(out.flags, 1);
    assert_eq!(out.attributes.get(KEPT_BY_ATTRIBUTE), None);
    // Head-sampled errors are not marked: the rule did not decide.
    let out = s.apply(span(kept, None, SpanKind::Server, 10, Status::Error { message: String::new() })).unwrap();
    assert_eq!(out.attributes.get(KEPT_BY_ATTRIBUTE), None);
    // A not-sampled parent flag is kept for other bits; bit 0 becomes the decision.
    let always = HeadSampler { root: Root::Always, parent_based: false };
    let (s2, _) = sampler(always, true, Vec::new());
    assert_eq!(s2.apply(span(kept, Some(0x80), SpanKind::Server, 10, Status::Unset)).unwrap().flags, 0x81);
    assert_eq!(counts(&c), (0, 0, 0));
}

#[test]
fn dropped_spans_are_counted() {
    let (s, c) = sampler(HALF, true, Vec::new());
    let dropped = trace_with((1 << 55) - 1);
    assert!(s.apply(span(dropped, None, SpanKind::Server, 10, Status::Unset)).is_none());
    assert!(s.apply(span(dropped, None, SpanKind::Client, 10, Status::Ok)).is_none());
    assert_eq!(counts(&c), (2, 0, 0));
}

#[test]
fn errors_and_slow_spans_are_kept_and_marked() {
    let rules = vec![LatencyRule { service: Some("shop".into()), route: Some("/items/{id}".into()), threshold_ns: 1_000 }];
    let off = HeadSampler { root: Root::Never, parent_based: false };
    let (s, c) = sampler(off, true, rules.clone());
    let t = trace_with(123);
    let err = s.apply(span(t, None, SpanKind::Server, 10, Status::Error { message: String::new() })).unwrap();
    assert_eq!(err.attributes.get(KEPT_BY_ATTRIBUTE), Some(&Value::Str("error".into())));
    assert_eq!(err.flags & 1, 0, "the trace was not sampled");
    let slow = s.apply(span(t, None, SpanKind::Server, 1_001, Status::Unset)).unwrap();
    assert_eq!(slow.attributes.get(KEPT_BY_ATTRIBUTE), Some(&Value::Str("latency".into())));
    assert!(s.apply(span(t, None, SpanKind::Server, 1_000, Status::Unset)).is_none());
    assert_eq!(counts(&c), (1, 1, 1));

    let (no_errors, c) = sampler(off, false, rules);
    assert!(no_errors.apply(span(t, None, SpanKind::Server, 10, Status::Error { message: String::new() })).is_none());
    assert_eq!(counts(&c), (1, 0, 0));
}

/// Every span of a trace gets the same decision: the root by ratio, remote and local children
/// by the flag their parent carries, whatever order they end in.
#[test]
fn one_decision_per_trace() {
    for head in [HALF, HeadSampler { parent_based: false, ..HALF }] {
        let (s, _) = sampler(head, false, Vec::new());
        for r in [0, (1 << 55) - 1, 1 << 55, (1 << 56) - 1] {
            let t = trace_with(r);
            let root = span(t, None, SpanKind::Server, 10, Status::Unset);
            let decision = s.head_decision(&root);
            assert_eq!(decision, r >= 1 << 55);
            // The local CLIENT child carries the root's decision, and so does the header sent
            // downstream, where the next service's SERVER span is a remote child.
            let flag = u8::from(decision);
            let client = span(t, Some(flag), SpanKind::Client, 5, Status::Unset);
            let downstream = span(t, Some(flag), SpanKind::Server, 3, Status::Unset);
            assert_eq!(s.apply(downstream).is_some(), decision);
            assert_eq!(s.apply(client).is_some(), decision);
            assert_eq!(s.apply(root).map(|x| x.flags), decision.then_some(1));
        }
    }
}

#[test]
fn parent_based_honours_the_incoming_flag() {
    let (s, c) = sampler(HALF, false, Vec::new());
    let drop_by_ratio = trace_with(0);
    assert!(s.apply(span(drop_by_ratio, Some(1), SpanKind::Server, 10, Status::Unset)).is_some());
    assert!(s.apply(span(trace_with((1 << 56) - 1), Some(0), SpanKind::Server, 10, Status::Unset)).is_none());
    assert_eq!(counts(&c), (1, 0, 0));
    let pb_off = HeadSampler { root: Root::Never, parent_based: true };
    let (s, _) = sampler(pb_off, false, Vec::new());
    assert!(s.apply(span(drop_by_ratio, Some(1), SpanKind::Server, 10, Status::Unset)).is_some());
    assert!(s.apply(span(drop_by_ratio, None, SpanKind::Server, 10, Status::Unset)).is_none());
}

#[test]
fn per_service_overrides() {
    let counters = Arc::new(Counters::default());
    let config = SamplingConfig {
        head: HeadSampler { root: Root::Never, parent_based: false },
        per_service: vec![("shop".into(), HeadSampler { root: Root::Always, parent_based: false })],
        keep_errors: false,
        keep_slower_than: Vec::new(),
    };
    let s = Sampler::new(config, counters);
    assert!(s.apply(span(trace_with(1), None, SpanKind::Server, 1, Status::Unset)).is_some());
    let mut other = span(trace_with(1), None, SpanKind::Server, 1, Status::Unset);
    other.resource = Arc::new(Resource { service_name: "cart".into(), attributes: Attributes::default() });
    assert!(s.apply(other).is_none());
    assert_eq!(s.kernel_params(), (0, 0, 0));
}
