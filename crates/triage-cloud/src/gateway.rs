//! The one place that decides whether to retry, fall back or give up.
//!
//! A call walks its targets (provider + model) in order. On each target it
//! makes up to `max_attempts` attempts, retrying only errors that know they
//! are retryable, with jittered exponential backoff that honours the
//! provider's `Retry-After`. An error another provider may not share
//! (`may_fall_back`: 401, 404, 5xx, ...) moves on to the next target; one that
//! any provider would return for the same request (400, 413, 422) ends the
//! call at once. A refusal is an answer and is returned as it is: it is never
//! sent to another provider to get around it. One deadline bounds the whole
//! walk, waits included.
//!
//! Every HTTP attempt is recorded once, as an [`Attempt`], to the
//! [`AttemptSink`] as it completes and in [`Outcome::attempts`]. Targets
//! skipped without a request leaving the process (breaker open, local rate
//! limit, deadline, no key, operation not offered) appear in
//! [`AllFailed::errors`] but not as attempts: nothing was sent, nothing billed.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::{Stream, StreamExt};
use indexmap::IndexMap;
use tokio::time::Instant;
use triage_core::llm::{
    ChatRequest, ChatResponse, ModerationRequest, ModerationResponse, TranscriptionRequest,
    TranscriptionResponse, Usage,
};

use crate::breaker::{Breaker, BreakerConfig, BreakerState, Permit, Report};
use crate::error::{ErrorKind, ProviderError};
use crate::prices::PriceTable;
use crate::provider::{ChunkStream, Provider, ProviderConfig};
use crate::ratelimit::{
    RateLimiter, RateLimits, Reservation, estimate_chat_tokens, estimate_moderation_tokens,
};
use crate::retry::RetryPolicy;
use crate::spend::{Charge, DEFAULT_MAX_TOKENS, SpendGate, SpendHold, UsageBound};

/// One place to send a request: a configured provider and its model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub provider: String,
    /// The provider's model name; empty means the request's own `model`.
    pub model: String,
}

impl Target {
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            model: model.into(),
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

/// Who asked, copied into every attempt record, and what holds the money
/// each attempt may spend.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub request_id: String,
    pub task: String,
    pub tier: String,
    /// Asked to hold every attempt's ceiling before it is sent (budgets);
    /// `None` spends without asking.
    pub gate: Option<Arc<dyn SpendGate>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Answered,
    /// The provider declined on content-policy grounds (an answer).
    Refused,
    Failed {
        kind: ErrorKind,
        status: Option<u16>,
        message: String,
    },
}

/// One HTTP call to one provider, for the cost ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub request_id: String,
    pub task: String,
    pub tier: String,
    pub provider: String,
    pub model: String,
    /// `chat`, `chat_stream`, `moderate` or `transcribe`.
    pub operation: &'static str,
    pub started_at: SystemTime,
    /// Until the answer was read (for a stream: until it ended).
    pub latency: Duration,
    pub outcome: AttemptOutcome,
    pub usage: Usage,
    pub audio_seconds: f64,
    /// The price table applied to `usage`; for a model it has no price for,
    /// the provider's dearest price (logged); 0 only for an empty table.
    pub cost_usd: f64,
}

/// Where attempts go as they complete (the engine's ledger).
pub trait AttemptSink: Send + Sync + std::fmt::Debug {
    fn record(&self, attempt: &Attempt);
}

/// One provider with its limits.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub config: ProviderConfig,
    pub limits: RateLimits,
    pub breaker: BreakerConfig,
}

