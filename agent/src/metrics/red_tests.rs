//! RedMetrics against hand-computed values: buckets, sums, attribute sets, limits, expiry.

use std::{sync::Arc, time::Duration};

use super::*;
use crate::model::Status;

const T0: u64 = 1_700_000_000_000_000_000;
const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

fn resource(name: &str) -> Arc<Resource> {
    let mut attributes = Attributes::default();
    attributes.push("service.name", name);
    attributes.push("service.instance.id", format!("host:{name}"));
    Arc::new(Resource {
        service_name: name.to_owned(),
        attributes,
    })
}

/// A server span ending at `end`, lasting `duration_ns`, with the attributes the correlator sets.
fn server(r: &Arc<Resource>, end: u64, duration_ns: u64, status: i64) -> Span {
    let mut a = Attributes::default();
    a.push("http.request.method", "GET");
    a.push("url.path", "/users/12345");
    a.push("url.scheme", "http");
    a.push("url.query", "REDACTED");
    a.push("http.response.status_code", status);
    a.push("server.address", "shop.local");
    a.push("server.port", 8080i64);
    a.push("client.address", "10.0.0.7");
    a.push("network.peer.address", "10.0.0.7");
    a.push("network.peer.port", 51234i64);
    a.push("network.protocol.version", "1.1");
    a.push("user_agent.original", "curl/8");
    a.push("http.request.body.size", 0i64);
    a.push("http.response.body.size", 1500i64);
    if status >= 500 {
        a.push("error.type", status.to_string());
    }
    span(r, SpanKind::Server, end, duration_ns, a)
}

fn client(r: &Arc<Resource>, end: u64, duration_ns: u64, status: i64, host: &str) -> Span {
    let mut a = Attributes::default();
    a.push("http.request.method", "POST");
    a.push("server.address", host);
    a.push("server.port", 80i64);
    a.push("url.full", format!("http://{host}/pay?REDACTED"));
    a.push("http.response.status_code", status);
    a.push("network.protocol.version", "1.1");
    a.push("http.request.body.size", 100i64);
    if status >= 400 {
        a.push("error.type", status.to_string());
    }
    span(r, SpanKind::Client, end, duration_ns, a)
}

fn span(r: &Arc<Resource>, kind: SpanKind, end: u64, duration_ns: u64, attributes: Attributes) -> Span {
    Span {
        resource: r.clone(),
        trace_id: [1; 16],
        span_id: [2; 8],
        parent_span_id: None,
        trace_state: String::new(),
        flags: 1,
        name: "GET".into(),
        kind,
        start_unix_nano: end - duration_ns,
        end_unix_nano: end,
        attributes,
        status: Status::Unset,
    }
}

fn red() -> RedMetrics {
    RedMetrics::new(RedConfig::default(), Arc::new(Counters::default()))
}

fn metric<'a>(rm: &'a ResourceMetrics, name: &str) -> &'a Metric {
    rm.metrics
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} missing; have {:?}", names(rm)))
}

fn names(rm: &ResourceMetrics) -> Vec<&str> {
    rm.metrics.iter().map(|m| m.name.as_str()).collect()
}

fn histograms(m: &Metric) -> &[HistogramPoint] {
    match &m.data {
        Data::Histogram { points } => points,
        other => panic!("{} is not a histogram: {other:?}", m.name),
    }
}

fn attrs(pairs: &[(&str, Value)]) -> Attributes {
    Attributes(pairs.iter().map(|(k, v)| ((*k).to_owned().into(), v.clone())).collect())
}

fn s(v: &str) -> Value {
    Value::from(v)
}

