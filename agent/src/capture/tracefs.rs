//! tracefs must be mounted for tracepoints to be attached: aya resolves tracepoint ids under
//! /sys/kernel/tracing. It is not mounted on every machine, so the agent mounts it when it may.

use std::path::Path;

pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracefsState {
    /// Mounted (already, or by us just now).
    Ready { mounted_by_us: bool },
    /// Missing and the mount failed.
    Unavailable { reason: String },
}

fn mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir() || Path::new("/sys/kernel/debug/tracing/events").is_dir()
}

/// Makes sure tracefs is mounted, mounting it at /sys/kernel/tracing when it is missing.
pub fn ensure() -> TracefsState {
    if mounted() {
        return TracefsState::Ready { mounted_by_us: false };
    }
    let result = nix::mount::mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    );
    match result {
        Ok(()) if mounted() => TracefsState::Ready { mounted_by_us: true },
        Ok(()) => TracefsState::Unavailable { reason: "mounted tracefs but it shows no events/ directory".into() },
        Err(e) => TracefsState::Unavailable {
            reason: format!(
                "tracefs is not mounted at {TRACEFS} and tapwire could not mount it ({e}): mount it with \
                 `mount -t tracefs tracefs {TRACEFS}` (on the node, when tapwire runs in a container) \
                 or grant tapwire CAP_SYS_ADMIN"
            ),
        },
    }
}
