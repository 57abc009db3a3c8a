//! Each provider against a local server that speaks its exact wire format:
//! the request it sends is captured and checked field by field, and the
//! documented success bodies, error bodies and event streams it gets back
//! are parsed into our types. No API key ever shows in an error.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use triage_cloud::{
    ErrorKind, Provider, ProviderConfig, ProviderError, ProviderKind, SecretString,
};
use triage_core::llm::{
    Answer, ChatChunk, ChatRequest, FinishReason, JsonSchema, Message, ModerationRequest,
    TranscriptionRequest, Usage,
};

const KEY: &str = "sk-test-VERY-SECRET-0123456789";

// ---------------------------------------------------------------- the mock

#[derive(Debug, Clone)]
struct Captured {
    method: String,
    /// Path and query, e.g. `/v1/chat/completions`.
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Captured {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

enum Reply {
    Json(u16, Vec<(&'static str, &'static str)>, Value),
    Text(u16, &'static str),
    /// A 200 `text/event-stream` body sent in these pieces.
    Sse(Vec<String>),
    /// Headers, then nothing ever.
    SseHang,
    /// No answer at all for this long.
    Sleep(Duration),
}

#[derive(Default)]
struct Shared {
    captured: Mutex<Vec<Captured>>,
    replies: Mutex<VecDeque<Reply>>,
}

struct Mock {
    base: String,
    shared: Arc<Shared>,
}

impl Mock {
    async fn start(replies: Vec<Reply>) -> Mock {
        let shared = Arc::new(Shared {
            captured: Mutex::default(),
            replies: Mutex::new(replies.into()),
        });
        let app = Router::new().fallback(answer).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Mock { base, shared }
    }

    fn captured(&self) -> Vec<Captured> {
        self.shared.captured.lock().unwrap().clone()
    }

    fn only(&self) -> Captured {
        let all = self.captured();
        assert_eq!(all.len(), 1, "expected exactly one request");
        all.into_iter().next().unwrap()
    }

    fn provider(&self, kind: ProviderKind, prefix: &str, key: Option<&str>) -> Provider {
        provider(
            kind,
            format!("{}{prefix}", self.base),
            key,
            Duration::from_secs(5),
        )
    }
}

fn provider(
    kind: ProviderKind,
    base_url: String,
    key: Option<&str>,
    timeout: Duration,
) -> Provider {
    Provider::new(
        ProviderConfig {
            name: format!("test-{kind:?}").to_lowercase(),
            kind,
            base_url,
            api_key: key.map(SecretString::new),
            api_key_env: Some("TEST_API_KEY".to_owned()),
            timeout,
        },
        reqwest::Client::new(),
    )
}

async fn answer(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    shared.captured.lock().unwrap().push(Captured {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    });
    let reply = shared
        .replies
        .lock()
        .unwrap()
        .pop_front()
        .expect("no reply left for this request");
    let builder = Response::builder();
    match reply {
        Reply::Json(status, headers, value) => {
            let mut b = builder
                .status(status)
                .header("content-type", "application/json");
            for (k, v) in headers {
                b = b.header(k, v);
            }
            b.body(Body::from(value.to_string())).unwrap()
        }
        Reply::Text(status, text) => builder.status(status).body(Body::from(text)).unwrap(),
        Reply::Sse(pieces) => {
            let stream = futures_util::stream::iter(pieces).then(|piece| async move {
                // Let each piece go out as its own write.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok::<_, Infallible>(Bytes::from(piece))
            });
            sse_response(Body::from_stream(stream))
        }
        Reply::SseHang => sse_response(Body::from_stream(futures_util::stream::pending::<
            Result<Bytes, Infallible>,
        >())),
        Reply::Sleep(d) => {
            tokio::time::sleep(d).await;
            builder
                .status(StatusCode::OK)
                .body(Body::from("{}"))
                .unwrap()
        }
    }
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap()
}

/// An event stream cut into pieces at awkward places (inside `data:`, inside
/// the JSON, between CR and LF), as a network may deliver it.
fn pieces(stream: &str) -> Vec<String> {
    let bytes = stream.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut step = 7;
    while start < bytes.len() {
        let mut end = (start + step).min(bytes.len());
        while !stream.is_char_boundary(end) {
            end += 1;
        }
        out.push(stream[start..end].to_owned());
        start = end;
        step = step % 23 + 5;
    }
    out
}

async fn collect(mut stream: triage_cloud::ChunkStream) -> (Vec<ChatChunk>, Option<ProviderError>) {
    let mut chunks = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(c) => chunks.push(c),
            Err(e) => {
                assert!(
                    stream.next().await.is_none(),
                    "the stream ends after an error"
                );
                return (chunks, Some(e));
            }
        }
    }
    (chunks, None)
}

fn text_of(chunks: &[ChatChunk]) -> String {
    chunks.iter().map(|c| c.delta.as_str()).collect()
}

fn chat_request(model: &str) -> ChatRequest {
    ChatRequest {
        model: model.to_owned(),
        messages: vec![
            Message::system("You label text."),
            Message::user("Is this spam?"),
        ],
        temperature: Some(0.25),
        max_tokens: Some(32),
        ..ChatRequest::default()
    }
}

fn assert_no_key(e: &ProviderError) {
    let mut texts = vec![e.to_string(), format!("{e:?}")];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        texts.push(s.to_string());
        texts.push(format!("{s:?}"));
        source = s.source();
    }
    for t in texts {
        assert!(!t.contains(KEY), "the key leaked: {t}");
    }
}

