//! Kernel timestamps (CLOCK_MONOTONIC, what bpf_ktime_get_ns returns) mapped to the wall clock.

use std::time::{SystemTime, UNIX_EPOCH};

/// Offset between CLOCK_REALTIME and CLOCK_MONOTONIC, measured once at start-up.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    /// Measures the offset, taking the tightest of a few samples.
    pub fn measure() -> Self {
        let mut best: Option<(u128, i128)> = None;
        for _ in 0..5 {
            let m1 = monotonic_ns();
            let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let m2 = monotonic_ns();
            let width = u128::from(m2 - m1);
            let offset = wall as i128 - i128::from(m1 + (m2 - m1) / 2);
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        Clock { offset_ns: best.map_or(0, |(_, o)| o) }
    }

    /// A clock with a fixed offset, for tests.
    pub fn with_offset(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    /// Unix-epoch nanoseconds for a kernel monotonic timestamp.
    pub fn to_unix_nanos(&self, mono_ns: u64) -> u64 {
        (i128::from(mono_ns) + self.offset_ns).clamp(0, i128::from(u64::MAX)) as u64
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the same clock as the kernel's event timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
