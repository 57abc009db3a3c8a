//! The rows the ledger keeps and the shapes its reports answer in.

use super::millis;
use serde::Serialize;
use std::time::{Duration, SystemTime};
use triage_cloud::gateway::{Attempt, AttemptOutcome};

/// One attempt as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRecord {
    pub request_id: String,
    pub task: String,
    pub tier: String,
    pub provider: String,
    pub model: String,
    pub operation: String,
    pub ts_ms: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub reasoning_tokens: i64,
    pub audio_seconds: f64,
    pub latency_ms: f64,
    pub cost_usd: f64,
    /// `answered`, `refused` or `failed`.
    pub outcome: String,
    pub error: Option<String>,
}

/// What the ledger keeps of a local tier's run.
#[derive(Debug)]
pub struct LocalAttempt<'a> {
    pub request_id: &'a str,
    pub task: &'a str,
    pub tier: &'a str,
    pub model: &'a str,
    /// `classify`, `tag`, `transcribe`.
    pub operation: &'a str,
    pub latency: Duration,
    pub cost_usd: f64,
    pub error: Option<String>,
}

impl AttemptRecord {
    pub fn from_attempt(a: &Attempt) -> Self {
        let (outcome, error) = match &a.outcome {
            AttemptOutcome::Answered => ("answered", None),
            AttemptOutcome::Refused => ("refused", None),
            AttemptOutcome::Failed {
                kind,
                status,
                message,
            } => (
                "failed",
                Some(match status {
                    Some(s) => format!("{kind:?} (HTTP {s}): {message}"),
                    None => format!("{kind:?}: {message}"),
                }),
            ),
        };
        let to_i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Self {
            request_id: a.request_id.clone(),
            task: a.task.clone(),
            tier: a.tier.clone(),
            provider: a.provider.clone(),
            model: a.model.clone(),
            operation: a.operation.to_owned(),
            ts_ms: millis(a.started_at),
            input_tokens: to_i(a.usage.input_tokens),
            output_tokens: to_i(a.usage.output_tokens),
            cached_input_tokens: to_i(a.usage.cached_input_tokens),
            reasoning_tokens: to_i(a.usage.reasoning_tokens),
            audio_seconds: a.audio_seconds,
            latency_ms: a.latency.as_secs_f64() * 1000.0,
            cost_usd: a.cost_usd,
            outcome: outcome.into(),
            error,
        }
    }

    /// A local tier's run (no tokens; priced by compute time).
    pub fn local(run: LocalAttempt<'_>) -> Self {
        let LocalAttempt {
            request_id,
            task,
            tier,
            model,
            operation,
            latency,
            cost_usd,
            error,
        } = run;
        Self {
            request_id: request_id.into(),
            task: task.into(),
            tier: tier.into(),
            provider: "local".into(),
            model: model.into(),
            operation: operation.into(),
            ts_ms: millis(SystemTime::now()),
            input_tokens: 0,
            output_tokens: 0,
            cached_input_tokens: 0,
            reasoning_tokens: 0,
            audio_seconds: 0.0,
            latency_ms: latency.as_secs_f64() * 1000.0,
            cost_usd,
            outcome: if error.is_some() {
                "failed"
            } else {
                "answered"
            }
            .into(),
            error,
        }
    }
}

/// One request's summary row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub task: String,
    pub answered_by: String,
    pub model: String,
    pub outcome: String,
    pub latency_ms: f64,
    pub cost_usd: f64,
    pub all_llm_cost_usd: f64,
    /// The id the caller gave (`overrides.request_id`), kept as a tag: it
    /// need not be unique.
    pub caller_id: Option<String>,
    /// The name of the API key the request came with, if any.
    pub key_name: Option<String>,
    /// The trace's tiers as JSON (no request text).
    pub trace: Option<String>,
    /// The request's text, kept only with `[ledger] store_text = true`.
    pub input_text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowRecord {
    pub request_id: String,
    pub task: String,
    pub tier: String,
    pub shadow_tier: String,
    pub agree: bool,
    pub score: Option<f64>,
    pub shadow_score: Option<f64>,
}

/// What [`Ledger::recent_requests`] lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentFilter {
    pub task: Option<String>,
    /// The tier that answered.
    pub tier: Option<String>,
    /// `answered`, `refused` or `failed`.
    pub outcome: Option<String>,
    pub before_ms: Option<i64>,
    pub limit: i64,
}

/// One request for the explorer: its row and when it was written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentRequest {
    pub ts_ms: i64,
    #[serde(flatten)]
    pub record: RequestRecord,
}

/// Shadow checks of one tier by the next (`triage audit --from-ledger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowAgreement {
    pub tier: String,
    pub shadow_tier: String,
    pub checked: i64,
    pub agreed: i64,
}

/// `triage costs --by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Task,
    Tier,
    Model,
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "task" => Ok(Self::Task),
            "tier" => Ok(Self::Tier),
            "model" => Ok(Self::Model),
            _ => Err(format!("`{s}`: group by task, tier or model")),
        }
    }
}

/// One line of `triage costs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    pub key: String,
    /// Requests answered by this task/tier/model.
    pub requests: i64,
    pub attempts: i64,
    pub failed_attempts: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    /// For the requests it answered: what the strongest model alone would have cost.
    pub all_llm_cost_usd: f64,
    pub mean_latency_ms: f64,
}
