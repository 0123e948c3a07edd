//! The Prometheus exposition: golden text, escaping, name mapping, promtool, and the endpoint.

use std::{io::Read as _, io::Write as _, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

use super::{PrometheusServer, PrometheusState, render, text::CONTENT_TYPE};
use crate::{
    export::metrics::test_support::{resource, sample_snapshot},
    metrics::{
        agent::{AgentGauge, agent_metrics, agent_resource_for},
        model::{Data, Metric, Number, NumberPoint, ResourceMetrics, Snapshot},
        red::{RedConfig, RedMetrics},
    },
    model::{Attributes, Span, SpanKind, Status, Value},
    telemetry::Counters,
};

const GOLDEN: &str = r#"# HELP target_info Target metadata
# TYPE target_info gauge
target_info{job="shop",instance="node-1:4",process_pid="42"} 1
target_info{job="tapwire",instance="node-1:7"} 1
# HELP http_server_request_duration_seconds Duration of HTTP server requests.
# TYPE http_server_request_duration_seconds histogram
http_server_request_duration_seconds_bucket{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="200",le="0.005"} 1
http_server_request_duration_seconds_bucket{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="200",le="0.1"} 2
http_server_request_duration_seconds_bucket{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="200",le="1"} 3
http_server_request_duration_seconds_bucket{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="200",le="+Inf"} 3
http_server_request_duration_seconds_sum{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="200"} 0.125
http_server_request_duration_seconds_count{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="200"} 3
# HELP http_server_active_requests Number of active HTTP server requests.
# TYPE http_server_active_requests gauge
http_server_active_requests{job="shop",instance="node-1:4",http_request_method="GET"} 2
http_server_active_requests{job="shop",instance="node-1:4",http_request_method="POST"} 0
# HELP process_cpu_utilization_ratio CPU use.
# TYPE process_cpu_utilization_ratio gauge
process_cpu_utilization_ratio{job="shop",instance="node-1:4"} 0.25
# HELP tapwire_agent_events_read_total Ring-buffer events decoded by the agent.
# TYPE tapwire_agent_events_read_total counter
tapwire_agent_events_read_total{job="tapwire",instance="node-1:7"} 1234
# HELP tapwire_agent_spans_total Spans by state.
# TYPE tapwire_agent_spans_total counter
tapwire_agent_spans_total{job="tapwire",instance="node-1:7",state="created"} 7
"#;

#[test]
fn golden_exposition() {
    assert_eq!(render(&sample_snapshot()), GOLDEN);
    assert_eq!(render(&Vec::new()), "", "nothing to expose before the first snapshot");
}

fn gauge(name: &str, unit: &str, description: &str, points: Vec<NumberPoint>) -> Metric {
    Metric {
        name: name.into(),
        description: description.into(),
        unit: unit.into(),
        data: Data::Gauge { points },
    }
}

fn point(pairs: &[(&str, Value)], value: Number) -> NumberPoint {
    NumberPoint {
        attributes: Attributes(pairs.iter().map(|(k, v)| ((*k).to_owned().into(), v.clone())).collect()),
        start_unix_nano: 0,
        time_unix_nano: 1,
        value,
    }
}

#[test]
fn labels_are_escaped_sanitised_and_merged() {
    let r = resource(
        "cart",
        &[
            ("service.namespace", Value::Str("prod".into())),
            ("k8s.pod.name", Value::Str("cart-7d9\"x\"".into())),
            ("2fa", Value::Bool(true)),
        ],
    );
    let metric = gauge(
        "queue.depth",
        "{item}",
        "Items\nwaiting \\ queued.",
        vec![point(
            &[
                ("path.kind", Value::Str("a\\b".into())),
                ("path_kind", Value::Str("line1\nline2".into())),
                ("job", Value::Str("ignored".into())),
                ("le", Value::Str("ignored".into())),
                ("ratio", Value::Double(0.5)),
            ],
            Number::Double(1.5),
        )],
    );
    let text = render(&vec![ResourceMetrics {
        resource: r,
        metrics: vec![metric],
    }]);
    let expected = r#"# HELP target_info Target metadata
# TYPE target_info gauge
target_info{job="prod/cart",instance="node-1:4",k8s_pod_name="cart-7d9\"x\"",key_2fa="true"} 1
# HELP queue_depth Items\nwaiting \\ queued.
# TYPE queue_depth gauge
queue_depth{job="prod/cart",instance="node-1:4",path_kind="a\\b;line1\nline2",ratio="0.5"} 1.5
"#;
    // Colliding keys: values joined with ';' in the order of the original keys ("path.kind" < "path_kind").
    assert_eq!(text, expected);
}

#[test]
fn conflicting_types_and_duplicate_series_are_left_out() {
    let a = resource("a", &[]);
    let b = resource("b", &[]);
    let counter = |name: &str| Metric {
        name: name.into(),
        description: "Things.".into(),
        unit: "{thing}".into(),
        data: Data::Sum {
            monotonic: true,
            points: vec![point(&[], Number::Int(3)), point(&[], Number::Int(4))],
        },
    };
    let snapshot: Snapshot = vec![
        ResourceMetrics {
            resource: a.clone(),
            metrics: vec![counter("things"), gauge("things.total", "", "Clash.", vec![point(&[], Number::Int(9))])],
        },
        ResourceMetrics {
            resource: b,
            metrics: vec![counter("things")],
        },
    ];
    let text = render(&snapshot);
    let expected = r#"# HELP target_info Target metadata
# TYPE target_info gauge
target_info{job="a",instance="node-1:1"} 1
target_info{job="b",instance="node-1:1"} 1
# HELP things_total Things.
# TYPE things_total counter
things_total{job="a",instance="node-1:1"} 3
things_total{job="b",instance="node-1:1"} 3
"#;
    assert_eq!(text, expected);
}

/// Spans like the correlator's, through RedMetrics, plus the agent's own metrics.
fn realistic_snapshot() -> Snapshot {
    let counters = Arc::new(Counters::default());
    let mut red = RedMetrics::new(RedConfig::default(), counters.clone());
    let shop = resource("shop", &[("process.pid", Value::Int(42)), ("host.name", Value::Str("node-1".into()))]);
    let t0 = 1_700_000_000_000_000_000u64;
    for (i, (kind, status, ms)) in [
        (SpanKind::Server, 200, 3),
        (SpanKind::Server, 200, 120),
        (SpanKind::Server, 404, 1),
        (SpanKind::Server, 503, 2500),
        (SpanKind::Client, 200, 40),
        (SpanKind::Client, 500, 11_000),
    ]
    .into_iter()
    .enumerate()
    {
        let mut a = Attributes::default();
        a.push("http.request.method", "GET");
        a.push("url.path", "/orders/17");
        a.push("url.scheme", "http");
        a.push("http.route", "/orders/{id}");
        a.push("http.response.status_code", i64::from(status));
        a.push("network.protocol.version", "1.1");
        a.push("server.address", "payments \"eu\"");
        a.push("server.port", 8443i64);
        a.push("http.request.body.size", 10i64 * i as i64);
        a.push("http.response.body.size", 999i64);
        if status >= 500 {
            a.push("error.type", status.to_string());
        }
        let end = t0 + i as u64;
        red.record(&Span {
            resource: shop.clone(),
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: String::new(),
            flags: 1,
            name: "GET /orders/{id}".into(),
            kind,
            start_unix_nano: end - ms * 1_000_000,
            end_unix_nano: end,
            attributes: a,
            status: Status::Unset,
        });
    }
    red.set_active_requests(&shop, &[("GET".into(), "http".into(), 2)]);
    let mut snapshot = red.snapshot(t0 + 1_000_000_000);
    let agent = agent_resource_for("node-1", 7);
    snapshot.push(agent_metrics(
        &counters,
        &agent,
        t0,
        t0 + 1_000_000_000,
        &[AgentGauge::export_queue_size(12), AgentGauge::metric_series(red.series_count())],
    ));
    snapshot
}

#[test]
fn realistic_exposition_has_the_expected_families() {
    let text = render(&realistic_snapshot());
    for line in [
        "# TYPE http_server_request_duration_seconds histogram",
        "# TYPE http_server_request_body_size_bytes histogram",
        "# TYPE http_server_response_body_size_bytes histogram",
        "# TYPE http_server_active_requests gauge",
        "# TYPE http_client_request_duration_seconds histogram",
        "# TYPE tapwire_agent_spans_total counter",
        "# TYPE tapwire_agent_parse_failures_total counter",
        "# TYPE tapwire_agent_export_queue_size gauge",
        r#"tapwire_agent_export_queue_size{job="tapwire",instance="node-1:7"} 12"#,
        r#"tapwire_agent_parse_failures_total{job="tapwire",instance="node-1:7",network_protocol_name="http"} 0"#,
        r#"http_server_active_requests{job="shop",instance="node-1:4",http_request_method="GET",url_scheme="http"} 2"#,
        r#"http_client_request_duration_seconds_bucket{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="500",http_route="/orders/{id}",url_scheme="http",error_type="500",network_protocol_version="1.1",server_address="payments \"eu\"",server_port="8443",le="10"} 0"#,
        r#"http_client_request_duration_seconds_bucket{job="shop",instance="node-1:4",http_request_method="GET",http_response_status_code="500",http_route="/orders/{id}",url_scheme="http",error_type="500",network_protocol_version="1.1",server_address="payments \"eu\"",server_port="8443",le="+Inf"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing line {line}\n{text}");
    }
    assert!(!text.contains("/orders/17"), "no raw path in metrics");
    assert_eq!(text.matches("# TYPE target_info gauge").count(), 1);
    assert_eq!(text.matches("target_info{").count(), 2, "shop (merged) and the agent");
}

/// `promtool check metrics` on a realistic exposition, when promtool is installed (the e2e
/// tests run it unconditionally).
#[test]
fn promtool_accepts_the_exposition() {
    let mut snapshot = realistic_snapshot();
    snapshot.extend(sample_snapshot());
    let text = render(&snapshot);
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool not installed: skipping the promtool check");
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}\n{text}");
}

