//! The routes, each implemented once over the engine: OpenAI-compatible
//! moderation, chat and transcription, the native `/v1/execute` and
//! `/v1/jobs`, models, health, readiness and metrics.

#[cfg(feature = "speech")]
pub mod audio;
pub mod chat;
pub mod execute;
pub mod info;
pub mod moderation;
pub mod upload;

use crate::auth::observe;
use crate::error::ApiError;
use crate::metrics::UNKNOWN_TASK;
use crate::state::Shared;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use std::time::Instant;
use triage_engine::{Engine, Execution, Input, Overrides};

#[cfg(feature = "speech")]
use audio::transcriptions;

/// A build without speech answers transcriptions with 503, naming why.
#[cfg(not(feature = "speech"))]
async fn transcriptions() -> ApiError {
    ApiError::no_speech()
}

/// Build the router.
pub fn router(state: Shared) -> Router {
    let text_limit = state.limits.moderation_body_bytes;
    // Uploads are spooled and bounded field by field (413 naming
    // `audio_upload_bytes`); this outer bound only adds the form's framing.
    let audio_limit = usize::try_from(state.limits.audio_upload_bytes.saturating_add(1 << 20))
        .unwrap_or(usize::MAX);
    Router::new()
        .route("/health", get(info::health))
        .route("/ready", get(info::ready))
        .route("/metrics", get(info::metrics))
        .route("/v1/models", get(info::models))
        .route("/v1/models/{model}", get(info::model))
        .route(
            "/v1/moderations",
            post(moderation::moderations).layer(DefaultBodyLimit::max(text_limit)),
        )
        .route(
            "/v1/audio/transcriptions",
            post(transcriptions).layer(DefaultBodyLimit::max(audio_limit)),
        )
        .route(
            "/v1/jobs",
            post(crate::jobs::submit).layer(DefaultBodyLimit::max(audio_limit)),
        )
        .route(
            "/v1/chat/completions",
            post(chat::chat_completions).layer(DefaultBodyLimit::max(text_limit)),
        )
        .route(
            "/v1/execute",
            post(execute::execute).layer(DefaultBodyLimit::max(audio_limit)),
        )
        .route("/v1/jobs/{id}", get(crate::jobs::status))
        .route("/v1/jobs/{id}/result", get(crate::jobs::result))
        .route("/v1/jobs/{id}/events", get(crate::jobs::events))
        .route("/v1/jobs/{id}/cancel", post(crate::jobs::cancel))
        .merge(crate::ui::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::edge::request_deadline,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Run one task and count it: requests, latency, escalations, dollars. A
/// task the config does not have counts under one fixed label.
pub(crate) async fn run(
    state: &Shared,
    engine: &Engine,
    task: &str,
    input: Input,
    overrides: &Overrides,
) -> Result<Execution, ApiError> {
    let started = Instant::now();
    let result = engine.execute_traced(task, input, overrides).await;
    let seconds = started.elapsed().as_secs_f64();
    let label = if engine.config.tasks.contains_key(task) {
        task
    } else {
        UNKNOWN_TASK
    };
    match result {
        Ok(e) => {
            state.metrics.executed(label, Some(&e.trace), true, seconds);
            Ok(e)
        }
        Err(f) => {
            tracing::debug!(task, error = %triage_engine::error::chain(&f.error), "task failed");
            // A failed request still counts its escalations and the dollars
            // its tiers spent before the failure.
            state
                .metrics
                .executed(label, Some(&f.trace), false, seconds);
            Err(f.error.into())
        }
    }
}

/// The answering tiers (distinct, in order) and the summed cost of `runs`.
pub(crate) fn tier_and_cost<'a>(runs: impl IntoIterator<Item = &'a Execution>) -> (String, f64) {
    let mut tiers: Vec<&str> = Vec::new();
    let mut usd = 0.0;
    for e in runs {
        usd += e.trace.cost_usd;
        let t = e.trace.answered_by().map_or("none", |t| t.tier.as_str());
        if !tiers.contains(&t) {
            tiers.push(t);
        }
    }
    (tiers.join(","), usd)
}

/// The task name transcriptions are authorised and counted under.
pub(crate) fn transcription_task(state: &Shared) -> String {
    state
        .engine
        .current()
        .config
        .server
        .transcription_task
        .clone()
        .unwrap_or_else(|| "transcription".to_owned())
}
