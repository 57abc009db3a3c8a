//! OpenAI: chat completions, moderations and audio transcriptions; the same
//! chat code serves any OpenAI-compatible server (vLLM, llama.cpp
//! `llama-server`, Ollama) at a configured base URL.
//!
//! Two differences between the kinds: api.openai.com wants a key and now takes
//! `max_completion_tokens` (reasoning models reject `max_tokens`), while
//! compatible servers may run without a key (no `Authorization` header is
//! sent then) and understand `max_tokens`.

use std::collections::BTreeMap;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use triage_core::llm::{
    Answer, ChatChunk, ChatRequest, ChatResponse, FinishReason, ModerationRequest,
    ModerationResponse, ModerationVerdict, Role, TokenLogprob, TranscriptionRequest,
    TranscriptionResponse, Usage,
};

use super::sse::{self, Decode, Event, Step};
use super::{decode, endpoint, excerpt, read_json, send, send_streaming, status_error};
use crate::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, ProviderConfig, ProviderKind};

pub const PROVIDER_TYPE: &str = "openai";
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// An OpenAI or OpenAI-compatible client.
#[derive(Debug, Clone)]
pub struct OpenAi {
    pub config: ProviderConfig,
    http: reqwest::Client,
}

impl OpenAi {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn post(&self, path: &str) -> Result<reqwest::RequestBuilder, ProviderError> {
        let request = self.http.post(endpoint(&self.config, path));
        match (&self.config.api_key, self.config.kind) {
            (Some(key), _) => Ok(request.bearer_auth(key.expose())),
            (None, ProviderKind::OpenaiCompatible) => Ok(request),
            (None, _) => Err(super::missing_key(&self.config)),
        }
    }

    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = ChatBody::new(req, self.config.kind, false);
        let request = self.post("/chat/completions")?.json(&body);
        let response = send(self.name(), request, self.config.timeout, map_error).await?;
        let bytes = super::read_bytes(self.name(), response).await?;
        parse_chat(self.name(), &req.model, &bytes)
    }

    pub async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let body = ChatBody::new(req, self.config.kind, true);
        let request = self.post("/chat/completions")?.json(&body);
        let response = send_streaming(self.name(), request, self.config.timeout, map_error).await?;
        Ok(sse::chunk_stream(
            self.name(),
            response,
            self.config.timeout,
            StreamDecoder::new(self.name()),
        ))
    }

    pub async fn moderate(
        &self,
        req: &ModerationRequest,
    ) -> Result<ModerationResponse, ProviderError> {
        let body = ModerationBody {
            model: &req.model,
            input: &req.input,
        };
        let request = self.post("/moderations")?.json(&body);
        let response = send(self.name(), request, self.config.timeout, map_error).await?;
        let wire: WireModeration = read_json(self.name(), response).await?;
        Ok(wire.into_response(self.name(), &req.model))
    }

    /// `verbose_json` carries the audio duration (pricing is per minute);
    /// models that only offer `json` (the gpt-4o transcribers) get `json`, and
    /// a server that rejects `verbose_json` gets the request once more as `json`.
    pub async fn transcribe(
        &self,
        req: &TranscriptionRequest,
    ) -> Result<TranscriptionResponse, ProviderError> {
        let format = if req.model.starts_with("gpt-4o") {
            "json"
        } else {
            "verbose_json"
        };
        match self.transcribe_as(req, format).await {
            Err(e) if format == "verbose_json" && rejects_verbose_json(&e) => {
                self.transcribe_as(req, "json").await
            }
            other => other,
        }
    }

    async fn transcribe_as(
        &self,
        req: &TranscriptionRequest,
        format: &'static str,
    ) -> Result<TranscriptionResponse, ProviderError> {
        let file =
            reqwest::multipart::Part::bytes(req.audio.clone()).file_name(req.file_name.clone());
        let mut form = reqwest::multipart::Form::new()
            .part("file", file)
            .text("model", req.model.clone())
            .text("response_format", format);
        if let Some(language) = &req.language {
            form = form.text("language", language.clone());
        }
        let request = self.post("/audio/transcriptions")?.multipart(form);
        let response = send(self.name(), request, self.config.timeout, map_error).await?;
        let wire: WireTranscription = read_json(self.name(), response).await?;
        Ok(wire.into_response(self.name(), &req.model))
    }
}

