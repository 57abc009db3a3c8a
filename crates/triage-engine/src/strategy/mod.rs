//! The three strategies and what they share: calling hosted models with a
//! tier's timeout, pricing what ran, and the counterfactual all-LLM cost.

pub mod cascade;
pub mod pipeline;
pub mod router;

use crate::config::{Handler, Intent, StageKind, Strategy, Task, TierKind};
use crate::engine::{Answered, Engine, Run, StepOutcome, ms};
use crate::error::EngineError;
use std::time::{Duration, Instant};
use triage_cloud::ErrorKind;
use triage_cloud::gateway::{Outcome, Target};
use triage_cloud::prices::PriceTable;
use triage_core::llm::{ChatRequest, ChatResponse, Usage};
use triage_core::trace::TierTrace;

/// Input tokens are estimated at this many characters per token where no
/// provider counted them (the usual figure for English with BPE tokenizers),
/// for the all-LLM counterfactual.
pub const CHARS_PER_TOKEN: usize = 4;

/// A hosted call's result with what it cost and how long it took.
#[derive(Debug)]
pub struct Called<T> {
    pub result: Result<T, EngineError>,
    pub cost_usd: f64,
    pub elapsed: Duration,
}

/// Await a gateway call under the tier's timeout and price its attempts. A
/// call the budgets refused (at any attempt) fails with the budget's typed
/// error.
pub async fn call<T>(
    run: &Run<'_>,
    tier: &str,
    timeout: Option<Duration>,
    fut: impl std::future::Future<Output = Outcome<T>>,
) -> Called<T> {
    let started = Instant::now();
    let outcome = match timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(o) => o,
            Err(_) => {
                return Called {
                    result: Err(EngineError::Timeout {
                        tier: tier.to_owned(),
                        ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
                    }),
                    cost_usd: 0.0,
                    elapsed: started.elapsed(),
                };
            }
        },
        None => fut.await,
    };
    let cost_usd = outcome.attempts.iter().map(|a| a.cost_usd).sum();
    let refusal = match &outcome.result {
        Err(e)
            if e.last()
                .is_some_and(|l| l.kind == ErrorKind::BudgetExceeded) =>
        {
            run.gate.as_ref().and_then(|g| g.take_refusal())
        }
        _ => None,
    };
    Called {
        result: outcome.result.map_err(|source| match refusal {
            Some(source) => EngineError::Budget {
                tier: tier.to_owned(),
                source,
            },
            None => EngineError::Cloud {
                tier: tier.to_owned(),
                source,
            },
        }),
        cost_usd,
        elapsed: started.elapsed(),
    }
}

/// A chat call for `tier` over its targets, within the budgets (each
/// attempt holds its ceiling through the run's gate).
pub async fn chat(
    run: &Run<'_>,
    tier: &str,
    targets: &[Target],
    req: &ChatRequest,
    timeout: Option<Duration>,
) -> Called<ChatResponse> {
    let ctx = run.ctx(tier);
    call(
        run,
        tier,
        timeout,
        run.engine.gateway.chat(&ctx, targets, req),
    )
    .await
}

/// A hosted tier's call, as its trace line shows it.
#[derive(Debug)]
pub struct HostedStep<'a> {
    pub tier: &'a str,
    /// `provider/model` that answered (or was tried last).
    pub model: String,
    pub elapsed: Duration,
    pub cost_usd: f64,
}

/// Push a hosted tier's line onto the trace.
pub fn push_hosted(run: &mut Run<'_>, step: HostedStep<'_>, outcome: StepOutcome) {
    let HostedStep {
        tier,
        model,
        elapsed,
        cost_usd,
    } = step;
    let StepOutcome {
        decision,
        reason,
        score,
    } = outcome;
    run.trace.push(TierTrace {
        tier: tier.to_owned(),
        model,
        decision,
        reason,
        score,
        latency_ms: ms(elapsed),
        cost_usd,
        queue_ms: None,
        compute_ms: None,
    });
}

/// Every hosted chat model a task may call.
fn chat_targets(task: &Task) -> Vec<&Target> {
    match &task.strategy {
        Strategy::Cascade(c) => c
            .tiers
            .iter()
            .filter_map(|t| match &t.kind {
                TierKind::Llm { targets } => Some(targets.iter()),
                _ => None,
            })
            .flatten()
            .collect(),
        Strategy::Router(r) => {
            let mut v: Vec<&Target> = r
                .routes
                .values()
                .filter_map(|route| match &route.handler {
                    Handler::Model { targets, .. } => Some(targets.iter()),
                    Handler::Template { .. } => None,
                })
                .flatten()
                .collect();
            if let Intent::Llm { targets, .. } = &r.intent {
                v.extend(targets.iter());
            }
            v
        }
        Strategy::Pipeline(p) => p
            .stages
            .iter()
            .filter_map(|s| match &s.kind {
                StageKind::Summarize { targets, .. } => Some(targets.iter()),
                _ => None,
            })
            .flatten()
            .collect(),
    }
}

/// Every hosted model a task may call and pay for (chat and moderation).
pub fn hosted_targets(task: &Task) -> Vec<&Target> {
    let mut v = chat_targets(task);
    if let Strategy::Cascade(c) = &task.strategy {
        for t in &c.tiers {
            if let TierKind::Moderation { targets } = &t.kind {
                v.extend(targets.iter());
            }
        }
    }
    v
}

/// The strongest configured model of a task: the one with the highest price
/// for a typical call (1k input and 250 output tokens) in the price table.
pub fn strongest<'a>(prices: &PriceTable, task: &'a Task) -> Option<&'a Target> {
    let today = PriceTable::today();
    let typical = Usage {
        input_tokens: 1000,
        output_tokens: 250,
        ..Usage::default()
    };
    chat_targets(task)
        .into_iter()
        .filter_map(|t| {
            prices
                .cost(&t.provider, &t.model, &typical, 0.0, &today)
                .map(|c| (t, c))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(t, _)| t)
}

/// What the request would have cost had the strongest configured model
/// answered it alone: its price applied to the input (at
/// [`CHARS_PER_TOKEN`]) and the output tokens the strategy reports, plus a
/// hosted transcription of any audio at the highest per-minute price in the
/// table. 0 when the table prices none of the task's models.
pub fn all_llm_cost(
    engine: &Engine,
    task: &Task,
    answered: &Answered,
    _trace: &triage_core::trace::Trace,
) -> f64 {
    let prices = &engine.config.prices;
    let today = PriceTable::today();
    let mut total = 0.0;
    if let Some(t) = strongest(prices, task) {
        let usage = Usage {
            input_tokens: answered.input_chars.div_ceil(CHARS_PER_TOKEN) as u64,
            output_tokens: answered.output_tokens,
            ..Usage::default()
        };
        total += prices
            .cost(&t.provider, &t.model, &usage, 0.0, &today)
            .unwrap_or(0.0);
    }
    if answered.audio_seconds > 0.0 {
        let per_minute = prices
            .prices()
            .iter()
            .map(|p| p.per_audio_minute)
            .fold(0.0_f64, f64::max);
        total += per_minute * answered.audio_seconds / 60.0;
    }
    total
}

/// Pull the first JSON object out of a model's text (small models sometimes
/// wrap it in prose or a code fence).
pub fn json_object(text: &str) -> Option<serde_json::Value> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
        return Some(v);
    }
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    (end > start)
        .then(|| serde_json::from_str(&text[start..=end]).ok())
        .flatten()
}
