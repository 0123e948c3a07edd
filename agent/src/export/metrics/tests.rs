//! OTLP metrics: the exact encoding, delivery to in-process collectors over both transports,
//! counters, latest-wins hand-over and shutdown.

use std::{sync::Arc, time::Duration};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{AggregationTemporality, HistogramDataPoint, NumberDataPoint, metric, number_data_point},
};
use prost::Message as _;
use tokio::time::Instant;

use super::{
    MetricsExportConfig,
    encode::{encode_request, encode_requests, snapshot_points},
    spawn_metrics, spawn_metrics_with_policy,
    test_support::{MetricsCollector, Reply, sample_snapshot},
};
use crate::{
    export::{
        ExportError,
        config::{Compression, OtlpConfig, Protocol},
        otlp::retry::RetryPolicy,
    },
    metrics::model::Snapshot,
    telemetry::Counters,
};

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn str_kv(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

#[test]
fn encoding_round_trips_exactly() {
    let snapshot = sample_snapshot();
    let bytes = encode_request(&snapshot).encode_to_vec();
    let req = ExportMetricsServiceRequest::decode(&bytes[..]).unwrap();

    assert_eq!(req.resource_metrics.len(), 2, "shop reported twice is one resource");
    let shop = &req.resource_metrics[0];
    assert_eq!(
        shop.resource.as_ref().unwrap().attributes,
        vec![
            str_kv("service.name", "shop"),
            str_kv("service.instance.id", "node-1:4"),
            kv("process.pid", any_value::Value::IntValue(42)),
        ]
    );
    assert_eq!(shop.scope_metrics.len(), 1);
    let scope = shop.scope_metrics[0].scope.as_ref().unwrap();
    assert_eq!((scope.name.as_str(), scope.version.as_str()), ("tapwire", env!("CARGO_PKG_VERSION")));
    let metrics = &shop.scope_metrics[0].metrics;
    let names: Vec<(&str, &str)> = metrics.iter().map(|m| (m.name.as_str(), m.unit.as_str())).collect();
    assert_eq!(
        names,
        [
            ("http.server.request.duration", "s"),
            ("http.server.active_requests", "{request}"),
            ("process.cpu.utilization", "1")
        ]
    );
    assert_eq!(metrics[0].description, "Duration of HTTP server requests.");

    let cumulative = AggregationTemporality::Cumulative as i32;
    let Some(metric::Data::Histogram(h)) = &metrics[0].data else { panic!("histogram") };
    assert_eq!(h.aggregation_temporality, cumulative);
    assert_eq!(
        h.data_points,
        vec![HistogramDataPoint {
            attributes: vec![
                str_kv("http.request.method", "GET"),
                kv("http.response.status_code", any_value::Value::IntValue(200)),
            ],
            start_time_unix_nano: 1_000,
            time_unix_nano: 9_000,
            count: 3,
            sum: Some(0.125),
            bucket_counts: vec![1, 1, 1, 0],
            explicit_bounds: vec![0.005, 0.1, 1.0],
            exemplars: vec![],
            flags: 0,
            min: Some(0.005),
            max: Some(0.11),
        }]
    );

    let Some(metric::Data::Sum(active)) = &metrics[1].data else { panic!("sum") };
    assert_eq!((active.aggregation_temporality, active.is_monotonic), (cumulative, false));
    let values: Vec<Option<number_data_point::Value>> = active.data_points.iter().map(|p| p.value).collect();
    assert_eq!(
        values,
        [Some(number_data_point::Value::AsInt(2)), Some(number_data_point::Value::AsInt(0))]
    );

    let Some(metric::Data::Gauge(cpu)) = &metrics[2].data else { panic!("gauge") };
    assert_eq!(
        cpu.data_points,
        vec![NumberDataPoint {
            attributes: vec![],
            start_time_unix_nano: 0,
            time_unix_nano: 9_000,
            exemplars: vec![],
            flags: 0,
            value: Some(number_data_point::Value::AsDouble(0.25)),
        }]
    );

    let agent = &req.resource_metrics[1];
    let Some(metric::Data::Sum(events)) = &agent.scope_metrics[0].metrics[0].data else { panic!("sum") };
    assert_eq!((events.aggregation_temporality, events.is_monotonic), (cumulative, true));
    assert_eq!(events.data_points[0].start_time_unix_nano, 500);
    assert_eq!(events.data_points[0].value, Some(number_data_point::Value::AsInt(1234)));
    assert!(encode_request(&Vec::new()).resource_metrics.is_empty());
}

#[test]
fn large_snapshots_split_between_resources() {
    let snapshot = sample_snapshot();
    assert_eq!(snapshot_points(&snapshot), 6);
    let one = encode_requests(&snapshot, 100);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0], (encode_request(&snapshot), 6));
    // shop has 4 points, the agent 2: a limit of 4 puts each in its own request.
    let split = encode_requests(&snapshot, 4);
    let shape: Vec<(usize, usize)> = split.iter().map(|(r, n)| (r.resource_metrics.len(), *n)).collect();
    assert_eq!(shape, [(1, 4), (1, 2)]);
    // A resource larger than the limit still goes, alone.
    let tiny = encode_requests(&snapshot, 1);
    assert_eq!(tiny.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [4, 2]);
    assert!(encode_requests(&Vec::new(), 10).is_empty());
}