fn rejects_verbose_json(e: &ProviderError) -> bool {
    matches!(e.kind, ErrorKind::BadRequest | ErrorKind::Unprocessable)
        && e.message.contains("response_format")
}

// ---------------------------------------------------------------- request

#[derive(Debug, Serialize)]
struct ChatBody<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat<'a> {
    JsonSchema { json_schema: WireJsonSchema<'a> },
}

#[derive(Debug, Serialize)]
struct WireJsonSchema<'a> {
    name: &'a str,
    schema: &'a serde_json::Value,
    strict: bool,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl<'a> ChatBody<'a> {
    fn new(req: &'a ChatRequest, kind: ProviderKind, stream: bool) -> Self {
        let (max_tokens, max_completion_tokens) = match kind {
            ProviderKind::Openai => (None, req.max_tokens),
            _ => (req.max_tokens, None),
        };
        ChatBody {
            model: &req.model,
            messages: req
                .messages
                .iter()
                .map(|m| WireMessage {
                    role: match m.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    },
                    content: &m.content,
                })
                .collect(),
            temperature: req.temperature,
            max_tokens,
            max_completion_tokens,
            response_format: req
                .json_schema
                .as_ref()
                .map(|s| ResponseFormat::JsonSchema {
                    json_schema: WireJsonSchema {
                        name: &s.name,
                        schema: &s.schema,
                        strict: s.strict,
                    },
                }),
            logprobs: req.top_logprobs.map(|_| true),
            top_logprobs: req.top_logprobs.filter(|&n| n > 0),
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        }
    }
}

#[derive(Debug, Serialize)]
struct ModerationBody<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    model: &'a str,
    input: &'a [String],
}

// ---------------------------------------------------------------- response

#[derive(Debug, Deserialize)]
struct WireCompletion {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    message: WireAssistantMessage,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<WireLogprobs>,
}

#[derive(Debug, Deserialize)]
struct WireAssistantMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<WirePromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<WireCompletionDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct WirePromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct WireCompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

/// OpenAI's `prompt_tokens` already include the cached ones and
/// `completion_tokens` the reasoning ones; [`Usage`] keeps that convention.
impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            cached_input_tokens: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            reasoning_tokens: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireLogprobs {
    #[serde(default)]
    content: Option<Vec<WireTokenLogprob>>,
}

#[derive(Debug, Deserialize)]
struct WireTokenLogprob {
    token: String,
    logprob: f64,
    #[serde(default)]
    top_logprobs: Vec<WireTopLogprob>,
}

#[derive(Debug, Deserialize)]
struct WireTopLogprob {
    token: String,
    logprob: f64,
}

impl From<WireTokenLogprob> for TokenLogprob {
    fn from(t: WireTokenLogprob) -> Self {
        TokenLogprob {
            token: t.token,
            logprob: t.logprob as f32,
            top: t
                .top_logprobs
                .into_iter()
                .map(|a| (a.token, a.logprob as f32))
                .collect(),
        }
    }
}

fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some(other) => FinishReason::Other(other.to_owned()),
        None => FinishReason::Other("unknown".to_owned()),
    }
}

const FILTERED: &str = "the provider's content filter withheld the answer";

/// A chat completion body into our response. `model` is the requested model,
/// used when the server does not name the one that answered.
fn parse_chat(provider: &str, model: &str, body: &[u8]) -> Result<ChatResponse, ProviderError> {
    let wire: WireCompletion = decode(provider, body)?;
    let Some(choice) = wire.choices.into_iter().next() else {
        return Err(ProviderError::new(
            provider,
            ErrorKind::Malformed,
            "the response has no choices",
        ));
    };
    let finish = finish_reason(choice.finish_reason.as_deref());
    let content = choice.message.content.unwrap_or_default();
    let answer = match choice.message.refusal.filter(|r| !r.is_empty()) {
        Some(reason) => Answer::Refusal { reason },
        None if finish == FinishReason::ContentFilter && content.trim().is_empty() => {
            Answer::Refusal {
                reason: FILTERED.to_owned(),
            }
        }
        None => Answer::Text { text: content },
    };
    Ok(ChatResponse {
        provider: provider.to_owned(),
        model: wire
            .model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| model.to_owned()),
        answer,
        finish_reason: finish,
        usage: wire.usage.map(Usage::from).unwrap_or_default(),
        logprobs: choice
            .logprobs
            .and_then(|l| l.content)
            .map(|c| c.into_iter().map(TokenLogprob::from).collect()),
    })
}