impl ProviderSettings {
    /// No client-side limits and the default breaker.
    pub fn new(config: ProviderConfig) -> Self {
        Self {
            config,
            limits: RateLimits::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

/// What a call produced, and every attempt it made on the way.
#[derive(Debug)]
pub struct Outcome<T> {
    pub result: Result<T, AllFailed>,
    /// For `chat_stream`, the attempts that failed before the stream that
    /// answered; that one reaches the sink when its stream ends.
    pub attempts: Vec<Attempt>,
}

/// Every target failed (or one failed in a way no other could fix).
#[derive(Debug, thiserror::Error)]
#[error("{}", summary(errors))]
pub struct AllFailed {
    /// Per `provider/model`, in the order tried, every error it returned.
    pub errors: IndexMap<String, Vec<ProviderError>>,
}

impl AllFailed {
    /// The error that ended the call.
    pub fn last(&self) -> Option<&ProviderError> {
        self.errors.values().last().and_then(|v| v.last())
    }

    /// Every error's kind, in order.
    pub fn kinds(&self) -> Vec<ErrorKind> {
        self.errors.values().flatten().map(|e| e.kind).collect()
    }
}

fn summary(errors: &IndexMap<String, Vec<ProviderError>>) -> String {
    if errors.is_empty() {
        return "no target to try".to_owned();
    }
    let each: Vec<String> = errors
        .iter()
        .filter_map(|(key, errs)| {
            let e = errs.last()?;
            let status = e.status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
            let tries = if errs.len() > 1 {
                format!(" [{} errors]", errs.len())
            } else {
                String::new()
            };
            Some(format!("{key}: {:?}{status}: {}{tries}", e.kind, e.message))
        })
        .collect();
    format!("every target failed: {}", each.join("; "))
}

#[derive(Debug)]
struct Slot {
    provider: Provider,
    breaker: Mutex<Breaker>,
    limiter: Mutex<RateLimiter>,
}

impl Slot {
    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn limiter(&self) -> MutexGuard<'_, RateLimiter> {
        self.limiter.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug)]
struct Inner {
    slots: IndexMap<String, Slot>,
    prices: Arc<PriceTable>,
    policy: RetryPolicy,
    sink: Option<Arc<dyn AttemptSink>>,
    /// `provider/model` pairs already warned about having no price.
    unpriced: Mutex<HashSet<String>>,
}

/// Providers behind the retry policy. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// What the driver needs to know of a successful answer.
#[derive(Debug, Clone, Copy, Default)]
struct Bill {
    usage: Usage,
    audio_seconds: f64,
    refused: bool,
}

/// The attempt of a stream that is still being read.
#[derive(Debug)]
struct Pending {
    attempt: Attempt,
    started: Instant,
    reservation: Reservation,
    /// The money held for it, and the most it may cost.
    hold: Option<Box<dyn SpendHold>>,
    ceiling_usd: f64,
}

fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}

/// One retry/fallback walk: what it is for, and how it is accounted.
#[derive(Debug, Clone, Copy)]
struct Walk<'a> {
    /// `chat`, `chat_stream`, `moderate`, `transcribe`.
    operation: &'static str,
    /// The model the caller asked for (kept when a target names none).
    request_model: &'a str,
    /// Tokens reserved against the rate limits before each try.
    estimate: u64,
    /// The most one attempt may bill, for the spending gate.
    bound: UsageBound,
    /// Hand the successful attempt back instead of recording it (a stream
    /// records it when it ends).
    defer: bool,
}

/// Who an attempt called.
#[derive(Debug, Clone, Copy)]
struct Callee<'a> {
    provider: &'a str,
    model: &'a str,
    operation: &'static str,
}

