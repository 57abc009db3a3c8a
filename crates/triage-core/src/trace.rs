//! What happened to one request on its way through the tiers: which tier
//! answered, why the others escalated, and what each cost.

use serde::{Deserialize, Serialize};

/// What a tier did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// This tier's answer is the answer.
    Accepted,
    /// Confidence fell inside the uncertain band (or a rule said so): next tier.
    Escalated,
    /// The tier failed (error, timeout, missing key): next tier.
    Failed,
    /// A sampled copy of an accepted item, sent on to measure agreement.
    Shadow,
    /// A pipeline stage or a handler that is not a model (template, regex, SQL).
    Ran,
}

/// One tier's entry in a trace (field names are an interface used by
/// acceptance checks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierTrace {
    /// The tier's name in the task config.
    pub tier: String,
    /// The model (local specialist or provider model) that ran, if any.
    pub model: String,
    pub decision: Decision,
    /// Why: `confident`, `uncertain`, `error: ...`, `route=refund`, ...
    pub reason: String,
    /// The calibrated confidence that drove the decision, where there is one.
    pub score: Option<f64>,
    pub latency_ms: f64,
    pub cost_usd: f64,
    /// A local model's time waiting in its queue, where measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
    /// A local model's share of its batch's compute (what `cost_usd` prices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Trace {
    pub tiers: Vec<TierTrace>,
    /// Sum of the tiers' costs.
    pub cost_usd: f64,
    /// What the request would have cost had the strongest configured model
    /// answered it alone.
    pub all_llm_cost_usd: f64,
}

impl Trace {
    pub fn push(&mut self, tier: TierTrace) {
        self.cost_usd += tier.cost_usd;
        self.tiers.push(tier);
    }

    /// The tier whose answer was used (the last accepted one).
    pub fn answered_by(&self) -> Option<&TierTrace> {
        self.tiers
            .iter()
            .rev()
            .find(|t| t.decision == Decision::Accepted)
    }
}