// ---------------------------------------------------------------- OpenAI

#[tokio::test]
async fn openai_chat_sends_the_documented_request_and_parses_the_answer() {
    let mock = Mock::start(vec![Reply::Json(200, vec![], json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion", "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "{\"spam\":false}", "refusal": null, "annotations": []},
            "logprobs": {"content": [{"token": "{\"", "logprob": -0.0001, "bytes": [123, 34], "top_logprobs": [
                {"token": "{\"", "logprob": -0.0001, "bytes": [123, 34]}, {"token": "{", "logprob": -9.5, "bytes": [123]}]}],
                "refusal": null},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_fc9f1d7035"
    }))])
    .await;
    let p = mock.provider(ProviderKind::Openai, "/v1", Some(KEY));
    let mut req = chat_request("gpt-4o");
    req.json_schema = Some(JsonSchema {
        name: "spam".into(),
        schema: json!({"type": "object", "properties": {"spam": {"type": "boolean"}}, "required": ["spam"], "additionalProperties": false}),
        strict: true,
    });
    req.top_logprobs = Some(2);
    let r = p.chat(&req).await.unwrap();

    let c = mock.only();
    assert_eq!(
        (c.method.as_str(), c.uri.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(
        c.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(c.header("content-type"), Some("application/json"));
    let body = c.json();
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "You label text."}, {"role": "user", "content": "Is this spam?"}])
    );
    assert_eq!(body["temperature"], 0.25);
    assert_eq!(body["max_completion_tokens"], 32);
    assert!(body.get("max_tokens").is_none());
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["name"], "spam");
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["required"],
        json!(["spam"])
    );
    assert_eq!(
        (&body["logprobs"], &body["top_logprobs"]),
        (&json!(true), &json!(2))
    );
    assert!(body.get("stream").is_none() && body.get("stream_options").is_none());

    assert_eq!(r.provider, "test-openai");
    assert_eq!(r.model, "gpt-4o-2024-08-06");
    assert_eq!(
        r.answer,
        Answer::Text {
            text: "{\"spam\":false}".into()
        }
    );
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 1117,
            output_tokens: 46,
            cached_input_tokens: 1024,
            reasoning_tokens: 0
        }
    );
    let lp = r.logprobs.unwrap();
    assert_eq!(lp[0].top.len(), 2);
    assert_eq!(lp[0].top[1], ("{".to_owned(), -9.5));
}

#[tokio::test]
async fn openai_compatible_servers_get_max_tokens_and_no_authorization_without_a_key() {
    let mock = Mock::start(vec![Reply::Json(200, vec![], json!({
        "choices": [{"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": "Yes, it"}}],
        "created": 1, "model": "smollm2", "object": "chat.completion",
        "usage": {"completion_tokens": 2, "prompt_tokens": 20, "total_tokens": 22}, "id": "chatcmpl-x"
    }))])
    .await;
    let p = mock.provider(ProviderKind::OpenaiCompatible, "/v1", None);
    let r = p.chat(&chat_request("smollm2")).await.unwrap();
    let c = mock.only();
    assert_eq!(c.header("authorization"), None);
    assert_eq!(c.json()["max_tokens"], 32);
    assert!(c.json().get("max_completion_tokens").is_none());
    assert_eq!(r.answer.text(), Some("Yes, it"));
    assert_eq!(r.finish_reason, FinishReason::Length);
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 20,
            output_tokens: 2,
            ..Usage::default()
        }
    );
}

