//! The OTLP exporter against in-process collectors: exact payloads, headers, compression,
//! retries and partial success.

use std::time::Duration;

use tokio::time::Instant;

use super::{OtlpExporter, encode::encode_request, retry::RetryPolicy};
use crate::export::{
    Delivery,
    config::{Compression, OtlpConfig, Protocol},
    test_support::{Collector, Reply, resource, span},
};
use crate::model::Span;

fn config(endpoint: String, protocol: Protocol, compression: Compression) -> OtlpConfig {
    OtlpConfig {
        endpoint,
        protocol,
        headers: vec![
            ("x-tenant".into(), "acme corp".into()),
            ("authorization".into(), "Bearer t0k=n".into()),
        ],
        timeout: Duration::from_secs(5),
        compression,
    }
}

fn fast_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..RetryPolicy::default()
    }
}

fn spans() -> Vec<Span> {
    let (a, b) = (resource("checkout"), resource("payments"));
    vec![span(&a, 1), span(&b, 2), span(&a, 3)]
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

fn all_accepted(n: usize) -> Delivery {
    Delivery {
        accepted: n,
        rejected: 0,
        message: None,
    }
}

#[tokio::test]
async fn http_protobuf_delivers_exact_spans() {
    let collector = Collector::http(vec![]).await;
    let cfg = config(
        format!("http://{}/v1/traces", collector.addr),
        Protocol::HttpProtobuf,
        Compression::None,
    );
    let mut exporter = OtlpExporter::new(&cfg).unwrap();
    let spans = spans();
    let (result, attempts) = exporter.export(&spans, deadline()).await;
    assert_eq!((result, attempts), (Ok(all_accepted(3)), 1));

    let received = collector.received();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.path, "/v1/traces");
    assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("x-tenant"), Some("acme corp"));
    assert_eq!(r.header("authorization"), Some("Bearer t0k=n"));
    assert_eq!(r.header("user-agent"), Some(super::USER_AGENT));
    assert_eq!(r.request, encode_request(&spans), "the collector decodes exactly the spans sent");
    // Spot-check the decoded payload against the model, independent of encode_request.
    assert_eq!(r.request.resource_spans.len(), 2);
    let first = &r.request.resource_spans[0].scope_spans[0].spans;
    assert_eq!(
        first.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["GET /items/1", "GET /items/3"]
    );
    assert_eq!(first[0].trace_id, spans[0].trace_id.to_vec());
    assert_eq!(first[0].parent_span_id, vec![0x77; 8]);
    assert_eq!(
        first[1].status.as_ref().map(|s| (s.code, s.message.as_str())),
        Some((2, "failure 3"))
    );
}

#[tokio::test]
async fn http_protobuf_gzip_body() {
    let collector = Collector::http(vec![]).await;
    let cfg = config(
        format!("http://{}/custom/path", collector.addr),
        Protocol::HttpProtobuf,
        Compression::Gzip,
    );
    let mut exporter = OtlpExporter::new(&cfg).unwrap();
    let r = resource("checkout");
    let spans: Vec<Span> = (0..50).map(|n| span(&r, n)).collect();
    assert_eq!(exporter.export(&spans, deadline()).await, (Ok(all_accepted(50)), 1));
    let received = collector.received();
    assert_eq!(received[0].path, "/custom/path");
    assert_eq!(received[0].header("content-encoding"), Some("gzip"));
    assert_eq!(received[0].request, encode_request(&spans));
    let raw = prost::Message::encoded_len(&received[0].request);
    assert!(
        received[0].wire_bytes * 3 < raw,
        "gzip shrinks the body: {} vs {raw}",
        received[0].wire_bytes
    );
}

