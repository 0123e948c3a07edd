//! Metrics push export: OTLP (gRPC or HTTP/protobuf, the span exporter's transports and retry
//! policy) and the console.
//!
//! The app calls [`MetricsExporterHandle::export`] with a fresh cumulative snapshot every
//! [`MetricsExporterHandle::interval`], and once more before [`MetricsExporterHandle::shutdown`].
//! `export` never blocks: the snapshot goes into a one-slot mailbox read by one task; a snapshot
//! still waiting when the next arrives is replaced (the newer cumulative values carry the same
//! data) and counted in `Counters::metric_snapshots_dropped`. Exported and failed data points
//! are counted in `metric_points_exported` / `metric_points_failed`, failures logged at most once
//! per kind per 10 s.

pub mod config;
pub mod encode;
pub mod otlp;

use std::{
    io::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, oneshot},
    task::JoinHandle,
    time::{Instant, timeout_at},
};

pub use self::config::{MetricsExportConfig, resolve_metrics_config};
use self::{encode::snapshot_points, otlp::OtlpMetricsExporter};
use super::{
    Delivery, ExportError,
    config::{Protocol, redact_userinfo},
    otlp::retry::{Failure, RetryPolicy},
    prometheus,
    ratelimit::LogLimiter,
};
use crate::{metrics::model::Snapshot, telemetry::Counters};

/// At most one warning line per kind of failure in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Time the task gets past the shutdown deadline before it is abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// The one-slot mailbox between the handle and the task.
#[derive(Default)]
struct Mailbox {
    pending: Mutex<Option<Snapshot>>,
    ready: Notify,
}

impl Mailbox {
    fn take(&self) -> Option<Snapshot> {
        // A poisoned lock only means a panic elsewhere mid-swap; the slot is still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The running metrics exporter.
pub struct MetricsExporterHandle {
    /// `None` when nothing is pushed (no OTLP, no console).
    mailbox: Option<Arc<Mailbox>>,
    stop: Option<oneshot::Sender<Instant>>,
    task: Option<JoinHandle<()>>,
    interval: Duration,
    counters: Arc<Counters>,
    limiter: Arc<LogLimiter>,
}

impl std::fmt::Debug for MetricsExporterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsExporterHandle")
            .field("pushes", &self.mailbox.is_some())
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl MetricsExporterHandle {
    /// Hands a snapshot to the export task; never blocks. If the previous one is still waiting
    /// (the task is busy with an earlier export), it is replaced and counted as dropped.
    pub fn export(&self, snapshot: Snapshot) {
        let Some(mailbox) = &self.mailbox else { return };
        let replaced = mailbox
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(snapshot)
            .is_some();
        mailbox.ready.notify_one();
        if replaced {
            Counters::inc(&self.counters.metric_snapshots_dropped);
            if let Some(held_back) = self.limiter.check("snapshot_replaced") {
                tracing::warn!(
                    held_back,
                    dropped_total = Counters::get(&self.counters.metric_snapshots_dropped),
                    "the metrics exporter is still busy: replacing the waiting snapshot"
                );
            }
        }
    }

    /// Whether `export` does anything (OTLP or console configured).
    pub fn pushes(&self) -> bool {
        self.mailbox.is_some()
    }

    /// How often the app should call [`export`](Self::export) (`OTEL_METRIC_EXPORT_INTERVAL`).
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Exports the waiting snapshot, if any, and stops; waits at most `deadline`. Points that
    /// could not be exported by then are counted in `metric_points_failed`.
    pub async fn shutdown(self, deadline: Duration) {
        let MetricsExporterHandle { stop, task, .. } = self;
        let at = Instant::now() + deadline;
        if let Some(stop) = stop {
            // Err: the task already ended; nothing to tell it.
            let _ = stop.send(at);
        }
        let Some(mut task) = task else { return };
        if tokio::time::timeout_at(at + SHUTDOWN_GRACE, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(?deadline, "the metrics exporter did not stop in time; abandoned it");
        }
    }
}

/// Starts the push exporter for `config` (nothing runs when it neither pushes OTLP nor prints).
/// Must be called inside a tokio runtime; does not connect. The Prometheus endpoint is separate:
/// see [`prometheus::PrometheusServer`].
pub fn spawn_metrics(config: MetricsExportConfig, counters: Arc<Counters>) -> Result<MetricsExporterHandle, ExportError> {
    spawn_metrics_with_policy(config, counters, RetryPolicy::default())
}

/// [`spawn_metrics`] with a chosen retry schedule.
pub fn spawn_metrics_with_policy(
    config: MetricsExportConfig,
    counters: Arc<Counters>,
    policy: RetryPolicy,
) -> Result<MetricsExporterHandle, ExportError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
    let limiter = Arc::new(LogLimiter::new(LOG_INTERVAL));
    let mut handle = MetricsExporterHandle {
        mailbox: None,
        stop: None,
        task: None,
        interval: config.interval,
        counters: counters.clone(),
        limiter: limiter.clone(),
    };
    if !config.pushes() {
        return Ok(handle);
    }
    let otlp = match &config.otlp {
        Some(otlp) => {
            let exporter = OtlpMetricsExporter::new(otlp)?.with_policy(policy);
            tracing::info!(
                endpoint = redact_userinfo(&otlp.endpoint),
                protocol = match otlp.protocol {
                    Protocol::Grpc => "grpc",
                    Protocol::HttpProtobuf => "http/protobuf",
                },
                interval = ?config.interval,
                "exporting metrics over OTLP"
            );
            Some(exporter)
        }
        None => None,
    };
    let mailbox = Arc::new(Mailbox::default());
    let (stop_tx, stop_rx) = oneshot::channel();
    let worker = Worker {
        otlp,
        console: config.console,
        export_timeout: config.export_timeout,
        counters,
        limiter,
        mailbox: mailbox.clone(),
    };
    handle.task = Some(runtime.spawn(worker.run(stop_rx)));
    handle.mailbox = Some(mailbox);
    handle.stop = Some(stop_tx);
    Ok(handle)
}

/// State of the export task.
struct Worker {
    otlp: Option<OtlpMetricsExporter>,
    console: bool,
    export_timeout: Duration,
    counters: Arc<Counters>,
    limiter: Arc<LogLimiter>,
    mailbox: Arc<Mailbox>,
}

/// The shutdown request: the deadline, once it has arrived.
struct Stop {
    rx: Option<oneshot::Receiver<Instant>>,
    at: Option<Instant>,
}

impl Stop {
    fn pending(&self) -> bool {
        self.rx.is_some()
    }