#[tokio::test]
async fn openai_without_a_key_fails_before_sending_and_names_the_variable() {
    let mock = Mock::start(vec![]).await;
    let e = mock
        .provider(ProviderKind::Openai, "/v1", None)
        .chat(&chat_request("gpt-4o"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::MissingKey);
    assert!(e.message.contains("TEST_API_KEY"), "{e}");
    assert!(mock.captured().is_empty());
}

#[tokio::test]
async fn openai_refusals_errors_and_malformed_bodies() {
    let mock = Mock::start(vec![
        Reply::Json(200, vec![], json!({"id": "c", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "refusal": "I'm sorry, I can't assist with that request."}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}})),
        Reply::Json(429, vec![("retry-after", "3"), ("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "20s")],
            json!({"error": {"message": "Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): Limit 3, Used 3, Requested 1.",
                "type": "requests", "param": null, "code": "rate_limit_exceeded"}})),
        Reply::Json(401, vec![], json!({"error": {"message": "Incorrect API key provided: sk-test-***6789.",
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})),
        Reply::Json(503, vec![], json!({"error": {"message": "The engine is currently overloaded, please try again later.",
            "type": "server_error", "param": null, "code": null}})),
        Reply::Text(200, "<html>captive portal</html>"),
    ])
    .await;
    let p = mock.provider(ProviderKind::Openai, "/v1", Some(KEY));
    let req = chat_request("gpt-4o");
    let r = p.chat(&req).await.unwrap();
    assert_eq!(
        r.answer,
        Answer::Refusal {
            reason: "I'm sorry, I can't assist with that request.".into()
        }
    );

    let e = p.chat(&req).await.unwrap_err();
    assert_eq!(
        (e.kind, e.status, e.retry_after),
        (
            ErrorKind::RateLimited,
            Some(429),
            Some(Duration::from_secs(3))
        )
    );
    assert!(e.message.starts_with("Rate limit reached for gpt-4o"));
    assert!(e.is_retryable());

    let e = p.chat(&req).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ErrorKind::Unauthorized, Some(401)));
    assert!(e.message.contains("Incorrect API key provided"));
    assert_no_key(&e);

    let e = p.chat(&req).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ErrorKind::Unavailable, Some(503)));

    let e = p.chat(&req).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Malformed);
    assert!(e.message.contains("captive portal"));
}

const OPENAI_STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    ": a comment the client must skip\n\n",
    "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" w\u{f6}rld \u{1F30D}\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-123\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[],\"usage\":{\"prompt_tokens\":17,\"completion_tokens\":4,\"total_tokens\":21,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}}\n\n",
    "data: [DONE]\n\n",
);

#[tokio::test]
async fn openai_streaming_request_chunks_and_final_usage() {
    let mock = Mock::start(vec![
        Reply::Sse(pieces(OPENAI_STREAM)),
        // The same stream with CRLF line ends, cut off before `[DONE]`.
        Reply::Sse(pieces(
            &OPENAI_STREAM
                .replace('\n', "\r\n")
                .replace("data: [DONE]\r\n\r\n", ""),
        )),
    ])
    .await;
    let p = mock.provider(ProviderKind::Openai, "/v1", Some(KEY));
    let mut req = chat_request("gpt-4o-mini");
    req.stream = true;
    let (chunks, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text_of(&chunks), "Hello w\u{f6}rld \u{1F30D}");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        last.usage,
        Some(Usage {
            input_tokens: 17,
            output_tokens: 4,
            ..Usage::default()
        })
    );
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.usage.is_none() && c.finish_reason.is_none())
    );

    let body = mock.only().json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));

    let (chunks, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert_eq!(text_of(&chunks), "Hello w\u{f6}rld \u{1F30D}");
    assert_eq!(error.map(|e| e.kind), Some(ErrorKind::StreamTruncated));
}

#[tokio::test]
async fn openai_streaming_errors_come_before_the_stream() {
    let mock = Mock::start(vec![Reply::Json(500, vec![], json!({"error": {"message": "The server had an error while processing your request. Sorry about that!", "type": "server_error", "param": null, "code": null}}))]).await;
    let e = mock
        .provider(ProviderKind::Openai, "/v1", Some(KEY))
        .chat_stream(&chat_request("gpt-4o"))
        .await
        .err()
        .unwrap();
    assert_eq!((e.kind, e.status), (ErrorKind::Server, Some(500)));
    assert!(e.message.starts_with("The server had an error"));
}

