//! Loading and attaching the kernel programs, keeping the cgroup selection in the kernel map,
//! and draining the ring buffer into typed [`event::Event`]s.

pub mod caps;
pub mod check;
pub mod event;
pub mod pin;
pub mod probes;
pub mod ring;
pub mod sockcheck;
pub mod tracefs;

pub use probes::{CaptureConfig, CaptureError, HOOKS, Probes};
