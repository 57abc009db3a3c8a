//! `/health`, `/ready`, `/metrics` and `/v1/models`.

use crate::state::Shared;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub(crate) async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// The tasks, specialists and routes this server answers, and the ledger's
/// queue. A specialist whose worker has stopped, or a ledger that is failing
/// or full, answers 503: a load balancer should send work elsewhere.
pub(crate) async fn ready(State(state): State<Shared>) -> Response {
    let engine = state.engine.current();
    let stopped = engine.specialists.stopped();
    if !stopped.is_empty() {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(json!({"status": "not_ready", "stopped_specialists": stopped})),
        )
            .into_response();
    }
    let ledger = state.ledger_health();
    let ready = ledger.as_ref().is_none_or(|l| l.ready());
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Json(json!({
        "status": if ready { "ready" } else { "ledger_behind" },
        "ledger": ledger,
        "tasks": engine.config.tasks.keys().collect::<Vec<_>>(),
        "specialists": engine.specialists.map.keys().collect::<Vec<_>>(),
        "moderation": engine.config.server.moderation_task,
        "transcription": engine.transcribes(),
    }));
    (status, body).into_response()
}

pub(crate) async fn metrics(State(state): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], {
        let mut text = state.metrics.render_with(
            state.ledger_health().as_ref(),
            &state.engine.current().specialists.cache_stats(),
            &state.engine.current().budgets,
        );
        let at = text.rfind("# EOF").unwrap_or(text.len());
        text.insert_str(at, &crate::edge::metrics_text(&state.edge));
        text
    })
        .into_response()
}

/// OpenAI's moderation model names, which mean the configured moderation task.
pub(crate) const MODERATION_MODELS: &[&str] = &[
    "omni-moderation-latest",
    "text-moderation-latest",
    "text-moderation-stable",
];
/// OpenAI's transcription model names, which mean the configured Whisper model.
pub(crate) const TRANSCRIPTION_MODELS: &[&str] = &["whisper-1", "whisper"];

/// `/v1/models`: every task, plus OpenAI's names for the configured
/// moderation task and Whisper model.
pub(crate) async fn models(State(state): State<Shared>) -> Json<Value> {
    let engine = state.engine.current();
    let model = |id: &str, task: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "triage", "task": task});
    let mut data: Vec<Value> = engine.config.tasks.keys().map(|t| model(t, t)).collect();
    let server = &engine.config.server;
    if let Some(t) = &server.moderation_task {
        data.extend(MODERATION_MODELS.iter().map(|m| model(m, t)));
    }
    if engine.transcribes() {
        let t = server
            .transcription_task
            .as_deref()
            .unwrap_or("transcription");
        data.extend(TRANSCRIPTION_MODELS.iter().map(|m| model(m, t)));
    }
    Json(json!({"object": "list", "data": data}))
}
