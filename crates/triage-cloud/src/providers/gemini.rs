//! Google Gemini `generateContent` and `streamGenerateContent?alt=sse`.
//!
//! Structured output sends the schema as `responseJsonSchema` (JSON Schema
//! as is) rather than `responseSchema` (Google's OpenAPI subset), so the
//! schema we hold needs no translation.
//!
//! Usage follows OpenAI's convention (see [`Usage`]): `promptTokenCount`
//! already includes the cached tokens; output is `candidatesTokenCount` plus
//! `thoughtsTokenCount`, which Gemini reports separately.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use triage_core::llm::{
    Answer, ChatChunk, ChatRequest, ChatResponse, FinishReason, Role, TokenLogprob, Usage,
};

use super::sse::{self, Decode, Event, Step};
use super::{decode, endpoint, excerpt, require_key, send, send_streaming, status_error};
use crate::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, ProviderConfig};

pub const PROVIDER_TYPE: &str = "gemini";
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

#[derive(Debug, Clone)]
pub struct Gemini {
    pub config: ProviderConfig,
    http: reqwest::Client,
}

impl Gemini {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    fn post(
        &self,
        req: &ChatRequest,
        method: &str,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let key = require_key(&self.config)?;
        if req.model.trim().is_empty() {
            return Err(ProviderError::new(
                self.name(),
                ErrorKind::BadRequest,
                "no model given",
            ));
        }
        // `gemini-2.5-flash` or `models/gemini-2.5-flash` (or `tunedModels/...`)
        let model = if req.model.contains('/') {
            req.model.clone()
        } else {
            format!("models/{}", req.model)
        };
        Ok(self
            .http
            .post(endpoint(&self.config, &format!("/{model}:{method}")))
            .header("x-goog-api-key", key.expose())
            .json(&GenerateBody::new(req)))
    }

    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let request = self.post(req, "generateContent")?;
        let response = send(self.name(), request, self.config.timeout, map_error).await?;
        let bytes = super::read_bytes(self.name(), response).await?;
        parse_generate(self.name(), &req.model, &bytes)
    }

    pub async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let request = self.post(req, "streamGenerateContent?alt=sse")?;
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
#[serde(rename_all = "camelCase")]
struct GenerateBody<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig<'a>>,
}

#[derive(Debug, Serialize)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<Part<'a>>,
}

#[derive(Debug, Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<u8>,
}

impl<'a> GenerateBody<'a> {
    fn new(req: &'a ChatRequest) -> Self {
        let mut system = Vec::new();
        let mut contents: Vec<Content<'a>> = Vec::new();
        for m in &req.messages {
            let role = match m.role {
                Role::System => {
                    system.push(Part { text: &m.content });
                    continue;
                }
                Role::User => "user",
                Role::Assistant => "model",
            };
            contents.push(Content {
                role: Some(role),
                parts: vec![Part { text: &m.content }],
            });
        }
        let config = GenerationConfig {
            temperature: req.temperature,
            max_output_tokens: req.max_tokens,
            response_mime_type: req.json_schema.as_ref().map(|_| "application/json"),
            response_json_schema: req.json_schema.as_ref().map(|s| &s.schema),
            response_logprobs: req.top_logprobs.map(|_| true),
            logprobs: req.top_logprobs.filter(|&n| n > 0),
        };
        let empty = config.temperature.is_none()
            && config.max_output_tokens.is_none()
            && config.response_mime_type.is_none()
            && config.response_logprobs.is_none();
        GenerateBody {
            contents,
            system_instruction: (!system.is_empty()).then_some(Content {
                role: None,
                parts: system,
            }),
            generation_config: (!empty).then_some(config),
        }
    }
}

// ---------------------------------------------------------------- response

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireGenerate {
    #[serde(default)]
    candidates: Vec<WireCandidate>,
    #[serde(default)]
    prompt_feedback: Option<WirePromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<WireUsage>,
    #[serde(default)]
    model_version: Option<String>,
    /// Sent mid-stream when the server fails after the headers went out.
    #[serde(default)]
    error: Option<WireErrorDetail>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs_result: Option<WireLogprobsResult>,
}

