//! The retry ladder of terminal webhooks: the configured schedule (delay before each
//! attempt), up to 20 % of random jitter added so that webhooks which failed together do
//! not all come back together, and `Retry-After` on 429/503 as a lower bound. Pure
//! functions, so the bounds are tested without clocks.

use std::time::{Duration, SystemTime};

use conduit_core::config::RetrySchedule;

/// Largest share of a delay added as jitter.
pub const MAX_JITTER: f64 = 0.2;

/// A receiver's `Retry-After` is honoured up to this long; beyond it a receiver could
/// park an event for ever.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// When the next attempt of a failed terminal webhook is due, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAttempt {
    After(Duration),
    Exhausted,
}

/// The configured schedule with jitter and `Retry-After` applied.
#[derive(Debug, Clone)]
pub struct RetryLadder {
    schedule: RetrySchedule,
}

impl RetryLadder {
    pub fn new(schedule: RetrySchedule) -> Self {
        Self { schedule }
    }

    /// The schedule it follows.
    pub fn schedule(&self) -> &RetrySchedule {
        &self.schedule
    }

    /// Attempts in one schedule.
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.schedule.attempts()).unwrap_or(u32::MAX)
    }

    /// The delay before the first attempt, counted from the event (usually zero).
    pub fn first_delay(&self) -> Option<Duration> {
        self.schedule.delay_before(1)
    }

    /// The delay before attempt `attempts_made + 1` after `attempts_made` failed ones.
    /// `jitter_fraction` in `[0, 1]` picks the share of [`MAX_JITTER`] to add; the
    /// `retry_after` a receiver asked for is a lower bound.
    pub fn next(
        &self,
        attempts_made: u32,
        jitter_fraction: f64,
        retry_after: Option<Duration>,
    ) -> NextAttempt {
        let next = usize::try_from(attempts_made)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        match self.schedule.delay_before(next) {
            None => NextAttempt::Exhausted,
            Some(base) => {
                let delay = with_jitter(base, jitter_fraction);
                let floor = retry_after
                    .map(|d| d.min(MAX_RETRY_AFTER))
                    .unwrap_or_default();
                NextAttempt::After(delay.max(floor))
            }
        }
    }
}

/// `base` lengthened by `fraction` (clamped to `[0, 1]`) of [`MAX_JITTER`]: always within
/// `[base, base * 1.2]`.
pub fn with_jitter(base: Duration, fraction: f64) -> Duration {
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    base + base.mul_f64(MAX_JITTER * fraction)
}

/// A fresh random jitter fraction.
pub fn random_fraction() -> f64 {
    rand::random::<f64>()
}

/// Parses a `Retry-After` value, seconds or an HTTP date, as a delay from `now`.
/// A date in the past means no wait; a value that is neither is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether a status code's `Retry-After` counts (429 Too Many Requests, 503 Unavailable).
pub fn honours_retry_after(status: u16) -> bool {
    matches!(status, 429 | 503)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ladder(raw: &str) -> RetryLadder {
        RetryLadder::new(RetrySchedule::parse(raw).unwrap())
    }

    #[test]
    fn follows_the_default_schedule_then_stops() {
        let l = ladder(conduit_core::config::DEFAULT_RETRY_SCHEDULE);
        assert_eq!(l.attempts(), 8);
        assert_eq!(l.first_delay(), Some(Duration::ZERO));
        assert_eq!(l.next(0, 0.0, None), NextAttempt::After(Duration::ZERO));
        assert_eq!(
            l.next(1, 0.0, None),
            NextAttempt::After(Duration::from_secs(5))
        );
        assert_eq!(
            l.next(2, 0.0, None),
            NextAttempt::After(Duration::from_secs(300))
        );
        assert_eq!(
            l.next(7, 0.0, None),
            NextAttempt::After(Duration::from_secs(36_000))
        );
        assert_eq!(l.next(8, 0.0, None), NextAttempt::Exhausted);
        assert_eq!(l.next(u32::MAX, 0.5, None), NextAttempt::Exhausted);
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let base = Duration::from_secs(300);
        assert_eq!(with_jitter(base, 0.0), base);
        assert_eq!(with_jitter(base, 1.0), Duration::from_secs(360));
        assert_eq!(with_jitter(base, 0.5), Duration::from_secs(330));
        // Out-of-range fractions are clamped, never stretch the bound.
        assert_eq!(with_jitter(base, 7.0), Duration::from_secs(360));
        assert_eq!(with_jitter(base, -1.0), base);
        assert_eq!(with_jitter(base, f64::NAN), base);
        assert_eq!(with_jitter(Duration::ZERO, 1.0), Duration::ZERO);
        for _ in 0..10_000 {
            let d = with_jitter(base, random_fraction());
            assert!(d >= base && d <= Duration::from_secs(360), "{d:?}");
        }
    }

    #[test]
    fn retry_after_is_a_lower_bound_only() {
        let l = ladder("0s,5s,5m");
        let longer = Some(Duration::from_secs(60));
        assert_eq!(
            l.next(1, 0.0, longer),
            NextAttempt::After(Duration::from_secs(60))
        );
        let shorter = Some(Duration::from_secs(1));
        assert_eq!(
            l.next(2, 0.0, shorter),
            NextAttempt::After(Duration::from_secs(300))
        );
        // It never adds attempts.
        assert_eq!(l.next(3, 0.0, longer), NextAttempt::Exhausted);
        let absurd = Some(Duration::from_secs(365 * 24 * 3600));
        assert_eq!(l.next(1, 0.0, absurd), NextAttempt::After(MAX_RETRY_AFTER));
    }

    #[test]
    fn parses_retry_after_seconds() {
        let now = SystemTime::now();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
    }

    #[test]
    fn parses_retry_after_http_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        // The obsolete RFC 850 form is still an HTTP date.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn only_429_and_503_carry_retry_after() {
        assert!(honours_retry_after(429));
        assert!(honours_retry_after(503));
        assert!(!honours_retry_after(500));
        assert!(!honours_retry_after(200));
    }
}
