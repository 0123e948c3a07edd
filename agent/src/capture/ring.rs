//! Draining the ring buffer from tokio.

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::event::Event;
use crate::telemetry::Counters;

pub struct RingReader {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl RingReader {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd for as long as it lives, and it lives inside the
        // AsyncFd, so the fd stays open and the same for the AsyncFd's whole lifetime.
        let fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(std::io::Error::from)?;
        Ok(RingReader { fd })
    }

    /// Waits until records are there (the kernel wakes us when a backlog builds up; otherwise
    /// the ring is drained every `RING_POLL_INTERVAL_MS`), then decodes up to `max` of them into
    /// `out`. Records that do not decode are counted.
    pub async fn read_batch(&mut self, out: &mut Vec<Event>, counters: &Counters, max: usize) -> std::io::Result<()> {
        let poll = std::time::Duration::from_millis(tapwire_common::RING_POLL_INTERVAL_MS);
        loop {
            if drain(self.fd.get_mut(), out, counters, max) > 0 {
                return Ok(());
            }
            tokio::select! {
                guard = self.fd.readable_mut() => {
                    let mut guard = guard?;
                    if drain(guard.get_inner_mut(), out, counters, max) == 0 {
                        guard.clear_ready();
                    } else {
                        return Ok(());
                    }
                }
                () = tokio::time::sleep(poll) => {}
            }
        }
    }
}

/// Decodes up to `max` records; returns how many were read.
fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>, counters: &Counters, max: usize) -> usize {
    let mut n = 0;
    while n < max {
        let Some(item) = ring.next() else { break };
        n += 1;
        Counters::inc(&counters.events_read);
        match Event::decode(&item) {
            Ok(event) => out.push(event),
            Err(err) => {
                Counters::inc(&counters.events_malformed);
                tracing::debug!(%err, "dropped a malformed ring-buffer record");
            }
        }
    }
    n
}