#[derive(Debug, Deserialize)]
struct WireModeration {
    #[serde(default)]
    model: Option<String>,
    results: Vec<WireModerationResult>,
}

#[derive(Debug, Deserialize)]
struct WireModerationResult {
    flagged: bool,
    #[serde(default)]
    category_scores: BTreeMap<String, f32>,
}

impl WireModeration {
    fn into_response(self, provider: &str, model: &str) -> ModerationResponse {
        ModerationResponse {
            provider: provider.to_owned(),
            model: self.model.unwrap_or_else(|| model.to_owned()),
            results: self
                .results
                .into_iter()
                .map(|r| ModerationVerdict {
                    flagged: r.flagged,
                    scores: r.category_scores,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct WireTranscription {
    text: String,
    /// `verbose_json` only.
    #[serde(default)]
    duration: Option<f64>,
    /// `json` from whisper-1 reports `{"type": "duration", "seconds": ..}`.
    #[serde(default)]
    usage: Option<WireTranscriptionUsage>,
}

#[derive(Debug, Deserialize)]
struct WireTranscriptionUsage {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    seconds: Option<f64>,
}

impl WireTranscription {
    fn into_response(self, provider: &str, model: &str) -> TranscriptionResponse {
        let from_usage = self
            .usage
            .filter(|u| u.kind == "duration")
            .and_then(|u| u.seconds);
        TranscriptionResponse {
            provider: provider.to_owned(),
            model: model.to_owned(),
            text: self.text,
            duration_s: self.duration.or(from_usage),
        }
    }
}

// ---------------------------------------------------------------- streaming

#[derive(Debug, Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Sent mid-stream when the server fails after the headers went out.
    #[serde(default)]
    error: Option<WireErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

/// Content deltas pass straight through; the finish reason and the usage
/// (which comes in a chunk of its own, with no choices, when
/// `include_usage` is set) are held and sent together in one final chunk at
/// `data: [DONE]`.
#[derive(Debug)]
struct StreamDecoder {
    provider: String,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    answered: bool,
}

impl StreamDecoder {
    fn new(provider: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            finish: None,
            usage: None,
            answered: false,
        }
    }
}

impl Decode for StreamDecoder {
    fn event(&mut self, event: Event) -> Result<Step, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            let filtered = self.finish == Some(FinishReason::ContentFilter) && !self.answered;
            return Ok(Step::Done(vec![ChatChunk {
                delta: String::new(),
                usage: self.usage.take(),
                finish_reason: self.finish.take(),
                refusal: filtered.then(|| FILTERED.to_owned()),
            }]));
        }
        let chunk: WireChunk = decode(&self.provider, data.as_bytes())?;
        if let Some(error) = chunk.error {
            return Err(stream_error(&self.provider, error));
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        let mut out = Vec::new();
        // n = 1 is all we ask for: only the first choice matters.
        if let Some(choice) = chunk.choices.into_iter().next() {
            let delta = choice.delta.unwrap_or_default();
            let content = delta.content.unwrap_or_default();
            let refusal = delta.refusal.filter(|r| !r.is_empty());
            if !content.is_empty() || refusal.is_some() {
                self.answered = true;
                out.push(ChatChunk {
                    delta: content,
                    refusal,
                    ..ChatChunk::default()
                });
            }
            if let Some(reason) = choice.finish_reason {
                self.finish = Some(finish_reason(Some(&reason)));
            }
        }
        Ok(Step::More(out))
    }

    fn eof(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        Err(sse::truncated(&self.provider, "data: [DONE]"))
    }
}

fn stream_error(provider: &str, error: WireErrorDetail) -> ProviderError {
    let kind = match error.kind.as_deref() {
        Some("rate_limit_exceeded" | "rate_limit_error") => ErrorKind::RateLimited,
        Some("invalid_request_error") => ErrorKind::BadRequest,
        _ => ErrorKind::Server,
    };
    ProviderError::new(
        provider,
        kind,
        error
            .message
            .unwrap_or_else(|| "error event in the stream".to_owned()),
    )
}

// ---------------------------------------------------------------- errors

/// `{"error": {"message", "type", "param", "code"}}` from OpenAI and
/// llama.cpp; vLLM puts `message` at the top level; Ollama may send
/// `{"error": "text"}`.
#[derive(Debug, Deserialize)]
struct WireErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

fn error_message(body: &str) -> String {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        return excerpt(body);
    };
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    value
        .get("error")
        .and_then(|e| e.get("message").and_then(text).or_else(|| text(e)))
        .or_else(|| value.get("message").and_then(text))
        .unwrap_or_else(|| excerpt(body))
}

/// OpenAI's 429 carries `retry-after`/`retry-after-ms` and, per limit,
/// `x-ratelimit-remaining-*` with `x-ratelimit-reset-*` (`"1s"`, `"6m0s"`,
/// `"20ms"`): when no Retry-After came, wait for the exhausted limit to reset.
fn ratelimit_reset(headers: &HeaderMap) -> Option<std::time::Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    ["requests", "tokens"]
        .iter()
        .filter(|limit| get(&format!("x-ratelimit-remaining-{limit}")).map(str::trim) == Some("0"))
        .filter_map(|limit| get(&format!("x-ratelimit-reset-{limit}")).and_then(parse_go_duration))
        .max()
}

/// `1h2m3.5s`, `6m0s`, `20ms`: the duration format OpenAI's reset headers use.
fn parse_go_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text.trim();
    let mut total = 0.0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let number: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "\u{b5}s" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * scale;
        rest = tail;
    }
    total
        .is_finite()
        .then(|| std::time::Duration::from_secs_f64(total))
}

