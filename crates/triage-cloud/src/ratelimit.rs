//! Client-side rate limits per provider: requests per minute and tokens per
//! minute, as token buckets that refill continuously. Staying under the
//! provider's own limits is cheaper than collecting its 429s.
//!
//! A call reserves its share at once (a bucket may go below zero) and then
//! waits for the deficit to refill, so concurrent callers queue in order
//! without a lock held across the wait. The token estimate (input chars / 4 +
//! `max_tokens`) is corrected with the reported usage after the call.

use std::time::{Duration, Instant};

use triage_core::llm::{ChatRequest, ModerationRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

/// One continuously refilling bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Also the refill per minute.
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket of `per_minute`, refilling at `per_minute` a minute.
    pub fn per_minute(per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Self {
            capacity,
            level: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.capacity / 60.0).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// How long until `amount` (at most a full bucket) is available.
    fn wait_for(&mut self, amount: f64, now: Instant) -> Duration {
        self.refill(now);
        let needed = amount.min(self.capacity);
        if self.level >= needed {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((needed - self.level) * 60.0 / self.capacity)
        }
    }

    fn take(&mut self, amount: f64) {
        self.level -= amount;
    }

    /// Give back (positive) or take more (negative) after the fact.
    fn adjust(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + amount).min(self.capacity);
    }

    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }
}

/// Both buckets of one provider.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
}

/// A reservation made by [`RateLimiter::reserve`]: wait `wait`, then call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reservation {
    pub wait: Duration,
    /// The tokens reserved, to correct with the real usage.
    pub estimated_tokens: u64,
}

impl RateLimiter {
    pub fn new(limits: RateLimits, now: Instant) -> Self {
        Self {
            requests: limits
                .requests_per_minute
                .map(|n| TokenBucket::per_minute(n, now)),
            tokens: limits
                .tokens_per_minute
                .map(|n| TokenBucket::per_minute(n, now)),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// Reserve one request and `estimated_tokens` if both are available
    /// within `max_wait`; otherwise reserve nothing and return the wait that
    /// would have been needed.
    pub fn reserve(
        &mut self,
        estimated_tokens: u64,
        max_wait: Duration,
        now: Instant,
    ) -> Result<Reservation, Duration> {
        let tokens = estimated_tokens as f64;
        let wait_requests = self
            .requests
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1.0, now));
        let wait_tokens = self
            .tokens
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(tokens, now));
        let wait = wait_requests.max(wait_tokens);
        if wait > max_wait {
            return Err(wait);
        }
        if let Some(b) = self.requests.as_mut() {
            b.take(1.0);
        }
        if let Some(b) = self.tokens.as_mut() {
            b.take(tokens);
        }
        Ok(Reservation {
            wait,
            estimated_tokens,
        })
    }

    /// Replace the estimate with the tokens the provider reported (0 for a
    /// call that failed before using any: its estimate is given back).
    pub fn settle(&mut self, reservation: &Reservation, actual_tokens: u64, now: Instant) {
        if let Some(b) = self.tokens.as_mut() {
            b.adjust(
                reservation.estimated_tokens as f64 - actual_tokens as f64,
                now,
            );
        }
    }

    pub fn tokens_available(&mut self, now: Instant) -> Option<f64> {
        self.tokens.as_mut().map(|b| b.level(now))
    }

    pub fn requests_available(&mut self, now: Instant) -> Option<f64> {
        self.requests.as_mut().map(|b| b.level(now))
    }
}

/// Input characters / 4 plus the most it may write.
pub fn estimate_chat_tokens(req: &ChatRequest) -> u64 {
    let chars: usize = req.messages.iter().map(|m| m.content.chars().count()).sum();
    (chars as u64).div_ceil(4) + u64::from(req.max_tokens.unwrap_or(0))
}