#[tokio::test]
async fn grpc_gzip_delivers_exact_spans() {
    let collector = Collector::grpc(vec![]).await;
    let cfg = config(format!("http://{}", collector.addr), Protocol::Grpc, Compression::Gzip);
    let mut exporter = OtlpExporter::new(&cfg).unwrap();
    let spans = spans();
    assert_eq!(exporter.export(&spans, deadline()).await, (Ok(all_accepted(3)), 1));
    let received = collector.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].request, encode_request(&spans));
    assert_eq!(received[0].header("x-tenant"), Some("acme corp"));
    assert_eq!(
        received[0].header("grpc-encoding"),
        Some("gzip"),
        "headers seen: {:?}",
        received[0].headers
    );
    assert!(received[0].header("user-agent").is_some_and(|ua| ua.starts_with(super::USER_AGENT)));
}

#[tokio::test]
async fn grpc_without_compression() {
    let collector = Collector::grpc(vec![]).await;
    let cfg = config(format!("http://{}", collector.addr), Protocol::Grpc, Compression::None);
    let mut exporter = OtlpExporter::new(&cfg).unwrap();
    assert_eq!(exporter.export(&spans(), deadline()).await, (Ok(all_accepted(3)), 1));
    assert_eq!(collector.received()[0].header("grpc-encoding"), None);
}

#[tokio::test]
async fn http_503_twice_then_200_takes_three_attempts() {
    let collector = Collector::http(vec![Reply::Http(503, None), Reply::Http(503, Some("0")), Reply::Ok]).await;
    let cfg = config(
        format!("http://{}/v1/traces", collector.addr),
        Protocol::HttpProtobuf,
        Compression::None,
    );
    let mut exporter = OtlpExporter::new(&cfg).unwrap().with_policy(fast_policy(5));
    let spans = spans();
    assert_eq!(exporter.export(&spans, deadline()).await, (Ok(all_accepted(3)), 3));
    let received = collector.received();
    assert_eq!(received.len(), 3);
    assert!(
        received.iter().all(|r| r.request == encode_request(&spans)),
        "every attempt carries the same batch"
    );
}

#[tokio::test]
async fn http_retry_after_is_honoured() {
    let collector = Collector::http(vec![Reply::Http(429, Some("1"))]).await;
    let cfg = config(
        format!("http://{}/v1/traces", collector.addr),
        Protocol::HttpProtobuf,
        Compression::None,
    );
    let mut exporter = OtlpExporter::new(&cfg).unwrap().with_policy(fast_policy(5));
    let started = Instant::now();
    assert_eq!(exporter.export(&spans(), deadline()).await, (Ok(all_accepted(3)), 2));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_millis(3000),
        "waited {waited:?}"
    );
}

#[tokio::test]
async fn http_400_is_not_retried() {
    let collector = Collector::http(vec![Reply::Http(400, None)]).await;
    let cfg = config(
        format!("http://{}/v1/traces", collector.addr),
        Protocol::HttpProtobuf,
        Compression::None,
    );
    let mut exporter = OtlpExporter::new(&cfg).unwrap().with_policy(fast_policy(5));
    let (result, attempts) = exporter.export(&spans(), deadline()).await;
    let failure = result.expect_err("400 is final");
    assert_eq!(attempts, 1);
    assert_eq!(
        (failure.kind.as_str(), failure.retryable, failure.message.as_str()),
        ("http 400", false, "status 400")
    );
    assert_eq!(collector.received().len(), 1);
}

#[tokio::test]
async fn grpc_unavailable_is_retried_resource_exhausted_is_not() {
    let collector = Collector::grpc(vec![Reply::Grpc(tonic::Code::Unavailable), Reply::Ok]).await;
    let cfg = config(format!("http://{}", collector.addr), Protocol::Grpc, Compression::Gzip);
    let mut exporter = OtlpExporter::new(&cfg).unwrap().with_policy(fast_policy(5));
    assert_eq!(exporter.export(&spans(), deadline()).await, (Ok(all_accepted(3)), 2));

    let collector = Collector::grpc(vec![Reply::Grpc(tonic::Code::ResourceExhausted)]).await;
    let cfg = config(format!("http://{}", collector.addr), Protocol::Grpc, Compression::Gzip);
    let mut exporter = OtlpExporter::new(&cfg).unwrap().with_policy(fast_policy(5));
    let (result, attempts) = exporter.export(&spans(), deadline()).await;
    assert_eq!(attempts, 1);
    assert_eq!(result.expect_err("final").kind, "grpc resourceexhausted");
    assert_eq!(collector.received().len(), 1);
}

