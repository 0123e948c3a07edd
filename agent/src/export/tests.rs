//! The exporter task through its public handle: batching, counters, queue limits, shutdown.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    ExportError, ExporterHandle,
    config::{BatchConfig, Compression, ExportConfig, ExportMode, OtlpConfig, Protocol},
    otlp::retry::RetryPolicy,
    spawn, spawn_with_policy,
    test_support::{Collector, Reply, resource, span},
};
use crate::telemetry::Counters;

fn otlp_http(collector: &Collector, batch: BatchConfig) -> ExportConfig {
    ExportConfig {
        mode: ExportMode::Otlp(OtlpConfig {
            endpoint: format!("http://{}/v1/traces", collector.addr),
            protocol: Protocol::HttpProtobuf,
            headers: vec![],
            timeout: Duration::from_secs(5),
            compression: Compression::Gzip,
        }),
        batch,
    }
}

fn batch(queue: usize, max_batch: usize, delay_ms: u64) -> BatchConfig {
    BatchConfig {
        max_queue_size: queue,
        max_export_batch_size: max_batch,
        scheduled_delay: Duration::from_millis(delay_ms),
        export_timeout: Duration::from_secs(10),
    }
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        ..RetryPolicy::default()
    }
}

/// (exported, failed, dropped)
fn counts(c: &Counters) -> (u64, u64, u64) {
    (
        Counters::get(&c.spans_exported),
        Counters::get(&c.spans_failed),
        Counters::get(&c.spans_dropped),
    )
}

