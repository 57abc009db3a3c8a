//! Anthropic messages (`POST /v1/messages`), plain and streamed.
//!
//! Structured output uses a forced tool: the schema becomes the
//! `input_schema` of one tool that `tool_choice` makes the model call, and the
//! tool call's `input` is the answer's JSON text. This works on every current
//! model without a beta header (the schema's root must be an object, as
//! Anthropic requires of tool inputs).
//!
//! Usage follows OpenAI's convention (see [`Usage`]): `input_tokens` is the
//! whole prompt, cached reads and cache writes included, and
//! `cached_input_tokens` the part read from the cache.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use triage_core::llm::{Answer, ChatChunk, ChatRequest, ChatResponse, FinishReason, Role, Usage};

use super::sse::{self, Decode, Event, Step};
use super::{decode, endpoint, excerpt, require_key, send, send_streaming, status_error};
use crate::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, ProviderConfig};

pub const PROVIDER_TYPE: &str = "anthropic";
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";
pub const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is sent when the request has none.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

#[derive(Debug, Clone)]
pub struct Anthropic {
    pub config: ProviderConfig,
    http: reqwest::Client,
}

impl Anthropic {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn post(&self, body: &MessagesBody<'_>) -> Result<reqwest::RequestBuilder, ProviderError> {
        let key = require_key(&self.config)?;
        Ok(self
            .http
            .post(endpoint(&self.config, "/messages"))
            .header("x-api-key", key.expose())
            .header("anthropic-version", API_VERSION)
            .json(body))
    }

    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let request = self.post(&MessagesBody::new(req, false))?;
        let response = send(self.name(), request, self.config.timeout, map_error).await?;
        let bytes = super::read_bytes(self.name(), response).await?;
        parse_message(self.name(), &bytes)
    }

    pub async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let request = self.post(&MessagesBody::new(req, true))?;
        let response = send_streaming(self.name(), request, self.config.timeout, map_error).await?;
        Ok(sse::chunk_stream(
            self.name(),
            response,
            self.config.timeout,
            StreamDecoder::new(self.name()),
        ))
    }
}

// ---------------------------------------------------------------- request

#[derive(Debug, Serialize)]
struct MessagesBody<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    model: &'a str,
    max_tokens: u32,
    /// System messages, in order, as text blocks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<TextBlock<'a>>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Debug, Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Serialize)]
struct Tool<'a> {
    name: &'a str,
    description: &'static str,
    input_schema: &'a serde_json::Value,
}

#[derive(Debug, Serialize)]
struct ToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
}

const TOOL_DESCRIPTION: &str = "Give the answer as this tool's input.";

impl<'a> MessagesBody<'a> {
    fn new(req: &'a ChatRequest, stream: bool) -> Self {
        let mut system = Vec::new();
        let mut messages = Vec::new();
        for m in &req.messages {
            match m.role {
                Role::System => system.push(TextBlock {
                    kind: "text",
                    text: &m.content,
                }),
                Role::User => messages.push(WireMessage {
                    role: "user",
                    content: &m.content,
                }),
                Role::Assistant => messages.push(WireMessage {
                    role: "assistant",
                    content: &m.content,
                }),
            }
        }
        let schema = req.json_schema.as_ref();
        MessagesBody {
            model: &req.model,
            max_tokens: req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            system,
            messages,
            temperature: req.temperature,
            tools: schema
                .map(|s| Tool {
                    name: &s.name,
                    description: TOOL_DESCRIPTION,
                    input_schema: &s.schema,
                })
                .into_iter()
                .collect(),
            tool_choice: schema.map(|s| ToolChoice {
                kind: "tool",
                name: &s.name,
            }),
            stream,
        }
    }
}

// ---------------------------------------------------------------- response

