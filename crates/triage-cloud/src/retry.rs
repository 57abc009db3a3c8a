//! The one retry policy: how many attempts per target, how long to wait
//! between them, and the overall deadline across every target. The
//! [`gateway`](crate::gateway) is the only place that applies it.

use std::time::Duration;

use rand::Rng;

/// Retries per target with exponential backoff and full jitter, inside one
/// deadline for the whole fallback walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per target, counting the first (at least 1).
    pub max_attempts: u32,
    /// The backoff cap before the first retry; doubles per retry.
    pub base_delay: Duration,
    /// The largest backoff cap.
    pub max_delay: Duration,
    /// Overall time across all targets, attempts and waits.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before the retry that follows failed attempt number `attempt`
    /// (0 for the first attempt): uniform in `[0, min(max_delay, base_delay *
    /// 2^attempt)]` ("full jitter", so that clients that failed together do
    /// not retry together), but never shorter than the provider's
    /// `Retry-After`.
    pub fn backoff<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut R,
    ) -> Duration {
        let cap = self.cap(attempt);
        let jitter = if cap.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(rng.random_range(0.0..=cap.as_secs_f64()))
        };
        match retry_after {
            Some(at_least) => jitter.max(at_least),
            None => jitter,
        }
    }

    /// The upper bound of the jittered wait after attempt `attempt`.
    pub fn cap(&self, attempt: u32) -> Duration {
        let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
        self.base_delay
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max_delay)
    }

    /// The wait before retrying the same target, or `None` when this target
    /// has had its attempts or the wait would not end before the deadline
    /// (then the caller moves on to the next target at once: a `Retry-After`
    /// longer than the time left means this provider will not answer in time).
    pub fn next_delay<R: Rng + ?Sized>(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        remaining: Duration,
        rng: &mut R,
    ) -> Option<Duration> {
        if attempt + 1 >= self.max_attempts.max(1) {
            return None;
        }
        let delay = self.backoff(attempt, retry_after, rng);
        (delay < remaining).then_some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
        }
    }

    #[test]
    fn default_is_three_attempts_in_a_minute() {
        let p = RetryPolicy::default();
        assert_eq!(
            (p.max_attempts, p.base_delay, p.max_delay, p.deadline),
            (
                3,
                Duration::from_millis(200),
                Duration::from_secs(10),
                Duration::from_secs(60)
            )
        );
    }

    #[test]
    fn the_cap_doubles_up_to_max_delay() {
        let p = policy();
        let caps: Vec<u128> = (0..6).map(|a| p.cap(a).as_millis()).collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.cap(200), Duration::from_secs(1));
    }

    #[test]
    fn backoff_is_full_jitter_within_the_cap() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..8 {
            let samples: Vec<Duration> = (0..500)
                .map(|_| p.backoff(attempt, None, &mut rng))
                .collect();
            let cap = p.cap(attempt);
            assert!(samples.iter().all(|d| *d <= cap), "attempt {attempt}");
            // Full jitter: samples spread over the whole range, not clustered at the cap.
            let low = samples.iter().filter(|d| **d < cap / 4).count();
            let high = samples.iter().filter(|d| **d > cap * 3 / 4).count();
            assert!(
                low > 50 && high > 50,
                "attempt {attempt}: {low} low, {high} high"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let d = p.backoff(0, Some(Duration::from_secs(3)), &mut rng);
            assert!(d >= Duration::from_secs(3));
            // A Retry-After shorter than the jitter does not shorten it below the sample.
            let d = p.backoff(3, Some(Duration::from_millis(1)), &mut rng);
            assert!(d >= Duration::from_millis(1) && d <= Duration::from_millis(800));
        }
    }

    #[test]
    fn next_delay_stops_after_max_attempts_and_at_the_deadline() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(3);
        let long = Duration::from_secs(60);
        assert!(p.next_delay(0, None, long, &mut rng).is_some());
        assert!(p.next_delay(2, None, long, &mut rng).is_some());
        assert_eq!(
            p.next_delay(3, None, long, &mut rng),
            None,
            "4 attempts made"
        );
        // A Retry-After past the deadline: move on instead of waiting.
        assert_eq!(
            p.next_delay(
                0,
                Some(Duration::from_secs(5)),
                Duration::from_secs(4),
                &mut rng
            ),
            None
        );
        let d = p.next_delay(
            0,
            Some(Duration::from_secs(2)),
            Duration::from_secs(4),
            &mut rng,
        );
        assert_eq!(d, Some(Duration::from_secs(2)));
        let once = RetryPolicy {
            max_attempts: 1,
            ..p
        };
        assert_eq!(once.next_delay(0, None, long, &mut rng), None);
        let zero = RetryPolicy {
            max_attempts: 0,
            ..p
        };
        assert_eq!(
            zero.next_delay(0, None, long, &mut rng),
            None,
            "0 is treated as 1"
        );
    }

    #[test]
    fn zero_base_delay_retries_at_once() {
        let p = RetryPolicy {
            base_delay: Duration::ZERO,
            ..policy()
        };
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(p.backoff(5, None, &mut rng), Duration::ZERO);
    }
}
