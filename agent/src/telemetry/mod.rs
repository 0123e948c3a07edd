//! The agent's own health: counters for every loss and every unit of work, readable by
//! the metrics exporter and printed on shutdown.

use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counters. Every field is a monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counters {
    /// Ring-buffer events decoded by user space.
    pub events_read: AtomicU64,
    /// Events the kernel could not put in the ring buffer (read from the kernel's counter map).
    pub events_lost: AtomicU64,
    /// Ring-buffer records that failed to decode (wrong size or kind).
    pub events_malformed: AtomicU64,
    /// HTTP/1 messages that failed to parse.
    pub parse_failures_http1: AtomicU64,
    /// Connections dropped from the tracking table because it was full.
    pub connections_evicted: AtomicU64,
    /// Connections forgotten after `idle_timeout` without any event (their unanswered requests
    /// end as spans with `error.type = "timeout"`).
    pub connections_expired: AtomicU64,
    /// Connections no longer parsed: found not to speak HTTP/1, given up on after repeated
    /// parse failures, or never seen starting a request (opened before the agent).
    pub connections_ignored: AtomicU64,
    /// Requests that did not become spans: the per-connection queue of unanswered requests was
    /// full, or the connection stopped being parsed with requests pending.
    pub requests_dropped: AtomicU64,
    /// Final responses that had no request to answer.
    pub responses_orphaned: AtomicU64,
    /// Requests whose `traceparent` header was invalid (ignored: the span started a new trace).
    pub traceparent_invalid: AtomicU64,
    /// Requests whose route went to the per-service overflow route (too many distinct routes).
    pub routes_overflowed: AtomicU64,
    /// Spans built from requests (before sampling).
    pub spans_created: AtomicU64,
    /// Spans not exported because head sampling dropped their trace and no keep rule applied.
    pub spans_sampled_out: AtomicU64,
    /// Spans head sampling dropped, exported anyway because they have Error status.
    pub spans_kept_error: AtomicU64,
    /// Spans head sampling dropped, exported anyway because they were slower than their threshold.
    pub spans_kept_latency: AtomicU64,
    /// Spans the collector accepted.
    pub spans_exported: AtomicU64,
    /// Spans whose export failed for good (after retries, or rejected by the collector).
    pub spans_failed: AtomicU64,
    /// Spans dropped because the export queue was full.
    pub spans_dropped: AtomicU64,
    /// Metric data points the collector accepted.
    pub metric_points_exported: AtomicU64,
    /// Metric data points whose export failed for good (after retries, or rejected).
    pub metric_points_failed: AtomicU64,
    /// Metric snapshots replaced by a newer one before they could be exported (the exporter
    /// was still busy); cumulative values make the newer snapshot carry the same data.
    pub metric_snapshots_dropped: AtomicU64,
    /// Measurements recorded into an overflow series (`otel.metric.overflow=true`) because
    /// their resource had reached its series limit.
    pub metric_series_overflowed: AtomicU64,
    /// Lists of this node's pods that failed (Kubernetes API unreachable, refused, ...).
    pub k8s_list_failures: AtomicU64,
    /// Pod watches that failed to start or ended with an error (not counting an expired
    /// resourceVersion, nor a watch that ended and was resumed).
    pub k8s_watch_failures: AtomicU64,
    /// ReplicaSet or Job lookups (for a pod's Deployment or CronJob) that failed.
    pub k8s_owner_failures: AtomicU64,
    /// Complete lists of this node's pods: the first, and one after every expired watch.
    pub k8s_relists: AtomicU64,
    /// Pods left without Kubernetes metadata (pod store full, or no uid).
    pub k8s_pods_dropped: AtomicU64,
    /// Spans whose ids the kernel decided, by where their parent came from
    /// (indexed by `ParentSource as usize`, in `ParentSource::ALL` order).
    pub spans_by_parent: [AtomicU64; 5],
    /// The kernel's trace-context and injection counters (`tapwire_common::Counter` slots),
    /// copied from its counter map.
    pub kernel: [AtomicU64; tapwire_common::COUNTER_SLOTS as usize],
}

impl Counters {
    /// Counts a span with kernel-decided ids by the source of its parent.
    pub fn count_parent(&self, source: crate::capture::event::ParentSource) {
        Self::inc(&self.spans_by_parent[source as usize]);
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