#[test]
fn buckets_boundaries_count_sum_min_max() {
    let r = resource("shop");
    let mut red = red();
    // (duration, expected bucket): a value equal to a bound falls in that bound's bucket.
    let cases = [
        (0, 0),
        (5 * MS, 0),
        (5 * MS + 1, 1),
        (10 * MS, 1),
        (100 * MS, 5),
        (250 * MS, 6),
        (S, 9),
        (10 * S, 13),
        (10 * S + 1, 14),
        (60 * S, 14),
    ];
    for (i, (d, _)) in cases.iter().enumerate() {
        red.record(&server(&r, T0 + i as u64, *d, 200));
    }
    let snap = red.snapshot(T0 + S);
    assert_eq!(snap.len(), 1);
    let p = &histograms(metric(&snap[0], "http.server.request.duration"))[0];
    let mut expected = vec![0u64; 15];
    for (_, b) in cases {
        expected[b] += 1;
    }
    assert_eq!(p.bucket_counts, expected);
    assert_eq!(p.bounds, DURATION_BOUNDS_S.to_vec());
    assert_eq!(p.count, 10);
    let sum: f64 = cases.iter().map(|(d, _)| *d as f64 / 1e9).sum();
    assert_eq!(p.sum, sum);
    assert_eq!((p.min, p.max), (Some(0.0), Some(60.0)));
    assert_eq!((p.start_unix_nano, p.time_unix_nano), (T0, T0 + S), "start = first measurement");
}

