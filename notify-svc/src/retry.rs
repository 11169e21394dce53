//! Exponential backoff with full jitter: the n-th retry waits a random time
//! between 0 and min(max_delay, initial * 2^n), which spreads retries of many
//! records so they do not hit a recovering receiver at once.

use std::time::Duration;

use rand::Rng;

/// How failed notifications are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Bound of the first retry's delay.
    pub initial_delay: Duration,
    /// Largest bound.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The delay bound before attempt `attempt + 1`, after `attempt` failures
    /// (1-based): initial * 2^(attempt-1), capped.
    pub fn bound(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(31));
        self.initial_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// A random delay in [0, bound(attempt)].
    pub fn delay(&self, attempt: u32) -> Duration {
        let bound = self.bound(attempt);
        if bound.is_zero() {
            return bound;
        }
        Duration::from_nanos(rand::rng().random_range(0..=bound.as_nanos().min(u128::from(u64::MAX)) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_double_and_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        assert_eq!(p.bound(1), Duration::from_millis(100));
        assert_eq!(p.bound(2), Duration::from_millis(200));
        assert_eq!(p.bound(4), Duration::from_millis(800));
        assert_eq!(p.bound(5), Duration::from_secs(1));
        assert_eq!(p.bound(100), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_within_the_bound() {
        let p = RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let delays: Vec<_> = (0..200).map(|_| p.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "full jitter should spread delays");
    }
}
