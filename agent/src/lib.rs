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
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod protocols;
pub mod sampling;
pub mod telemetry;