#[test]
fn server_attributes_are_picked_never_the_path() {
    let r = resource("shop");
    let mut red = red();
    let mut span = server(&r, T0, 20 * MS, 503);
    span.attributes.push("http.route", "/users/{id}");
    red.record(&span);
    let snap = red.snapshot(T0 + S);
    let rm = &snap[0];
    assert!(Arc::ptr_eq(&rm.resource, &r));
    assert_eq!(
        names(rm),
        [
            "http.server.request.duration",
            "http.server.request.body.size",
            "http.server.response.body.size"
        ]
    );
    let expected = attrs(&[
        ("http.request.method", s("GET")),
        ("http.response.status_code", Value::Int(503)),
        ("http.route", s("/users/{id}")),
        ("url.scheme", s("http")),
        ("error.type", s("503")),
        ("network.protocol.version", s("1.1")),
    ]);
    for m in &rm.metrics {
        assert_eq!(histograms(m)[0].attributes, expected, "{}", m.name);
    }
    let m = metric(rm, "http.server.request.duration");
    assert_eq!((m.unit.as_str(), m.description.as_str()), ("s", "Duration of HTTP server requests."));
    let body = metric(rm, "http.server.response.body.size");
    assert_eq!(body.unit, "By");
    let p = &histograms(body)[0];
    assert_eq!(p.bounds, SIZE_BOUNDS_BYTES.to_vec());
    // 1500 bytes: (1000, 10000] is bucket 3.
    assert_eq!(p.bucket_counts, vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!((p.count, p.sum, p.min, p.max), (1, 1500.0, Some(1500.0), Some(1500.0)));
    let req = &histograms(metric(rm, "http.server.request.body.size"))[0];
    assert_eq!(req.bucket_counts[0], 1, "0 bytes is in the first bucket (<= 0)");
}

#[test]
fn status_codes_and_error_type_split_series_as_given() {
    let r = resource("shop");
    let mut red = red();
    red.record(&server(&r, T0, MS, 200));
    red.record(&server(&r, T0 + 1, 2 * MS, 200));
    red.record(&server(&r, T0 + 2, 3 * MS, 404));
    red.record(&server(&r, T0 + 3, 4 * MS, 500));
    let snap = red.snapshot(T0 + S);
    let points = histograms(metric(&snap[0], "http.server.request.duration"));
    let summary: Vec<(Option<&Value>, Option<&Value>, u64)> = points
        .iter()
        .map(|p| {
            (
                p.attributes.get("http.response.status_code"),
                p.attributes.get("error.type"),
                p.count,
            )
        })
        .collect();
    // A 4xx is not a server error: no error.type unless the span carries one.
    assert_eq!(
        summary,
        [
            (Some(&Value::Int(200)), None, 2),
            (Some(&Value::Int(404)), None, 1),
            (Some(&Value::Int(500)), Some(&s("500")), 1),
        ]
    );
}

#[test]
fn client_spans_add_server_address_and_port() {
    let r = resource("checkout");
    let mut red = red();
    red.record(&client(&r, T0, 30 * MS, 200, "payments"));
    red.record(&client(&r, T0 + 1, 40 * MS, 429, "payments"));
    red.record(&client(&r, T0 + 2, 50 * MS, 200, "stock"));
    let snap = red.snapshot(T0 + S);
    let rm = &snap[0];
    assert_eq!(
        names(rm),
        ["http.client.request.duration", "http.client.request.body.size"],
        "no response body size on these spans: no metric"
    );
    let points = histograms(metric(rm, "http.client.request.duration"));
    assert_eq!(points.len(), 3);
    // Series are ordered by their attribute values: (200, payments), (200, stock), (429, payments).
    assert_eq!(
        points[2].attributes,
        attrs(&[
            ("http.request.method", s("POST")),
            ("http.response.status_code", Value::Int(429)),
            ("error.type", s("429")),
            ("network.protocol.version", s("1.1")),
            ("server.address", s("payments")),
            ("server.port", Value::Int(80)),
        ])
    );
    assert_eq!(points[1].attributes.get("server.address"), Some(&s("stock")));
    assert!(points.iter().all(|p| p.attributes.get("url.full").is_none()));
}

#[test]
fn resources_compare_by_value_and_keep_their_order() {
    let a = resource("a");
    let a_copy = Arc::new((*a).clone());
    let b = resource("b");
    let mut red = red();
    red.record(&server(&b, T0, MS, 200));
    red.record(&server(&a, T0, MS, 200));
    red.record(&server(&a_copy, T0, MS, 200));
    let snap = red.snapshot(T0 + S);
    let services: Vec<&str> = snap.iter().map(|rm| rm.resource.service_name.as_str()).collect();
    assert_eq!(services, ["b", "a"]);
    assert_eq!(histograms(metric(&snap[1], "http.server.request.duration"))[0].count, 2);
}

#[test]
fn string_status_codes_become_ints_and_odd_values_are_skipped() {
    let r = resource("shop");
    let mut red = red();
    let mut a = Attributes::default();
    a.push("http.request.method", "GET");
    a.push("http.response.status_code", "201");
    a.push("server.port", "not a port");
    a.push("http.request.body.size", -5i64);
    red.record(&span(&r, SpanKind::Client, T0, MS, a));
    let snap = red.snapshot(T0);
    let rm = &snap[0];
    assert_eq!(names(rm), ["http.client.request.duration"]);
    assert_eq!(
        histograms(&rm.metrics[0])[0].attributes,
        attrs(&[("http.request.method", s("GET")), ("http.response.status_code", Value::Int(201))])
    );
}

#[test]
fn cardinality_overflow_goes_to_one_counted_series() {
    let counters = Arc::new(Counters::default());
    let config = RedConfig {
        max_series_per_resource: 3,
        ..RedConfig::default()
    };
    let mut red = RedMetrics::new(config, counters.clone());
    let r = resource("shop");
    let other = resource("other");
    for (i, code) in [200, 201, 202, 203, 204, 200, 204].into_iter().enumerate() {
        red.record(&server(&r, T0 + i as u64, MS, code));
    }
    // The limit is per resource: another resource still gets its own series.
    red.record(&server(&other, T0, MS, 299));
    assert_eq!(Counters::get(&counters.metric_series_overflowed), 3);
    assert_eq!(red.series_count(), 4);
    let snap = red.snapshot(T0 + S);
    let points = histograms(metric(&snap[0], "http.server.request.duration"));
    let counts: Vec<(Attributes, u64)> = points.iter().map(|p| (p.attributes.clone(), p.count)).collect();
    let code = |c: i64| {
        attrs(&[
            ("http.request.method", s("GET")),
            ("http.response.status_code", Value::Int(c)),
            ("url.scheme", s("http")),
            ("network.protocol.version", s("1.1")),
        ])
    };
    assert_eq!(
        counts,
        [
            (code(200), 2),
            (code(201), 1),
            (code(202), 1),
            (attrs(&[("otel.metric.overflow", Value::Bool(true))]), 3),
        ]
    );
    assert_eq!(histograms(metric(&snap[1], "http.server.request.duration"))[0].count, 1);

    // Active-request sets share the limit: a full resource puts them in overflow too.
    red.set_active_requests(&r, &[("GET".into(), "http".into(), 4), ("PUT".into(), "http".into(), 1)]);
    assert_eq!(Counters::get(&counters.metric_series_overflowed), 5);
    let snap = red.snapshot(T0 + S);
    let Data::Sum { points, monotonic: false } = &metric(&snap[0], "http.server.active_requests").data else {
        panic!("active_requests is a non-monotonic sum");
    };
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].attributes, attrs(&[("otel.metric.overflow", Value::Bool(true))]));
    assert_eq!(points[0].value, Number::Int(5));
}