/// Every status OpenAI documents (400, 401, 403, 404, 408, 409, 413, 422, 429,
/// 500, 502, 503, 504) goes through [`ErrorKind::from_status`]; the provider's
/// message is kept, and a 429 waits as long as the headers say.
pub(crate) fn map_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    body: &str,
) -> ProviderError {
    let mut error = status_error(provider, status, headers, error_message(body));
    if status == 429 && error.retry_after.is_none() {
        error.retry_after = ratelimit_reset(headers);
    }
    error
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use reqwest::header::HeaderValue;
    use serde_json::json;
    use triage_core::llm::{JsonSchema, Message};

    use super::*;

    fn request() -> ChatRequest {
        ChatRequest {
            model: "gpt-4o-mini".into(),
            messages: vec![
                Message::system("Be brief."),
                Message::user("Hi"),
                Message::assistant("Hello"),
            ],
            temperature: Some(0.5),
            max_tokens: Some(64),
            json_schema: Some(JsonSchema {
                name: "verdict".into(),
                schema: json!({"type": "object", "properties": {"ok": {"type": "boolean"}}}),
                strict: true,
            }),
            top_logprobs: Some(2),
            stream: false,
        }
    }

    #[test]
    fn chat_body_for_openai_field_by_field() {
        let req = request();
        let body = serde_json::to_value(ChatBody::new(&req, ProviderKind::Openai, false)).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}
                ],
                "temperature": 0.5,
                "max_completion_tokens": 64,
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "verdict",
                    "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
                    "strict": true
                }},
                "logprobs": true,
                "top_logprobs": 2
            })
        );
    }

    #[test]
    fn chat_body_for_compatible_servers_uses_max_tokens_and_streams_usage() {
        let req = ChatRequest {
            model: String::new(),
            messages: vec![Message::user("Hi")],
            max_tokens: Some(10),
            top_logprobs: Some(0),
            ..ChatRequest::default()
        };
        let body = serde_json::to_value(ChatBody::new(&req, ProviderKind::OpenaiCompatible, true))
            .unwrap();
        assert_eq!(
            body,
            json!({
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 10,
                "logprobs": true,
                "stream": true,
                "stream_options": {"include_usage": true}
            })
        );
    }

    #[test]
    fn moderation_body() {
        let input = vec!["a".to_owned(), "b".to_owned()];
        let body = serde_json::to_value(ModerationBody {
            model: "omni-moderation-latest",
            input: &input,
        })
        .unwrap();
        assert_eq!(
            body,
            json!({"model": "omni-moderation-latest", "input": ["a", "b"]})
        );
    }

    #[test]
    fn parses_text_usage_with_cached_and_reasoning_tokens_and_logprobs() {
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": null},
                "logprobs": {"content": [
                    {"token": "Hello", "logprob": -0.25, "bytes": [72], "top_logprobs": [
                        {"token": "Hello", "logprob": -0.25, "bytes": [72]},
                        {"token": "Hi", "logprob": -1.5, "bytes": [72]}
                    ]},
                    {"token": "!", "logprob": -0.5, "bytes": [33], "top_logprobs": []}
                ], "refusal": null},
                "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 3, "audio_tokens": 0}}
        });
        let r = parse_chat("openai", "gpt-4o-mini", body.to_string().as_bytes()).unwrap();
        assert_eq!(r.provider, "openai");
        assert_eq!(r.model, "gpt-4o-mini-2024-07-18");
        assert_eq!(
            r.answer,
            Answer::Text {
                text: "Hello!".into()
            }
        );
        assert_eq!(r.finish_reason, FinishReason::Stop);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 19,
                output_tokens: 10,
                cached_input_tokens: 4,
                reasoning_tokens: 3
            }
        );
        let lp = r.logprobs.unwrap();
        assert_eq!(lp.len(), 2);
        assert_eq!(lp[0].token, "Hello");
        assert_eq!(
            lp[0].top,
            vec![("Hello".to_owned(), -0.25), ("Hi".to_owned(), -1.5)]
        );
        assert_eq!(lp[1].logprob, -0.5);
    }

    #[test]
    fn parses_refusals() {
        let body = json!({"model": "gpt-4o", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": null, "refusal": "I can't help with that."},
            "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 7}});
        let r = parse_chat("openai", "gpt-4o", body.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.answer,
            Answer::Refusal {
                reason: "I can't help with that.".into()
            }
        );
        assert_eq!(r.usage.output_tokens, 7);

        let filtered = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
            "finish_reason": "content_filter"}]});
        let r = parse_chat("azure", "m", filtered.to_string().as_bytes()).unwrap();
        assert!(r.answer.is_refusal());
        assert_eq!(r.finish_reason, FinishReason::ContentFilter);
        assert_eq!(r.model, "m");
        assert_eq!(r.usage, Usage::default());

        let partial = json!({"choices": [{"message": {"content": "Part"}, "finish_reason": "content_filter"}]});
        let r = parse_chat("x", "m", partial.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.answer,
            Answer::Text {
                text: "Part".into()
            }
        );
        let length =
            json!({"choices": [{"message": {"content": "Long"}, "finish_reason": "length"}]});
        let r = parse_chat("x", "m", length.to_string().as_bytes()).unwrap();
        assert_eq!(r.finish_reason, FinishReason::Length);
    }

    #[test]
    fn undecodable_or_empty_bodies_are_malformed() {
        for body in [
            &b"<html>oops</html>"[..],
            br#"{"choices": []}"#,
            br#"{"choices": [{}]}"#,
        ] {
            let e = parse_chat("openai", "m", body).unwrap_err();
            assert_eq!(
                e.kind,
                ErrorKind::Malformed,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn parses_moderation_and_transcriptions() {
        let m: WireModeration =
            serde_json::from_value(json!({"id": "modr-1", "model": "omni-moderation-latest",
            "results": [{"flagged": true, "categories": {"harassment": true},
                "category_scores": {"harassment": 0.75, "violence": 0.5},
                "category_applied_input_types": {"harassment": ["text"]}}]}))
            .unwrap();
        let r = m.into_response("openai", "");
        assert_eq!(r.model, "omni-moderation-latest");
        assert!(r.results[0].flagged);
        assert_eq!(r.results[0].scores["harassment"], 0.75);

        let verbose: WireTranscription = serde_json::from_value(json!({"task": "transcribe",
            "language": "english", "duration": 8.47, "text": "Hello.", "segments": []}))
        .unwrap();
        assert_eq!(
            verbose.into_response("openai", "whisper-1").duration_s,
            Some(8.47)
        );
        let plain: WireTranscription = serde_json::from_value(json!({"text": "Hi",
            "usage": {"type": "duration", "seconds": 3}}))
        .unwrap();
        assert_eq!(
            plain.into_response("openai", "whisper-1").duration_s,
            Some(3.0)
        );
        let tokens: WireTranscription = serde_json::from_value(json!({"text": "Hi",
            "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 2}}))
        .unwrap();
        assert_eq!(
            tokens
                .into_response("openai", "gpt-4o-transcribe")
                .duration_s,
            None
        );
    }

    fn events(decoder: &mut StreamDecoder, data: &[&str]) -> Vec<ChatChunk> {
        let mut out = Vec::new();
        for d in data {
            match decoder
                .event(Event {
                    event: "message".into(),
                    data: (*d).into(),
                })
                .unwrap()
            {
                Step::More(c) | Step::Done(c) => out.extend(c),
            }
        }
        out
    }

    #[test]
    fn stream_decoder_holds_finish_and_usage_for_the_final_chunk() {
        let mut d = StreamDecoder::new("openai");
        let chunks = events(
            &mut d,
            &[
                r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
                r#"{"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":null}"#,
                r#"{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}],"usage":null}"#,
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
                r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#,
                "[DONE]",
            ],
        );
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].delta, "Hel");
        assert_eq!(chunks[1].delta, "lo");
        assert_eq!(chunks[2].finish_reason, Some(FinishReason::Stop));
        assert_eq!(
            chunks[2].usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((9, 2))
        );
        assert!(d.eof().is_err_and(|e| e.kind == ErrorKind::StreamTruncated));
    }

    #[test]
    fn stream_decoder_passes_refusals_and_errors() {
        let mut d = StreamDecoder::new("openai");
        let chunks = events(
            &mut d,
            &[r#"{"choices":[{"delta":{"refusal":"I can't"}}]}"#],
        );
        assert_eq!(chunks[0].refusal.as_deref(), Some("I can't"));
        let e = d
            .event(Event {
                event: "message".into(),
                data: r#"{"error":{"message":"boom","type":"server_error"}}"#.into(),
            })
            .unwrap_err();
        assert_eq!((e.kind, e.message.as_str()), (ErrorKind::Server, "boom"));
        let e = d
            .event(Event {
                event: "message".into(),
                data: "{not json".into(),
            })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
    }

    #[test]
    fn maps_every_documented_status() {
        let cases = [
            (400, ErrorKind::BadRequest),
            (401, ErrorKind::Unauthorized),
            (403, ErrorKind::Forbidden),
            (404, ErrorKind::NotFound),
            (408, ErrorKind::RequestTimeout),
            (409, ErrorKind::Conflict),
            (413, ErrorKind::PayloadTooLarge),
            (422, ErrorKind::Unprocessable),
            (429, ErrorKind::RateLimited),
            (500, ErrorKind::Server),
            (502, ErrorKind::BadGateway),
            (503, ErrorKind::Unavailable),
            (504, ErrorKind::GatewayTimeout),
            (418, ErrorKind::UnexpectedStatus),
        ];
        for (status, kind) in cases {
            let body = json!({"error": {"message": format!("msg {status}"), "type": "x", "param": null, "code": null}});
            let e = map_error("openai", status, &HeaderMap::new(), &body.to_string());
            assert_eq!((e.kind, e.status), (kind, Some(status)));
            assert_eq!(e.message, format!("msg {status}"));
            assert_eq!(e.retry_after, None);
        }
    }

    #[test]
    fn rate_limits_wait_for_retry_after_or_the_exhausted_limit() {
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        let e = map_error("openai", 429, &h, "{}");
        assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));

        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("10"),
        );
        h.insert("x-ratelimit-reset-requests", HeaderValue::from_static("1s"));
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("0"),
        );
        h.insert(
            "x-ratelimit-reset-tokens",
            HeaderValue::from_static("6m0.5s"),
        );
        let e = map_error(
            "openai",
            429,
            &h,
            r#"{"error":{"message":"Rate limit reached"}}"#,
        );
        assert_eq!(e.retry_after, Some(Duration::from_millis(360_500)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_go_duration("soon"), None);
    }

    #[test]
    fn error_messages_from_compatible_servers() {
        assert_eq!(
            error_message(
                r#"{"object":"error","message":"vllm says","type":"BadRequestError","code":400}"#
            ),
            "vllm says"
        );
        assert_eq!(
            error_message(r#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(error_message("Bad Gateway"), "Bad Gateway");
        assert!(error_message(&"x".repeat(1000)).len() < 400);
    }
}
