//! `GET /ui/api/dashboard`: the counters `/metrics` has since the server
//! started (the same numbers), and the last hour and day from the ledger's
//! per-minute totals (never its raw rows): requests per second, answers and
//! escalations per tier, dollars against the all-LLM path, latency
//! quantiles per tier, and budget burn.

use crate::error::ApiError;
use crate::metrics::TaskCounts;
use crate::state::Shared;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use std::collections::BTreeMap;
use triage_engine::ledger::minute_stats::{MinutePoint, WindowRow, quantile_ms};

#[derive(Debug, Serialize)]
pub struct Dashboard {
    /// Since the server started: exactly what `/metrics` counts.
    pub since_start: BTreeMap<String, TaskCounts>,
    /// `None` when the config has no ledger.
    pub windows: Option<Vec<Window>>,
    /// Ledger rows older than this (unix ms) are not in the windows yet:
    /// a ledger from before the per-minute totals is being summed into
    /// them. `None` when every row is counted.
    pub backfill_before_ms: Option<i64>,
    pub budgets: Vec<BudgetBurn>,
    /// Unix ms at which the ledger windows were read.
    pub now_ms: i64,
}

#[derive(Debug, Serialize)]
pub struct BudgetBurn {
    pub name: String,
    pub period: &'static str,
    pub usd: f64,
    pub spent_usd: f64,
    /// Held by hosted calls in flight.
    pub reserved_usd: f64,
    pub left_usd: f64,
}

#[derive(Debug, Serialize)]
pub struct Window {
    /// `hour` or `day`.
    pub name: &'static str,
    pub seconds: i64,
    pub requests: i64,
    pub requests_per_s: f64,
    pub cost_usd: f64,
    pub all_llm_cost_usd: f64,
    pub saved_usd: f64,
    /// Saved over the all-LLM cost; `None` when that is zero.
    pub saved_pct: Option<f64>,
    pub tasks: Vec<TaskWindow>,
    pub per_minute: Vec<MinutePoint>,
}

#[derive(Debug, Default, Serialize)]
pub struct TaskWindow {
    pub task: String,
    pub requests: i64,
    pub failed: i64,
    pub cost_usd: f64,
    pub all_llm_cost_usd: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub tiers: Vec<TierWindow>,
}

#[derive(Debug, Default, Serialize)]
pub struct TierWindow {
    pub tier: String,
    /// Runs of this tier (ledger attempts; hosted retries count each).
    pub attempts: i64,
    pub failed_attempts: i64,
    /// Requests this tier answered.
    pub answered: i64,
    /// Runs that did not end the request here, over the runs.
    pub escalation_rate: Option<f64>,
    pub cost_usd: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

fn add_hist(into: &mut Vec<i64>, h: &[i64]) {
    if into.len() < h.len() {
        into.resize(h.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(h) {
        *a += b;
    }
}

fn quantiles(h: &[i64]) -> (Option<f64>, Option<f64>, Option<f64>) {
    (
        quantile_ms(h, 0.5),
        quantile_ms(h, 0.95),
        quantile_ms(h, 0.99),
    )
}

/// One window from the ledger's per-minute rows.
pub fn window(
    name: &'static str,
    seconds: i64,
    rows: &[WindowRow],
    per_minute: Vec<MinutePoint>,
) -> Window {
    // Per task: its totals and latency histogram, then the same per tier.
    type TaskAcc<'a> = (
        TaskWindow,
        Vec<i64>,
        BTreeMap<&'a str, (TierWindow, Vec<i64>)>,
    );
    let mut tasks: BTreeMap<&str, TaskAcc<'_>> = BTreeMap::new();
    for r in rows {
        let (t, th, tiers) = tasks.entry(r.task.as_str()).or_default();
        t.task = r.task.clone();
        let (tier, hist) = tiers.entry(r.tier.as_str()).or_default();
        tier.tier = r.tier.clone();
        match r.kind.as_str() {
            "request" => {
                t.requests += r.n;
                // `answered` and `refused` are answers; `failed` is not.
                if r.decision == "failed" {
                    t.failed += r.n;
                } else {
                    tier.answered += r.n;
                }
                t.cost_usd += r.cost_usd;
                t.all_llm_cost_usd += r.all_llm_cost_usd;
                add_hist(th, &r.latency_histogram);
            }
            _ => {
                tier.attempts += r.n;
                if r.decision == "failed" {
                    tier.failed_attempts += r.n;
                }
                tier.cost_usd += r.cost_usd;
                add_hist(hist, &r.latency_histogram);
            }
        }
    }
    let mut out = Window {
        name,
        seconds,
        requests: 0,
        requests_per_s: 0.0,
        cost_usd: 0.0,
        all_llm_cost_usd: 0.0,
        saved_usd: 0.0,
        saved_pct: None,
        tasks: Vec::new(),
        per_minute,
    };
    for (_, (mut t, th, tiers)) in tasks {
        (t.p50_ms, t.p95_ms, t.p99_ms) = quantiles(&th);
        for (_, (mut tier, h)) in tiers {
            (tier.p50_ms, tier.p95_ms, tier.p99_ms) = quantiles(&h);
            tier.escalation_rate = (tier.attempts > 0)
                .then(|| (tier.attempts - tier.answered).max(0) as f64 / tier.attempts as f64);
            t.tiers.push(tier);
        }
        out.requests += t.requests;
        out.cost_usd += t.cost_usd;
        out.all_llm_cost_usd += t.all_llm_cost_usd;
        out.tasks.push(t);
    }
    out.requests_per_s = out.requests as f64 / seconds.max(1) as f64;
    out.saved_usd = out.all_llm_cost_usd - out.cost_usd;
    out.saved_pct = (out.all_llm_cost_usd > 0.0).then(|| out.saved_usd / out.all_llm_cost_usd);
    out
}

pub(crate) async fn dashboard(State(state): State<Shared>) -> Result<Json<Dashboard>, ApiError> {
    let engine = state.engine.current();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let read_failed = |e: triage_engine::ledger::LedgerError| {
        tracing::error!(error = %triage_engine::error::chain(&e), "dashboard query failed");
        ApiError::Internal("the ledger could not be read")
    };
    let backfill_before_ms = match &engine.ledger {
        None => None,
        Some(ledger) => ledger.minute_backfill_before().await.map_err(read_failed)?,
    };
    let windows = match &engine.ledger {
        None => None,
        Some(ledger) => {
            let mut out = Vec::new();
            for (name, seconds) in [("hour", 3600), ("day", 86_400)] {
                let (rows, points) = ledger
                    .minute_window(now_ms - seconds * 1000)
                    .await
                    .map_err(read_failed)?;
                out.push(window(name, seconds, &rows, points));
            }
            Some(out)
        }
    };
    let budgets = engine
        .budgets
        .status()
        .into_iter()
        .map(|b| BudgetBurn {
            name: b.name,
            period: b.period,
            usd: b.usd,
            spent_usd: b.spent_usd,
            reserved_usd: b.reserved_usd,
            left_usd: b.left_usd,
        })
        .collect();
    Ok(Json(Dashboard {
        since_start: state.metrics.task_counts(),
        windows,
        backfill_before_ms,
        budgets,
        now_ms,
    }))
}