pub fn estimate_moderation_tokens(req: &ModerationRequest) -> u64 {
    let chars: usize = req.input.iter().map(|s| s.chars().count()).sum();
    (chars as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_core::llm::Message;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn requests_per_minute_refill_continuously() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            RateLimits {
                requests_per_minute: Some(60),
                tokens_per_minute: None,
            },
            t0,
        );
        for _ in 0..60 {
            assert_eq!(
                l.reserve(0, Duration::ZERO, t0).unwrap().wait,
                Duration::ZERO
            );
        }
        // Empty: the next one needs a second (60/min), which max_wait refuses.
        assert_eq!(
            l.reserve(0, Duration::ZERO, t0),
            Err(Duration::from_secs(1))
        );
        // Half a second later, half a request has refilled.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(
            l.reserve(0, Duration::ZERO, t1),
            Err(Duration::from_millis(500))
        );
        // Reserving with patience queues: each waits one more second.
        assert_eq!(
            l.reserve(0, MIN, t1).unwrap().wait,
            Duration::from_millis(500)
        );
        assert_eq!(
            l.reserve(0, MIN, t1).unwrap().wait,
            Duration::from_millis(1500)
        );
        // Refill never exceeds the capacity.
        let much_later = t1 + Duration::from_secs(3600);
        assert_eq!(l.requests_available(much_later), Some(60.0));
    }

    #[test]
    fn tokens_per_minute_and_settling_with_real_usage() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            RateLimits {
                requests_per_minute: None,
                tokens_per_minute: Some(6000),
            },
            t0,
        );
        let r = l.reserve(5000, Duration::ZERO, t0).unwrap();
        assert_eq!(l.tokens_available(t0), Some(1000.0));
        // It used only 1000: 4000 come back.
        l.settle(&r, 1000, t0);
        assert_eq!(l.tokens_available(t0), Some(5000.0));
        let r = l.reserve(5000, Duration::ZERO, t0).unwrap();
        assert_eq!(l.tokens_available(t0), Some(0.0));
        // It used more than estimated: the bucket goes into debt.
        l.settle(&r, 8000, t0);
        assert_eq!(l.tokens_available(t0), Some(-3000.0));
        // 100 tokens/s: 1000 tokens are 40 s away.
        assert_eq!(
            l.reserve(1000, Duration::from_secs(39), t0),
            Err(Duration::from_secs(40))
        );
        assert!(l.reserve(1000, Duration::from_secs(40), t0).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_bucket_waits_for_a_full_bucket() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            RateLimits {
                requests_per_minute: None,
                tokens_per_minute: Some(600),
            },
            t0,
        );
        assert_eq!(
            l.reserve(10_000, Duration::ZERO, t0).unwrap().wait,
            Duration::ZERO
        );
        // Now deep in debt: 10_000 - 600 = 9_400 owed, then a full bucket of 600.
        assert_eq!(
            l.reserve(10_000, Duration::ZERO, t0),
            Err(Duration::from_secs(1000))
        );
    }

    #[test]
    fn both_limits_apply_and_the_longer_wait_wins() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(
            RateLimits {
                requests_per_minute: Some(1),
                tokens_per_minute: Some(120),
            },
            t0,
        );
        assert!(l.reserve(60, Duration::ZERO, t0).is_ok());
        // Requests: 60 s until the next; tokens: 60 left, 100 needs 20 s.
        assert_eq!(l.reserve(100, Duration::ZERO, t0), Err(MIN));
        // A refused reservation takes nothing.
        assert_eq!(l.tokens_available(t0), Some(60.0));
        assert!(RateLimiter::new(RateLimits::default(), t0).is_unlimited());
    }

    #[test]
    fn estimates_are_chars_over_four_plus_max_tokens() {
        let req = ChatRequest {
            messages: vec![Message::system("abcd"), Message::user("héllo wörld")],
            max_tokens: Some(100),
            ..ChatRequest::default()
        };
        // 4 + 11 chars = 15 → 4 tokens (rounded up) + 100.
        assert_eq!(estimate_chat_tokens(&req), 104);
        let m = ModerationRequest {
            model: String::new(),
            input: vec!["12345678".into(), "1".into()],
        };
        assert_eq!(estimate_moderation_tokens(&m), 3);
    }
}