fn otlp(endpoint: String, protocol: Protocol, compression: Compression) -> OtlpConfig {
    OtlpConfig {
        endpoint,
        protocol,
        headers: vec![("x-tenant".into(), "acme".into())],
        timeout: Duration::from_secs(5),
        compression,
    }
}

fn config(otlp: OtlpConfig) -> MetricsExportConfig {
    MetricsExportConfig {
        otlp: Some(otlp),
        interval: Duration::from_millis(1500),
        ..MetricsExportConfig::default()
    }
}

fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..RetryPolicy::default()
    }
}

/// (exported, failed, dropped snapshots)
fn counts(c: &Counters) -> (u64, u64, u64) {
    (
        Counters::get(&c.metric_points_exported),
        Counters::get(&c.metric_points_failed),
        Counters::get(&c.metric_snapshots_dropped),
    )
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn http_protobuf_delivers_the_snapshot() {
    let collector = MetricsCollector::http(vec![]).await;
    let counters = Arc::new(Counters::default());
    let cfg = config(otlp(
        format!("http://{}/v1/metrics", collector.addr),
        Protocol::HttpProtobuf,
        Compression::Gzip,
    ));
    let handle = spawn_metrics(cfg, counters.clone()).unwrap();
    assert!(handle.pushes());
    assert_eq!(handle.interval(), Duration::from_millis(1500));
    let snapshot = sample_snapshot();
    handle.export(snapshot.clone());
    wait_for("6 points exported", || counts(&counters) == (6, 0, 0)).await;
    let received = collector.received();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.path, "/v1/metrics");
    assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("x-tenant"), Some("acme"));
    assert_eq!(r.request, encode_request(&snapshot));
    handle.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn grpc_delivers_the_snapshot() {
    for compression in [Compression::Gzip, Compression::None] {
        let collector = MetricsCollector::grpc(vec![]).await;
        let counters = Arc::new(Counters::default());
        let cfg = config(otlp(format!("http://{}", collector.addr), Protocol::Grpc, compression));
        let handle = spawn_metrics(cfg, counters.clone()).unwrap();
        let snapshot = sample_snapshot();
        handle.export(snapshot.clone());
        wait_for("6 points exported", || counts(&counters) == (6, 0, 0)).await;
        let received = collector.received();
        assert_eq!(received.len(), 1);
        assert_eq!(received[0].request, encode_request(&snapshot));
        assert_eq!(received[0].header("x-tenant"), Some("acme"));
        let gzip = (compression == Compression::Gzip).then_some("gzip");
        assert_eq!(received[0].header("grpc-encoding"), gzip, "{:?}", received[0].headers);
        handle.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn retries_then_counts_failures_and_partial_success() {
    // 503 twice, then OK: exported after three attempts.
    let collector = MetricsCollector::http(vec![Reply::Http(503, None), Reply::Http(503, None)]).await;
    let counters = Arc::new(Counters::default());
    let cfg = config(otlp(
        format!("http://{}/v1/metrics", collector.addr),
        Protocol::HttpProtobuf,
        Compression::None,
    ));
    let handle = spawn_metrics_with_policy(cfg, counters.clone(), fast_retries(5)).unwrap();
    handle.export(sample_snapshot());
    wait_for("exported after retries", || counts(&counters) == (6, 0, 0)).await;
    assert_eq!(collector.received().len(), 3);

    // 400 is final: all 6 points failed, one attempt. Then a partial success rejects 2.
    let collector = MetricsCollector::grpc(vec![Reply::Grpc(tonic::Code::InvalidArgument), Reply::Partial(2, "bad point")]).await;
    let counters = Arc::new(Counters::default());
    let cfg = config(otlp(format!("http://{}", collector.addr), Protocol::Grpc, Compression::Gzip));
    let handle2 = spawn_metrics_with_policy(cfg, counters.clone(), fast_retries(5)).unwrap();
    handle2.export(sample_snapshot());
    wait_for("first export failed", || counts(&counters) == (0, 6, 0)).await;
    handle2.export(sample_snapshot());
    wait_for("partial success", || counts(&counters) == (4, 8, 0)).await;
    assert_eq!(collector.received().len(), 2);
    handle.shutdown(Duration::from_secs(1)).await;
    handle2.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_busy_exporter_keeps_only_the_latest_snapshot() {
    // The first export hangs until its 300 ms export timeout; meanwhile B then C arrive.
    let collector = MetricsCollector::http(vec![Reply::Hang]).await;
    let counters = Arc::new(Counters::default());
    let mut cfg = config(otlp(
        format!("http://{}/v1/metrics", collector.addr),
        Protocol::HttpProtobuf,
        Compression::None,
    ));
    cfg.export_timeout = Duration::from_millis(300);
    let handle = spawn_metrics_with_policy(cfg, counters.clone(), fast_retries(1)).unwrap();
    let a = sample_snapshot();
    let b: Snapshot = a[..1].to_vec();
    let c: Snapshot = a[1..2].to_vec();
    handle.export(a.clone());
    wait_for("A at the collector", || collector.received().len() == 1).await;
    handle.export(b);
    handle.export(c.clone());
    assert_eq!(counts(&counters).2, 1, "B was replaced by C");
    wait_for("C exported", || collector.received().len() == 2).await;
    wait_for("counters settled", || counts(&counters) == (2, 6, 1)).await;
    let received = collector.received();
    assert_eq!(received[0].request, encode_request(&a));
    assert_eq!(received[1].request, encode_request(&c), "the latest snapshot went out, not B");
    handle.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_exports_the_last_snapshot_and_respects_the_deadline() {
    let collector = MetricsCollector::grpc(vec![]).await;
    let counters = Arc::new(Counters::default());
    let cfg = config(otlp(format!("http://{}", collector.addr), Protocol::Grpc, Compression::Gzip));
    let handle = spawn_metrics(cfg, counters.clone()).unwrap();
    handle.export(sample_snapshot());
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(counts(&counters), (6, 0, 0));
    assert_eq!(collector.received().len(), 1);

    // A collector that never answers: shutdown returns near its deadline, points failed.
    let collector = MetricsCollector::http(vec![Reply::Hang]).await;
    let counters = Arc::new(Counters::default());
    let cfg = config(otlp(
        format!("http://{}/v1/metrics", collector.addr),
        Protocol::HttpProtobuf,
        Compression::None,
    ));
    let handle = spawn_metrics(cfg, counters.clone()).unwrap();
    handle.export(sample_snapshot());
    wait_for("request at the collector", || collector.received().len() == 1).await;
    let started = Instant::now();
    handle.shutdown(Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(counts(&counters), (0, 6, 0));
}

#[tokio::test]
async fn nothing_configured_means_no_task() {
    let counters = Arc::new(Counters::default());
    let handle = spawn_metrics(MetricsExportConfig::default(), counters.clone()).unwrap();
    assert!(!handle.pushes());
    handle.export(sample_snapshot());
    handle.export(sample_snapshot());
    assert_eq!(counts(&counters), (0, 0, 0));
    handle.shutdown(Duration::from_millis(10)).await;
}

#[test]
fn spawn_outside_a_runtime_is_an_error() {
    let err = spawn_metrics(MetricsExportConfig::default(), Arc::new(Counters::default())).unwrap_err();
    assert!(matches!(err, ExportError::NoRuntime));
}