impl Gateway {
    /// Providers with later duplicate names replace earlier ones.
    pub fn new(
        providers: Vec<ProviderSettings>,
        prices: Arc<PriceTable>,
        policy: RetryPolicy,
        sink: Option<Arc<dyn AttemptSink>>,
    ) -> Self {
        // One connection pool for every provider.
        let http = reqwest::Client::new();
        let now = now_std();
        let slots = providers
            .into_iter()
            .map(|s| {
                let name = s.config.name.clone();
                let slot = Slot {
                    provider: Provider::new(s.config, http.clone()),
                    breaker: Mutex::new(Breaker::new(s.breaker)),
                    limiter: Mutex::new(RateLimiter::new(s.limits, now)),
                };
                (name, slot)
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                slots,
                prices,
                policy,
                sink,
                unpriced: Mutex::new(HashSet::new()),
            }),
        }
    }

    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.inner.slots.get(name).map(|s| &s.provider)
    }

    pub fn prices(&self) -> &PriceTable {
        &self.inner.prices
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.inner.policy
    }

    /// The breaker of a provider, for health reports.
    pub fn breaker_state(&self, name: &str) -> Option<BreakerState> {
        self.inner.slots.get(name).map(|s| s.breaker().state())
    }

    pub async fn chat(
        &self,
        ctx: &CallContext,
        targets: &[Target],
        req: &ChatRequest,
    ) -> Outcome<ChatResponse> {
        let req = capped(req);
        let req = &*req;
        let estimate = estimate_chat_tokens(req);
        let call = |provider: &Provider, model: String| {
            let req = ChatRequest {
                model,
                stream: false,
                ..req.clone()
            };
            let provider = provider.clone();
            async move { provider.chat(&req).await }
        };
        let bill = |r: &ChatResponse| Bill {
            usage: r.usage,
            audio_seconds: 0.0,
            refused: r.answer.is_refusal(),
        };
        let (outcome, _) = self
            .run(
                ctx,
                targets,
                Walk {
                    operation: "chat",
                    request_model: &req.model,
                    estimate,
                    bound: UsageBound::chat(req),
                    defer: false,
                },
                call,
                bill,
            )
            .await;
        outcome
    }

    /// Fails over only until the first chunk: the stream returned has already
    /// produced one item, and a later error reaches the caller on the stream.
    pub async fn chat_stream(
        &self,
        ctx: &CallContext,
        targets: &[Target],
        req: &ChatRequest,
    ) -> Outcome<ChunkStream> {
        let req = capped(req);
        let req = &*req;
        let estimate = estimate_chat_tokens(req);
        let call = |provider: &Provider, model: String| {
            let req = ChatRequest {
                model,
                stream: true,
                ..req.clone()
            };
            let provider = provider.clone();
            async move {
                let mut stream = provider.chat_stream(&req).await?;
                match stream.next().await {
                    Some(Ok(first)) => {
                        let first = futures_util::stream::once(async move { Ok(first) });
                        Ok(Box::pin(first.chain(stream)) as ChunkStream)
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(ProviderError::new(
                        provider.name(),
                        ErrorKind::StreamTruncated,
                        "the stream ended before its first chunk",
                    )),
                }
            }
        };
        let (outcome, pending) = self
            .run(
                ctx,
                targets,
                Walk {
                    operation: "chat_stream",
                    request_model: &req.model,
                    estimate,
                    bound: UsageBound::chat(req),
                    defer: true,
                },
                call,
                |_| Bill::default(),
            )
            .await;
        let Outcome { result, attempts } = outcome;
        let result = match (result, pending) {
            (Ok(stream), Some(pending)) => Ok(Box::pin(RecordedStream {
                inner: stream,
                gateway: self.clone(),
                pending: Some(pending),
                usage: None,
                refused: false,
            }) as ChunkStream),
            (other, _) => other,
        };
        Outcome { result, attempts }
    }

    pub async fn moderate(
        &self,
        ctx: &CallContext,
        targets: &[Target],
        req: &ModerationRequest,
    ) -> Outcome<ModerationResponse> {
        let estimate = estimate_moderation_tokens(req);
        let call = |provider: &Provider, model: String| {
            let req = ModerationRequest {
                model,
                input: req.input.clone(),
            };
            let provider = provider.clone();
            async move { provider.moderate(&req).await }
        };
        let (outcome, _) = self
            .run(
                ctx,
                targets,
                Walk {
                    operation: "moderate",
                    request_model: &req.model,
                    estimate,
                    bound: UsageBound::moderation(req),
                    defer: false,
                },
                call,
                |_| Bill::default(),
            )
            .await;
        outcome
    }

    pub async fn transcribe(
        &self,
        ctx: &CallContext,
        targets: &[Target],
        req: &TranscriptionRequest,
    ) -> Outcome<TranscriptionResponse> {
        let call = |provider: &Provider, model: String| {
            let req = TranscriptionRequest {
                model,
                ..req.clone()
            };
            let provider = provider.clone();
            async move { provider.transcribe(&req).await }
        };
        let bill = |r: &TranscriptionResponse| Bill {
            usage: Usage::default(),
            audio_seconds: r.duration_s.unwrap_or(0.0),
            refused: false,
        };
        let (outcome, _) = self
            .run(
                ctx,
                targets,
                Walk {
                    operation: "transcribe",
                    request_model: &req.model,
                    estimate: 0,
                    bound: UsageBound {
                        audio_seconds: audio_seconds_bound(&req.audio),
                        output_tokens: Some(0),
                        ..UsageBound::default()
                    },
                    defer: false,
                },
                call,
                bill,
            )
            .await;
        outcome
    }

    /// The retry/fallback walk. With `defer`, the successful attempt is not
    /// recorded but handed back, to be recorded when its stream ends.
    async fn run<T, F, Fut>(
        &self,
        ctx: &CallContext,
        targets: &[Target],
        walk: Walk<'_>,
        call: F,
        bill: impl Fn(&T) -> Bill,
    ) -> (Outcome<T>, Option<Pending>)
    where
        F: Fn(&Provider, String) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let Walk {
            operation,
            request_model,
            estimate,
            bound,
            defer,
        } = walk;
        let policy = self.inner.policy;
        let deadline = Instant::now() + policy.deadline;
        let mut attempts = Vec::new();
        let mut errors: IndexMap<String, Vec<ProviderError>> = IndexMap::new();
        let fail = |errors, attempts| {
            (
                Outcome {
                    result: Err(AllFailed { errors }),
                    attempts,
                },
                None,
            )
        };

        'targets: for target in targets {
            let key = target.key();
            let model = if target.model.is_empty() {
                request_model.to_owned()
            } else {
                target.model.clone()
            };
            let Some(slot) = self.inner.slots.get(&target.provider) else {
                let message = format!("no provider named {:?} is configured", target.provider);
                errors.entry(key).or_default().push(ProviderError::new(
                    &target.provider,
                    ErrorKind::NotFound,
                    message,
                ));
                continue;
            };
            let name = slot.provider.name();
            let mut attempt_no = 0;
            loop {
                let now = Instant::now();
                if now >= deadline {
                    errors
                        .entry(key)
                        .or_default()
                        .push(deadline_error(name, policy.deadline));
                    break 'targets;
                }
                let permit = match slot.breaker().allow(now.into_std()) {
                    Ok(permit) => permit,
                    Err(wait) => {
                        tracing::debug!(provider = name, "circuit open; skipping");
                        let message = if wait.is_zero() {
                            "circuit breaker open: a probe is in flight".to_owned()
                        } else {
                            format!(
                                "circuit breaker open for another {:.1}s",
                                wait.as_secs_f64()
                            )
                        };
                        let e = ProviderError::new(name, ErrorKind::CircuitOpen, message);
                        errors.entry(key).or_default().push(e);
                        continue 'targets;
                    }
                };
                let ceiling_usd = self.ceiling(name, &model, &bound);
                let hold = match &ctx.gate {
                    None => None,
                    Some(gate) => {
                        let charge = Charge {
                            provider: name.to_owned(),
                            model: model.clone(),
                            ceiling_usd,
                        };
                        match gate.hold(charge).await {
                            Ok(hold) => Some(hold),
                            Err(reason) => {
                                if permit == Permit::Probe {
                                    slot.breaker().cancel_probe(now_std());
                                }
                                let e = ProviderError::new(name, ErrorKind::BudgetExceeded, reason);
                                errors.entry(key).or_default().push(e);
                                return fail(errors, attempts);
                            }
                        }
                    }
                };
                let reservation = match slot.limiter().reserve(
                    estimate,
                    deadline - now,
                    now.into_std(),
                ) {
                    Ok(reservation) => reservation,
                    Err(wait) => {
                        // Nothing is sent: nothing is spent.
                        if let Some(hold) = hold {
                            hold.settle(0.0);
                        }
                        if permit == Permit::Probe {
                            slot.breaker().cancel_probe(now.into_std());
                        }
                        let message = format!(
                            "client-side rate limit: the next slot is {:.1}s away, past the deadline",
                            wait.as_secs_f64()
                        );
                        let e = ProviderError::new(name, ErrorKind::LocalRateLimit, message);
                        errors.entry(key).or_default().push(e);
                        continue 'targets;
                    }
                };
                if !reservation.wait.is_zero() {
                    tracing::debug!(provider = name, wait = ?reservation.wait, "waiting for the client-side rate limit");
                    tokio::time::sleep(reservation.wait).await;
                }

                let started_at = SystemTime::now();
                let started = Instant::now();
                let remaining = deadline.saturating_duration_since(started);
                let mut in_flight = InFlight {
                    gateway: self,
                    ctx,
                    provider: name,
                    model: &model,
                    operation,
                    started_at,
                    started,
                    done: false,
                };
                let result = match tokio::time::timeout(
                    remaining,
                    call(&slot.provider, model.clone()),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(deadline_error(name, policy.deadline)),
                };
                in_flight.done = true;
                drop(in_flight);
                let latency = started.elapsed();
                let record = |outcome, bill: Bill| {
                    self.attempt(
                        ctx,
                        Callee {
                            provider: name,
                            model: &model,
                            operation,
                        },
                        started_at,
                        latency,
                        outcome,
                        bill,
                    )
                };

                let error = match result {
                    Ok(value) => {
                        let b = bill(&value);
                        let after = now_std();
                        slot.breaker().report(Report::Success, after);
                        if defer {
                            // Settled and recorded when the stream ends.
                            let attempt = record(AttemptOutcome::Answered, b);
                            let pending = Pending {
                                attempt,
                                started,
                                reservation,
                                hold,
                                ceiling_usd,
                            };
                            return (
                                Outcome {
                                    result: Ok(value),
                                    attempts,
                                },
                                Some(pending),
                            );
                        }
                        slot.limiter()
                            .settle(&reservation, total_tokens(&b.usage), after);
                        let outcome = if b.refused {
                            AttemptOutcome::Refused
                        } else {
                            AttemptOutcome::Answered
                        };
                        let mut attempt = record(outcome, b);
                        self.meter(&mut attempt, ceiling_usd);
                        if let Some(hold) = hold {
                            hold.settle(attempt.cost_usd);
                        }
                        self.sink(&attempt);
                        attempts.push(attempt);
                        return (
                            Outcome {
                                result: Ok(value),
                                attempts,
                            },
                            None,
                        );
                    }
                    Err(error) => error,
                };

                let after = now_std();
                let kind = error.kind;
                slot.limiter().settle(&reservation, 0, after);
                if let Some(hold) = hold
                    && !may_have_billed(kind)
                {
                    // Refused with a status (or never sent): not billed. A
                    // hold dropped here keeps its ceiling as spent.
                    hold.settle(0.0);
                }
                if matches!(kind, ErrorKind::MissingKey | ErrorKind::Unsupported) {
                    // Nothing was sent: no attempt to record, no health signal.
                    if permit == Permit::Probe {
                        slot.breaker().cancel_probe(after);
                    }
                } else {
                    slot.breaker().report(Report::from_error(kind), after);
                    let outcome = AttemptOutcome::Failed {
                        kind,
                        status: error.status,
                        message: error.message.clone(),
                    };
                    let attempt = record(outcome, Bill::default());
                    self.sink(&attempt);
                    attempts.push(attempt);
                }
                let retry_after = error.retry_after;
                tracing::debug!(provider = name, model = %model, attempt = attempt_no, error = %error, "attempt failed");
                errors.entry(key.clone()).or_default().push(error);

                if kind == ErrorKind::Deadline {
                    break 'targets;
                }
                if !kind.is_retryable() {
                    if kind.may_fall_back() {
                        continue 'targets;
                    }
                    // The same request fails the same way anywhere.
                    return fail(errors, attempts);
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                let delay = policy.next_delay(attempt_no, retry_after, remaining, &mut rand::rng());
                match delay {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => continue 'targets,
                }
                attempt_no += 1;
            }
        }
        if let Some(last) = errors.values().last().and_then(|v| v.last()) {
            tracing::warn!(operation, request_id = %ctx.request_id, error = %last, "every target failed");
        }
        fail(errors, attempts)
    }

    fn attempt(
        &self,
        ctx: &CallContext,
        callee: Callee<'_>,
        started_at: SystemTime,
        latency: Duration,
        outcome: AttemptOutcome,
        bill: Bill,
    ) -> Attempt {
        let Callee {
            provider,
            model,
            operation,
        } = callee;
        let mut attempt = Attempt {
            request_id: ctx.request_id.clone(),
            task: ctx.task.clone(),
            tier: ctx.tier.clone(),
            provider: provider.to_owned(),
            model: model.to_owned(),
            operation,
            started_at,
            latency,
            outcome,
            usage: bill.usage,
            audio_seconds: bill.audio_seconds,
            cost_usd: 0.0,
        };
        self.price(&mut attempt);
        attempt
    }

    /// Fill in `cost_usd` from the usage.
    fn price(&self, attempt: &mut Attempt) {
        let failed_unbilled = matches!(attempt.outcome, AttemptOutcome::Failed { .. })
            && attempt.usage == Usage::default()
            && attempt.audio_seconds == 0.0;
        if failed_unbilled {
            attempt.cost_usd = 0.0;
            return;
        }
        let today = PriceTable::today();
        let cost = self.inner.prices.cost(
            &attempt.provider,
            &attempt.model,
            &attempt.usage,
            attempt.audio_seconds,
            &today,
        );
        attempt.cost_usd = cost.unwrap_or_else(|| {
            let key = format!("{}/{}", attempt.provider, attempt.model);
            let mut warned = self
                .inner
                .unpriced
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if warned.insert(key) {
                tracing::warn!(provider = %attempt.provider, model = %attempt.model, date = %today,
                    "the price table has no price for this model; its calls are counted at the provider's dearest price");
            }
            // Never $0: the dearest price in force for the provider.
            self.inner
                .prices
                .dearest_cost(
                    &attempt.provider,
                    &attempt.usage,
                    attempt.audio_seconds,
                    &today,
                )
                .unwrap_or(0.0)
        });
    }

    /// The most one attempt to `provider`/`model` within `bound` can cost:
    /// at the model's price, else at the provider's dearest (never $0 while
    /// any price is known).
    fn ceiling(&self, provider: &str, model: &str, bound: &UsageBound) -> f64 {
        let today = PriceTable::today();
        let usage = bound.usage(DEFAULT_MAX_TOKENS);
        let prices = &self.inner.prices;
        prices
            .cost(provider, model, &usage, bound.audio_seconds, &today)
            .or_else(|| prices.dearest_cost(provider, &usage, bound.audio_seconds, &today))
            .unwrap_or(0.0)
    }

    /// An answered chat that reported no usage is counted at its ceiling
    /// (it was billed, by how much is unknown), with a warning.
    fn meter(&self, attempt: &mut Attempt, ceiling_usd: f64) {
        let chat = matches!(attempt.operation, "chat" | "chat_stream");
        if chat && attempt.usage == Usage::default() && ceiling_usd > attempt.cost_usd {
            tracing::warn!(provider = %attempt.provider, model = %attempt.model, request_id = %attempt.request_id,
                ceiling_usd, "the provider reported no usage; the call is counted at its ceiling");
            attempt.cost_usd = ceiling_usd;
        }
    }

    fn sink(&self, attempt: &Attempt) {
        if let Some(sink) = &self.inner.sink {
            sink.record(attempt);
        }
    }

    /// A stream's attempt is over: settle its limits, report to its breaker
    /// and record it.
    fn finish_stream(&self, mut pending: Pending, outcome: AttemptOutcome, usage: Option<Usage>) {
        let now = now_std();
        let usage = usage.unwrap_or_default();
        if let Some(slot) = self.inner.slots.get(&pending.attempt.provider) {
            slot.limiter()
                .settle(&pending.reservation, total_tokens(&usage), now);
            if let AttemptOutcome::Failed { kind, .. } = &outcome {
                slot.breaker().report(Report::from_error(*kind), now);
            }
        }
        pending.attempt.latency = pending.started.elapsed();
        let failed = matches!(outcome, AttemptOutcome::Failed { .. });
        pending.attempt.outcome = outcome;
        pending.attempt.usage = usage;
        self.price(&mut pending.attempt);
        if !failed || usage != Usage::default() {
            self.meter(&mut pending.attempt, pending.ceiling_usd);
            if let Some(hold) = pending.hold.take() {
                hold.settle(pending.attempt.cost_usd);
            }
        }
        // A stream that failed without usage may have been billed for what
        // it sent: its hold, dropped here, keeps the ceiling.
        self.sink(&pending.attempt);
    }
}

