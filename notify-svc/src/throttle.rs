//! Logging a recurring error at most once per interval, so an outage does
//! not flood the log.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Logs a recurring error at most once per interval, counting the rest, so an
/// outage does not flood the log.
#[derive(Debug)]
pub struct Throttled {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Some(number suppressed since the last log line) when this one should be logged.
    pub fn check(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

/// How often the same kind of client error is logged at most.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_logs_once_per_interval_and_counts_the_rest() {
        let t = Throttled::new(Duration::from_millis(200));
        assert_eq!(t.check(), Some(0), "the first one is logged");
        assert_eq!(t.check(), None);
        assert_eq!(t.check(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.check(), Some(2), "then one line saying how many were skipped");
    }
}
