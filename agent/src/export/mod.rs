//! Export stage: spans leave the agent here, batched, to the console or an OTLP collector.
//!
//! The rest of the agent only sees [`ExporterHandle`]: [`ExporterHandle::send`] never blocks;
//! a bounded queue feeds one task ([`batch`]) that exports batches and counts every span as
//! exported, failed or dropped in [`Counters`]. A collector that is down costs retries and
//! counted losses, never memory beyond the queue and never a stalled caller.

mod batch;
pub mod config;
pub mod console;
pub mod metrics;
pub mod otlp;
pub mod prometheus;
pub(crate) mod ratelimit;

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

pub use self::config::{ConfigError, ExportConfig, ExportMode, ExporterChoice};
use self::{
    batch::{Backend, Worker},
    config::Protocol,
    console::ConsoleExporter,
    otlp::{OtlpExporter, retry::RetryPolicy},
    ratelimit::LogLimiter,
};
use crate::{model::Span, telemetry::Counters};

/// At most one warning line per kind of failure in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Time the task gets past the shutdown deadline to count what it could not send.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the span exporter must be started inside a tokio runtime")]
    NoRuntime,
    #[error("OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("OTLP header {name:?} cannot be sent: invalid name or value")]
    Header { name: String },
}

/// What the collector (or the console) accepted of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Spans accepted.
    pub accepted: usize,
    /// Spans the collector rejected in a partial-success answer.
    pub rejected: usize,
    /// The collector's partial-success message, if any.
    pub message: Option<String>,
}

/// Resolves the export configuration from the process environment, with the CLI's choice
/// applied on top.
pub fn resolve_config(choice: impl Into<ExporterChoice>) -> Result<ExportConfig, ConfigError> {
    ExportConfig::resolve(choice.into(), &|name| std::env::var(name).ok())
}

/// The running exporter: a bounded queue in front of one export task.
#[derive(Debug)]
pub struct ExporterHandle {
    /// `None` when spans are discarded (`--exporter none`).
    tx: Option<mpsc::Sender<Span>>,
    stop: Option<oneshot::Sender<Instant>>,
    task: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    limiter: Arc<LogLimiter>,
}

impl ExporterHandle {
    /// Non-blocking: queues a span; when the bounded queue is full the span is dropped and
    /// counted in `counters.spans_dropped` (with a rate-limited warning).
    pub fn send(&self, span: Span) {
        let Some(tx) = &self.tx else { return };
        let (kind, message) = match tx.try_send(span) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => ("queue_full", "the span export queue is full: dropping spans"),
            Err(mpsc::error::TrySendError::Closed(_)) => ("exporter_stopped", "the span exporter has stopped: dropping spans"),
        };
        Counters::inc(&self.counters.spans_dropped);
        if let Some(held_back) = self.limiter.check(kind) {
            tracing::warn!(
                dropped_since_last_warning = held_back + 1,
                dropped_total = Counters::get(&self.counters.spans_dropped),
                "{message}"
            );
        }
    }

    /// Spans waiting in the export queue now (0 when spans are discarded).
    pub fn queue_len(&self) -> usize {
        self.tx.as_ref().map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// Flushes everything queued and stops; waits at most `deadline`. Spans that could not be
    /// exported by then are counted in `counters.spans_failed`.
    pub async fn shutdown(self, deadline: Duration) {
        let ExporterHandle { tx, stop, task, .. } = self;
        drop(tx);
        let at = Instant::now() + deadline;
        if let Some(stop) = stop {
            // Err: the task already ended; nothing to tell it.
            let _ = stop.send(at);
        }
        let Some(mut task) = task else { return };
        if tokio::time::timeout_at(at + SHUTDOWN_GRACE, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(?deadline, "the span exporter did not stop in time; abandoned it");
        }
    }
}

/// Starts the exporter. Must be called inside a tokio runtime. Does not connect: a collector
/// that is down shows up later as counted, logged export failures.
pub fn spawn(config: ExportConfig, counters: Arc<Counters>) -> Result<ExporterHandle, ExportError> {
    spawn_with_policy(config, counters, RetryPolicy::default())
}

