//! A circuit breaker per provider, so that a provider that keeps failing is
//! skipped at once instead of costing every request its timeouts and retries.
//!
//! Closed → Open after `failure_threshold` consecutive retryable failures;
//! after `open_for` one half-open probe goes through; its success closes the
//! breaker, its failure opens it again. Errors that retrying cannot fix (400,
//! 401, ...) and refusals say nothing about the provider's health and are not
//! failures. Time comes in as an `Instant` argument, so tests need no sleeps.

use std::time::{Duration, Instant};

use crate::error::ErrorKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive retryable failures that open the breaker (0 = never open).
    pub failure_threshold: u32,
    /// How long it stays open before letting one probe through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight since `since`. If its caller goes away without
    /// reporting (cancelled), another probe is allowed after `open_for`.
    HalfOpen {
        since: Instant,
    },
}

/// What [`Breaker::allow`] grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The breaker is closed.
    Closed,
    /// The one half-open probe: report its result, or [`Breaker::cancel_probe`].
    Probe,
}

/// How an attempt ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Success,
    /// A retryable failure (5xx, 429, timeout, reset, malformed body).
    Failure,
    /// Neither: the provider answered, but with an error retrying cannot fix.
    Neutral,
}

impl Report {
    pub fn from_error(kind: ErrorKind) -> Self {
        if kind.is_retryable() {
            Report::Failure
        } else {
            Report::Neutral
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: BreakerState::Closed {
                consecutive_failures: 0,
            },
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go out now; `Err` carries how long until a probe
    /// may (zero when a probe is already in flight).
    pub fn allow(&mut self, now: Instant) -> Result<Permit, Duration> {
        match self.state {
            BreakerState::Closed { .. } => Ok(Permit::Closed),
            BreakerState::Open { until } if now < until => Err(until - now),
            BreakerState::HalfOpen { since } if now < since + self.config.open_for => {
                Err(Duration::ZERO)
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen { .. } => {
                self.state = BreakerState::HalfOpen { since: now };
                Ok(Permit::Probe)
            }
        }
    }

    /// A granted probe was not used (e.g. the local rate limit refused it).
    pub fn cancel_probe(&mut self, now: Instant) {
        if matches!(self.state, BreakerState::HalfOpen { .. }) {
            // Back to "open, expired": the next caller probes.
            self.state = BreakerState::Open { until: now };
        }
    }

    pub fn report(&mut self, report: Report, now: Instant) {
        self.state = match (self.state, report) {
            (_, Report::Success) => BreakerState::Closed {
                consecutive_failures: 0,
            },
            (
                BreakerState::Closed {
                    consecutive_failures,
                },
                Report::Failure,
            ) => {
                let failures = consecutive_failures.saturating_add(1);
                if self.config.failure_threshold > 0 && failures >= self.config.failure_threshold {
                    tracing::warn!(failures, open_for = ?self.config.open_for, "circuit breaker opens");
                    BreakerState::Open {
                        until: now + self.config.open_for,
                    }
                } else {
                    BreakerState::Closed {
                        consecutive_failures: failures,
                    }
                }
            }
            (BreakerState::HalfOpen { .. }, Report::Failure) => {
                tracing::warn!(open_for = ?self.config.open_for, "half-open probe failed; circuit breaker opens again");
                BreakerState::Open {
                    until: now + self.config.open_for,
                }
            }
            // A late report from a call that started before the breaker opened.
            (BreakerState::Open { until }, Report::Failure) => BreakerState::Open { until },
            // The probe reached the provider but says nothing about its health:
            // let the next call probe.
            (BreakerState::HalfOpen { .. }, Report::Neutral) => BreakerState::Open { until: now },
            (state, Report::Neutral) => state,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(30);

    fn breaker(threshold: u32) -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: threshold,
            open_for: OPEN_FOR,
        })
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = breaker(3);
        for _ in 0..2 {
            assert_eq!(b.allow(t0), Ok(Permit::Closed));
            b.report(Report::Failure, t0);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed {
                consecutive_failures: 2
            }
        );
        b.report(Report::Failure, t0);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: t0 + OPEN_FOR
            }
        );
        assert_eq!(
            b.allow(t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(20))
        );
    }

    #[test]
    fn success_resets_the_count_and_neutral_errors_do_not_count() {
        let t0 = Instant::now();
        let mut b = breaker(2);
        b.report(Report::Failure, t0);
        b.report(Report::Success, t0);
        b.report(Report::Failure, t0);
        assert_eq!(
            b.state(),
            BreakerState::Closed {
                consecutive_failures: 1
            }
        );
        for _ in 0..10 {
            b.report(Report::from_error(ErrorKind::BadRequest), t0);
            b.report(Report::from_error(ErrorKind::Unauthorized), t0);
        }
        assert_eq!(
            b.state(),
            BreakerState::Closed {
                consecutive_failures: 1
            }
        );
        b.report(Report::from_error(ErrorKind::Overloaded), t0);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[test]
    fn after_open_for_one_probe_goes_through_and_success_closes() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        b.report(Report::Failure, t0);
        let later = t0 + OPEN_FOR;
        assert_eq!(b.allow(later), Ok(Permit::Probe));
        // Only one probe at a time.
        assert_eq!(b.allow(later), Err(Duration::ZERO));
        assert_eq!(b.allow(later + Duration::from_secs(1)), Err(Duration::ZERO));
        b.report(Report::Success, later + Duration::from_secs(1));
        assert_eq!(
            b.state(),
            BreakerState::Closed {
                consecutive_failures: 0
            }
        );
        assert_eq!(b.allow(later + Duration::from_secs(1)), Ok(Permit::Closed));
    }

    #[test]
    fn a_failed_probe_opens_again_for_the_full_period() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        b.report(Report::Failure, t0);
        let probe_at = t0 + OPEN_FOR + Duration::from_secs(5);
        assert_eq!(b.allow(probe_at), Ok(Permit::Probe));
        b.report(Report::Failure, probe_at);
        assert_eq!(
            b.state(),
            BreakerState::Open {
                until: probe_at + OPEN_FOR
            }
        );
        assert!(
            b.allow(probe_at + OPEN_FOR - Duration::from_millis(1))
                .is_err()
        );
        assert_eq!(b.allow(probe_at + OPEN_FOR), Ok(Permit::Probe));
    }

    #[test]
    fn an_abandoned_probe_is_replaced_after_open_for() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        b.report(Report::Failure, t0);
        assert_eq!(b.allow(t0 + OPEN_FOR), Ok(Permit::Probe));
        assert!(
            b.allow(t0 + OPEN_FOR * 2 - Duration::from_millis(1))
                .is_err()
        );
        assert_eq!(b.allow(t0 + OPEN_FOR * 2), Ok(Permit::Probe));
    }

    #[test]
    fn a_cancelled_or_neutral_probe_lets_the_next_call_probe() {
        let t0 = Instant::now();
        let mut b = breaker(1);
        b.report(Report::Failure, t0);
        let t1 = t0 + OPEN_FOR;
        assert_eq!(b.allow(t1), Ok(Permit::Probe));
        b.cancel_probe(t1);
        assert_eq!(b.allow(t1), Ok(Permit::Probe));
        b.report(Report::Neutral, t1);
        assert_eq!(b.allow(t1), Ok(Permit::Probe));
    }

    #[test]
    fn threshold_zero_never_opens() {
        let t0 = Instant::now();
        let mut b = breaker(0);
        for _ in 0..100 {
            b.report(Report::Failure, t0);
        }
        assert_eq!(b.allow(t0), Ok(Permit::Closed));
    }
}