fn send_n(handle: &ExporterHandle, n: u32) {
    let r = resource("svc");
    for i in 0..n {
        handle.send(span(&r, i));
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn schedule_delay_exports_a_partial_batch() {
    let collector = Collector::http(vec![]).await;
    let counters = Arc::new(Counters::default());
    let handle = spawn(otlp_http(&collector, batch(100, 50, 100)), counters.clone()).unwrap();
    let started = Instant::now();
    send_n(&handle, 5);
    wait_for("5 spans at the collector", || collector.spans() == 5).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(90),
        "the batch waits for the schedule delay ({waited:?})"
    );
    assert_eq!(collector.received().len(), 1, "one request for the batch");
    wait_for("counters", || counts(&counters) == (5, 0, 0)).await;
    handle.shutdown(Duration::from_secs(2)).await;
    assert_eq!(counts(&counters), (5, 0, 0));
}

#[tokio::test]
async fn full_batches_go_out_without_waiting() {
    let collector = Collector::http(vec![]).await;
    let counters = Arc::new(Counters::default());
    let handle = spawn(otlp_http(&collector, batch(100, 4, 60_000)), counters.clone()).unwrap();
    send_n(&handle, 8);
    wait_for("two full batches", || collector.spans() == 8).await;
    assert_eq!(collector.received().iter().map(|r| r.span_count()).collect::<Vec<_>>(), [4, 4]);
    handle.shutdown(Duration::from_secs(2)).await;
    assert_eq!(counts(&counters), (8, 0, 0));
}

#[tokio::test]
async fn full_queue_drops_are_counted_exactly() {
    let collector = Collector::http(vec![]).await;
    let counters = Arc::new(Counters::default());
    let handle = spawn(otlp_http(&collector, batch(10, 4, 60_000)), counters.clone()).unwrap();
    // No await between sends: on this single-threaded runtime the task cannot drain the queue.
    send_n(&handle, 25);
    assert_eq!(counts(&counters), (0, 0, 15));
    handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(counts(&counters), (10, 0, 15));
    assert_eq!(collector.spans(), 10);
    assert_eq!(collector.received().iter().map(|r| r.span_count()).collect::<Vec<_>>(), [4, 4, 2]);
}

#[tokio::test]
async fn retries_503_twice_then_exports() {
    let collector = Collector::http(vec![Reply::Http(503, None), Reply::Http(503, None)]).await;
    let counters = Arc::new(Counters::default());
    let handle = spawn_with_policy(otlp_http(&collector, batch(100, 10, 20)), counters.clone(), fast_retries()).unwrap();
    send_n(&handle, 3);
    wait_for("three attempts", || collector.received().len() == 3).await;
    handle.shutdown(Duration::from_secs(2)).await;
    assert_eq!(collector.received().len(), 3, "exactly three attempts");
    assert_eq!(counts(&counters), (3, 0, 0));
}

#[tokio::test]
async fn non_retryable_400_fails_the_batch_once() {
    let collector = Collector::http(vec![Reply::Http(400, None)]).await;
    let counters = Arc::new(Counters::default());
    let handle = spawn_with_policy(otlp_http(&collector, batch(100, 10, 20)), counters.clone(), fast_retries()).unwrap();
    send_n(&handle, 2);
    wait_for("the failure counted", || counts(&counters).1 == 2).await;
    handle.shutdown(Duration::from_secs(2)).await;
    assert_eq!(collector.received().len(), 1, "one attempt only");
    assert_eq!(counts(&counters), (0, 2, 0));
}

#[tokio::test]
async fn partial_success_counts_rejected_as_failed() {
    let collector = Collector::grpc(vec![Reply::Partial(1, "one bad span")]).await;
    let counters = Arc::new(Counters::default());
    let mut cfg = otlp_http(&collector, batch(100, 10, 20));
    if let ExportMode::Otlp(o) = &mut cfg.mode {
        o.protocol = Protocol::Grpc;
        o.endpoint = format!("http://{}", collector.addr);
    }
    let handle = spawn(cfg, counters.clone()).unwrap();
    send_n(&handle, 3);
    handle.shutdown(Duration::from_secs(2)).await;
    assert_eq!(counts(&counters), (2, 1, 0));
}

#[tokio::test]
async fn shutdown_flushes_before_the_schedule_delay() {
    let collector = Collector::http(vec![]).await;
    let counters = Arc::new(Counters::default());
    let handle = spawn(otlp_http(&collector, batch(100, 50, 60_000)), counters.clone()).unwrap();
    send_n(&handle, 7);
    let started = Instant::now();
    handle.shutdown(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(collector.spans(), 7);
    assert_eq!(counts(&counters), (7, 0, 0));
}

#[tokio::test]
async fn shutdown_deadline_bounds_a_hanging_collector() {
    let collector = Collector::http(vec![Reply::Hang]).await;
    let counters = Arc::new(Counters::default());
    let handle = spawn(otlp_http(&collector, batch(100, 4, 10)), counters.clone()).unwrap();
    send_n(&handle, 10);
    wait_for("the first request", || !collector.received().is_empty()).await;
    let started = Instant::now();
    handle.shutdown(Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "shutdown took {took:?}"
    );
    // Every span is accounted for: none exported, all failed (the hung batch and the rest).
    assert_eq!(counts(&counters), (0, 10, 0));
}

#[tokio::test]
async fn collector_down_never_blocks_the_sender() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut cfg = ExportConfig::from_env(&|_| None).unwrap();
    cfg.mode = ExportMode::Otlp(OtlpConfig {
        endpoint: format!("http://{addr}/v1/traces"),
        protocol: Protocol::HttpProtobuf,
        headers: vec![],
        timeout: Duration::from_millis(200),
        compression: Compression::None,
    });
    cfg.batch = batch(50, 10, 5);
    let counters = Arc::new(Counters::default());
    let handle = spawn_with_policy(cfg, counters.clone(), fast_retries()).unwrap();
    let started = Instant::now();
    for round in 0..20 {
        send_n(&handle, 10);
        assert!(started.elapsed() < Duration::from_secs(1), "round {round}: send must not block");
        tokio::task::yield_now().await;
    }
    handle.shutdown(Duration::from_millis(500)).await;
    let (exported, failed, dropped) = counts(&counters);
    assert_eq!(exported, 0);
    assert_eq!(failed + dropped, 200, "every span is counted as failed or dropped");
}

#[tokio::test]
async fn none_mode_discards_without_a_task() {
    let counters = Arc::new(Counters::default());
    let cfg = ExportConfig {
        mode: ExportMode::None,
        batch: BatchConfig::default(),
    };
    let handle = spawn(cfg, counters.clone()).unwrap();
    send_n(&handle, 3);
    handle.shutdown(Duration::from_millis(10)).await;
    assert_eq!(counts(&counters), (0, 0, 0));
}

#[test]
fn spawn_outside_a_runtime_is_an_error() {
    let cfg = ExportConfig {
        mode: ExportMode::Console,
        batch: BatchConfig::default(),
    };
    let err = spawn(cfg, Arc::new(Counters::default())).expect_err("no runtime");
    assert!(matches!(err, ExportError::NoRuntime), "{err}");
}

#[tokio::test]
async fn bad_header_is_a_spawn_error() {
    let collector = Collector::http(vec![]).await;
    let mut cfg = otlp_http(&collector, BatchConfig::default());
    if let ExportMode::Otlp(o) = &mut cfg.mode {
        o.headers = vec![("bad header".into(), "v".into())];
    }
    let err = spawn(cfg, Arc::new(Counters::default())).expect_err("invalid header name");
    assert!(err.to_string().contains("bad header"), "{err}");
}
