//! At most one log line per interval for conditions that can happen on every event.

use std::time::{Duration, Instant};

/// Lets one log line through per interval and counts the ones it held back.
#[derive(Debug)]
pub(crate) struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> Self {
        RateLimit { every, last: None, suppressed: 0 }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the
    /// previous one; `None` when this one should be skipped.
    pub fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_none_or(|l| now.duration_since(l) >= self.every) {
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval() {
        let mut r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        assert_eq!(r.check(), None);
        assert_eq!(r.check(), None);
        r.last = r.last.and_then(|l| l.checked_sub(Duration::from_secs(3601)));
        assert_eq!(r.check(), Some(2));
    }
}
