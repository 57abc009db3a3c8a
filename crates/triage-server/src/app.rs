//! The router and its handlers: OpenAI-compatible moderation and
//! transcription served by the local specialists (or, with a config, by the
//! engine's tasks: see [`crate::engine_routes`]), models, health, readiness
//! and metrics.

use crate::error::ApiError;
use crate::metrics::Metrics;
use axum::extract::{DefaultBodyLimit, Multipart, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use triage_local::ModelHandle;
use triage_local::speech::{self, TranscribeOptions, WhisperEngine};

/// OpenAI's moderation categories, in their order.
pub const OPENAI_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

/// Who is calling: a local process on the socket, or a TCP client.
#[derive(Debug, Clone)]
pub enum Peer {
    Unix {
        pid: Option<i32>,
        uid: u32,
        gid: u32,
    },
    Tcp(std::net::SocketAddr),
}

/// A bearer key for TCP clients and the tasks it may use (empty: all).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub key: String,
    pub name: String,
    pub tasks: Vec<String>,
    /// Requests per minute this key may make (token bucket); `None`: unlimited.
    pub rpm: Option<u32>,
}

/// Per-key token buckets.
#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl RateLimits {
    /// Take one request from `key`'s bucket; `Err(seconds)` until the next one.
    pub fn take(&self, key: &str, rpm: u32) -> Result<(), u64> {
        let capacity = f64::from(rpm.max(1));
        let per_second = capacity / 60.0;
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / per_second).ceil() as u64)
        }
    }
}

/// Limits on what a request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub moderation_body_bytes: usize,
    pub audio_body_bytes: usize,
    pub max_inputs: usize,
    pub max_audio_s: f64,
    /// Transcriptions decoded at once; more wait, and past `audio_queue` are refused.
    pub audio_parallel: usize,
    pub audio_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            moderation_body_bytes: 1 << 20,
            audio_body_bytes: 25 << 20,
            max_inputs: 256,
            max_audio_s: 4.0 * 3600.0,
            audio_parallel: 2,
            audio_queue: 16,
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub moderation: Option<ModelHandle>,
    /// Specialist label → OpenAI category (`offensive` → `harassment`).
    pub category_map: BTreeMap<String, String>,
    pub flag_threshold: f32,
    pub whisper: Option<Arc<WhisperEngine>>,
    pub whisper_slots: Arc<tokio::sync::Semaphore>,
    /// Transcription requests admitted (running or waiting for a slot).
    pub audio_waiting: std::sync::atomic::AtomicUsize,
    pub limits: Limits,
    pub keys: Vec<ApiKey>,
    pub metrics: Metrics,
    pub jobs: crate::jobs::Jobs,
    pub rate_limits: RateLimits,
    /// Dollars per CPU-hour of local compute, for `x-triage-cost-usd`.
    pub cpu_hour_usd: f64,
    /// The strategies engine when serving a config (`triage serve --config`);
    /// empty for the default specialists. A reload swaps it.
    pub engine: crate::reload::EngineSlot,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The Whisper engine (with a config: the transcription task's, else the
    /// first Whisper specialist), or 503 when this server has none.
    pub(crate) fn whisper_engine(&self) -> Result<Arc<WhisperEngine>, ApiError> {
        if let Some(engine) = self.engine.current() {
            return crate::engine_routes::whisper_of(&engine)
                .ok_or_else(|| ApiError::NotReady("transcription".into()));
        }
        self.whisper
            .clone()
            .ok_or_else(|| ApiError::NotReady("transcription".into()))
    }

    /// Longest audio accepted: the config's `server.max_audio_seconds`, else the limit.
    pub(crate) fn max_audio_s(&self) -> f64 {
        self.engine
            .current()
            .and_then(|e| e.config.server.max_audio_seconds)
            .unwrap_or(self.limits.max_audio_s)
    }

    /// The bearer key `given` names: from `TRIAGE_API_KEYS`, or from the
    /// current config's `server.keys` (whose values come from the environment).
    pub fn find_key(&self, given: &str) -> Option<ApiKey> {
        if let Some(k) = self.keys.iter().find(|k| k.key == given) {
            return Some(k.clone());
        }
        let engine = self.engine.current()?;
        engine
            .config
            .server
            .keys
            .iter()
            .find(|k| k.key.as_ref().is_some_and(|v| v.expose() == given))
            .map(|k| ApiKey {
                key: given.to_owned(),
                name: k.name.clone(),
                tasks: k.tasks.clone(),
                rpm: k.requests_per_minute,
            })
    }

    /// Whether any bearer key can be used (TCP refuses to start without one).
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
            || self
                .engine
                .current()
                .is_some_and(|e| e.config.server.keys.iter().any(|k| k.key.is_some()))
    }
}