#[tokio::test]
async fn openai_moderation() {
    let mock = Mock::start(vec![Reply::Json(200, vec![], json!({
        "id": "modr-0d9740456c391e43c445bf0f010940c7", "model": "omni-moderation-latest",
        "results": [
            {"flagged": true, "categories": {"harassment": true, "harassment/threatening": true, "violence": true},
             "category_scores": {"harassment": 0.8189, "harassment/threatening": 0.8046, "violence": 0.9711},
             "category_applied_input_types": {"harassment": ["text"], "harassment/threatening": ["text"], "violence": ["text"]}},
            {"flagged": false, "categories": {"harassment": false}, "category_scores": {"harassment": 0.0001},
             "category_applied_input_types": {"harassment": ["text"]}}
        ]
    }))])
    .await;
    let p = mock.provider(ProviderKind::Openai, "/v1", Some(KEY));
    let r = p
        .moderate(&ModerationRequest {
            model: "omni-moderation-latest".into(),
            input: vec!["I will hurt you".into(), "hello".into()],
        })
        .await
        .unwrap();
    let c = mock.only();
    assert_eq!(
        (c.method.as_str(), c.uri.as_str()),
        ("POST", "/v1/moderations")
    );
    assert_eq!(
        c.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        c.json(),
        json!({"model": "omni-moderation-latest", "input": ["I will hurt you", "hello"]})
    );
    assert_eq!(r.model, "omni-moderation-latest");
    assert_eq!(r.results.len(), 2);
    assert!(r.results[0].flagged && !r.results[1].flagged);
    assert_eq!(r.results[0].scores["violence"], 0.9711);
}

async fn multipart_fields(c: &Captured) -> Vec<(String, Option<String>, Vec<u8>)> {
    let mut request = Request::builder().method("POST").uri(&c.uri);
    for (k, v) in &c.headers {
        request = request.header(k, v);
    }
    let request = request.body(Body::from(c.body.clone())).unwrap();
    let mut form = Multipart::from_request(request, &()).await.unwrap();
    let mut fields = Vec::new();
    while let Some(field) = form.next_field().await.unwrap() {
        let name = field.name().unwrap().to_owned();
        let file = field.file_name().map(str::to_owned);
        fields.push((name, file, field.bytes().await.unwrap().to_vec()));
    }
    fields
}

#[tokio::test]
async fn openai_transcription_is_multipart_verbose_json_with_a_json_fallback() {
    let mock = Mock::start(vec![
        Reply::Json(200, vec![], json!({"task": "transcribe", "language": "english", "duration": 8.470000267028809,
            "text": "The beach was a popular spot on a hot summer day.",
            "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": 3.3, "text": " The beach was a popular spot on a hot summer day.",
                "tokens": [50364], "temperature": 0.0, "avg_logprob": -0.28, "compression_ratio": 1.2, "no_speech_prob": 0.01}]})),
        Reply::Json(400, vec![], json!({"error": {"message": "response_format 'verbose_json' is not compatible with model 'custom-asr'. Use 'json' or 'text' instead.",
            "type": "invalid_request_error", "param": "response_format", "code": "unsupported_value"}})),
        Reply::Json(200, vec![], json!({"text": "Hello.", "usage": {"type": "duration", "seconds": 2}})),
    ])
    .await;
    let p = mock.provider(ProviderKind::Openai, "/v1", Some(KEY));
    let audio = b"RIFF\x24\x00\x00\x00WAVEfmt fake audio bytes \x00\xff".to_vec();
    let req = TranscriptionRequest {
        model: "whisper-1".into(),
        file_name: "clip.wav".into(),
        audio: audio.clone(),
        language: Some("en".into()),
    };
    let r = p.transcribe(&req).await.unwrap();
    assert_eq!(r.text, "The beach was a popular spot on a hot summer day.");
    assert_eq!(r.duration_s, Some(8.470000267028809));
    assert_eq!(r.model, "whisper-1");

    let c = mock.only();
    assert_eq!(
        (c.method.as_str(), c.uri.as_str()),
        ("POST", "/v1/audio/transcriptions")
    );
    assert_eq!(
        c.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert!(
        c.header("content-type")
            .unwrap()
            .starts_with("multipart/form-data; boundary=")
    );
    let fields = multipart_fields(&c).await;
    assert_eq!(
        fields,
        vec![
            (
                "file".to_owned(),
                Some("clip.wav".to_owned()),
                audio.clone()
            ),
            ("model".to_owned(), None, b"whisper-1".to_vec()),
            ("response_format".to_owned(), None, b"verbose_json".to_vec()),
            ("language".to_owned(), None, b"en".to_vec()),
        ]
    );

    let req = TranscriptionRequest {
        model: "custom-asr".into(),
        language: None,
        ..req
    };
    let r = p.transcribe(&req).await.unwrap();
    assert_eq!((r.text.as_str(), r.duration_s), ("Hello.", Some(2.0)));
    let all = mock.captured();
    assert_eq!(all.len(), 3);
    let mut formats = Vec::new();
    for c in &all[1..] {
        let fields = multipart_fields(c).await;
        formats.push(
            fields
                .into_iter()
                .find(|(n, _, _)| n == "response_format")
                .unwrap()
                .2,
        );
    }
    assert_eq!(formats, vec![b"verbose_json".to_vec(), b"json".to_vec()]);
}