#[derive(Debug, Deserialize)]
struct WireContent {
    #[serde(default)]
    parts: Vec<WirePart>,
}

#[derive(Debug, Deserialize)]
struct WirePart {
    #[serde(default)]
    text: Option<String>,
    /// Thought summaries are not part of the answer.
    #[serde(default)]
    thought: bool,
}

impl WireCandidate {
    fn text(&self) -> String {
        let parts = self.content.iter().flat_map(|c| &c.parts);
        parts
            .filter(|p| !p.thought)
            .filter_map(|p| p.text.as_deref())
            .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage {
            input_tokens: u.prompt_token_count,
            output_tokens: u.candidates_token_count + u.thoughts_token_count,
            cached_input_tokens: u.cached_content_token_count,
            reasoning_tokens: u.thoughts_token_count,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireLogprobsResult {
    #[serde(default)]
    top_candidates: Vec<WireTopCandidates>,
    #[serde(default)]
    chosen_candidates: Vec<WireLogprobCandidate>,
}

#[derive(Debug, Deserialize)]
struct WireTopCandidates {
    #[serde(default)]
    candidates: Vec<WireLogprobCandidate>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireLogprobCandidate {
    #[serde(default)]
    token: String,
    #[serde(default)]
    log_probability: f32,
}

impl WireLogprobsResult {
    /// Chosen tokens, each with the alternatives at the same position.
    fn into_tokens(self) -> Vec<TokenLogprob> {
        let mut top = self.top_candidates.into_iter();
        self.chosen_candidates
            .into_iter()
            .map(|c| TokenLogprob {
                token: c.token,
                logprob: c.log_probability,
                top: top
                    .next()
                    .map(|t| {
                        t.candidates
                            .into_iter()
                            .map(|a| (a.token, a.log_probability))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// Finish reasons that mean the answer was withheld on policy grounds.
const BLOCKED: &[&str] = &[
    "SAFETY",
    "PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "RECITATION",
    "IMAGE_SAFETY",
];

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::Length,
        r if BLOCKED.contains(&r) => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_owned()),
    }
}

fn parse_generate(provider: &str, model: &str, body: &[u8]) -> Result<ChatResponse, ProviderError> {
    let wire: WireGenerate = decode(provider, body)?;
    let model = wire
        .model_version
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| model.to_owned());
    let usage = wire.usage_metadata.map(Usage::from).unwrap_or_default();
    let respond = |answer, finish_reason, logprobs| ChatResponse {
        provider: provider.to_owned(),
        model: model.clone(),
        answer,
        finish_reason,
        usage,
        logprobs,
    };
    if let Some(reason) = wire.prompt_feedback.and_then(|f| f.block_reason) {
        let answer = Answer::Refusal {
            reason: format!("the prompt was blocked ({reason})"),
        };
        return Ok(respond(answer, FinishReason::ContentFilter, None));
    }
    let Some(candidate) = wire.candidates.into_iter().next() else {
        return Err(ProviderError::new(
            provider,
            ErrorKind::Malformed,
            "the response has no candidates",
        ));
    };
    let reason = candidate
        .finish_reason
        .as_deref()
        .unwrap_or("FINISH_REASON_UNSPECIFIED");
    let finish = finish_reason(reason);
    let answer = if finish == FinishReason::ContentFilter {
        Answer::Refusal {
            reason: format!("the answer was blocked ({reason})"),
        }
    } else {
        Answer::Text {
            text: candidate.text(),
        }
    };
    let logprobs = candidate
        .logprobs_result
        .map(WireLogprobsResult::into_tokens);
    Ok(respond(answer, finish, logprobs))
}

// ---------------------------------------------------------------- streaming

/// Each event is a whole `GenerateContentResponse` holding the next piece
/// of text. The stream has no terminator of its own: it is complete once a
/// candidate carried a `finishReason` (or the prompt was blocked). The usage
/// counts are running totals, so the last one seen goes into the final chunk.
#[derive(Debug)]
struct StreamDecoder {
    provider: String,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    refusal: Option<String>,
}

impl StreamDecoder {
    fn new(provider: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            usage: None,
            finish: None,
            refusal: None,
        }
    }
}

impl Decode for StreamDecoder {
    fn event(&mut self, event: Event) -> Result<Step, ProviderError> {
        let wire: WireGenerate = decode(&self.provider, event.data.as_bytes())?;
        if let Some(error) = wire.error {
            return Err(google_error(
                &self.provider,
                error.code.unwrap_or(500),
                &HeaderMap::new(),
                error,
            ));
        }
        if let Some(usage) = wire.usage_metadata {
            self.usage = Some(usage.into());
        }
        if let Some(reason) = wire.prompt_feedback.and_then(|f| f.block_reason) {
            self.finish = Some(FinishReason::ContentFilter);
            self.refusal = Some(format!("the prompt was blocked ({reason})"));
            return Ok(Step::More(Vec::new()));
        }
        let mut out = Vec::new();
        if let Some(candidate) = wire.candidates.into_iter().next() {
            let text = candidate.text();
            if !text.is_empty() {
                out.push(ChatChunk {
                    delta: text,
                    ..ChatChunk::default()
                });
            }
            if let Some(reason) = candidate.finish_reason {
                let finish = finish_reason(&reason);
                if finish == FinishReason::ContentFilter {
                    self.refusal = Some(format!("the answer was blocked ({reason})"));
                }
                self.finish = Some(finish);
            }
        }
        Ok(Step::More(out))
    }

    fn eof(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        let Some(finish) = self.finish.take() else {
            return Err(sse::truncated(&self.provider, "a finishReason"));
        };
        Ok(vec![ChatChunk {
            delta: String::new(),
            usage: self.usage.take(),
            finish_reason: Some(finish),
            refusal: self.refusal.take(),
        }])
    }
}

// ---------------------------------------------------------------- errors

/// Google's error body: `{"error": {"code", "message", "status", "details"}}`
/// (an array of those from some streaming endpoints). Shared with Perspective.
#[derive(Debug, Deserialize)]
pub(crate) struct WireErrorDetail {
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireErrorBody {
    One { error: WireErrorDetail },
    Many(Vec<WireErrorBodyOne>),
}

#[derive(Debug, Deserialize)]
struct WireErrorBodyOne {
    error: WireErrorDetail,
}

fn parse_google_error(body: &str) -> Option<WireErrorDetail> {
    match serde_json::from_str::<WireErrorBody>(body).ok()? {
        WireErrorBody::One { error } => Some(error),
        WireErrorBody::Many(list) => list.into_iter().next().map(|b| b.error),
    }
}

/// `"37s"`, `"0.5s"`: protobuf's JSON duration.
fn parse_proto_duration(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn google_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    error: WireErrorDetail,
) -> ProviderError {
    let detail = |field: &str, wanted: &str| {
        error.details.iter().find_map(|d| {
            let kind = d.get("@type")?.as_str()?;
            kind.ends_with(wanted)
                .then(|| d.get(field)?.as_str().map(str::to_owned))
                .flatten()
        })
    };
    let message = if error.status.is_empty() {
        error.message.clone()
    } else {
        format!("{}: {}", error.status, error.message)
    };
    let mut e = status_error(provider, status, headers, message);
    // A wrong key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID.
    if detail("reason", "google.rpc.ErrorInfo").as_deref() == Some("API_KEY_INVALID") {
        e.kind = ErrorKind::Unauthorized;
    }
    if e.retry_after.is_none() {
        e.retry_after = detail("retryDelay", "google.rpc.RetryInfo")
            .as_deref()
            .and_then(parse_proto_duration);
    }
    e
}

/// Google documents 400 (INVALID_ARGUMENT, FAILED_PRECONDITION), 403, 404,
/// 429 (RESOURCE_EXHAUSTED, with a `RetryInfo` detail), 500, 503 and 504; all
/// of them and any other status go through [`ErrorKind::from_status`].
pub(crate) fn map_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    body: &str,
) -> ProviderError {
    match parse_google_error(body) {
        Some(error) => google_error(provider, status, headers, error),
        None => status_error(provider, status, headers, excerpt(body)),
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;
    use serde_json::json;
    use triage_core::llm::{JsonSchema, Message};

    use super::*;

    #[test]
    fn body_field_by_field() {
        let schema = json!({"type": "object", "properties": {"label": {"type": "string"}}});
        let req = ChatRequest {
            model: "gemini-2.5-flash".into(),
            messages: vec![
                Message::system("Be brief."),
                Message::user("Hi"),
                Message::assistant("Hello"),
                Message::user("Label it"),
            ],
            temperature: Some(0.5),
            max_tokens: Some(100),
            json_schema: Some(JsonSchema {
                name: "label".into(),
                schema: schema.clone(),
                strict: true,
            }),
            top_logprobs: Some(2),
            stream: false,
        };
        let body = serde_json::to_value(GenerateBody::new(&req)).unwrap();
        assert_eq!(
            body,
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Hi"}]},
                    {"role": "model", "parts": [{"text": "Hello"}]},
                    {"role": "user", "parts": [{"text": "Label it"}]}
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "generationConfig": {
                    "temperature": 0.5,
                    "maxOutputTokens": 100,
                    "responseMimeType": "application/json",
                    "responseJsonSchema": schema,
                    "responseLogprobs": true,
                    "logprobs": 2
                }
            })
        );
        let plain = ChatRequest {
            messages: vec![Message::user("Hi")],
            ..ChatRequest::default()
        };
        assert_eq!(
            serde_json::to_value(GenerateBody::new(&plain)).unwrap(),
            json!({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
        );
    }

    #[test]
    fn parses_text_usage_and_logprobs() {
        let body = json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "thinking...", "thought": true}, {"text": "Hel"}, {"text": "lo"}]},
                "finishReason": "STOP", "index": 0,
                "logprobsResult": {
                    "topCandidates": [{"candidates": [{"token": "Hel", "logProbability": -0.1}, {"token": "Hi", "logProbability": -2.5}]}],
                    "chosenCandidates": [{"token": "Hel", "logProbability": -0.1}]
                }}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 3, "totalTokenCount": 40,
                "cachedContentTokenCount": 8, "thoughtsTokenCount": 25},
            "modelVersion": "gemini-2.5-flash", "responseId": "abc"
        });
        let r = parse_generate("gemini", "gemini-2.5-flash", body.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.answer,
            Answer::Text {
                text: "Hello".into()
            }
        );
        assert_eq!(r.finish_reason, FinishReason::Stop);
        assert_eq!(r.model, "gemini-2.5-flash");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 12,
                output_tokens: 28,
                cached_input_tokens: 8,
                reasoning_tokens: 25
            }
        );
        let lp = r.logprobs.unwrap();
        assert_eq!(lp[0].token, "Hel");
        assert_eq!(
            lp[0].top,
            vec![("Hel".to_owned(), -0.1), ("Hi".to_owned(), -2.5)]
        );
    }

    #[test]
    fn parses_blocks_as_refusals() {
        for reason in ["SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST"] {
            let body = json!({"candidates": [{"finishReason": reason, "index": 0, "safetyRatings": []}],
                "usageMetadata": {"promptTokenCount": 5}});
            let r = parse_generate("gemini", "m", body.to_string().as_bytes()).unwrap();
            assert!(r.answer.is_refusal(), "{reason}");
            assert_eq!(r.finish_reason, FinishReason::ContentFilter);
            assert_eq!(r.usage.input_tokens, 5);
        }
        let blocked = json!({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
            "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}});
        let r = parse_generate("gemini", "m", blocked.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.answer,
            Answer::Refusal {
                reason: "the prompt was blocked (SAFETY)".into()
            }
        );
        let long = json!({"candidates": [{"content": {"parts": [{"text": "cut"}]}, "finishReason": "MAX_TOKENS"}]});
        let r = parse_generate("gemini", "m", long.to_string().as_bytes()).unwrap();
        assert_eq!(
            (r.answer.text(), r.finish_reason),
            (Some("cut"), FinishReason::Length)
        );
        let e = parse_generate("gemini", "m", b"{}").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
    }

    #[test]
    fn stream_decoder_ends_at_eof_after_a_finish_reason() {
        let mut d = StreamDecoder::new("gemini");
        let mut chunks = Vec::new();
        for data in [
            json!({"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1}}),
            json!({"candidates": [{"content": {"parts": [{"text": "lo"}], "role": "model"}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2}}),
        ] {
            let Step::More(c) = d
                .event(Event {
                    event: "message".into(),
                    data: data.to_string(),
                })
                .unwrap()
            else {
                panic!()
            };
            chunks.extend(c);
        }
        chunks.extend(d.eof().unwrap());
        let deltas: Vec<_> = chunks.iter().map(|c| c.delta.as_str()).collect();
        assert_eq!(deltas, ["Hel", "lo", ""]);
        assert_eq!(chunks[2].finish_reason, Some(FinishReason::Stop));
        assert_eq!(chunks[2].usage.map(|u| u.output_tokens), Some(2));
        let mut cut = StreamDecoder::new("gemini");
        assert!(
            cut.eof()
                .is_err_and(|e| e.kind == ErrorKind::StreamTruncated)
        );
        let e = cut
            .event(Event {
                event: "message".into(),
                data: json!({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}).to_string(),
            })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
    }

    #[test]
    fn maps_every_documented_status() {
        let cases = [
            (400, "INVALID_ARGUMENT", ErrorKind::BadRequest),
            (401, "UNAUTHENTICATED", ErrorKind::Unauthorized),
            (403, "PERMISSION_DENIED", ErrorKind::Forbidden),
            (404, "NOT_FOUND", ErrorKind::NotFound),
            (408, "DEADLINE_EXCEEDED", ErrorKind::RequestTimeout),
            (409, "ABORTED", ErrorKind::Conflict),
            (413, "INVALID_ARGUMENT", ErrorKind::PayloadTooLarge),
            (422, "INVALID_ARGUMENT", ErrorKind::Unprocessable),
            (429, "RESOURCE_EXHAUSTED", ErrorKind::RateLimited),
            (500, "INTERNAL", ErrorKind::Server),
            (502, "UNAVAILABLE", ErrorKind::BadGateway),
            (503, "UNAVAILABLE", ErrorKind::Unavailable),
            (504, "DEADLINE_EXCEEDED", ErrorKind::GatewayTimeout),
            (499, "CANCELLED", ErrorKind::UnexpectedStatus),
        ];
        for (status, name, kind) in cases {
            let body = json!({"error": {"code": status, "message": "why", "status": name}});
            let e = map_error("gemini", status, &HeaderMap::new(), &body.to_string());
            assert_eq!((e.kind, e.status), (kind, Some(status)));
            assert_eq!(e.message, format!("{name}: why"));
        }
    }

    #[test]
    fn retry_info_invalid_keys_and_array_bodies() {
        let body = json!([{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}]}}]);
        let e = map_error("gemini", 429, &HeaderMap::new(), &body.to_string());
        assert_eq!(e.retry_after, Some(Duration::from_secs(37)));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(
            map_error("gemini", 429, &h, &body.to_string()).retry_after,
            Some(Duration::from_secs(2))
        );

        let bad_key = json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}});
        let e = map_error("gemini", 400, &HeaderMap::new(), &bad_key.to_string());
        assert_eq!((e.kind, e.status), (ErrorKind::Unauthorized, Some(400)));
        assert_eq!(
            map_error("gemini", 502, &HeaderMap::new(), "<html>").message,
            "<html>"
        );
    }
}