/// The key a TCP caller authenticated with; `None` on the unix socket, where
/// the peer's credentials are logged instead.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<ApiKey>);

impl Caller {
    /// 403 unless this caller's key may use `task`.
    pub fn authorize(&self, task: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(key) if !key.tasks.is_empty() && !key.tasks.iter().any(|t| t == task) => {
                Err(ApiError::Forbidden(format!("task `{task}`")))
            }
            _ => Ok(()),
        }
    }
}

pub type Shared = Arc<AppState>;

/// Build the router.
pub fn router(state: Shared) -> Router {
    let moderation_limit = state.limits.moderation_body_bytes;
    let audio_limit = state.limits.audio_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route(
            "/v1/moderations",
            post(moderations).layer(DefaultBodyLimit::max(moderation_limit)),
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
            post(crate::engine_routes::chat_completions)
                .layer(DefaultBodyLimit::max(moderation_limit)),
        )
        .route(
            "/v1/execute",
            post(crate::engine_routes::execute).layer(DefaultBodyLimit::max(audio_limit)),
        )
        .route("/v1/jobs/{id}", get(crate::jobs::status))
        .route("/v1/jobs/{id}/result", get(crate::jobs::result))
        .route("/v1/jobs/{id}/events", get(crate::jobs::events))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Auth for TCP peers, peer logging, metrics, and the JSON error shape for
/// rejections that axum produces itself (body too large, bad JSON).
async fn observe(State(state): State<Shared>, mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let mut caller = Caller(None);
    let route = req.uri().path().to_owned();
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    if let Some(Peer::Tcp(addr)) = &peer {
        let open = matches!(route.as_str(), "/health" | "/ready");
        if !open {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let key = given.and_then(|g| state.find_key(g));
            let Some(key) = key else {
                tracing::info!(%addr, %route, "rejected: no valid key");
                return finish(
                    &state,
                    &route,
                    started,
                    ApiError::Unauthorized.into_response(),
                );
            };
            let task = match route.as_str() {
                "/v1/moderations" => Some("moderation"),
                "/v1/audio/transcriptions" => Some("transcription"),
                r if r.starts_with("/v1/jobs") => Some("transcription"),
                _ => None,
            };
            // With a config, handlers check the scope against the task they
            // resolve (a request's `model` may name any configured task).
            if let Some(task) = task
                && state.engine.current().is_none()
                && !key.tasks.is_empty()
                && !key.tasks.iter().any(|t| t == task)
            {
                return finish(
                    &state,
                    &route,
                    started,
                    ApiError::Forbidden(task.to_owned()).into_response(),
                );
            }
            if let Some(rpm) = key.rpm
                && let Err(retry_after_s) = state.rate_limits.take(&key.name, rpm)
            {
                return finish(
                    &state,
                    &route,
                    started,
                    ApiError::Overloaded { retry_after_s }.into_response(),
                );
            }
            tracing::debug!(%addr, key = %key.name, %route, "request");
            caller = Caller(Some(key));
        }
    } else if let Some(Peer::Unix { pid, uid, gid }) = &peer {
        tracing::debug!(?pid, uid, gid, %route, "request on the unix socket");
    }
    req.extensions_mut().insert(caller);
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let response = next.run(req).await;
    state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    let response = match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !is_json(&response) => {
            let limit = if route.contains("audio") {
                state.limits.audio_body_bytes
            } else {
                state.limits.moderation_body_bytes
            };
            ApiError::TooLarge { limit }.into_response()
        }
        s @ (StatusCode::BAD_REQUEST
        | StatusCode::UNPROCESSABLE_ENTITY
        | StatusCode::UNSUPPORTED_MEDIA_TYPE)
            if !is_json(&response) =>
        {
            let body = axum::body::to_bytes(response.into_body(), 64 << 10)
                .await
                .unwrap_or_default();
            let message = String::from_utf8_lossy(&body).into_owned();
            match s {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMedia(message),
                StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(message),
                _ => ApiError::bad(message, None),
            }
            .into_response()
        }
        _ => response,
    };
    finish(&state, &route, started, response)
}

