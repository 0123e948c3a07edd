//! At most one warning per kind per interval; the lines that were held back are counted.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Rate limiter for log lines, keyed by a short kind string ("queue_full", "http 503", ...).
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    /// (kind, last time logged, occurrences held back since). Few kinds: a Vec is enough.
    state: Mutex<Vec<(String, Instant, u64)>>,
}

impl LogLimiter {
    /// A limiter allowing one line per kind per `interval`.
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            state: Mutex::new(Vec::new()),
        }
    }

    /// Records one occurrence of `kind`. Returns `Some(held_back)` when a line should be logged
    /// now, where `held_back` is the number of occurrences not logged since the last line.
    pub fn check(&self, kind: &str) -> Option<u64> {
        let now = Instant::now();
        // A poisoned lock only means another thread panicked mid-update; the data is still usable.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.iter_mut().find(|(k, _, _)| k == kind) {
            Some((_, last, held)) if now.duration_since(*last) < self.interval => {
                *held += 1;
                None
            }
            Some((_, last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                // Bound the table: kinds come from a small fixed set, but be safe.
                if state.len() >= 64 {
                    state.remove(0);
                }
                state.push((kind.to_owned(), now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval() {
        let limiter = LogLimiter::new(Duration::from_millis(50));
        assert_eq!(limiter.check("a"), Some(0));
        assert_eq!(limiter.check("a"), None);
        assert_eq!(limiter.check("a"), None);
        assert_eq!(limiter.check("b"), Some(0), "kinds are independent");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limiter.check("a"), Some(2));
        assert_eq!(limiter.check("a"), None);
    }
}