// ---------------------------------------------------------------- Anthropic

#[tokio::test]
async fn anthropic_messages_request_headers_and_answer() {
    let mock = Mock::start(vec![Reply::Json(200, vec![], json!({
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "No, it is not spam."}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 2095, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1800, "output_tokens": 503,
            "service_tier": "standard"}
    }))])
    .await;
    let p = mock.provider(ProviderKind::Anthropic, "/v1", Some(KEY));
    let r = p.chat(&chat_request("claude-sonnet-4-5")).await.unwrap();
    let c = mock.only();
    assert_eq!(
        (c.method.as_str(), c.uri.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(c.header("x-api-key"), Some(KEY));
    assert_eq!(c.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(c.header("content-type"), Some("application/json"));
    assert_eq!(c.header("authorization"), None);
    assert_eq!(
        c.json(),
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 32,
            "system": [{"type": "text", "text": "You label text."}],
            "messages": [{"role": "user", "content": "Is this spam?"}],
            "temperature": 0.25
        })
    );
    assert_eq!(r.model, "claude-sonnet-4-5-20250929");
    assert_eq!(
        r.answer,
        Answer::Text {
            text: "No, it is not spam.".into()
        }
    );
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 3895,
            output_tokens: 503,
            cached_input_tokens: 1800,
            reasoning_tokens: 0
        }
    );
}

