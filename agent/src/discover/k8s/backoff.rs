//! Exponential backoff with a cap and jitter, reset after a quiet period (as client-go's
//! reflector: 800 ms doubling up to 30 s, reset after 2 minutes without failure).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A failure this long after the previous one starts again from `initial`.
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(800),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(120),
        }
    }
}

#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
    last_failure: Option<Instant>,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Backoff {
        Backoff { config, failures: 0, last_failure: None }
    }

    /// The delay before the next attempt, after a failure at `now`, before jitter:
    /// initial * 2^(failures in a row), capped.
    pub fn next_base(&mut self, now: Instant) -> Duration {
        if self.last_failure.is_some_and(|t| now.duration_since(t) > self.config.reset_after) {
            self.failures = 0;
        }
        self.last_failure = Some(now);
        let exp = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        self.config.initial.saturating_mul(1 << exp).min(self.config.max)
    }

    /// [`Self::next_base`] scaled by a random factor in [0.5, 1.0], so that the agents of a
    /// cluster do not all come back at the same instant after an API server restart.
    pub fn next_delay(&mut self) -> Duration {
        self.next_base(Instant::now()).mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets_after_quiet() {
        let config = BackoffConfig {
            initial: Duration::from_millis(800),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(120),
        };
        let mut b = Backoff::new(config);
        let t0 = Instant::now();
        let delays: Vec<u128> = (0..8).map(|i| b.next_base(t0 + Duration::from_secs(i)).as_millis()).collect();
        assert_eq!(delays, [800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        // 119 s after the last failure: still backing off.
        assert_eq!(b.next_base(t0 + Duration::from_secs(7 + 119)), Duration::from_secs(30));
        // More than 2 minutes later: from the start again.
        assert_eq!(b.next_base(t0 + Duration::from_secs(126 + 121)), Duration::from_millis(800));
        for _ in 0..100 {
            b.next_base(t0 + Duration::from_secs(300));
        }
        assert_eq!(b.next_base(t0 + Duration::from_secs(300)), Duration::from_secs(30), "no overflow");
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let mut b = Backoff::new(BackoffConfig { initial: Duration::from_millis(100), ..BackoffConfig::default() });
        for _ in 0..50 {
            let mut fresh = Backoff::new(BackoffConfig { initial: Duration::from_millis(100), ..BackoffConfig::default() });
            let d = fresh.next_delay();
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100), "{d:?}");
        }
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
