//! When to try again: a pure function of the attempt count, the time, and a random number, so that
//! it is tested without sleeping.

use std::time::Duration;

/// Exponential backoff with full jitter, capped, for a bounded time since the first failure.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Stop retrying this long after the first failure; the item becomes `failed`.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again this many milliseconds from now.
    RetryIn(u64),
    GiveUp,
}

impl RetryPolicy {
    /// `attempts` failures so far (1 after the first), the first of them `since_first_failure` ago;
    /// `retry_after` is a server's explicit request (S3's `Retry-After`); `unit` is uniform in [0, 1).
    pub fn decide(
        &self,
        attempts: u32,
        since_first_failure: Duration,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Decision {
        if since_first_failure >= self.give_up_after {
            return Decision::GiveUp;
        }
        let exp = attempts.saturating_sub(1).min(40);
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << exp.min(31))
            .min(self.max_delay);
        // Full jitter: a uniform wait below the ceiling spreads a fleet's retries apart.
        let mut wait = ceiling.mul_f64(unit.clamp(0.0, 1.0));
        if let Some(ra) = retry_after {
            wait = wait.max(ra.min(self.max_delay));
        }
        // Never retry after the deadline has passed: the last retry happens at the deadline.
        let left = self.give_up_after - since_first_failure;
        Decision::RetryIn(wait.min(left).as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_then_caps() {
        let p = RetryPolicy::default();
        let d = |n| p.decide(n, Duration::ZERO, None, 0.999_999);
        assert_eq!(d(1), Decision::RetryIn(999));
        assert_eq!(d(2), Decision::RetryIn(1999));
        assert_eq!(d(4), Decision::RetryIn(7999));
        assert_eq!(d(30), Decision::RetryIn(299_999));
        assert_eq!(d(u32::MAX), Decision::RetryIn(299_999));
        assert_eq!(p.decide(3, Duration::ZERO, None, 0.0), Decision::RetryIn(0));
    }

    #[test]
    fn honours_retry_after_and_gives_up_after_the_window() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(Duration::from_secs(30)), 0.1),
            Decision::RetryIn(30_000)
        );
        assert_eq!(
            p.decide(1, Duration::from_secs(24 * 3600), None, 0.5),
            Decision::GiveUp
        );
        // One second before the deadline, the wait is at most that second.
        let almost = Duration::from_secs(24 * 3600 - 1);
        assert_eq!(p.decide(30, almost, None, 0.99), Decision::RetryIn(1000));
    }

    proptest! {
        #[test]
        fn waits_are_bounded(attempts in 0u32.., since in 0u64..200_000, unit in 0.0f64..1.0, ra in proptest::option::of(0u64..10_000)) {
            let p = RetryPolicy::default();
            match p.decide(attempts, Duration::from_secs(since), ra.map(Duration::from_secs), unit) {
                Decision::RetryIn(ms) => {
                    prop_assert!(since < 24 * 3600);
                    prop_assert!(ms <= 300_000);
                    prop_assert!(ms <= (24 * 3600 - since) * 1000);
                }
                Decision::GiveUp => prop_assert!(since >= 24 * 3600),
            }
        }
    }
}
