//! Metrics: producers fill the shared [`model`] and the exporters (OTLP, Prometheus, console)
//! render it.
//!
//! - [`red`]: HTTP RED metrics (request rate, errors, duration, body sizes, in-flight requests)
//!   aggregated from finished spans.
//! - [`process`], [`queue`], [`net`]: per-service CPU and memory, accept queues, network counters.
//! - [`servicegraph`]: edges between services (request count, failures, durations) from client
//!   and server spans paired by their shared TCP connection.
//! - [`agent`]: the agent's own health counters, under a `service.name = tapwire` resource, with
//!   [`ebpf`]: what each eBPF program costs, and the service-graph metrics.
//!
//! Each producer returns a [`model::Snapshot`]; the app concatenates them and hands the result to
//! `export::metrics` and `export::prometheus` (both merge resources that are equal by value).

pub mod agent;
pub mod collect;
pub mod ebpf;
pub mod model;
pub mod net;
pub mod process;
pub mod queue;
pub mod red;
pub mod servicegraph;

/// The wall clock in nanoseconds since the Unix epoch (0 if the clock is before 1970), the time
/// base of every metric point.
pub fn now_unix_nano() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