#[tokio::test]
async fn anthropic_json_schema_uses_a_forced_tool_and_refusals_are_answers() {
    let mock = Mock::start(vec![
        Reply::Json(200, vec![], json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [{"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "spam", "input": {"spam": true}}],
            "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 400, "output_tokens": 20}})),
        Reply::Json(200, vec![], json!({"id": "msg_2", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
            "content": [], "stop_reason": "refusal", "stop_sequence": null, "usage": {"input_tokens": 40, "output_tokens": 0}})),
    ])
    .await;
    let p = mock.provider(ProviderKind::Anthropic, "/v1", Some(KEY));
    let schema = json!({"type": "object", "properties": {"spam": {"type": "boolean"}}, "required": ["spam"]});
    let req = ChatRequest {
        max_tokens: None,
        json_schema: Some(JsonSchema {
            name: "spam".into(),
            schema: schema.clone(),
            strict: true,
        }),
        ..chat_request("claude-haiku-4-5")
    };
    let r = p.chat(&req).await.unwrap();
    assert_eq!(
        r.answer,
        Answer::Text {
            text: "{\"spam\":true}".into()
        }
    );
    assert_eq!(r.finish_reason, FinishReason::Stop);
    let body = mock.captured()[0].json();
    assert_eq!(body["max_tokens"], 1024);
    assert_eq!(body["tools"][0]["name"], "spam");
    assert_eq!(body["tools"][0]["input_schema"], schema);
    assert_eq!(body["tool_choice"], json!({"type": "tool", "name": "spam"}));

    let r = p.chat(&req).await.unwrap();
    assert!(r.answer.is_refusal());
    assert_eq!(r.finish_reason, FinishReason::ContentFilter);
}

#[tokio::test]
async fn anthropic_error_statuses_keep_the_message() {
    let body = |kind: &str, message: &str| json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_011"});
    let mock = Mock::start(vec![
        Reply::Json(529, vec![], body("overloaded_error", "Overloaded")),
        Reply::Json(
            429,
            vec![("retry-after", "17")],
            body(
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
            ),
        ),
        Reply::Json(
            401,
            vec![],
            body("authentication_error", "invalid x-api-key"),
        ),
        Reply::Json(
            413,
            vec![],
            body(
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
            ),
        ),
        Reply::Json(
            400,
            vec![],
            body("invalid_request_error", "max_tokens: Field required"),
        ),
    ])
    .await;
    let p = mock.provider(ProviderKind::Anthropic, "/v1", Some(KEY));
    let req = chat_request("claude-sonnet-4-5");
    let expected = [
        (
            ErrorKind::Overloaded,
            529,
            "overloaded_error: Overloaded",
            None,
        ),
        (
            ErrorKind::RateLimited,
            429,
            "rate_limit_error: Number of request tokens",
            Some(Duration::from_secs(17)),
        ),
        (
            ErrorKind::Unauthorized,
            401,
            "authentication_error: invalid x-api-key",
            None,
        ),
        (
            ErrorKind::PayloadTooLarge,
            413,
            "request_too_large: Request exceeds",
            None,
        ),
        (
            ErrorKind::BadRequest,
            400,
            "invalid_request_error: max_tokens",
            None,
        ),
    ];
    for (kind, status, message, retry_after) in expected {
        let e = p.chat(&req).await.unwrap_err();
        assert_eq!(
            (e.kind, e.status, e.retry_after),
            (kind, Some(status), retry_after)
        );
        assert!(e.message.starts_with(message), "{}", e.message);
        assert_no_key(&e);
    }
}

const ANTHROPIC_STREAM: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\n",
    "data: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n",
    "event: content_block_stop\n",
    "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
    "event: message_stop\n",
    "data: {\"type\":\"message_stop\"}\n\n",
);

#[tokio::test]
async fn anthropic_streaming_events_and_a_mid_stream_overload() {
    let overloaded = ANTHROPIC_STREAM
        .split("event: content_block_stop")
        .next()
        .unwrap()
        .to_owned()
        + "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
    let cut = ANTHROPIC_STREAM
        .split("event: message_stop")
        .next()
        .unwrap()
        .to_owned();
    let mock = Mock::start(vec![
        Reply::Sse(pieces(ANTHROPIC_STREAM)),
        Reply::Sse(pieces(&overloaded)),
        Reply::Sse(pieces(&cut)),
    ])
    .await;
    let p = mock.provider(ProviderKind::Anthropic, "/v1", Some(KEY));
    let mut req = chat_request("claude-sonnet-4-5");
    req.stream = true;

    let (chunks, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text_of(&chunks), "Hello!");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        last.usage,
        Some(Usage {
            input_tokens: 25,
            output_tokens: 15,
            ..Usage::default()
        })
    );
    assert_eq!(mock.captured()[0].json()["stream"], true);

    let (chunks, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert_eq!(text_of(&chunks), "Hello!");
    let e = error.unwrap();
    assert_eq!(
        (e.kind, e.message.as_str()),
        (ErrorKind::Overloaded, "Overloaded")
    );

    let (_, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert_eq!(error.map(|e| e.kind), Some(ErrorKind::StreamTruncated));
}

// ---------------------------------------------------------------- Gemini

#[tokio::test]
async fn gemini_generate_content_request_and_answer() {
    let mock = Mock::start(vec![Reply::Json(200, vec![], json!({
        "candidates": [{"content": {"parts": [{"text": "Not spam."}], "role": "model"}, "finishReason": "STOP", "avgLogprobs": -0.12, "index": 0}],
        "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 3, "totalTokenCount": 64, "cachedContentTokenCount": 4,
            "thoughtsTokenCount": 50, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 11}]},
        "modelVersion": "gemini-2.5-flash", "responseId": "mjbYaJ3TKZWEz7IPmeT8iQk"
    }))])
    .await;
    let p = mock.provider(ProviderKind::Gemini, "/v1beta", Some(KEY));
    let mut req = chat_request("gemini-2.5-flash");
    req.messages.push(Message::assistant("Which text?"));
    req.messages.push(Message::user("This one."));
    let r = p.chat(&req).await.unwrap();
    let c = mock.only();
    assert_eq!(
        (c.method.as_str(), c.uri.as_str()),
        ("POST", "/v1beta/models/gemini-2.5-flash:generateContent")
    );
    assert_eq!(c.header("x-goog-api-key"), Some(KEY));
    assert_eq!(c.header("authorization"), None);
    assert_eq!(
        c.json(),
        json!({
            "contents": [
                {"role": "user", "parts": [{"text": "Is this spam?"}]},
                {"role": "model", "parts": [{"text": "Which text?"}]},
                {"role": "user", "parts": [{"text": "This one."}]}
            ],
            "systemInstruction": {"parts": [{"text": "You label text."}]},
            "generationConfig": {"temperature": 0.25, "maxOutputTokens": 32}
        })
    );
    assert_eq!(
        r.answer,
        Answer::Text {
            text: "Not spam.".into()
        }
    );
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 11,
            output_tokens: 53,
            cached_input_tokens: 4,
            reasoning_tokens: 50
        }
    );
}