#[derive(Debug, Deserialize)]
struct WireMessageResponse {
    #[serde(default)]
    model: String,
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock {
    Text {
        text: String,
    },
    ToolUse {
        input: serde_json::Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Fold in a later report (`message_delta` counts are cumulative).
    fn update(&mut self, later: WireUsage) {
        let keep = |old: &mut Option<u64>, new: Option<u64>| {
            if new.is_some() {
                *old = new;
            }
        };
        keep(&mut self.input_tokens, later.input_tokens);
        keep(&mut self.output_tokens, later.output_tokens);
        keep(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
        keep(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
    }
}

impl From<&WireUsage> for Usage {
    fn from(u: &WireUsage) -> Self {
        let read = u.cache_read_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: u.input_tokens.unwrap_or(0)
                + read
                + u.cache_creation_input_tokens.unwrap_or(0),
            output_tokens: u.output_tokens.unwrap_or(0),
            cached_input_tokens: read,
            reasoning_tokens: 0,
        }
    }
}

fn finish_reason(stop_reason: Option<&str>) -> FinishReason {
    match stop_reason {
        // A forced tool call is how a structured answer ends.
        Some("end_turn" | "stop_sequence" | "tool_use") => FinishReason::Stop,
        Some("max_tokens") => FinishReason::Length,
        Some("refusal") => FinishReason::ContentFilter,
        Some(other) => FinishReason::Other(other.to_owned()),
        None => FinishReason::Other("unknown".to_owned()),
    }
}

const REFUSED: &str = "the model declined to answer (stop_reason: refusal)";

fn parse_message(provider: &str, body: &[u8]) -> Result<ChatResponse, ProviderError> {
    let wire: WireMessageResponse = decode(provider, body)?;
    let mut text = String::new();
    let mut tool_input = None;
    for block in wire.content {
        match block {
            WireBlock::Text { text: t } => text.push_str(&t),
            WireBlock::ToolUse { input } => tool_input = Some(input),
            WireBlock::Other => {}
        }
    }
    let finish = finish_reason(wire.stop_reason.as_deref());
    let answer = if finish == FinishReason::ContentFilter {
        let reason = if text.trim().is_empty() {
            REFUSED.to_owned()
        } else {
            text
        };
        Answer::Refusal { reason }
    } else if let Some(input) = tool_input {
        Answer::Text {
            text: input.to_string(),
        }
    } else {
        Answer::Text { text }
    };
    Ok(ChatResponse {
        provider: provider.to_owned(),
        model: wire.model,
        answer,
        finish_reason: finish,
        usage: Usage::from(&wire.usage),
        logprobs: None,
    })
}

// ---------------------------------------------------------------- streaming

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    MessageStart {
        message: WireStartMessage,
    },
    ContentBlockDelta {
        delta: WireDelta,
    },
    MessageDelta {
        delta: WireMessageDelta,
        #[serde(default)]
        usage: WireUsage,
    },
    MessageStop,
    Error {
        error: WireErrorDetail,
    },
    /// `ping`, `content_block_start`, `content_block_stop` and any event
    /// type added later (the API reserves the right to add some).
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireStartMessage {
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireMessageDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

/// Text and tool-input deltas pass through; usage (input counts from
/// `message_start`, output counts from `message_delta`) and the stop reason
/// are sent in one final chunk at `message_stop`.
#[derive(Debug)]
struct StreamDecoder {
    provider: String,
    usage: WireUsage,
    stop_reason: Option<String>,
}

impl StreamDecoder {
    fn new(provider: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            usage: WireUsage::default(),
            stop_reason: None,
        }
    }
}

impl Decode for StreamDecoder {
    fn event(&mut self, event: Event) -> Result<Step, ProviderError> {
        let wire: WireEvent = decode(&self.provider, event.data.as_bytes())?;
        let delta = match wire {
            WireEvent::MessageStart { message } => {
                self.usage.update(message.usage);
                return Ok(Step::More(Vec::new()));
            }
            WireEvent::ContentBlockDelta {
                delta: WireDelta::TextDelta { text },
            } => text,
            WireEvent::ContentBlockDelta {
                delta: WireDelta::InputJsonDelta { partial_json },
            } => partial_json,
            WireEvent::MessageDelta { delta, usage } => {
                self.usage.update(usage);
                self.stop_reason = delta.stop_reason.or(self.stop_reason.take());
                return Ok(Step::More(Vec::new()));
            }
            WireEvent::MessageStop => {
                let finish = finish_reason(self.stop_reason.as_deref());
                let refusal = (finish == FinishReason::ContentFilter).then(|| REFUSED.to_owned());
                return Ok(Step::Done(vec![ChatChunk {
                    delta: String::new(),
                    usage: Some(Usage::from(&self.usage)),
                    finish_reason: Some(finish),
                    refusal,
                }]));
            }
            WireEvent::Error { error } => {
                return Err(ProviderError::new(
                    &self.provider,
                    error_kind(&error.kind),
                    error.message,
                ));
            }
            WireEvent::ContentBlockDelta {
                delta: WireDelta::Other,
            }
            | WireEvent::Other => {
                return Ok(Step::More(Vec::new()));
            }
        };
        if delta.is_empty() {
            return Ok(Step::More(Vec::new()));
        }
        Ok(Step::More(vec![ChatChunk {
            delta,
            ..ChatChunk::default()
        }]))
    }

    fn eof(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        Err(sse::truncated(&self.provider, "message_stop"))
    }
}

// ---------------------------------------------------------------- errors

#[derive(Debug, Deserialize)]
struct WireErrorBody {
    error: WireErrorDetail,
}

#[derive(Debug, Deserialize)]
struct WireErrorDetail {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

/// The error `type`s Anthropic documents, for errors that arrive without a
/// status of their own (the `error` event of a stream).
fn error_kind(kind: &str) -> ErrorKind {
    match kind {
        "invalid_request_error" => ErrorKind::BadRequest,
        "authentication_error" => ErrorKind::Unauthorized,
        "permission_error" => ErrorKind::Forbidden,
        "not_found_error" => ErrorKind::NotFound,
        "request_too_large" => ErrorKind::PayloadTooLarge,
        "rate_limit_error" => ErrorKind::RateLimited,
        "api_error" => ErrorKind::Server,
        "timeout_error" => ErrorKind::GatewayTimeout,
        "overloaded_error" => ErrorKind::Overloaded,
        _ => ErrorKind::Server,
    }
}

/// Anthropic documents 400, 401, 403, 404, 413, 429, 500, 504 and 529 with
/// `{"type": "error", "error": {"type", "message"}}`; every other status goes
/// through [`ErrorKind::from_status`] too. A 429 waits for `retry-after`, or
/// else for the exhausted limit's `anthropic-ratelimit-*-reset` time.
pub(crate) fn map_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    body: &str,
) -> ProviderError {
    let message = match serde_json::from_str::<WireErrorBody>(body) {
        Ok(b) if !b.error.kind.is_empty() => format!("{}: {}", b.error.kind, b.error.message),
        Ok(b) => b.error.message,
        Err(_) => excerpt(body),
    };
    let mut error = status_error(provider, status, headers, message);
    if status == 429 && error.retry_after.is_none() {
        error.retry_after = ratelimit_reset(headers, SystemTime::now());
    }
    error
}

fn ratelimit_reset(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    ["requests", "tokens", "input-tokens", "output-tokens"]
        .iter()
        .filter(|limit| get(&format!("anthropic-ratelimit-{limit}-remaining")) == Some("0"))
        .filter_map(|limit| {
            get(&format!("anthropic-ratelimit-{limit}-reset")).and_then(parse_rfc3339)
        })
        .map(|reset| reset.duration_since(now).unwrap_or(Duration::ZERO))
        .max()
}

/// `2024-02-29T12:00:00.5+01:00` or `...Z`: the timestamps of the reset headers.
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let at: jiff::Timestamp = text.parse().ok()?;
    if at < jiff::Timestamp::UNIX_EPOCH {
        return None;
    }
    SystemTime::try_from(at).ok()
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;
    use serde_json::json;
    use triage_core::llm::{JsonSchema, Message};

    use super::*;

    #[test]
    fn body_moves_system_messages_and_defaults_max_tokens() {
        let req = ChatRequest {
            model: "claude-sonnet-4-5".into(),
            messages: vec![
                Message::system("Be brief."),
                Message::user("Hi"),
                Message::assistant("Hello"),
                Message::system("Answer in French."),
                Message::user("Again"),
            ],
            temperature: Some(0.25),
            ..ChatRequest::default()
        };
        let body = serde_json::to_value(MessagesBody::new(&req, true)).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 1024,
                "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in French."}],
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Again"}
                ],
                "temperature": 0.25,
                "stream": true
            })
        );
    }

    #[test]
    fn body_forces_a_tool_for_json_schema() {
        let schema = json!({"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]});
        let req = ChatRequest {
            model: "claude-haiku-4-5".into(),
            messages: vec![Message::user("Classify")],
            max_tokens: Some(50),
            json_schema: Some(JsonSchema {
                name: "label".into(),
                schema: schema.clone(),
                strict: true,
            }),
            top_logprobs: Some(3),
            ..ChatRequest::default()
        };
        let body = serde_json::to_value(MessagesBody::new(&req, false)).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "claude-haiku-4-5",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "Classify"}],
                "tools": [{"name": "label", "description": TOOL_DESCRIPTION, "input_schema": schema}],
                "tool_choice": {"type": "tool", "name": "label"}
            })
        );
    }

    #[test]
    fn parses_text_with_cache_usage() {
        let body = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 7}
        });
        let r = parse_message("anthropic", body.to_string().as_bytes()).unwrap();
        assert_eq!(r.model, "claude-sonnet-4-5-20250929");
        assert_eq!(
            r.answer,
            Answer::Text {
                text: "Hello there".into()
            }
        );
        assert_eq!(r.finish_reason, FinishReason::Stop);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 115,
                output_tokens: 7,
                cached_input_tokens: 100,
                reasoning_tokens: 0
            }
        );
    }

    #[test]
    fn parses_tool_input_refusal_and_max_tokens() {
        let tool = json!({"model": "m", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "label", "input": {"label": "ok"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 3, "output_tokens": 4}});
        let r = parse_message("anthropic", tool.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.answer,
            Answer::Text {
                text: r#"{"label":"ok"}"#.into()
            }
        );
        assert_eq!(r.finish_reason, FinishReason::Stop);

        let refusal = json!({"model": "m", "content": [], "stop_reason": "refusal",
            "usage": {"input_tokens": 3, "output_tokens": 0}});
        let r = parse_message("anthropic", refusal.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.answer,
            Answer::Refusal {
                reason: REFUSED.into()
            }
        );
        assert_eq!(r.finish_reason, FinishReason::ContentFilter);

        let long = json!({"model": "m", "content": [{"type": "thinking", "thinking": "..."}, {"type": "text", "text": "cut"}],
            "stop_reason": "max_tokens", "usage": {"input_tokens": 3, "output_tokens": 9}});
        let r = parse_message("anthropic", long.to_string().as_bytes()).unwrap();
        assert_eq!(
            (r.answer.text(), r.finish_reason),
            (Some("cut"), FinishReason::Length)
        );

        let e = parse_message("anthropic", br#"{"content": "nope"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
    }

    fn feed(d: &mut StreamDecoder, data: serde_json::Value) -> Result<Step, ProviderError> {
        let event = data["type"].as_str().unwrap_or("message").to_owned();
        d.event(Event {
            event,
            data: data.to_string(),
        })
    }

    #[test]
    fn stream_decoder_collects_usage_and_stops_at_message_stop() {
        let mut d = StreamDecoder::new("anthropic");
        let mut chunks = Vec::new();
        for data in [
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                "model": "m", "stop_reason": null, "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 15}}),
            json!({"type": "message_stop"}),
        ] {
            match feed(&mut d, data).unwrap() {
                Step::More(c) => chunks.extend(c),
                Step::Done(c) => {
                    chunks.extend(c);
                    break;
                }
            }
        }
        let deltas: Vec<_> = chunks.iter().map(|c| c.delta.as_str()).collect();
        assert_eq!(deltas, ["Hi", "{\"a\"", ""]);
        let last = chunks.last().unwrap();
        assert_eq!(last.finish_reason, Some(FinishReason::Stop));
        assert_eq!(
            last.usage,
            Some(Usage {
                input_tokens: 30,
                output_tokens: 15,
                cached_input_tokens: 5,
                reasoning_tokens: 0
            })
        );
        assert!(d.eof().is_err_and(|e| e.kind == ErrorKind::StreamTruncated));
    }

    #[test]
    fn stream_error_events_become_typed_errors() {
        let mut d = StreamDecoder::new("anthropic");
        let e = feed(&mut d, json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
            .unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str(), e.status),
            (ErrorKind::Overloaded, "Overloaded", None)
        );
        let mut d = StreamDecoder::new("anthropic");
        feed(&mut d, json!({"type": "message_delta", "delta": {"stop_reason": "refusal"}, "usage": {"output_tokens": 2}})).unwrap();
        let Step::Done(c) = feed(&mut d, json!({"type": "message_stop"})).unwrap() else {
            panic!()
        };
        assert_eq!(c[0].refusal.as_deref(), Some(REFUSED));
        assert_eq!(c[0].finish_reason, Some(FinishReason::ContentFilter));
    }

    #[test]
    fn maps_every_documented_status() {
        let cases = [
            (400, "invalid_request_error", ErrorKind::BadRequest),
            (401, "authentication_error", ErrorKind::Unauthorized),
            (403, "permission_error", ErrorKind::Forbidden),
            (404, "not_found_error", ErrorKind::NotFound),
            (408, "timeout_error", ErrorKind::RequestTimeout),
            (409, "api_error", ErrorKind::Conflict),
            (413, "request_too_large", ErrorKind::PayloadTooLarge),
            (422, "invalid_request_error", ErrorKind::Unprocessable),
            (429, "rate_limit_error", ErrorKind::RateLimited),
            (500, "api_error", ErrorKind::Server),
            (502, "api_error", ErrorKind::BadGateway),
            (503, "api_error", ErrorKind::Unavailable),
            (504, "timeout_error", ErrorKind::GatewayTimeout),
            (529, "overloaded_error", ErrorKind::Overloaded),
            (418, "api_error", ErrorKind::UnexpectedStatus),
        ];
        for (status, kind_name, kind) in cases {
            let body = json!({"type": "error", "error": {"type": kind_name, "message": "why"}});
            let e = map_error("anthropic", status, &HeaderMap::new(), &body.to_string());
            assert_eq!((e.kind, e.status), (kind, Some(status)));
            assert_eq!(e.message, format!("{kind_name}: why"));
        }
        let e = map_error(
            "anthropic",
            502,
            &HeaderMap::new(),
            "<html>Bad gateway</html>",
        );
        assert_eq!(e.message, "<html>Bad gateway</html>");
    }

    #[test]
    fn rate_limits_wait_for_retry_after_or_the_reset_time() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("12"));
        assert_eq!(
            map_error("a", 429, &h, "{}").retry_after,
            Some(Duration::from_secs(12))
        );

        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("3"),
        );
        h.insert(
            "anthropic-ratelimit-requests-reset",
            HeaderValue::from_static("2024-02-29T11:00:59Z"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-remaining",
            HeaderValue::from_static("0"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-reset",
            HeaderValue::from_static("2024-02-29T12:00:30+01:00"),
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_204_400);
        assert_eq!(ratelimit_reset(&h, now), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_rfc3339("1970-01-02T00:00:01.5Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(86_401_500))
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
