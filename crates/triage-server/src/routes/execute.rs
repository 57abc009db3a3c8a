//! `POST /v1/execute`: `{"task", "input", "overrides"}` (or, for audio
//! tasks, multipart with `task`, `file` and an optional `overrides` JSON
//! field) → `{"answer", "trace"}`, as `triage execute` prints.

use super::chat::WireChatRequest;
use super::upload::{AudioForm, SLOT_WAIT, check_length, read_audio_form};
use super::{run, tier_and_cost};
use crate::auth::{Caller, tagged};
use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use triage_engine::{Input, Overrides};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteRequest {
    task: String,
    /// Text, or a chat request (`{"messages": [...]}`).
    input: Value,
    #[serde(default)]
    overrides: Option<Overrides>,
}

/// The answer of `POST /v1/execute`.
#[derive(Debug, serde::Serialize)]
struct ExecuteAnswer<'a> {
    answer: &'a triage_core::TaskAnswer,
    trace: &'a triage_core::trace::Trace,
}

/// `POST /v1/execute`.
pub async fn execute(State(state): State<Shared>, req: Request) -> Result<Response, ApiError> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_default();
    let engine = state.engine.current();
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    // Audio: admitted (the line shared with transcriptions and jobs) before
    // the body is read, spooled to disk, and held until the task is done.
    let mut _admitted = None;
    let mut _upload = None;
    let mut _slot = None;
    let (task, input, overrides) = if multipart {
        check_length(&state, req.headers())?;
        let mut form = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::bad(e.body_text(), None))?;
        // The task (named before the file) is authorised, then admitted,
        // before any of the file is read.
        let mut gate = |task: Option<&str>| -> Result<Option<u64>, ApiError> {
            let task = task.ok_or_else(|| {
                ApiError::bad(
                    "`task` is required, before `file` in the form",
                    Some("task"),
                )
            })?;
            caller.authorize(task)?;
            _admitted = Some(state.audio.admit_as(caller.key_name())?);
            Ok(None)
        };
        let AudioForm {
            file,
            task,
            overrides,
            ..
        } = read_audio_form(&state, &mut form, &mut gate).await?;
        let task = task.ok_or_else(|| ApiError::bad("`task` is required", Some("task")))?;
        let upload = AudioForm::required_file(file)?;
        // The transcription inside the pipeline takes a Whisper slot like
        // any other.
        _slot = Some(state.audio.slot(SLOT_WAIT).await?);
        let overrides = match overrides {
            Some(o) => serde_json::from_str(&o).map_err(|e| {
                ApiError::bad(format!("`overrides` is not valid: {e}"), Some("overrides"))
            })?,
            None => Overrides::default(),
        };
        let input = Input::AudioFile {
            path: upload.path.to_path_buf(),
            file_name: upload.name.clone(),
        };
        _upload = Some(upload);
        (task, input, overrides)
    } else {
        let bytes = bounded_body(req, state.limits.moderation_body_bytes).await?;
        let r: ExecuteRequest = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad(
                format!("the body is not a valid execute request: {e}"),
                None,
            )
        })?;
        let input = match r.input {
            Value::String(s) => Input::Text(s),
            v @ Value::Object(_) => {
                let chat: WireChatRequest = serde_json::from_value(v).map_err(|e| {
                    ApiError::bad(
                        format!("`input` must be text or a chat request with `messages`: {e}"),
                        Some("input"),
                    )
                })?;
                Input::Chat(chat.into_chat()?)
            }
            _ => {
                return Err(ApiError::bad(
                    "`input` must be text or a chat request with `messages`",
                    Some("input"),
                ));
            }
        };
        (r.task, input, r.overrides.unwrap_or_default())
    };
    caller.authorize(&task)?;
    let overrides = caller.overrides(overrides)?;
    let execution = run(&state, &engine, &task, input, &overrides).await?;
    let (tier, usd) = tier_and_cost([&execution]);
    // Serialised straight from the execution (no JSON tree built first).
    let body = ExecuteAnswer {
        answer: &execution.answer,
        trace: &execution.trace,
    };
    let mut response = tagged(Json(body).into_response(), &tier, usd);
    if let Ok(v) = axum::http::HeaderValue::from_str(&execution.request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    Ok(response)
}

/// Run an engine task for a job (`/v1/jobs` with a `task` field): the result
/// is `{"answer", "trace"}`.
pub(crate) async fn run_job(
    state: &Shared,
    engine: &triage_engine::Engine,
    task: &str,
    input: Input,
    overrides: &Overrides,
) -> Result<Value, String> {
    run(state, engine, task, input, overrides)
        .await
        .map(|e| json!({"answer": e.answer, "trace": e.trace}))
        .map_err(|e| e.to_string())
}

/// Read a body of at most `limit` bytes: a declared length over it is
/// refused before reading, and reading stops (413) as soon as it passes.
pub(crate) async fn bounded_body(
    req: Request,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge { limit });
    }
    let body = http_body_util::Limited::new(req.into_body(), limit);
    match body.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge { limit })
        }
        Err(e) => Err(crate::edge::body_error(e.as_ref(), || {
            ApiError::bad(format!("cannot read the body: {e}"), None)
        })),
    }
}