#[tokio::test]
async fn gemini_blocks_are_refusals_and_errors_keep_their_status() {
    let mock = Mock::start(vec![
        Reply::Json(200, vec![], json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}, "modelVersion": "gemini-2.5-flash"})),
        Reply::Json(429, vec![], json!({"error": {"code": 429,
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "status": "RESOURCE_EXHAUSTED", "details": [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests"}]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": []},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "41s"}]}})),
        Reply::Json(400, vec![], json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]}})),
        Reply::Json(503, vec![], json!({"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}})),
    ])
    .await;
    let p = mock.provider(ProviderKind::Gemini, "/v1beta", Some(KEY));
    let req = chat_request("gemini-2.5-flash");
    let r = p.chat(&req).await.unwrap();
    assert!(r.answer.is_refusal());
    assert_eq!(r.finish_reason, FinishReason::ContentFilter);

    let e = p.chat(&req).await.unwrap_err();
    assert_eq!(
        (e.kind, e.status, e.retry_after),
        (
            ErrorKind::RateLimited,
            Some(429),
            Some(Duration::from_secs(41))
        )
    );
    assert!(
        e.message
            .starts_with("RESOURCE_EXHAUSTED: You exceeded your current quota")
    );
    let e = p.chat(&req).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ErrorKind::Unauthorized, Some(400)));
    assert_no_key(&e);
    let e = p.chat(&req).await.unwrap_err();
    assert_eq!((e.kind, e.status), (ErrorKind::Unavailable, Some(503)));
}

#[tokio::test]
async fn gemini_streaming_over_alt_sse() {
    let event = |text: &str, finish: Option<&str>, out: u64| {
        let mut candidate =
            json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        if let Some(f) = finish {
            candidate["finishReason"] = json!(f);
        }
        let body = json!({"candidates": [candidate],
            "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": out, "totalTokenCount": 8 + out},
            "modelVersion": "gemini-2.5-flash", "responseId": "r1"});
        format!("data: {body}\r\n\r\n")
    };
    let full =
        event("The quick", None, 2) + &event(" brown fox", None, 4) + &event(".", Some("STOP"), 5);
    let cut = event("The quick", None, 2);
    let safety = event("", Some("SAFETY"), 0);
    let mock = Mock::start(vec![
        Reply::Sse(pieces(&full)),
        Reply::Sse(pieces(&cut)),
        Reply::Sse(pieces(&safety)),
    ])
    .await;
    let p = mock.provider(ProviderKind::Gemini, "/v1beta", Some(KEY));
    let mut req = chat_request("gemini-2.5-flash");
    req.stream = true;

    let (chunks, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text_of(&chunks), "The quick brown fox.");
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        last.usage,
        Some(Usage {
            input_tokens: 8,
            output_tokens: 5,
            ..Usage::default()
        })
    );
    let c = &mock.captured()[0];
    assert_eq!(
        c.uri,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    );
    assert_eq!(c.header("x-goog-api-key"), Some(KEY));

    let (_, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert_eq!(error.map(|e| e.kind), Some(ErrorKind::StreamTruncated));

    let (chunks, error) = collect(p.chat_stream(&req).await.unwrap()).await;
    assert!(error.is_none());
    let last = chunks.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::ContentFilter));
    assert!(last.refusal.as_deref().unwrap().contains("SAFETY"));
}

// ---------------------------------------------------------------- Perspective

fn perspective_scores(toxicity: f64) -> Value {
    let score = |v: f64| {
        json!({"spanScores": [{"begin": 0, "end": 10, "score": {"value": v, "type": "PROBABILITY"}}],
        "summaryScore": {"value": v, "type": "PROBABILITY"}})
    };
    json!({"attributeScores": {"TOXICITY": score(toxicity), "SEVERE_TOXICITY": score(toxicity / 4.0),
        "INSULT": score(toxicity / 2.0), "THREAT": score(0.01), "PROFANITY": score(0.02), "IDENTITY_ATTACK": score(0.03)},
        "languages": ["en"], "detectedLanguages": ["en"]})
}