fn is_json(r: &Response) -> bool {
    r.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn finish(state: &AppState, route: &str, started: Instant, mut response: Response) -> Response {
    let known = [
        "/health",
        "/ready",
        "/metrics",
        "/v1/models",
        "/v1/moderations",
        "/v1/audio/transcriptions",
        "/v1/chat/completions",
        "/v1/execute",
        "/v1/jobs",
    ];
    let label = if known.contains(&route) {
        route
    } else {
        "other"
    };
    state.metrics.observe(
        label,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    let headers = response.headers_mut();
    if !headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(&request_id("req"))
    {
        headers.insert("x-request-id", v);
    }
    if !headers.contains_key("x-triage-tier") {
        headers.insert("x-triage-tier", HeaderValue::from_static("none"));
    }
    if !headers.contains_key("x-triage-cost-usd") {
        headers.insert("x-triage-cost-usd", HeaderValue::from_static("0"));
    }
    response
}

pub(crate) fn tagged(mut response: Response, tier: &str, usd: f64) -> Response {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(tier) {
        h.insert("x-triage-tier", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{usd:.9}")) {
        h.insert("x-triage-cost-usd", v);
    }
    response
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<Shared>) -> Result<Json<Value>, ApiError> {
    if let Some(engine) = state.engine.current() {
        return Ok(Json(json!({
            "status": "ready",
            "tasks": engine.config.tasks.keys().collect::<Vec<_>>(),
            "specialists": engine.specialists.map.keys().collect::<Vec<_>>(),
            "transcription": crate::engine_routes::whisper_of(&engine).is_some(),
        })));
    }
    if state.moderation.is_none() && state.whisper.is_none() {
        return Err(ApiError::NotReady("no model".into()));
    }
    Ok(Json(json!({
        "status": "ready",
        "moderation": state.moderation.as_ref().map(|h| h.info().name.clone()),
        "transcription": state.whisper.is_some(),
    })))
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

pub(crate) const MODERATION_MODELS: &[&str] = &[
    "omni-moderation-latest",
    "text-moderation-latest",
    "text-moderation-stable",
    "toxicity",
];
pub(crate) const TRANSCRIPTION_MODELS: &[&str] = &["whisper-1", "whisper"];

async fn models(State(state): State<Shared>) -> Json<Value> {
    if let Some(engine) = state.engine.current() {
        return Json(crate::engine_routes::models(&engine));
    }
    let mut data = Vec::new();
    if state.moderation.is_some() {
        data.extend(
            MODERATION_MODELS
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "triage"})),
        );
    }
    if state.whisper.is_some() {
        data.extend(
            TRANSCRIPTION_MODELS
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "triage"})),
        );
    }
    Json(json!({"object": "list", "data": data}))
}

#[derive(Debug, Deserialize)]
struct ModerationRequest {
    input: Value,
    #[serde(default)]
    model: Option<String>,
}

pub(crate) fn request_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{nanos:x}")
}

async fn moderations(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ModerationRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            format!("the body is not a valid moderation request: {e}"),
            None,
        )
    })?;
    if let Some(engine) = state.engine.current() {
        let inputs = moderation_inputs(req.input, state.limits.max_inputs)?;
        return crate::engine_routes::moderations(&state, &engine, &caller, req.model, inputs)
            .await;
    }
    let model_name = req
        .model
        .clone()
        .unwrap_or_else(|| "omni-moderation-latest".into());
    if !MODERATION_MODELS.contains(&model_name.as_str()) {
        return Err(ApiError::UnknownModel(model_name));
    }
    let handle = state
        .moderation
        .as_ref()
        .ok_or_else(|| ApiError::NotReady("moderation".into()))?;
    let inputs = moderation_inputs(req.input, state.limits.max_inputs)?;
    moderate_locally(&state, handle, model_name, inputs, Instant::now()).await
}

