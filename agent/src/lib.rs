//! tapwire: a zero-code instrumentation agent. The path of one request through the agent:
//!
//! capture (kernel events) -> protocols (HTTP/1 parsing) -> correlate (connections, exchanges,
//! spans) -> sampling (which spans leave) -> export (console, OTLP). discover names the services;
//! telemetry counts every loss.

pub mod app;
pub mod capture;
pub mod clock;
pub mod config;
pub mod correlate;
pub mod discover;
pub mod export;

/// Hash maps on the per-event path, keyed by kernel values (pids, socket addresses, cgroup ids):
/// foldhash, randomly seeded, instead of SipHash, which took ~3% of the agent's CPU.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod protocols;
pub mod sampling;
pub mod telemetry;