/// An attempt on the wire. If its future is dropped before the answer (a
/// tier's timeout, a caller that went away), the request may already have
/// been billed: it is recorded then, as cancelled, with no usage known.
struct InFlight<'a> {
    gateway: &'a Gateway,
    ctx: &'a CallContext,
    provider: &'a str,
    model: &'a str,
    operation: &'static str,
    started_at: SystemTime,
    started: Instant,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let outcome = AttemptOutcome::Failed {
            kind: ErrorKind::Cancelled,
            status: None,
            message: "cancelled before the provider answered (tier timeout or caller gone); usage unknown".to_owned(),
        };
        let attempt = self.gateway.attempt(
            self.ctx,
            Callee {
                provider: self.provider,
                model: self.model,
                operation: self.operation,
            },
            self.started_at,
            self.started.elapsed(),
            outcome,
            Bill::default(),
        );
        self.gateway.sink(&attempt);
    }
}

/// `req` with the output cap triage sends on every chat call: the caller's
/// (or tier's) `max_tokens`, else [`DEFAULT_MAX_TOKENS`] (copied only then).
fn capped(req: &ChatRequest) -> std::borrow::Cow<'_, ChatRequest> {
    match req.max_tokens {
        Some(_) => std::borrow::Cow::Borrowed(req),
        None => std::borrow::Cow::Owned(ChatRequest {
            max_tokens: Some(DEFAULT_MAX_TOKENS),
            ..req.clone()
        }),
    }
}