/// `input` as a string, an array of strings, or an array of text parts.
pub(crate) fn moderation_inputs(input: Value, max_inputs: usize) -> Result<Vec<String>, ApiError> {
    let inputs: Vec<String> = match input {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("text") => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("a text input needs `text`", Some("input"))),
                _ => Err(ApiError::bad(
                    "`input` must be a string or an array of strings (or text parts)",
                    Some("input"),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::bad(
                "`input` must be a string or an array of strings",
                Some("input"),
            ));
        }
    };
    if inputs.is_empty() {
        return Err(ApiError::bad("`input` is empty", Some("input")));
    }
    if inputs.len() > max_inputs {
        return Err(ApiError::bad(
            format!("at most {max_inputs} inputs per request"),
            Some("input"),
        ));
    }
    Ok(inputs)
}

/// The engine-less moderation path: the local model scores every input.
async fn moderate_locally(
    state: &AppState,
    handle: &ModelHandle,
    model_name: String,
    inputs: Vec<String>,
    started: Instant,
) -> Result<Response, ApiError> {
    // Submit every input at once so the worker can batch them; answers keep input order.
    let pending: Vec<_> = inputs
        .into_iter()
        .map(|text| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.classify(&text, false).await })
        })
        .collect();
    let mut results = Vec::with_capacity(pending.len());
    for p in pending {
        let c = p.await.map_err(|e| ApiError::Internal(e.to_string()))??;
        let mut scores: Map<String, Value> = OPENAI_CATEGORIES
            .iter()
            .map(|c| ((*c).to_owned(), json!(0.0)))
            .collect();
        let mut extra: Map<String, Value> = Map::new();
        for s in &c.scores {
            if let Some(cat) = state.category_map.get(&s.label) {
                let prev = scores.get(cat).and_then(Value::as_f64).unwrap_or(0.0);
                scores.insert(cat.clone(), json!(prev.max(f64::from(s.score))));
            }
            extra.insert(s.label.clone(), json!(s.score));
        }
        let categories: Map<String, Value> = scores
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!(v.as_f64().unwrap_or(0.0) >= f64::from(state.flag_threshold)),
                )
            })
            .collect();
        let flagged = categories.values().any(|v| v.as_bool() == Some(true));
        let applied: Map<String, Value> = OPENAI_CATEGORIES
            .iter()
            .map(|c| ((*c).to_owned(), json!(["text"])))
            .collect();
        results.push(json!({
            "flagged": flagged,
            "categories": categories,
            "category_scores": scores,
            "category_applied_input_types": applied,
            "triage": {"labels": extra, "truncated": c.truncated},
        }));
    }
    // Local compute priced at the configured CPU-hour rate.
    let usd = started.elapsed().as_secs_f64() / 3600.0 * state.cpu_hour_usd;
    state.metrics.answered("moderation", "local", usd);
    let body = json!({"id": request_id("modr"), "model": model_name, "results": results});
    Ok(tagged(
        Json(body).into_response(),
        &format!("local:{}", handle.info().name),
        usd,
    ))
}

/// The fields of an audio upload (`/v1/audio/transcriptions`, `/v1/jobs`).
#[derive(Debug, Default)]
pub(crate) struct AudioForm {
    /// File name (for its extension) and bytes.
    pub file: Option<(Option<String>, Vec<u8>)>,
    pub model: Option<String>,
    pub format: Option<String>,
    pub language: Option<String>,
    pub task: Option<String>,
    /// `/v1/execute`: the overrides as JSON text.
    pub overrides: Option<String>,
}

impl AudioForm {
    /// The uploaded bytes and the file name's extension, lower case.
    pub(crate) fn required_file(
        file: Option<(Option<String>, Vec<u8>)>,
    ) -> Result<(Vec<u8>, Option<String>), ApiError> {
        let (name, bytes) =
            file.ok_or_else(|| ApiError::bad("`file` is required", Some("file")))?;
        let ext = name
            .as_deref()
            .and_then(|n| n.rsplit_once('.'))
            .map(|(_, e)| e.to_ascii_lowercase());
        Ok((bytes, ext))
    }
}