#[tokio::test]
async fn partial_success_reports_rejected_spans() {
    let http = Collector::http(vec![Reply::Partial(2, "bad ids")]).await;
    let cfg = config(format!("http://{}/v1/traces", http.addr), Protocol::HttpProtobuf, Compression::None);
    let expected = Delivery {
        accepted: 1,
        rejected: 2,
        message: Some("bad ids".into()),
    };
    assert_eq!(
        OtlpExporter::new(&cfg).unwrap().export(&spans(), deadline()).await,
        (Ok(expected.clone()), 1)
    );
    let grpc = Collector::grpc(vec![Reply::Partial(2, "bad ids")]).await;
    let cfg = config(format!("http://{}", grpc.addr), Protocol::Grpc, Compression::Gzip);
    assert_eq!(
        OtlpExporter::new(&cfg).unwrap().export(&spans(), deadline()).await,
        (Ok(expected), 1)
    );
    // A collector claiming more rejections than spans sent cannot push the counts negative.
    let http = Collector::http(vec![Reply::Partial(99, "")]).await;
    let cfg = config(format!("http://{}/v1/traces", http.addr), Protocol::HttpProtobuf, Compression::None);
    let (result, _) = OtlpExporter::new(&cfg).unwrap().export(&spans(), deadline()).await;
    assert_eq!(
        result,
        Ok(Delivery {
            accepted: 0,
            rejected: 3,
            message: Some(String::new())
        })
    );
}

#[tokio::test]
async fn request_timeout_is_retryable() {
    for protocol in [Protocol::HttpProtobuf, Protocol::Grpc] {
        let (collector, endpoint) = match protocol {
            Protocol::HttpProtobuf => {
                let c = Collector::http(vec![Reply::Hang, Reply::Hang]).await;
                let endpoint = format!("http://{}/v1/traces", c.addr);
                (c, endpoint)
            }
            Protocol::Grpc => {
                let c = Collector::grpc(vec![Reply::Hang, Reply::Hang]).await;
                let endpoint = format!("http://{}", c.addr);
                (c, endpoint)
            }
        };
        let mut cfg = config(endpoint, protocol, Compression::None);
        cfg.timeout = Duration::from_millis(100);
        let mut exporter = OtlpExporter::new(&cfg).unwrap().with_policy(fast_policy(2));
        let (result, attempts) = exporter.export(&spans(), deadline()).await;
        let failure = result.expect_err("hangs");
        // One kind and message for both transports (tonic says CANCELLED "Timeout expired").
        assert_eq!(
            (failure.kind.as_str(), failure.message.as_str(), attempts),
            ("timeout", "no response within 100ms", 2),
            "{protocol:?}"
        );
        drop(collector);
    }
}

#[tokio::test]
async fn collector_down_fails_after_bounded_attempts() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    for (endpoint, protocol) in [
        (format!("http://{addr}/v1/traces"), Protocol::HttpProtobuf),
        (format!("http://{addr}"), Protocol::Grpc),
    ] {
        let cfg = config(endpoint, protocol, Compression::Gzip);
        let mut exporter = OtlpExporter::new(&cfg).unwrap().with_policy(fast_policy(3));
        let (result, attempts) = exporter.export(&spans(), deadline()).await;
        let failure = result.expect_err("nobody listens");
        assert!(failure.retryable, "{protocol:?}: {failure:?}");
        assert_eq!(attempts, 3, "{protocol:?}");
    }
}

#[tokio::test]
async fn https_endpoint_is_accepted() {
    // Only the client construction: no TLS server here. The handshake fails against a plain port.
    for protocol in [Protocol::HttpProtobuf, Protocol::Grpc] {
        let cfg = config("https://collector.example:4318/v1/traces".into(), protocol, Compression::Gzip);
        assert!(OtlpExporter::new(&cfg).is_ok(), "{protocol:?}");
    }
}