/// Whether a failed attempt may still have been billed: it was sent and no
/// status said it was refused (a timeout, a cut stream, an unreadable 2xx).
fn may_have_billed(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Timeout
            | ErrorKind::Deadline
            | ErrorKind::Malformed
            | ErrorKind::StreamTruncated
            | ErrorKind::Cancelled
    )
}

/// An upper bound on the seconds of audio in `bytes` of an encoded file, at
/// 6 kbit/s: below any codec a hosted transcription accepts at speech
/// quality (Opus's lowest voice setting).
fn audio_seconds_bound(bytes: &[u8]) -> f64 {
    bytes.len() as f64 * 8.0 / 6_000.0
}

fn total_tokens(usage: &Usage) -> u64 {
    usage.input_tokens + usage.output_tokens
}

fn deadline_error(provider: &str, deadline: Duration) -> ProviderError {
    ProviderError::new(
        provider,
        ErrorKind::Deadline,
        format!(
            "the overall deadline of {:.1}s passed",
            deadline.as_secs_f64()
        ),
    )
}

/// A stream that records its attempt when it ends, fails, or is dropped
/// unfinished (the caller went away: recorded as answered, with whatever
/// usage had arrived).
struct RecordedStream {
    inner: ChunkStream,
    gateway: Gateway,
    pending: Option<Pending>,
    /// The usage of the latest chunk that carried one (the final chunk's is
    /// the total).
    usage: Option<Usage>,
    refused: bool,
}

