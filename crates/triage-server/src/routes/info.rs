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
/// or full, answers 503: a load balancer should send work elsewhere. Over
/// TCP without a valid key (a load balancer's probe) only the status is
/// answered: what the server runs is not told to strangers.
pub(crate) async fn ready(State(state): State<Shared>, req: axum::extract::Request) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::state::Peer>>();
    let stranger = match peer.map(|p| &p.0) {
        Some(crate::state::Peer::Tcp(_)) => req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .is_none_or(|k| state.find_key(k).is_none()),
        _ => false,
    };
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
    if stranger {
        let body = Json(json!({"status": if ready { "ready" } else { "ledger_behind" }}));
        return (status, body).into_response();
    }
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
    Json(json!({"object": "list", "data": model_list(&state)}))
}

/// `GET /v1/models/{model}`: one model of the list, or 404
/// `model_not_found` (what `client.models.retrieve` reads).
pub(crate) async fn model(
    State(state): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, crate::ApiError> {
    model_list(&state)
        .into_iter()
        .find(|m| m["id"] == id.as_str())
        .map(Json)
        .ok_or(crate::ApiError::UnknownModel(id))
}

/// Every model name this server answers to: its tasks, and OpenAI's names
/// for the moderation and transcription tasks.
fn model_list(state: &Shared) -> Vec<Value> {
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
    data
}
