//! Routes answered by the strategies engine when the server runs a config:
//! `/v1/moderations` and `/v1/chat/completions` in OpenAI's shapes, the native
//! `/v1/execute`, and the engine's Whisper for transcriptions. Every response
//! names the tier that answered (`x-triage-tier`) and what the request cost
//! (`x-triage-cost-usd`, the sum of the trace).

use crate::app::{
    AudioForm, Caller, MODERATION_MODELS, OPENAI_CATEGORIES, Shared, TRANSCRIPTION_MODELS,
    request_id, tagged,
};
use crate::error::ApiError;
use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use triage_core::llm::{ChatRequest, JsonSchema, Message, Role};
use triage_engine::config::{StageKind, Strategy};
use triage_engine::specialists::Specialist;
use triage_engine::{Engine, Execution, Input, Overrides};
use triage_local::speech::WhisperEngine;

/// The Whisper model of the configured transcription task (its first
/// transcribe stage), else the first Whisper specialist.
pub fn whisper_of(engine: &Engine) -> Option<Arc<WhisperEngine>> {
    let of_task = engine
        .config
        .server
        .transcription_task
        .as_deref()
        .and_then(|t| engine.config.tasks.get(t))
        .and_then(|t| match &t.strategy {
            Strategy::Pipeline(p) => p.stages.iter().find_map(|s| match &s.kind {
                StageKind::Transcribe { specialist } => Some(specialist.clone()),
                _ => None,
            }),
            _ => None,
        });
    let whisper = |s: &Specialist| match s {
        Specialist::Whisper { engine, .. } => Some(engine.clone()),
        _ => None,
    };
    of_task
        .and_then(|name| engine.specialists.map.get(&name).and_then(whisper))
        .or_else(|| engine.specialists.map.values().find_map(whisper))
}

/// `/v1/models` with a config: every task, plus OpenAI's names for the
/// configured default tasks.
pub fn models(engine: &Engine) -> Value {
    let model = |id: &str, task: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "triage", "task": task});
    let mut data: Vec<Value> = engine.config.tasks.keys().map(|t| model(t, t)).collect();
    let server = &engine.config.server;
    if let Some(t) = &server.moderation_task {
        data.extend(OPENAI_MODERATION.iter().map(|m| model(m, t)));
    }
    if whisper_of(engine).is_some() {
        let t = server
            .transcription_task
            .as_deref()
            .unwrap_or("transcription");
        data.extend(TRANSCRIPTION_MODELS.iter().map(|m| model(m, t)));
    }
    json!({"object": "list", "data": data})
}

/// OpenAI's moderation model names, which mean the configured moderation task.
const OPENAI_MODERATION: &[&str] = &[
    "omni-moderation-latest",
    "text-moderation-latest",
    "text-moderation-stable",
];

/// Run one task and count it: requests, latency, escalations, dollars.
async fn run(
    state: &Shared,
    engine: &Engine,
    task: &str,
    input: Input,
    overrides: &Overrides,
) -> Result<Execution, ApiError> {
    let started = Instant::now();
    let result = engine.execute_traced(task, input, overrides).await;
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(e) => {
            state.metrics.executed(task, Some(&e.trace), true, seconds);
            Ok(e)
        }
        Err(f) => {
            let error = triage_engine::error::chain(&f.error);
            tracing::debug!(task, %error, "task failed");
            // A failed request still counts its escalations and the dollars
            // its tiers spent before the failure.
            state.metrics.executed(task, Some(&f.trace), false, seconds);
            Err(f.error.into())
        }
    }
}