impl RecordedStream {
    fn finish(&mut self, outcome: AttemptOutcome) {
        if let Some(pending) = self.pending.take() {
            self.gateway.finish_stream(pending, outcome, self.usage);
        }
    }

    fn answered(&self) -> AttemptOutcome {
        if self.refused {
            AttemptOutcome::Refused
        } else {
            AttemptOutcome::Answered
        }
    }
}

impl Stream for RecordedStream {
    type Item = Result<triage_core::llm::ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.pending.is_none() {
            // Over (ended or failed): never poll the provider's stream again.
            return Poll::Ready(None);
        }
        let item = match self.inner.poll_next_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        match &item {
            Some(Ok(chunk)) => {
                if let Some(usage) = chunk.usage {
                    self.usage = Some(usage);
                }
                if chunk.refusal.is_some() {
                    self.refused = true;
                }
            }
            Some(Err(e)) => {
                let outcome = AttemptOutcome::Failed {
                    kind: e.kind,
                    status: e.status,
                    message: e.message.clone(),
                };
                self.finish(outcome);
            }
            None => {
                let outcome = self.answered();
                self.finish(outcome);
            }
        }
        Poll::Ready(item)
    }
}

impl Drop for RecordedStream {
    fn drop(&mut self) {
        let outcome = self.answered();
        self.finish(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: ErrorKind, message: &str) -> ProviderError {
        ProviderError::new("p", kind, message)
    }

    #[test]
    fn all_failed_lists_every_provider_last_error() {
        let mut errors = IndexMap::new();
        errors.insert(
            "openai/gpt-4o-mini".to_owned(),
            vec![
                err(ErrorKind::Server, "first"),
                err(ErrorKind::Unavailable, "down").with_status(503),
            ],
        );
        errors.insert(
            "anthropic/claude".to_owned(),
            vec![err(ErrorKind::CircuitOpen, "open")],
        );
        let all = AllFailed { errors };
        let text = all.to_string();
        assert_eq!(
            text,
            "every target failed: openai/gpt-4o-mini: Unavailable (HTTP 503): down [2 errors]; \
             anthropic/claude: CircuitOpen: open"
        );
        assert_eq!(all.last().map(|e| e.kind), Some(ErrorKind::CircuitOpen));
        assert_eq!(
            all.kinds(),
            [
                ErrorKind::Server,
                ErrorKind::Unavailable,
                ErrorKind::CircuitOpen
            ]
        );
        assert_eq!(
            AllFailed {
                errors: IndexMap::new()
            }
            .to_string(),
            "no target to try"
        );
    }
}
