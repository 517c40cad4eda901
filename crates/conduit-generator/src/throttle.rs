//! When a progress report becomes a published progress event. The contract: whenever
//! progress advanced by at least 10 points or 5 s passed since the last event, and never
//! more than once a second per task. The `processing` event counts as the first one (at
//! 0 %), so a task that finishes within a second may send none.

use std::time::{Duration, Instant};

const MIN_GAP: Duration = Duration::from_secs(1);
const HEARTBEAT: Duration = Duration::from_secs(5);
const STEP: u8 = 10;

#[derive(Debug, Clone)]
pub struct ProgressThrottle {
    last_at: Instant,
    last_percent: u8,
}

impl ProgressThrottle {
    /// Starts counting from the `processing` event sent at `started`.
    pub fn new(started: Instant) -> Self {
        Self {
            last_at: started,
            last_percent: 0,
        }
    }

    /// Whether a report of `percent` at `now` is published; if so it becomes the last one.
    pub fn offer(&mut self, now: Instant, percent: u8) -> bool {
        let since = now.saturating_duration_since(self.last_at);
        if since < MIN_GAP {
            return false;
        }
        if percent >= self.last_percent.saturating_add(STEP) || since >= HEARTBEAT {
            self.last_at = now;
            self.last_percent = percent.max(self.last_percent);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_within_the_first_second() {
        let t0 = Instant::now();
        let mut t = ProgressThrottle::new(t0);
        assert!(!t.offer(t0 + ms(100), 50));
        assert!(!t.offer(t0 + ms(999), 100));
        assert!(t.offer(t0 + ms(1000), 100));
    }

    #[test]
    fn ten_points_after_a_second_sends() {
        let t0 = Instant::now();
        let mut t = ProgressThrottle::new(t0);
        assert!(!t.offer(t0 + ms(1500), 9));
        assert!(t.offer(t0 + ms(1600), 10));
        // A big jump still waits for the one-second gap.
        assert!(!t.offer(t0 + ms(2000), 60));
        assert!(t.offer(t0 + ms(2600), 60));
        assert!(!t.offer(t0 + ms(4000), 69));
        assert!(t.offer(t0 + ms(4100), 70));
    }

    #[test]
    fn five_quiet_seconds_send_a_heartbeat() {
        let t0 = Instant::now();
        let mut t = ProgressThrottle::new(t0);
        assert!(!t.offer(t0 + ms(4999), 3));
        assert!(t.offer(t0 + ms(5000), 3));
        assert!(!t.offer(t0 + ms(9000), 4));
        assert!(t.offer(t0 + ms(10_000), 4));
    }

    #[test]
    fn never_more_than_once_a_second_under_a_flood() {
        let t0 = Instant::now();
        let mut t = ProgressThrottle::new(t0);
        let mut sent = Vec::new();
        for i in 0..=1000u64 {
            let now = t0 + ms(i * 10);
            if t.offer(now, (i / 10).min(100) as u8) {
                sent.push(now);
            }
        }
        assert!(!sent.is_empty());
        for pair in sent.windows(2) {
            assert!(pair[1] - pair[0] >= MIN_GAP);
        }
    }

    #[test]
    fn a_lower_report_does_not_lower_the_baseline() {
        let t0 = Instant::now();
        let mut t = ProgressThrottle::new(t0);
        assert!(t.offer(t0 + ms(1000), 50));
        assert!(!t.offer(t0 + ms(2000), 30));
        assert!(!t.offer(t0 + ms(3000), 59));
        assert!(t.offer(t0 + ms(3000), 60));
    }
}