/// The answering tiers (distinct, in order) and the summed cost of `runs`.
fn tier_and_cost<'a>(runs: impl IntoIterator<Item = &'a Execution>) -> (String, f64) {
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

/// `POST /v1/moderations` with a config: the moderation task (or the task the
/// request's `model` names) once per input; each task label maps to an
/// OpenAI category through `server.categories`.
pub(crate) async fn moderations(
    state: &Shared,
    engine: &Engine,
    caller: &Caller,
    model: Option<String>,
    inputs: Vec<String>,
) -> Result<Response, ApiError> {
    let server = &engine.config.server;
    let task = match model.as_deref() {
        Some(m) if engine.config.tasks.contains_key(m) => m.to_owned(),
        None => server
            .moderation_task
            .clone()
            .ok_or_else(|| ApiError::UnknownModel("omni-moderation-latest".into()))?,
        Some(m) if MODERATION_MODELS.contains(&m) => server
            .moderation_task
            .clone()
            .ok_or_else(|| ApiError::UnknownModel(m.to_owned()))?,
        Some(m) => return Err(ApiError::UnknownModel(m.to_owned())),
    };
    caller.authorize(&task)?;
    let overrides = Overrides::default();
    let runs = futures_util::future::join_all(
        inputs
            .into_iter()
            .map(|text| run(state, engine, &task, Input::Text(text), &overrides)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let applied: Map<String, Value> = OPENAI_CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), json!(["text"])))
        .collect();
    let results: Vec<Value> = runs
        .iter()
        .map(|e| {
            let mut scores: Map<String, Value> = OPENAI_CATEGORIES
                .iter()
                .map(|c| ((*c).to_owned(), json!(0.0)))
                .collect();
            let mut categories: Map<String, Value> = OPENAI_CATEGORIES
                .iter()
                .map(|c| ((*c).to_owned(), json!(false)))
                .collect();
            let flagged_labels: Vec<&str> = e.answer["flagged_labels"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let labels = e.answer["labels"].as_object().cloned().unwrap_or_default();
            for (label, score) in &labels {
                let Some(category) = server.categories.get(label) else {
                    continue;
                };
                let score = score.as_f64().unwrap_or(0.0);
                let prev = scores.get(category).and_then(Value::as_f64).unwrap_or(0.0);
                scores.insert(category.clone(), json!(prev.max(score)));
                if flagged_labels.contains(&label.as_str()) {
                    categories.insert(category.clone(), json!(true));
                }
            }
            json!({
                "flagged": e.answer["flagged"].as_bool().unwrap_or(false),
                "categories": categories,
                "category_scores": scores,
                "category_applied_input_types": applied,
                "triage": {
                    "labels": labels,
                    "tier": e.trace.answered_by().map(|t| t.tier.clone()),
                    "request_id": e.request_id,
                    "refusal": e.answer.get("refusal"),
                },
            })
        })
        .collect();
    let (tier, usd) = tier_and_cost(&runs);
    let body = json!({
        "id": request_id("modr"),
        "model": model.unwrap_or_else(|| task.clone()),
        "results": results,
    });
    Ok(tagged(Json(body).into_response(), &tier, usd))
}

#[derive(Debug, Deserialize)]
struct WireChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<WireMessage>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    /// A string, an array of content parts, or null.
    #[serde(default)]
    content: Value,
}

impl WireChatRequest {
    fn into_chat(self) -> Result<ChatRequest, ApiError> {
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::bad(
                        format!(
                            "messages[{i}].role `{other}` is not supported (system, developer, user, assistant)"
                        ),
                        Some("messages"),
                    ));
                }
            };
            let content = match m.content {
                Value::String(s) => s,
                Value::Null => String::new(),
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(ApiError::bad(
                            format!("messages[{i}].content: only text parts are supported"),
                            Some("messages"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join("\n"),
                _ => {
                    return Err(ApiError::bad(
                        format!("messages[{i}].content must be a string or an array of text parts"),
                        Some("messages"),
                    ));
                }
            };
            messages.push(Message { role, content });
        }
        if messages.is_empty() {
            return Err(ApiError::bad("`messages` is empty", Some("messages")));
        }
        let json_schema = match &self.response_format {
            None => None,
            Some(f) => match f["type"].as_str() {
                Some("text") => None,
                Some("json_object") => Some(JsonSchema {
                    name: "json_object".into(),
                    schema: json!({"type": "object"}),
                    strict: false,
                }),
                Some("json_schema") => {
                    let s = &f["json_schema"];
                    Some(JsonSchema {
                        name: s["name"].as_str().unwrap_or("response").to_owned(),
                        schema: s
                            .get("schema")
                            .cloned()
                            .unwrap_or(json!({"type": "object"})),
                        strict: s["strict"].as_bool().unwrap_or(false),
                    })
                }
                _ => {
                    return Err(ApiError::bad(
                        "response_format.type must be text, json_object or json_schema",
                        Some("response_format"),
                    ));
                }
            },
        };
        Ok(ChatRequest {
            // Empty: each tier's configured model answers.
            model: String::new(),
            messages,
            temperature: self.temperature,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            json_schema,
            top_logprobs: None,
            stream: false,
        })
    }
}