#[test]
fn idle_series_expire_and_empty_resources_disappear() {
    let idle = Duration::from_secs(600);
    let idle_ns = 600 * S;
    let mut red = red();
    let (a, b) = (resource("a"), resource("b"));
    red.record(&server(&a, T0, MS, 200));
    red.record(&server(&a, T0 + 10 * S, MS, 404));
    red.record(&server(&b, T0 + 5 * S, MS, 200));
    assert_eq!(RedConfig::default().idle_expiry, idle);

    let snap = red.snapshot(T0 + idle_ns - 1);
    assert_eq!(snap.len(), 2, "nothing is idle for 10 min yet");
    assert_eq!(histograms(&snap[0].metrics[0]).len(), 2);

    let snap = red.snapshot(T0 + idle_ns);
    assert_eq!(snap.len(), 2);
    let points = histograms(&snap[0].metrics[0]);
    assert_eq!(points.len(), 1, "the 200 series of a was idle for exactly 10 min");
    assert_eq!(points[0].attributes.get("http.response.status_code"), Some(&Value::Int(404)));

    let snap = red.snapshot(T0 + 5 * S + idle_ns);
    assert_eq!(snap.len(), 1, "b had no series left");
    assert_eq!(snap[0].resource.service_name, "a");
    assert!(red.snapshot(T0 + 10 * S + idle_ns).is_empty(), "everything expired");

    // A fresh measurement starts a new cumulative series.
    red.record(&server(&a, T0 + 2 * idle_ns, 7 * MS, 200));
    let snap = red.snapshot(T0 + 2 * idle_ns + S);
    let p = &histograms(&snap[0].metrics[0])[0];
    assert_eq!((p.count, p.start_unix_nano), (1, T0 + 2 * idle_ns));
}

#[test]
fn active_requests_are_set_zeroed_and_expired() {
    let mut red = red();
    let r = resource("shop");
    red.set_active_requests(
        &r,
        &[
            ("GET".into(), "http".into(), 3),
            ("POST".into(), "http".into(), 1),
            ("GET".into(), "http".into(), 2),
        ],
    );
    let snap = red.snapshot(T0);
    let m = metric(&snap[0], "http.server.active_requests");
    assert_eq!((m.unit.as_str(), names(&snap[0])), ("{request}", vec!["http.server.active_requests"]));
    let Data::Sum { monotonic: false, points } = &m.data else {
        panic!("non-monotonic sum expected: {m:?}")
    };
    let values: Vec<(Attributes, Number, u64)> = points
        .iter()
        .map(|p| (p.attributes.clone(), p.value, p.start_unix_nano))
        .collect();
    let key = |method: &str| attrs(&[("http.request.method", s(method)), ("url.scheme", s("http"))]);
    assert_eq!(values, [(key("GET"), Number::Int(5), T0), (key("POST"), Number::Int(1), T0)]);

    // POST no longer reported: it reads 0, keeps its start time, and expires when idle.
    red.set_active_requests(&r, &[("GET".into(), "http".into(), 1)]);
    let snap = red.snapshot(T0 + S);
    let Data::Sum { points, .. } = &metric(&snap[0], "http.server.active_requests").data else { unreachable!() };
    let values: Vec<(Number, u64, u64)> = points
        .iter()
        .map(|p| (p.value, p.start_unix_nano, p.time_unix_nano))
        .collect();
    assert_eq!(values, [(Number::Int(1), T0, T0 + S), (Number::Int(0), T0, T0 + S)]);

    red.set_active_requests(&r, &[("GET".into(), "http".into(), 0)]);
    let snap = red.snapshot(T0 + 600 * S);
    let Data::Sum { points, .. } = &metric(&snap[0], "http.server.active_requests").data else { unreachable!() };
    assert_eq!(points.len(), 1, "POST was last set at T0: expired");
    assert_eq!(points[0].value, Number::Int(0));
}