/// Counts a request as waiting for transcription until it is dropped.
struct WaitingGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) async fn read_audio_form(form: &mut Multipart) -> Result<AudioForm, ApiError> {
    let mut out = AudioForm::default();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad(format!("malformed multipart body: {e}"), None))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let file_name = field.file_name().map(str::to_owned);
            let bytes = field
                .bytes()
                .await
                .map_err(|e| ApiError::bad(format!("cannot read `file`: {e}"), Some("file")))?;
            out.file = Some((file_name, bytes.to_vec()));
            continue;
        }
        let text = field.text().await.unwrap_or_default();
        let text = Some(text).filter(|t| !t.is_empty());
        match name.as_str() {
            "model" => out.model = text,
            "response_format" => out.format = text,
            "language" => out.language = text,
            "task" => out.task = text,
            "overrides" => out.overrides = text,
            _ => {}
        }
    }
    Ok(out)
}

async fn transcriptions(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    if let Some(engine) = state.engine.current() {
        caller.authorize(
            engine
                .config
                .server
                .transcription_task
                .as_deref()
                .unwrap_or("transcription"),
        )?;
    }
    let engine = state.whisper_engine()?;
    let AudioForm {
        file,
        model,
        format,
        language,
        ..
    } = read_audio_form(&mut form).await?;
    let format = format.unwrap_or_else(|| "json".to_owned());
    let model = model.ok_or_else(|| ApiError::bad("`model` is required", Some("model")))?;
    if !TRANSCRIPTION_MODELS.contains(&model.as_str()) {
        return Err(ApiError::UnknownModel(model));
    }
    if !["json", "text", "srt", "verbose_json", "vtt"].contains(&format.as_str()) {
        return Err(ApiError::bad(
            format!("response_format `{format}` is not one of json, text, srt, verbose_json, vtt"),
            Some("response_format"),
        ));
    }
    let (bytes, ext) = AudioForm::required_file(file)?;
    // Bounded waiting: past `audio_parallel + audio_queue` requests, refuse at
    // once rather than queue without end.
    let admitted = state.audio_waiting.fetch_add(1, Ordering::AcqRel);
    let _admission = WaitingGuard(&state.audio_waiting);
    if admitted >= state.limits.audio_parallel + state.limits.audio_queue {
        return Err(ApiError::Overloaded { retry_after_s: 5 });
    }
    let permit = match tokio::time::timeout(
        std::time::Duration::from_secs(120),
        state.whisper_slots.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(p)) => p,
        _ => return Err(ApiError::Overloaded { retry_after_s: 5 }),
    };
    let max = state.max_audio_s();
    let verbose = format == "verbose_json";
    let started = Instant::now();
    let transcript = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let pcm = speech::decode(bytes, ext.as_deref(), Some(max)).map_err(|e| {
            ApiError::bad(format!("the audio file cannot be used: {e}"), Some("file"))
        })?;
        engine
            .transcribe(
                &pcm.samples,
                &TranscribeOptions {
                    language,
                    token_probs: verbose,
                },
                None,
            )
            .map_err(|e| ApiError::Internal(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let usd = started.elapsed().as_secs_f64() / 3600.0 * state.cpu_hour_usd;
    state.metrics.answered("transcription", "local", usd);
    let response = match format.as_str() {
        "text" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            speech::format::txt(&transcript),
        )
            .into_response(),
        "srt" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            speech::format::srt(&transcript),
        )
            .into_response(),
        "vtt" => (
            [(header::CONTENT_TYPE, "text/vtt; charset=utf-8")],
            speech::format::vtt(&transcript),
        )
            .into_response(),
        "verbose_json" => {
            let segments: Vec<Value> = transcript
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    json!({
                        "id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                        "tokens": [], "temperature": 0.0, "avg_logprob": s.avg_logprob,
                        "compression_ratio": 0.0, "no_speech_prob": s.no_speech_prob,
                    })
                })
                .collect();
            Json(json!({
                "task": "transcribe", "language": transcript.language, "duration": transcript.duration_s,
                "text": transcript.text, "segments": segments,
                "triage": {"confidence": transcript.confidence, "no_speech": transcript.no_speech},
            }))
            .into_response()
        }
        _ => Json(json!({"text": transcript.text})).into_response(),
    };
    Ok(tagged(response, "local:whisper", usd))
}