/// OpenAI's usage object from the answer's `usage` (zeros when the tier that
/// answered reported none, e.g. a template).
fn openai_usage(answer: &Value) -> Value {
    let u = &answer["usage"];
    let prompt = u["input_tokens"].as_u64().unwrap_or(0);
    let completion = u["output_tokens"].as_u64().unwrap_or(0);
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u["cached_input_tokens"].as_u64().unwrap_or(0)},
        "completion_tokens_details": {"reasoning_tokens": u["reasoning_tokens"].as_u64().unwrap_or(0)},
    })
}

/// `POST /v1/chat/completions`: the chat task (or the task `model` names).
///
/// With `stream: true` the cascade runs to the end first and the accepted
/// answer is then sent as `chat.completion.chunk` events: a cheap tier's
/// answer can only be judged (and escalated) once it is complete, so tokens
/// cannot be forwarded as they arrive without possibly retracting them.
pub async fn chat_completions(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: WireChatRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            format!("the body is not a valid chat completion request: {e}"),
            None,
        )
    })?;
    let requested = req.model.clone().unwrap_or_default();
    let Some(engine) = state.engine.current() else {
        return Err(ApiError::UnknownModel(requested));
    };
    let task = if engine.config.tasks.contains_key(&requested) {
        requested.clone()
    } else {
        engine
            .config
            .server
            .chat_task
            .clone()
            .ok_or_else(|| ApiError::UnknownModel(requested.clone()))?
    };
    caller.authorize(&task)?;
    let stream = req.stream;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let chat = req.into_chat()?;
    let execution = run(
        &state,
        &engine,
        &task,
        Input::Chat(chat),
        &Overrides::default(),
    )
    .await?;
    let (tier, usd) = tier_and_cost([&execution]);
    let answer = &execution.answer;
    let refusal = answer["refusal"].as_str().map(str::to_owned);
    let content = match (&refusal, &answer["text"]) {
        (Some(_), _) => None,
        (None, Value::String(t)) => Some(t.clone()),
        // A strategy whose answer is not text (a pipeline): its JSON.
        (None, other) => Some(if other.is_null() {
            answer.to_string()
        } else {
            other.to_string()
        }),
    };
    let finish_reason = answer["finish_reason"]
        .as_str()
        .unwrap_or("stop")
        .to_owned();
    let id = format!("chatcmpl-{}", execution.request_id);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let model = if requested.is_empty() {
        task.clone()
    } else {
        requested
    };
    let usage = openai_usage(answer);
    if !stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage,
            "system_fingerprint": null,
            "triage": {"task": task, "tier": tier, "trace": execution.trace},
        });
        return Ok(tagged(Json(body).into_response(), &tier, usd));
    }
    let chunk = |choices: Value, usage: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage;
        }
        c
    };
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut events = vec![chunk(
        choice(json!({"role": "assistant", "content": ""}), Value::Null),
        Value::Null,
    )];
    match (&refusal, &content) {
        (Some(r), _) => events.push(chunk(
            choice(json!({"refusal": r}), Value::Null),
            Value::Null,
        )),
        (None, Some(text)) => {
            for piece in pieces(text, 24) {
                events.push(chunk(
                    choice(json!({"content": piece}), Value::Null),
                    Value::Null,
                ));
            }
        }
        (None, None) => {}
    }
    events.push(chunk(choice(json!({}), json!(finish_reason)), Value::Null));
    if include_usage {
        events.push(chunk(json!([]), usage));
    }
    let mut data: Vec<Event> = events
        .iter()
        .map(|e| Event::default().data(e.to_string()))
        .collect();
    data.push(Event::default().data("[DONE]"));
    let stream =
        futures_util::stream::iter(data.into_iter().map(Ok::<_, std::convert::Infallible>));
    Ok(tagged(Sse::new(stream).into_response(), &tier, usd))
}

