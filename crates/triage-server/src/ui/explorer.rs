//! The request explorer's API: recent requests from the ledger with their
//! traces (tiers, decisions, scores, costs, latency), filtered by task,
//! answering tier and outcome, and one request's attempts. Request texts
//! appear only when the config keeps them (`[ledger] store_text = true`).

use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use triage_engine::ledger::RecentFilter;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestsQuery {
    pub task: Option<String>,
    pub tier: Option<String>,
    pub outcome: Option<String>,
    /// Unix ms: only requests before it (the next page).
    pub before: Option<i64>,
    pub limit: Option<i64>,
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.is_empty())
}

fn ledger(state: &Shared) -> Result<triage_engine::Ledger, ApiError> {
    state
        .engine
        .current()
        .ledger
        .clone()
        .ok_or_else(|| ApiError::NotFound("this config has no ledger ([ledger] disabled)".into()))
}

fn read_failed(e: triage_engine::ledger::LedgerError) -> ApiError {
    tracing::error!(error = %triage_engine::error::chain(&e), "explorer query failed");
    ApiError::Internal("the ledger could not be read")
}

/// `GET /ui/api/requests`.
pub(crate) async fn requests(
    State(state): State<Shared>,
    Query(q): Query<RequestsQuery>,
) -> Result<Json<Value>, ApiError> {
    let ledger = ledger(&state)?;
    let filter = RecentFilter {
        task: non_empty(q.task),
        tier: non_empty(q.tier),
        outcome: non_empty(q.outcome),
        before_ms: q.before,
        // A page is at most 200 rows (and each row's text is capped by
        // `[ledger] max_text_bytes`): a page's size is bounded.
        limit: q.limit.unwrap_or(50).clamp(1, 200),
    };
    let rows = ledger.recent_requests(&filter).await.map_err(read_failed)?;
    let store_text = state.engine.current().config.store_text;
    let out: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let trace: Value = r
                .record
                .trace
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(Value::Null);
            json!({
                "ts_ms": r.ts_ms,
                "request_id": r.record.request_id,
                "task": r.record.task,
                "answered_by": r.record.answered_by,
                "model": r.record.model,
                "outcome": r.record.outcome,
                "latency_ms": r.record.latency_ms,
                "cost_usd": r.record.cost_usd,
                "all_llm_cost_usd": r.record.all_llm_cost_usd,
                "caller_id": r.record.caller_id,
                "key_name": r.record.key_name,
                "tiers": trace,
                "text": r.record.input_text,
            })
        })
        .collect();
    Ok(Json(json!({"requests": out, "store_text": store_text})))
}

/// `GET /ui/api/requests/{id}`: the request and every attempt it made.
pub(crate) async fn request(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ledger = ledger(&state)?;
    let record = ledger
        .request(&id)
        .await
        .map_err(read_failed)?
        .ok_or_else(|| ApiError::NotFound(format!("no request `{id}` in the ledger")))?;
    let attempts = ledger.attempts(&id).await.map_err(read_failed)?;
    Ok(Json(json!({"request": record, "attempts": attempts})))
}