    /// Resolves when shutdown is requested (or the handle is gone); then never again.
    async fn requested(&mut self) {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        // A dropped handle (no deadline): export what is waiting, bounded by the export timeout.
        self.at = rx.await.ok();
        self.rx = None;
    }
}

impl Worker {
    async fn run(mut self, stop: oneshot::Receiver<Instant>) {
        let mut stop = Stop { rx: Some(stop), at: None };
        let mailbox = self.mailbox.clone();
        while stop.pending() {
            tokio::select! {
                biased;
                () = stop.requested() => {}
                () = mailbox.ready.notified() => {
                    if let Some(snapshot) = mailbox.take() {
                        self.export(&snapshot, &mut stop).await;
                    }
                }
            }
        }
        // Shutdown: the last snapshot the app handed over, bounded by the deadline.
        if let Some(snapshot) = mailbox.take() {
            self.export(&snapshot, &mut stop).await;
        }
    }

    /// Exports one snapshot within the export timeout (and the shutdown deadline, also when it
    /// arrives meanwhile), then counts and logs the outcome.
    async fn export(&mut self, snapshot: &Snapshot, stop: &mut Stop) {
        if self.console {
            print_console(snapshot);
        }
        let Some(otlp) = self.otlp.as_mut() else { return };
        let points = snapshot_points(snapshot);
        if points == 0 {
            return;
        }
        let mut limit = Instant::now() + self.export_timeout;
        if let Some(at) = stop.at {
            limit = limit.min(at);
        }
        let outcome = {
            let export = otlp.export(snapshot, limit);
            tokio::pin!(export);
            loop {
                tokio::select! {
                    r = timeout_at(limit, &mut export) => break r,
                    () = stop.requested(), if stop.pending() => {
                        if let Some(at) = stop.at {
                            limit = limit.min(at);
                        }
                    }
                }
            }
        };
        let outcome = outcome.map_err(|_| {
            if stop.at.is_some_and(|at| at <= limit) {
                Failure::transient("shutdown_deadline", "cut short by the shutdown deadline")
            } else {
                Failure::transient("export_timeout", format!("export took longer than {:?}", self.export_timeout))
            }
        });
        self.account(points, outcome);
    }

    fn account(&self, sent: usize, outcome: Result<(Result<Delivery, Failure>, u32), Failure>) {
        let c = &self.counters;
        let endpoint = self.otlp.as_ref().map(|otlp| otlp.endpoint());
        super::account("metric points", endpoint, &c.metric_points_exported, &c.metric_points_failed, &self.limiter, sent, outcome);
    }
}

/// The console exporter: the snapshot in the Prometheus text format on stdout.
fn print_console(snapshot: &Snapshot) {
    let text = prometheus::render(snapshot);
    let mut out = std::io::stdout().lock();
    // A closed stdout is not worth failing over; the OTLP path is unaffected.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