/// `text` cut into pieces of about `n` characters, on char boundaries, each
/// ending after whitespace where there is one (so words stay whole).
fn pieces(text: &str, n: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let Some((limit, _)) = rest.char_indices().nth(n) else {
            out.push(rest);
            break;
        };
        let cut = rest[..limit]
            .rfind(char::is_whitespace)
            .map(|i| i + rest[i..].chars().next().map_or(1, char::len_utf8))
            .filter(|&i| i > 0)
            .unwrap_or(limit);
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteRequest {
    task: String,
    /// Text, or a chat request (`{"messages": [...]}`).
    input: Value,
    #[serde(default)]
    overrides: Option<Overrides>,
}

/// `POST /v1/execute`: `{"task", "input", "overrides"}` (or, for audio tasks,
/// multipart with `task`, `file` and an optional `overrides` JSON field) →
/// `{"answer", "trace"}`, as `triage execute` prints.
pub async fn execute(State(state): State<Shared>, req: Request) -> Result<Response, ApiError> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_default();
    let Some(engine) = state.engine.current() else {
        return Err(ApiError::NotFound(
            "/v1/execute needs a config: start the server with `triage serve --config FILE`".into(),
        ));
    };
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (task, input, overrides) = if multipart {
        let mut form = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::bad(e.body_text(), None))?;
        let AudioForm {
            file,
            task,
            overrides,
            ..
        } = crate::app::read_audio_form(&mut form).await?;
        let task = task.ok_or_else(|| ApiError::bad("`task` is required", Some("task")))?;
        let (name, bytes) =
            file.ok_or_else(|| ApiError::bad("`file` is required", Some("file")))?;
        let overrides = match overrides {
            Some(o) => serde_json::from_str(&o).map_err(|e| {
                ApiError::bad(format!("`overrides` is not valid: {e}"), Some("overrides"))
            })?,
            None => Overrides::default(),
        };
        (
            task,
            Input::Audio {
                bytes,
                file_name: name,
            },
            overrides,
        )
    } else {
        let bytes = axum::body::Bytes::from_request(req, &state)
            .await
            .map_err(|e| ApiError::bad(e.body_text(), None))?;
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
    let execution = run(&state, &engine, &task, input, &overrides).await?;
    let (tier, usd) = tier_and_cost([&execution]);
    let mut response = tagged(
        Json(json!({"answer": execution.answer, "trace": execution.trace})).into_response(),
        &tier,
        usd,
    );
    if let Ok(v) = axum::http::HeaderValue::from_str(&execution.request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    Ok(response)
}

/// Run an engine task for a job (`/v1/jobs` with a `task` field): the result
/// is `{"answer", "trace"}`.
pub(crate) async fn run_job(
    state: &Shared,
    engine: &Engine,
    task: &str,
    input: Input,
) -> Result<Value, String> {
    run(state, engine, task, input, &Overrides::default())
        .await
        .map(|e| json!({"answer": e.answer, "trace": e.trace}))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_cover_the_text_and_keep_words_whole() {
        let text = "the quick brown fox jumps over the lazy dög and runs away";
        let p = pieces(text, 16);
        assert_eq!(p.concat(), text);
        assert!(p.len() > 2);
        for piece in &p[..p.len() - 1] {
            assert!(piece.ends_with(' '), "{piece:?}");
        }
        assert_eq!(pieces("", 4), Vec::<&str>::new());
        assert_eq!(pieces("abcdefgh", 3).concat(), "abcdefgh");
    }
}
