//! `POST /v1/chat/completions`: the chat task (or the task `model` names),
//! answered in OpenAI's shape, streamed as `chat.completion.chunk` events
//! when asked.

use super::{run, tier_and_cost};
use crate::auth::{Caller, tagged};
use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};
use triage_core::llm::{ChatRequest, JsonSchema, Message, Role, Usage};
use triage_engine::{Input, Overrides, TaskAnswer};

#[derive(Debug, Deserialize)]
pub(crate) struct WireChatRequest {
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
    pub(crate) fn into_chat(self) -> Result<ChatRequest, ApiError> {
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

/// OpenAI's usage object (zeros when the tier that answered reported none,
/// e.g. a template).
fn openai_usage(answer: &TaskAnswer) -> Value {
    let u = match answer {
        TaskAnswer::Chat(c) => c.usage,
        _ => Usage::default(),
    };
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
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
    let engine = state.engine.current();
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
    let overrides = caller.overrides(Overrides::default())?;
    let execution = run(&state, &engine, &task, Input::Chat(chat), &overrides).await?;
    let (tier, usd) = tier_and_cost([&execution]);
    let answer = &execution.answer;
    let refusal = answer.refusal().map(str::to_owned);
    let content = match (&refusal, answer.text()) {
        (Some(_), _) => None,
        (None, Some(t)) => Some(t.to_owned()),
        // A strategy whose answer is not text (a pipeline, scores): its JSON.
        (None, None) => Some(serde_json::to_string(answer).unwrap_or_default()),
    };
    let finish_reason = match answer {
        TaskAnswer::Chat(c) => c.finish_reason.clone(),
        _ => "stop".to_owned(),
    };
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
