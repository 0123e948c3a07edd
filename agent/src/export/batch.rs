//! The exporter task: gathers queued spans into batches (as the OpenTelemetry
//! BatchSpanProcessor does), hands them to the backend, and counts the outcome.

use std::sync::Arc;

use tokio::{
    sync::{mpsc, oneshot},
    time::{Duration, Instant, sleep_until, timeout_at},
};

use super::{Delivery, config::BatchConfig, console::ConsoleExporter, otlp::OtlpExporter, otlp::retry::Failure, ratelimit::LogLimiter};
use crate::{model::Span, telemetry::Counters};

/// Where batches go.
#[expect(clippy::large_enum_variant, reason = "one instance per agent, never moved after start")]
pub enum Backend {
    /// Lines on stdout.
    Console(ConsoleExporter),
    /// An OTLP collector.
    Otlp(OtlpExporter),
}

impl Backend {
    async fn export(&mut self, spans: &[Span], deadline: Instant) -> (Result<Delivery, Failure>, u32) {
        match self {
            Backend::Console(console) => (console.export(spans).await, 1),
            Backend::Otlp(otlp) => otlp.export(spans, deadline).await,
        }
    }
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
        // A dropped handle (no deadline) means: flush what is queued, bounded by the export timeout.
        self.at = rx.await.ok();
        self.rx = None;
    }

    fn expired(&self) -> bool {
        self.at.is_some_and(|at| Instant::now() >= at)
    }
}

/// State of the exporter task.
pub struct Worker {
    /// Where batches go.
    pub backend: Backend,
    /// Batch size, delay and export timeout (already clamped to sane values).
    pub batch: BatchConfig,
    /// Where exported / failed spans are counted.
    pub counters: Arc<Counters>,
    /// Shared with the handle; limits the warnings.
    pub limiter: Arc<LogLimiter>,
}

impl Worker {
    /// Runs until shutdown is requested or every sender is gone, then flushes what is queued
    /// (until the shutdown deadline, if there is one).
    pub async fn run(mut self, mut rx: mpsc::Receiver<Span>, stop: oneshot::Receiver<Instant>) {
        let max_batch = self.batch.max_export_batch_size.max(1);
        let mut stop = Stop { rx: Some(stop), at: None };
        let mut batch: Vec<Span> = Vec::with_capacity(max_batch);
        let mut flush_at: Option<Instant> = None;
        loop {
            let timer = flush_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let room = max_batch - batch.len();
            tokio::select! {
                biased;
                () = stop.requested(), if stop.pending() => break,
                // Everything queued at once (up to a full batch): one pass of this loop per
                // burst of spans from the event loop, not per span.
                received = rx.recv_many(&mut batch, room) => {
                    if received == 0 {
                        break; // every sender is gone
                    }
                    if flush_at.is_none() {
                        flush_at = Some(Instant::now() + self.batch.scheduled_delay);
                    }
                    if batch.len() >= max_batch {
                        flush_at = None;
                        self.export(&batch, &mut stop).await;
                        batch.clear();
                    }
                },
                () = sleep_until(timer), if flush_at.is_some() => {
                    flush_at = None;
                    self.export(&batch, &mut stop).await;
                    batch.clear();
                }
            }
            if !stop.pending() {
                break;
            }
        }

        // Shutdown: no new spans; export everything already queued.
        rx.close();
        loop {
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            if stop.expired() {
                let mut left = batch.len() as u64;
                while rx.try_recv().is_ok() {
                    left += 1;
                }
                Counters::add(&self.counters.spans_failed, left);
                tracing::warn!(spans = left, "shutdown deadline reached: spans left unexported");
                break;
            }
            self.export(&batch, &mut stop).await;
            batch.clear();
        }
    }

    /// Exports one batch within the export timeout (and the shutdown deadline, also when it
    /// arrives meanwhile), then counts and logs the outcome.
    async fn export(&mut self, spans: &[Span], stop: &mut Stop) {
        if spans.is_empty() {
            return;
        }
        let mut limit = Instant::now() + self.batch.export_timeout;
        if let Some(at) = stop.at {
            limit = limit.min(at);
        }
        let outcome = {
            let export = self.backend.export(spans, limit);
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
                Failure::transient("export_timeout", format!("export took longer than {:?}", self.batch.export_timeout))
            }
        });
        self.account(spans.len(), outcome);
    }

    fn account(&self, sent: usize, outcome: Result<(Result<Delivery, Failure>, u32), Failure>) {
        let c = &self.counters;
        let endpoint = match &self.backend {
            Backend::Otlp(otlp) => Some(otlp.endpoint()),
            Backend::Console(_) => None,
        };
        super::account("spans", endpoint, &c.spans_exported, &c.spans_failed, &self.limiter, sent, outcome);
    }
}