async fn get(addr: std::net::SocketAddr, method: Method, path: &str, gzip: bool) -> (StatusCode, Vec<(String, String)>, Bytes) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(format!("http://{addr}{path}"));
    if gzip {
        req = req.header("accept-encoding", "deflate, gzip;q=1.0");
    }
    let response = client.request(req.body(Empty::new()).unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    (parts.status, headers, body.collect().await.unwrap().to_bytes())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn endpoint_serves_metrics_and_health() {
    let state = Arc::new(PrometheusState::new());
    let server = PrometheusServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let task = tokio::spawn(server.run(state.clone()));

    let (status, headers, body) = get(addr, Method::GET, "/metrics", false).await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b""[..]), "empty before the first update");
    assert_eq!(header(&headers, "content-type"), Some(CONTENT_TYPE));

    state.update(sample_snapshot());
    let (status, headers, body) = get(addr, Method::GET, "/metrics", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&headers, "content-encoding"), None);
    assert_eq!(std::str::from_utf8(&body).unwrap(), GOLDEN);

    let (status, headers, body) = get(addr, Method::GET, "/metrics", true).await;
    assert_eq!((status, header(&headers, "content-encoding")), (StatusCode::OK, Some("gzip")));
    let mut text = String::new();
    flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut text).unwrap();
    assert_eq!(text, GOLDEN);

    let (status, _, body) = get(addr, Method::GET, "/healthz", false).await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"ok"[..]));
    let (status, _, _) = get(addr, Method::GET, "/nope", false).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, headers, _) = get(addr, Method::POST, "/metrics", false).await;
    assert_eq!((status, header(&headers, "allow")), (StatusCode::METHOD_NOT_ALLOWED, Some("GET, HEAD")));

    task.abort();
    // A taken port is a clear error.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = PrometheusServer::bind(busy.local_addr().unwrap()).await.unwrap_err();
    assert!(err.to_string().starts_with("cannot listen on 127.0.0.1:"), "{err}");
}