/// [`spawn`] with a chosen retry schedule.
pub fn spawn_with_policy(config: ExportConfig, counters: Arc<Counters>, policy: RetryPolicy) -> Result<ExporterHandle, ExportError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
    let limiter = Arc::new(LogLimiter::new(LOG_INTERVAL));
    let backend = match &config.mode {
        ExportMode::None => {
            tracing::info!("span export disabled");
            return Ok(ExporterHandle {
                tx: None,
                stop: None,
                task: None,
                counters,
                limiter,
            });
        }
        ExportMode::Console => {
            tracing::info!("printing spans to stdout");
            Backend::Console(ConsoleExporter::default())
        }
        ExportMode::Otlp(otlp) => {
            let exporter = OtlpExporter::new(otlp)?.with_policy(policy);
            tracing::info!(
                endpoint = config::redact_userinfo(&otlp.endpoint),
                protocol = match otlp.protocol {
                    Protocol::Grpc => "grpc",
                    Protocol::HttpProtobuf => "http/protobuf",
                },
                compression = ?otlp.compression,
                "exporting spans over OTLP"
            );
            Backend::Otlp(exporter)
        }
    };
    let mut batch = config.batch;
    batch.max_queue_size = batch.max_queue_size.max(1);
    batch.max_export_batch_size = batch.max_export_batch_size.clamp(1, batch.max_queue_size);
    let (tx, rx) = mpsc::channel(batch.max_queue_size);
    let (stop_tx, stop_rx) = oneshot::channel();
    let worker = Worker {
        backend,
        batch,
        counters: counters.clone(),
        limiter: limiter.clone(),
    };
    let task = runtime.spawn(worker.run(rx, stop_rx));
    Ok(ExporterHandle {
        tx: Some(tx),
        stop: Some(stop_tx),
        task: Some(task),
        counters,
        limiter,
    })
}

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

/// Counts the outcome of one export of `sent` items (spans or metric points) in `exported` /
/// `failed`, and logs failures and partial successes at most once per kind and interval. A
/// failure is one sentence naming the collector (`endpoint`) and what to check.
pub(crate) fn account(
    what: &'static str,
    endpoint: Option<&str>,
    exported: &std::sync::atomic::AtomicU64,
    failed: &std::sync::atomic::AtomicU64,
    limiter: &ratelimit::LogLimiter,
    sent: usize,
    outcome: Result<(Result<Delivery, otlp::retry::Failure>, u32), otlp::retry::Failure>,
) {
    let (failure, attempts) = match outcome {
        Ok((Ok(delivery), _)) => {
            Counters::add(exported, delivery.accepted as u64);
            Counters::add(failed, delivery.rejected as u64);
            if let Some(message) = delivery.message
                && let Some(held_back) = limiter.check("partial_success")
            {
                tracing::warn!(
                    what,
                    rejected = delivery.rejected,
                    failed_total = Counters::get(failed),
                    held_back,
                    // Not `message`: tracing prints that field as the event's own text.
                    collector_message = message,
                    "the collector rejected part of an export"
                );
            }
            return;
        }
        Ok((Err(failure), attempts)) => (failure, attempts),
        Err(failure) => (failure, 0),
    };
    Counters::add(failed, sent as u64);
    if let Some(held_back) = limiter.check(&failure.kind) {
        let message = match endpoint {
            Some(endpoint) => format!(
                "export failed: {what} could not be delivered to the OTLP collector at {endpoint} and are counted as \
                 failed; check that the collector runs there and that OTEL_EXPORTER_OTLP_ENDPOINT (or \
                 export.otlp.endpoint) names it"
            ),
            None => format!("export failed: {what} are counted as failed"),
        };
        tracing::warn!(
            what,
            kind = failure.kind,
            attempts,
            items = sent,
            failed_total = Counters::get(failed),
            held_back,
            error = failure.message,
            "{message}"
        );
    }
}