#[tokio::test]
async fn perspective_analyzes_each_input_with_the_key_in_the_query() {
    let mock = Mock::start(vec![
        Reply::Json(200, vec![], perspective_scores(0.875)),
        Reply::Json(200, vec![], perspective_scores(0.125)),
    ])
    .await;
    let p = mock.provider(ProviderKind::Perspective, "/v1alpha1", Some(KEY));
    let r = p
        .moderate(&ModerationRequest {
            model: String::new(),
            input: vec!["you idiot".into(), "have a nice day".into()],
        })
        .await
        .unwrap();
    let all = mock.captured();
    assert_eq!(all.len(), 2);
    for (c, text) in all.iter().zip(["you idiot", "have a nice day"]) {
        assert_eq!(
            (c.method.as_str(), c.uri.as_str()),
            (
                "POST",
                format!("/v1alpha1/comments:analyze?key={KEY}").as_str()
            )
        );
        assert_eq!(
            c.json(),
            json!({
                "comment": {"text": text},
                "requestedAttributes": {"TOXICITY": {}, "SEVERE_TOXICITY": {}, "INSULT": {}, "THREAT": {}, "PROFANITY": {}, "IDENTITY_ATTACK": {}},
                "languages": ["en"],
                "doNotStore": true
            })
        );
    }
    assert_eq!(
        (r.provider.as_str(), r.model.as_str()),
        ("test-perspective", "perspective")
    );
    assert!(r.results[0].flagged && !r.results[1].flagged);
    assert_eq!(r.results[0].scores["TOXICITY"], 0.875);
    assert_eq!(r.results[0].scores["INSULT"], 0.4375);
    assert_eq!(r.results[0].scores.len(), 6);
}

#[tokio::test]
async fn perspective_errors_never_show_the_key() {
    let echo = format!(
        "Invalid request https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze?key={KEY}"
    );
    let mock = Mock::start(vec![
        Reply::Json(400, vec![], json!({"error": {"code": 400, "message": "Attribute TOXICITY does not support request languages: xx", "status": "INVALID_ARGUMENT"}})),
        Reply::Json(403, vec![], json!({"error": {"code": 403, "message": echo, "status": "PERMISSION_DENIED"}})),
        Reply::Json(429, vec![], json!({"error": {"code": 429, "message": "Quota exceeded for quota metric 'Analysis requests'", "status": "RESOURCE_EXHAUSTED"}})),
        Reply::Text(200, "not json"),
        Reply::Sleep(Duration::from_secs(5)),
    ])
    .await;
    let p = provider(
        ProviderKind::Perspective,
        format!("{}/v1alpha1", mock.base),
        Some(KEY),
        Duration::from_millis(300),
    );
    let req = ModerationRequest {
        model: String::new(),
        input: vec!["text".into()],
    };
    for kind in [
        ErrorKind::BadRequest,
        ErrorKind::Forbidden,
        ErrorKind::RateLimited,
        ErrorKind::Malformed,
        ErrorKind::Timeout,
    ] {
        let e = p.moderate(&req).await.unwrap_err();
        assert_eq!(e.kind, kind, "{e}");
        assert_no_key(&e);
    }
}

// ---------------------------------------------------------------- transport

/// A port with nothing listening on it.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn connection_refused_is_connect_and_never_shows_the_key() {
    let base = closed_port();
    let chat = chat_request("m");
    for kind in [
        ProviderKind::Openai,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ] {
        let p = provider(kind, base.clone(), Some(KEY), Duration::from_secs(5));
        let e = p.chat(&chat).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connect, "{kind:?}: {e}");
        assert!(e.is_retryable());
        assert_no_key(&e);
        let e = p.chat_stream(&chat).await.err().unwrap();
        assert_eq!(e.kind, ErrorKind::Connect, "{kind:?}: {e}");
        assert_no_key(&e);
    }
    let p = provider(
        ProviderKind::Perspective,
        base,
        Some(KEY),
        Duration::from_secs(5),
    );
    let e = p
        .moderate(&ModerationRequest {
            model: String::new(),
            input: vec!["x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Connect, "{e}");
    assert_no_key(&e);
}

#[tokio::test]
async fn timeouts_bound_the_whole_request_and_the_first_event() {
    let mock = Mock::start(vec![
        Reply::Sleep(Duration::from_secs(5)),
        Reply::SseHang,
        Reply::SseHang,
        Reply::SseHang,
    ])
    .await;
    let timeout = Duration::from_millis(300);
    let openai = provider(
        ProviderKind::Openai,
        format!("{}/v1", mock.base),
        Some(KEY),
        timeout,
    );
    let started = std::time::Instant::now();
    let e = openai.chat(&chat_request("m")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
    assert_no_key(&e);
    for (kind, prefix) in [
        (ProviderKind::Openai, "/v1"),
        (ProviderKind::Anthropic, "/v1"),
        (ProviderKind::Gemini, "/v1beta"),
    ] {
        let p = provider(kind, format!("{}{prefix}", mock.base), Some(KEY), timeout);
        let (chunks, error) = collect(p.chat_stream(&chat_request("m")).await.unwrap()).await;
        assert!(chunks.is_empty());
        assert_eq!(error.map(|e| e.kind), Some(ErrorKind::Timeout), "{kind:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
