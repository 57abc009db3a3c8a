//! Fault injection for the gateway: local servers that speak the OpenAI chat
//! completions wire format (and Anthropic's errors) play a script of replies
//! per request (answers, error statuses with headers, delays, malformed
//! bodies, streams cut short, refusals), plus a raw TCP listener that resets
//! every connection and an address where nothing listens.
//!
//! Every scenario checks the same invariants besides its own: the call ends in
//! an answer or a typed error; each server received exactly as many requests
//! as there are attempts for its provider; the sink got exactly one record per
//! attempt, the same ones `Outcome::attempts` returns; and each record's cost
//! is the price table applied to its usage.
//!
//! Time is real but short (millisecond backoffs, sub-second timeouts): the
//! HTTP client's own timeouts would fire at once under tokio's paused clock.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use triage_cloud::breaker::BreakerState;
use triage_cloud::spend::{DEFAULT_MAX_TOKENS, UsageBound};
use triage_cloud::{
    AllFailed, Attempt, AttemptOutcome, AttemptSink, BreakerConfig, CallContext, ErrorKind,
    Gateway, Outcome, PriceTable, ProviderConfig, ProviderKind, ProviderSettings, RateLimits,
    RetryPolicy, Target,
};
use triage_core::llm::{
    Answer, ChatRequest, Message, ModerationRequest, TranscriptionRequest, Usage,
};

// ---------------------------------------------------------------- script

/// One scripted reply.
#[derive(Debug, Clone)]
enum Reply {
    /// A plain response after `delay` (before the headers).
    Http {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    },
    /// `text/event-stream`: each `data:` event after its delay; `[DONE]` last
    /// when `done`.
    Sse {
        events: Vec<(Duration, String)>,
        done: bool,
    },
}

fn usage_json(u: Usage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

const USAGE: Usage = Usage {
    input_tokens: 1000,
    output_tokens: 500,
    cached_input_tokens: 200,
    reasoning_tokens: 100,
};

fn json(status: u16, body: serde_json::Value) -> Reply {
    Reply::Http {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

/// A chat completion that answers `text`.
fn ok(text: &str) -> Reply {
    ok_with(text, USAGE)
}

fn ok_with(text: &str, usage: Usage) -> Reply {
    json(
        200,
        serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "served-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": text, "refusal": null}}],
            "usage": usage_json(usage),
        }),
    )
}

fn refusal(reason: &str) -> Reply {
    json(
        200,
        serde_json::json!({
            "id": "chatcmpl-2", "object": "chat.completion", "model": "served-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": null, "refusal": reason}}],
            "usage": usage_json(Usage { input_tokens: 40, output_tokens: 12, ..Usage::default() }),
        }),
    )
}

/// An OpenAI-style error status.
fn status(code: u16) -> Reply {
    json(
        code,
        serde_json::json!({"error": {"message": format!("scripted {code}"), "type": "server_error"}}),
    )
}

fn with_header(reply: Reply, name: &'static str, value: &str) -> Reply {
    match reply {
        Reply::Http {
            status,
            mut headers,
            body,
            delay,
        } => {
            headers.push((name, value.to_owned()));
            Reply::Http {
                status,
                headers,
                body,
                delay,
            }
        }
        sse => sse,
    }
}

fn delayed(reply: Reply, by: Duration) -> Reply {
    match reply {
        Reply::Http {
            status,
            headers,
            body,
            ..
        } => Reply::Http {
            status,
            headers,
            body,
            delay: by,
        },
        sse => sse,
    }
}

fn malformed() -> Reply {
    Reply::Http {
        status: 200,
        headers: vec![("content-type", "application/json".into())],
        body: r#"{"id": "chatcmpl-3", "choices": [{"message": {"content": "trunc"#.into(),
        delay: Duration::ZERO,
    }
}

/// Anthropic's documented "overloaded" answer.
fn overloaded() -> Reply {
    json(
        529,
        serde_json::json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
}

/// An Anthropic messages answer.
fn anthropic_ok(text: &str) -> Reply {
    json(
        200,
        serde_json::json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 800, "cache_read_input_tokens": 200, "output_tokens": 500},
        }),
    )
}

fn delta(text: &str) -> String {
    serde_json::json!({"object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    .to_string()
}

fn stream_events(parts: &[&str], usage: Usage) -> Vec<(Duration, String)> {
    let mut events: Vec<(Duration, String)> =
        parts.iter().map(|p| (Duration::ZERO, delta(p))).collect();
    events.push((
        Duration::ZERO,
        serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            .to_string(),
    ));
    events.push((
        Duration::ZERO,
        serde_json::json!({"choices": [], "usage": usage_json(usage)}).to_string(),
    ));
    events
}

/// A complete stream of `parts`, usage and `[DONE]`.
fn sse_ok(parts: &[&str]) -> Reply {
    Reply::Sse {
        events: stream_events(parts, USAGE),
        done: true,
    }
}

/// A stream that sends `parts` and then ends without `[DONE]`.
fn sse_truncated(parts: &[&str]) -> Reply {
    Reply::Sse {
        events: parts.iter().map(|p| (Duration::ZERO, delta(p))).collect(),
        done: false,
    }
}

// ---------------------------------------------------------------- servers

/// A test that panicked while holding a lock has already failed.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    /// The `model` of every request received, in order.
    requests: Mutex<Vec<String>>,
}

/// An OpenAI-compatible server that plays its script, one reply per request.
#[derive(Debug)]
struct FaultServer {
    name: &'static str,
    base_url: String,
    shared: Arc<Shared>,
}

impl FaultServer {
    async fn start(name: &'static str, script: Vec<Reply>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            script: Mutex::new(script.into()),
            requests: Mutex::default(),
        });
        let app = Router::new().fallback(serve).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            name,
            base_url: format!("http://{addr}/v1"),
            shared,
        })
    }

    fn hits(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    fn models(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    fn push(&self, reply: Reply) {
        lock(&self.shared.script).push_back(reply);
    }

    fn settings(&self) -> ProviderSettings {
        settings(self.name, &self.base_url)
    }
}

async fn serve(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let multipart = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/"));
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let model = if multipart {
        "(multipart)".to_owned()
    } else {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_owned))
            .unwrap_or_default()
    };
    lock(&shared.requests).push(model);
    let reply = lock(&shared.script).pop_front();
    // Past the end of its script a server answers 418, which no scenario expects.
    let reply = reply.unwrap_or_else(|| status(418));
    match reply {
        Reply::Http {
            status,
            headers,
            body,
            delay,
        } => {
            tokio::time::sleep(delay).await;
            let mut response = Response::new(Body::from(body));
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
            for (name, value) in headers {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        Reply::Sse { events, done } => {
            let mut frames: Vec<(Duration, String)> = events
                .into_iter()
                .map(|(d, data)| (d, format!("data: {data}\n\n")))
                .collect();
            if done {
                frames.push((Duration::ZERO, "data: [DONE]\n\n".to_owned()));
            }
            let body = futures_util::stream::iter(frames).then(|(delay, frame)| async move {
                tokio::time::sleep(delay).await;
                Ok::<_, Infallible>(Bytes::from(frame))
            });
            let mut response = Response::new(Body::from_stream(body));
            response.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            response
        }
    }
}

/// Accepts connections, reads the request and resets the connection.
#[derive(Debug)]
struct ResetServer {
    name: &'static str,
    base_url: String,
    accepted: Arc<AtomicUsize>,
}

impl ResetServer {
    async fn start(name: &'static str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let _ = socket.read(&mut buf).await;
                    // RST instead of FIN.
                    let _ = socket.set_zero_linger();
                    drop(socket);
                });
            }
        });
        Ok(Self {
            name,
            base_url: format!("http://{addr}/v1"),
            accepted,
        })
    }

    fn hits(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A base URL where nothing listens.
fn refused_url() -> std::io::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(format!("http://{addr}/v1"))
}

fn settings(name: &str, base_url: &str) -> ProviderSettings {
    ProviderSettings {
        config: ProviderConfig {
            name: name.to_owned(),
            kind: ProviderKind::OpenaiCompatible,
            base_url: base_url.to_owned(),
            api_key: None,
            api_key_env: None,
            timeout: Duration::from_secs(5),
        },
        limits: RateLimits::default(),
        breaker: BreakerConfig {
            failure_threshold: 100,
            open_for: Duration::from_secs(60),
        },
    }
}

fn with_timeout(mut s: ProviderSettings, timeout: Duration) -> ProviderSettings {
    s.config.timeout = timeout;
    s
}

// ---------------------------------------------------------------- gateway

#[derive(Debug, Default)]
struct Sink(Mutex<Vec<Attempt>>);

impl AttemptSink for Sink {
    fn record(&self, attempt: &Attempt) {
        lock(&self.0).push(attempt.clone());
    }
}

impl Sink {
    fn records(&self) -> Vec<Attempt> {
        lock(&self.0).clone()
    }
}

const PRICES: &str = r#"
[[price]]
model = "model-a"
effective = "2024-01-01"
input_per_mtok = 1.0
output_per_mtok = 2.0
cached_input_per_mtok = 0.5

[[price]]
model = "model-b"
effective = "2024-01-01"
input_per_mtok = 3.0
output_per_mtok = 6.0

[[price]]
model = "omni-moderation-latest"
effective = "2024-01-01"
per_request = 0.001

[[price]]
model = "whisper-1"
effective = "2024-01-01"
per_audio_minute = 0.006
"#;

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        deadline: Duration::from_secs(10),
    }
}

struct Harness {
    gateway: Gateway,
    sink: Arc<Sink>,
    prices: Arc<PriceTable>,
}

fn harness(providers: Vec<ProviderSettings>, policy: RetryPolicy) -> Harness {
    let prices = match PriceTable::from_toml_str(PRICES) {
        Ok(prices) => Arc::new(prices),
        Err(e) => panic!("the test price table: {e}"),
    };
    let sink = Arc::new(Sink::default());
    let gateway = Gateway::new(
        providers,
        prices.clone(),
        policy,
        Some(sink.clone() as Arc<dyn AttemptSink>),
    );
    Harness {
        gateway,
        sink,
        prices,
    }
}

fn ctx() -> CallContext {
    CallContext {
        request_id: "req-1".into(),
        task: "summarize".into(),
        tier: "cloud".into(),
        gate: None,
    }
}

fn request() -> ChatRequest {
    ChatRequest {
        messages: vec![Message::user("Say hello.")],
        max_tokens: Some(64),
        ..ChatRequest::default()
    }
}

fn targets(names: &[(&str, &str)]) -> Vec<Target> {
    names.iter().map(|(p, m)| Target::new(*p, *m)).collect()
}

/// A server's name and how many requests it received.
fn hits(server: &FaultServer) -> (&'static str, usize) {
    (server.name, server.hits())
}

impl Harness {
    /// The shared invariants. `servers` are the request counts per provider;
    /// `in_flight` counts stream attempts recorded after `outcome` was made.
    fn check<T>(&self, outcome: &Outcome<T>, servers: &[(&str, usize)], in_flight: usize) {
        let records = self.sink.records();
        assert_eq!(
            records.len(),
            outcome.attempts.len() + in_flight,
            "one record per attempt"
        );
        assert_eq!(
            &records[..outcome.attempts.len()],
            &outcome.attempts[..],
            "the sink got the attempts the outcome returns"
        );
        for (name, received) in servers {
            let attempts = records.iter().filter(|a| a.provider == *name).count();
            assert_eq!(
                *received, attempts,
                "{name}: requests received vs attempts recorded"
            );
        }
        let today = PriceTable::today();
        for r in &records {
            assert_eq!(
                (r.request_id.as_str(), r.task.as_str(), r.tier.as_str()),
                ("req-1", "summarize", "cloud")
            );
            let expected = match r.outcome {
                AttemptOutcome::Failed { .. } if r.usage == Usage::default() => 0.0,
                // Billed without a usage report: counted at the ceiling of
                // `request()` as the gateway sent it (capped).
                _ if r.usage == Usage::default() && r.operation.starts_with("chat") => {
                    let mut req = request();
                    req.max_tokens = Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS));
                    let bound = UsageBound::chat(&req).usage(DEFAULT_MAX_TOKENS);
                    self.prices
                        .cost(&r.provider, &r.model, &bound, 0.0, &today)
                        .or_else(|| self.prices.dearest_cost(&r.provider, &bound, 0.0, &today))
                        .unwrap_or(0.0)
                }
                // An unpriced model counts at its provider's dearest price.
                _ => self
                    .prices
                    .cost(&r.provider, &r.model, &r.usage, r.audio_seconds, &today)
                    .or_else(|| {
                        self.prices
                            .dearest_cost(&r.provider, &r.usage, r.audio_seconds, &today)
                    })
                    .unwrap_or(0.0),
            };
            assert!(
                (r.cost_usd - expected).abs() < 1e-12,
                "{r:?}: cost {} != {expected}",
                r.cost_usd
            );
        }
    }
}

fn failed_kinds(attempts: &[Attempt]) -> Vec<Option<ErrorKind>> {
    attempts
        .iter()
        .map(|a| match &a.outcome {
            AttemptOutcome::Failed { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

fn all_failed<T>(outcome: &Outcome<T>) -> &AllFailed {
    match &outcome.result {
        Err(e) => e,
        Ok(_) => panic!("expected every target to fail"),
    }
}

fn text(outcome: &Outcome<triage_core::llm::ChatResponse>) -> &str {
    match &outcome.result {
        Ok(response) => response.answer.text().unwrap_or("<refusal>"),
        Err(e) => panic!("expected an answer: {e}"),
    }
}

/// Drain a stream into its text and the error that ended it, if any.
async fn drain(mut stream: triage_cloud::ChunkStream) -> (String, Option<ErrorKind>, Usage) {
    let mut text = String::new();
    let mut usage = Usage::default();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                text.push_str(&chunk.delta);
                if let Some(u) = chunk.usage {
                    usage = u;
                }
            }
            Err(e) => return (text, Some(e.kind), usage),
        }
    }
    (text, None, usage)
}

// ---------------------------------------------------------------- scenarios

#[tokio::test]
async fn answers_first_time_and_prices_cached_tokens() {
    let a = FaultServer::start("primary", vec![ok("hello")])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    assert_eq!(text(&out), "hello");
    assert_eq!(out.attempts.len(), 1);
    let attempt = &out.attempts[0];
    assert_eq!(attempt.outcome, AttemptOutcome::Answered);
    assert_eq!(
        (attempt.operation, attempt.model.as_str()),
        ("chat", "model-a")
    );
    assert_eq!(attempt.usage, USAGE);
    // 800 uncached * $1 + 200 cached * $0.5 + 500 out (reasoning inside) * $2, per million.
    assert!(
        (attempt.cost_usd - 0.0019).abs() < 1e-12,
        "{}",
        attempt.cost_usd
    );
    // The target's model went on the wire.
    assert_eq!(a.models(), ["model-a"]);
    h.check(&out, &[hits(&a)], 0);
}

#[tokio::test]
async fn timeout_is_retried_then_falls_back() {
    let slow = delayed(ok("late"), Duration::from_secs(3));
    let a = FaultServer::start("primary", vec![slow.clone(), slow.clone(), slow])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let h = harness(
        vec![
            with_timeout(a.settings(), Duration::from_millis(200)),
            b.settings(),
        ],
        policy(),
    );
    let started = Instant::now();
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert_eq!(
        failed_kinds(&out.attempts),
        [
            Some(ErrorKind::Timeout),
            Some(ErrorKind::Timeout),
            Some(ErrorKind::Timeout),
            None
        ]
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(b.models(), ["model-b"]);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn slow_first_byte_of_a_stream_fails_over() {
    let slow = Reply::Sse {
        events: vec![(Duration::from_secs(3), delta("late"))],
        done: true,
    };
    let a = FaultServer::start("primary", vec![slow]).await.unwrap();
    let b = FaultServer::start("secondary", vec![sse_ok(&["Hel", "lo"])])
        .await
        .unwrap();
    let policy = RetryPolicy {
        max_attempts: 1,
        ..policy()
    };
    let h = harness(
        vec![
            with_timeout(a.settings(), Duration::from_millis(200)),
            b.settings(),
        ],
        policy,
    );
    let started = Instant::now();
    let out = h
        .gateway
        .chat_stream(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(failed_kinds(&out.attempts), [Some(ErrorKind::Timeout)]);
    assert!(started.elapsed() < Duration::from_secs(2));
    let stream = out.result.as_ref().map(|_| ()).map_err(|e| e.to_string());
    assert!(stream.is_ok(), "{stream:?}");
    let Outcome { result, attempts } = out;
    let (text, error, usage) = drain(result.unwrap()).await;
    assert_eq!((text.as_str(), error, usage), ("Hello", None, USAGE));
    let out = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&out, &[hits(&a), hits(&b)], 1);
    let last = h.sink.records().pop().unwrap();
    assert_eq!(
        (
            last.provider.as_str(),
            last.operation,
            last.outcome.clone(),
            last.usage
        ),
        ("secondary", "chat_stream", AttemptOutcome::Answered, USAGE)
    );
}

#[tokio::test]
async fn rate_limited_429_waits_for_retry_after_ms() {
    let limited = with_header(status(429), "retry-after-ms", "400");
    let a = FaultServer::start("primary", vec![limited, ok("after the wait")])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let started = Instant::now();
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    let waited = started.elapsed();
    assert_eq!(text(&out), "after the wait");
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::RateLimited), None]
    );
    // The jittered backoff alone is at most 5 ms.
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    h.check(&out, &[hits(&a)], 0);
}

#[tokio::test]
async fn rate_limited_429_waits_for_retry_after_seconds() {
    let limited = with_header(status(429), "retry-after", "1");
    let a = FaultServer::start("primary", vec![limited, ok("after a second")])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let started = Instant::now();
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    assert_eq!(text(&out), "after a second");
    assert!(started.elapsed() >= Duration::from_secs(1));
    h.check(&out, &[hits(&a)], 0);
}

#[tokio::test]
async fn retry_after_past_the_deadline_moves_on_at_once() {
    let limited = with_header(status(429), "retry-after", "30");
    let a = FaultServer::start("primary", vec![limited]).await.unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let started = Instant::now();
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::RateLimited), None]
    );
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn server_500_is_retried_on_the_same_target() {
    let a = FaultServer::start("primary", vec![status(500), status(500), ok("third time")])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![]).await.unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "third time");
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::Server), Some(ErrorKind::Server), None]
    );
    assert_eq!(b.hits(), 0);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn unavailable_503_exhausts_its_attempts_then_falls_back() {
    let a = FaultServer::start("primary", vec![status(503), status(503), status(503)])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert_eq!(a.hits(), 3, "max_attempts per target");
    let statuses: Vec<_> = out
        .attempts
        .iter()
        .map(|a| match &a.outcome {
            AttemptOutcome::Failed { status, .. } => *status,
            _ => None,
        })
        .collect();
    assert_eq!(statuses, [Some(503), Some(503), Some(503), None]);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn overloaded_529_is_retried() {
    let a = FaultServer::start("primary", vec![overloaded(), ok("no longer busy")])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    assert_eq!(text(&out), "no longer busy");
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::Overloaded), None]
    );
    match &out.attempts[0].outcome {
        AttemptOutcome::Failed {
            status, message, ..
        } => {
            assert_eq!(*status, Some(529));
            assert!(message.contains("Overloaded"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    h.check(&out, &[hits(&a)], 0);
}

#[tokio::test]
async fn anthropic_529_overloaded_is_retried_then_falls_back_across_wire_formats() {
    let a = FaultServer::start("claude", vec![overloaded(), anthropic_ok("hi from claude")])
        .await
        .unwrap();
    let mut anthropic = a.settings();
    anthropic.config.kind = ProviderKind::Anthropic;
    anthropic.config.api_key = Some(triage_cloud::SecretString::new("sk-ant-test"));
    let h = harness(vec![anthropic.clone()], policy());
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("claude", "model-a")]), &request())
        .await;
    assert_eq!(text(&out), "hi from claude");
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::Overloaded), None]
    );
    // Anthropic's input_tokens exclude cache reads; ours include them.
    assert_eq!(out.attempts[1].usage.input_tokens, 1000);
    assert!((out.attempts[1].cost_usd - 0.0019).abs() < 1e-12);
    h.check(&out, &[hits(&a)], 0);

    // Overloaded on every attempt: on to an OpenAI-compatible server.
    let a2 = FaultServer::start("claude", vec![overloaded(), overloaded(), overloaded()])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    anthropic.config.base_url = a2.base_url.clone();
    let h = harness(vec![anthropic, b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("claude", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::Overloaded); 3]
            .into_iter()
            .chain([None])
            .collect::<Vec<_>>()
    );
    h.check(&out, &[hits(&a2), hits(&b)], 0);
}

#[tokio::test]
async fn connection_reset_is_retried_then_falls_back() {
    let reset = ResetServer::start("flaky").await.unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let h = harness(
        vec![settings(reset.name, &reset.base_url), b.settings()],
        policy(),
    );
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("flaky", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert_eq!(
        failed_kinds(&out.attempts),
        [
            Some(ErrorKind::Connect),
            Some(ErrorKind::Connect),
            Some(ErrorKind::Connect),
            None
        ]
    );
    h.check(&out, &[(reset.name, reset.hits()), hits(&b)], 0);
}

#[tokio::test]
async fn connection_refused_is_retried_then_falls_back() {
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let h = harness(
        vec![settings("nowhere", &refused_url().unwrap()), b.settings()],
        policy(),
    );
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("nowhere", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert_eq!(
        failed_kinds(&out.attempts),
        [
            Some(ErrorKind::Connect),
            Some(ErrorKind::Connect),
            Some(ErrorKind::Connect),
            None
        ]
    );
    // Nothing listened, so nothing was received; the attempts still count.
    h.check(&out, &[("nowhere", 3), hits(&b)], 0);
}

#[tokio::test]
async fn malformed_json_is_retried() {
    let a = FaultServer::start("primary", vec![malformed(), ok("well-formed")])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    assert_eq!(text(&out), "well-formed");
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::Malformed), None]
    );
    h.check(&out, &[hits(&a)], 0);
}

#[tokio::test]
async fn stream_truncated_before_the_first_chunk_fails_over() {
    let a = FaultServer::start(
        "primary",
        vec![sse_truncated(&[]), sse_truncated(&[]), sse_truncated(&[])],
    )
    .await
    .unwrap();
    let b = FaultServer::start("secondary", vec![sse_ok(&["fine"])])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat_stream(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::StreamTruncated); 3]
    );
    let Outcome { result, attempts } = out;
    let (text, error, _) = drain(result.unwrap()).await;
    assert_eq!((text.as_str(), error), ("fine", None));
    let out = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&out, &[hits(&a), hits(&b)], 1);
}

#[tokio::test]
async fn stream_truncated_after_the_first_chunk_reaches_the_caller() {
    let a = FaultServer::start("primary", vec![sse_truncated(&["Hel", "lo"])])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![sse_ok(&["never"])])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat_stream(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert!(out.attempts.is_empty());
    assert!(h.sink.records().is_empty(), "recorded when the stream ends");
    let Outcome { result, attempts } = out;
    let (text, error, _) = drain(result.unwrap()).await;
    assert_eq!(
        (text.as_str(), error),
        ("Hello", Some(ErrorKind::StreamTruncated))
    );
    assert_eq!(b.hits(), 0, "no failover once a chunk reached the caller");
    let out = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&out, &[hits(&a), hits(&b)], 1);
    assert_eq!(
        failed_kinds(&h.sink.records()),
        [Some(ErrorKind::StreamTruncated)]
    );
}

#[tokio::test]
async fn refusal_is_an_answer_and_never_rerouted() {
    let a = FaultServer::start("primary", vec![refusal("I can't help with that.")])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("would have answered")])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    let answer = &out.result.as_ref().unwrap().answer;
    assert_eq!(
        answer,
        &Answer::Refusal {
            reason: "I can't help with that.".into()
        }
    );
    assert_eq!(b.hits(), 0, "a refusal is never sent elsewhere");
    assert_eq!(out.attempts[0].outcome, AttemptOutcome::Refused);
    // The refused call was still billed.
    assert!(out.attempts[0].cost_usd > 0.0);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn refusal_in_a_stream_is_never_rerouted() {
    let refused = Reply::Sse {
        events: vec![(
            Duration::ZERO,
            serde_json::json!({"choices": [{"index": 0, "delta": {"refusal": "No."}}]}).to_string(),
        )],
        done: true,
    };
    let a = FaultServer::start("primary", vec![refused]).await.unwrap();
    let b = FaultServer::start("secondary", vec![sse_ok(&["would have answered"])])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat_stream(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    let Outcome { result, attempts } = out;
    let mut stream = result.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.refusal.as_deref(), Some("No."));
    while stream.next().await.is_some() {}
    drop(stream);
    assert_eq!(b.hits(), 0);
    let out = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&out, &[hits(&a), hits(&b)], 1);
    assert_eq!(h.sink.records()[0].outcome, AttemptOutcome::Refused);
}

#[tokio::test]
async fn all_providers_down_lists_every_providers_errors() {
    let a = FaultServer::start("primary", vec![status(500), status(502), status(500)])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![status(503), status(503), status(504)])
        .await
        .unwrap();
    let h = harness(
        vec![
            a.settings(),
            b.settings(),
            settings("nowhere", &refused_url().unwrap()),
        ],
        policy(),
    );
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[
                ("primary", "model-a"),
                ("secondary", "model-b"),
                ("nowhere", "model-a"),
            ]),
            &request(),
        )
        .await;
    let err = all_failed(&out);
    let keys: Vec<&str> = err.errors.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["primary/model-a", "secondary/model-b", "nowhere/model-a"]
    );
    assert!(err.errors.values().all(|e| e.len() == 3));
    let text = err.to_string();
    for needle in [
        "primary/model-a: Server (HTTP 500)",
        "secondary/model-b: GatewayTimeout (HTTP 504)",
        "nowhere/model-a: Connect",
    ] {
        assert!(text.contains(needle), "{needle} in {text}");
    }
    assert_eq!(out.attempts.len(), 9);
    h.check(&out, &[hits(&a), hits(&b), ("nowhere", 3)], 0);
}

fn breaker_settings(server: &FaultServer, open_for: Duration) -> ProviderSettings {
    let mut s = server.settings();
    s.breaker = BreakerConfig {
        failure_threshold: 2,
        open_for,
    };
    s
}

#[tokio::test]
async fn breaker_opens_after_failures_and_a_successful_probe_closes_it() {
    let a = FaultServer::start("primary", vec![status(500), status(500), ok("probe ok")])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("b1"), ok("b2"), ok("b3")])
        .await
        .unwrap();
    let open_for = Duration::from_millis(300);
    let policy = RetryPolicy {
        max_attempts: 1,
        ..policy()
    };
    let h = harness(vec![breaker_settings(&a, open_for), b.settings()], policy);
    let both = targets(&[("primary", "model-a"), ("secondary", "model-b")]);
    let mut attempts = Vec::new();
    for expected in ["b1", "b2"] {
        let out = h.gateway.chat(&ctx(), &both, &request()).await;
        assert_eq!(text(&out), expected);
        attempts.extend(out.attempts);
    }
    assert!(matches!(
        h.gateway.breaker_state("primary"),
        Some(BreakerState::Open { .. })
    ));
    // Open: primary is skipped without a request.
    let out = h.gateway.chat(&ctx(), &both, &request()).await;
    assert_eq!(text(&out), "b3");
    assert_eq!(out.attempts.len(), 1);
    assert_eq!(a.hits(), 2);
    attempts.extend(out.attempts);
    // After open_for, one probe goes through and closes the breaker.
    tokio::time::sleep(open_for + Duration::from_millis(50)).await;
    let out = h.gateway.chat(&ctx(), &both, &request()).await;
    assert_eq!(text(&out), "probe ok");
    attempts.extend(out.attempts);
    assert_eq!(
        h.gateway.breaker_state("primary"),
        Some(BreakerState::Closed {
            consecutive_failures: 0
        })
    );
    let all = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&all, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn breaker_reopens_when_the_probe_fails() {
    let a = FaultServer::start("primary", vec![status(503), status(503), status(503)])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![]).await.unwrap();
    let open_for = Duration::from_millis(300);
    let policy = RetryPolicy {
        max_attempts: 1,
        ..policy()
    };
    let h = harness(vec![breaker_settings(&a, open_for), b.settings()], policy);
    let only_a = targets(&[("primary", "model-a")]);
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let out = h.gateway.chat(&ctx(), &only_a, &request()).await;
        assert_eq!(
            all_failed(&out).last().map(|e| e.kind),
            Some(ErrorKind::Unavailable)
        );
        attempts.extend(out.attempts);
    }
    // Open: a typed error, no request, no attempt record.
    let out = h.gateway.chat(&ctx(), &only_a, &request()).await;
    assert_eq!(all_failed(&out).kinds(), [ErrorKind::CircuitOpen]);
    assert!(out.attempts.is_empty());
    tokio::time::sleep(open_for + Duration::from_millis(50)).await;
    // The probe fails: open again, for the full period.
    let out = h.gateway.chat(&ctx(), &only_a, &request()).await;
    assert_eq!(all_failed(&out).kinds(), [ErrorKind::Unavailable]);
    attempts.extend(out.attempts);
    let out = h.gateway.chat(&ctx(), &only_a, &request()).await;
    assert_eq!(all_failed(&out).kinds(), [ErrorKind::CircuitOpen]);
    assert_eq!(a.hits(), 3);
    let all = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&all, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn local_rate_limit_moves_on_without_a_request() {
    let a = FaultServer::start("primary", vec![ok("a1"), ok("never")])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("b1")])
        .await
        .unwrap();
    let mut limited = a.settings();
    limited.limits = RateLimits {
        requests_per_minute: Some(1),
        tokens_per_minute: None,
    };
    let h = harness(vec![limited, b.settings()], policy());
    let both = targets(&[("primary", "model-a"), ("secondary", "model-b")]);
    let first = h.gateway.chat(&ctx(), &both, &request()).await;
    assert_eq!(text(&first), "a1");
    // The next slot is a minute away, past the 10 s deadline: go elsewhere now.
    let started = Instant::now();
    let second = h.gateway.chat(&ctx(), &both, &request()).await;
    assert_eq!(text(&second), "b1");
    assert!(started.elapsed() < Duration::from_secs(1));
    let third = h
        .gateway
        .chat(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    assert_eq!(all_failed(&third).kinds(), [ErrorKind::LocalRateLimit]);
    assert!(third.attempts.is_empty());
    assert_eq!(a.hits(), 1);
    let attempts = [first.attempts, second.attempts, third.attempts].concat();
    let all = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&all, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn token_limit_is_corrected_by_actual_usage_and_waits_within_the_deadline() {
    let small = Usage {
        input_tokens: 11,
        output_tokens: 80,
        ..Usage::default()
    };
    let a = FaultServer::start(
        "primary",
        vec![ok_with("one", small), ok_with("two", small)],
    )
    .await
    .unwrap();
    let mut limited = a.settings();
    // 100 tokens a second; each request estimates 3 + 5990 tokens.
    limited.limits = RateLimits {
        requests_per_minute: None,
        tokens_per_minute: Some(6000),
    };
    let h = harness(vec![limited], policy());
    let req = ChatRequest {
        max_tokens: Some(5990),
        ..request()
    };
    let only_a = targets(&[("primary", "model-a")]);
    let first = h.gateway.chat(&ctx(), &only_a, &req).await;
    assert_eq!(text(&first), "one");
    // Only 91 tokens were used: the rest came back, so the second call waits
    // about (5993 - 5909) / 100 s instead of the minute its estimate implies.
    let started = Instant::now();
    let second = h.gateway.chat(&ctx(), &only_a, &req).await;
    let waited = started.elapsed();
    assert_eq!(text(&second), "two");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let all = Outcome {
        result: Ok(()),
        attempts: [first.attempts, second.attempts].concat(),
    };
    h.check(&all, &[hits(&a)], 0);
}

#[tokio::test]
async fn bad_request_400_is_not_retried_nor_rerouted() {
    let a = FaultServer::start("primary", vec![status(400)])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("never")])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    let err = all_failed(&out);
    assert_eq!(err.kinds(), [ErrorKind::BadRequest]);
    assert_eq!(err.last().and_then(|e| e.status), Some(400));
    assert_eq!((a.hits(), b.hits()), (1, 0));
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn payload_too_large_413_ends_the_call() {
    let a = FaultServer::start("primary", vec![status(413)])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("never")])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(all_failed(&out).kinds(), [ErrorKind::PayloadTooLarge]);
    assert_eq!(b.hits(), 0);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn unauthorized_401_falls_back_without_retrying() {
    let a = FaultServer::start("primary", vec![status(401), ok("never")])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert_eq!(
        failed_kinds(&out.attempts),
        [Some(ErrorKind::Unauthorized), None]
    );
    assert_eq!(a.hits(), 1);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn missing_key_skips_the_target_without_a_request() {
    let a = FaultServer::start("primary", vec![ok("never")])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let mut keyless = a.settings();
    keyless.config.kind = ProviderKind::Openai;
    keyless.config.api_key_env = Some("TRIAGE_TEST_UNSET_KEY".into());
    let h = harness(vec![keyless, b.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    assert_eq!(a.hits(), 0);
    assert_eq!(out.attempts.len(), 1);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn deadline_bounds_the_whole_call() {
    let a = FaultServer::start(
        "primary",
        vec![delayed(ok("too late"), Duration::from_secs(5))],
    )
    .await
    .unwrap();
    let b = FaultServer::start("secondary", vec![ok("never")])
        .await
        .unwrap();
    let policy = RetryPolicy {
        deadline: Duration::from_millis(300),
        ..policy()
    };
    let h = harness(vec![a.settings(), b.settings()], policy);
    let started = Instant::now();
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(all_failed(&out).kinds(), [ErrorKind::Deadline]);
    assert_eq!(failed_kinds(&out.attempts), [Some(ErrorKind::Deadline)]);
    assert_eq!(b.hits(), 0);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn deadline_during_retries_stops_before_the_next_attempt() {
    // Each 500 comes back after 150 ms; the deadline allows two of them.
    let slow_500 = delayed(status(500), Duration::from_millis(150));
    let a = FaultServer::start(
        "primary",
        vec![slow_500.clone(), slow_500.clone(), slow_500],
    )
    .await
    .unwrap();
    let policy = RetryPolicy {
        deadline: Duration::from_millis(250),
        ..policy()
    };
    let h = harness(vec![a.settings()], policy);
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    assert_eq!(
        all_failed(&out).kinds(),
        [ErrorKind::Server, ErrorKind::Deadline]
    );
    assert!(a.hits() <= 2);
    h.check(&out, &[hits(&a)], 0);
}

#[tokio::test]
async fn moderation_fails_over_and_is_priced_per_request() {
    let moderation = json(
        200,
        serde_json::json!({"id": "modr-1", "model": "omni-moderation-latest",
            "results": [{"flagged": true, "categories": {"hate": true},
                "category_scores": {"hate": 0.91}}]}),
    );
    let a = FaultServer::start("primary", vec![status(502), status(502), status(502)])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![moderation])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let req = ModerationRequest {
        model: String::new(),
        input: vec!["some text".into()],
    };
    let out = h
        .gateway
        .moderate(
            &ctx(),
            &targets(&[
                ("primary", "omni-moderation-latest"),
                ("secondary", "omni-moderation-latest"),
            ]),
            &req,
        )
        .await;
    let response = out.result.as_ref().unwrap();
    assert!(response.results[0].flagged);
    let last = out.attempts.last().unwrap();
    assert_eq!((last.operation, last.cost_usd), ("moderate", 0.001));
    assert_eq!(b.models(), ["omni-moderation-latest"]);
    h.check(&out, &[hits(&a), hits(&b)], 0);
}

#[tokio::test]
async fn transcription_is_retried_and_priced_per_audio_minute() {
    let transcript = json(
        200,
        serde_json::json!({"task": "transcribe", "language": "english",
            "duration": 90.0, "text": "hello there"}),
    );
    let a = FaultServer::start("primary", vec![status(500), transcript])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let req = TranscriptionRequest {
        model: String::new(),
        file_name: "clip.wav".into(),
        audio: vec![0u8; 64],
        language: None,
    };
    let out = h
        .gateway
        .transcribe(&ctx(), &targets(&[("primary", "whisper-1")]), &req)
        .await;
    assert_eq!(out.result.as_ref().unwrap().text, "hello there");
    let last = out.attempts.last().unwrap();
    assert_eq!(last.audio_seconds, 90.0);
    assert!((last.cost_usd - 1.5 * 0.006).abs() < 1e-12);
    h.check(&out, &[hits(&a)], 0);
}

#[tokio::test]
async fn a_stream_is_recorded_when_it_ends_with_the_final_usage() {
    let a = FaultServer::start("primary", vec![sse_ok(&["a", "b", "c"])])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let out = h
        .gateway
        .chat_stream(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    let Outcome { result, attempts } = out;
    assert!(attempts.is_empty());
    let mut stream = result.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().delta, "a");
    assert!(h.sink.records().is_empty(), "not before the end");
    let (rest, error, usage) = drain(stream).await;
    assert_eq!((rest.as_str(), error, usage), ("bc", None, USAGE));
    let records = h.sink.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].usage, USAGE);
    assert!((records[0].cost_usd - 0.0019).abs() < 1e-12);
    let out = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&out, &[hits(&a)], 1);
}

#[tokio::test]
async fn a_stream_dropped_early_is_still_recorded_once() {
    let a = FaultServer::start("primary", vec![sse_ok(&["a", "b"])])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let out = h
        .gateway
        .chat_stream(&ctx(), &targets(&[("primary", "model-a")]), &request())
        .await;
    let Outcome { result, attempts } = out;
    let mut stream = result.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().delta, "a");
    drop(stream);
    let records = h.sink.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].outcome, AttemptOutcome::Answered);
    let out = Outcome {
        result: Ok(()),
        attempts,
    };
    h.check(&out, &[hits(&a)], 1);
}

#[tokio::test]
async fn unknown_provider_and_empty_targets_are_typed_errors() {
    let h = harness(vec![], policy());
    let out = h
        .gateway
        .chat(&ctx(), &targets(&[("ghost", "model-a")]), &request())
        .await;
    assert_eq!(all_failed(&out).kinds(), [ErrorKind::NotFound]);
    let out = h.gateway.chat(&ctx(), &[], &request()).await;
    assert!(all_failed(&out).errors.is_empty());
    assert!(h.sink.records().is_empty());
}

#[tokio::test]
async fn concurrent_calls_share_one_breaker_and_one_sink() {
    let a = FaultServer::start("primary", vec![]).await.unwrap();
    for i in 0..8 {
        a.push(ok(&format!("answer {i}")));
    }
    let h = harness(vec![a.settings()], policy());
    let only_a = targets(&[("primary", "model-a")]);
    let (c, r) = (ctx(), request());
    let calls = (0..8).map(|_| h.gateway.chat(&c, &only_a, &r));
    let outs = futures_util::future::join_all(calls).await;
    assert!(outs.iter().all(|o| o.result.is_ok()));
    let attempts: Vec<Attempt> = outs.into_iter().flat_map(|o| o.attempts).collect();
    assert_eq!(attempts.len(), 8);
    assert_eq!(h.sink.records().len(), 8);
    assert_eq!(a.hits(), 8);
}

/// A call dropped while its request is on the wire (a tier's timeout, a
/// caller gone) may already be billed: its attempt is recorded as
/// cancelled, with the provider and model it went to and no usage.
#[tokio::test]
async fn an_attempt_dropped_on_the_wire_is_recorded_as_cancelled() {
    let a = FaultServer::start(
        "primary",
        vec![delayed(ok("too late"), Duration::from_secs(5))],
    )
    .await
    .unwrap();
    let h = harness(vec![a.settings()], policy());
    let (ctx, targets, request) = (ctx(), targets(&[("primary", "model-a")]), request());
    let call = h.gateway.chat(&ctx, &targets, &request);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err()
    );
    assert_eq!(a.hits(), 1);
    let records = h.sink.records();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(
        (r.provider.as_str(), r.model.as_str()),
        ("primary", "model-a")
    );
    assert_eq!(failed_kinds(&records), [Some(ErrorKind::Cancelled)]);
    assert_eq!(r.usage, Usage::default());
    assert_eq!(r.cost_usd, 0.0);
}

/// A spending gate: dollars left, and each hold's ceiling with what it
/// was settled at (`None`: dropped unsettled, the ceiling counts).
/// Each hold's ceiling and what it was settled at.
type Holds = Arc<Mutex<Vec<(f64, Option<f64>)>>>;

#[derive(Debug)]
struct TestHold {
    index: usize,
    ceiling: f64,
    holds: Holds,
    gate_left: Arc<Mutex<f64>>,
}

#[derive(Debug, Clone, Default)]
struct TestGate(Arc<Mutex<f64>>, Holds);

impl triage_cloud::SpendGate for TestGate {
    fn hold(
        &self,
        charge: triage_cloud::Charge,
    ) -> triage_cloud::spend::BoxFuture<'_, Result<Box<dyn triage_cloud::SpendHold>, String>> {
        Box::pin(async move {
            let mut left = lock(&self.0);
            if charge.ceiling_usd > *left {
                return Err(format!("{} left, {} asked", *left, charge.ceiling_usd));
            }
            *left -= charge.ceiling_usd;
            let mut holds = lock(&self.1);
            holds.push((charge.ceiling_usd, None));
            Ok(Box::new(TestHold {
                index: holds.len() - 1,
                ceiling: charge.ceiling_usd,
                holds: self.1.clone(),
                gate_left: self.0.clone(),
            }) as Box<dyn triage_cloud::SpendHold>)
        })
    }
}

impl triage_cloud::SpendHold for TestHold {
    fn settle(self: Box<Self>, usd: f64) {
        *lock(&self.gate_left) += self.ceiling - usd;
        lock(&self.holds)[self.index].1 = Some(usd);
    }
}

fn gated(left: f64) -> (CallContext, TestGate) {
    let gate = TestGate(Arc::new(Mutex::new(left)), Arc::default());
    let ctx = CallContext {
        gate: Some(Arc::new(gate.clone())),
        ..ctx()
    };
    (ctx, gate)
}

/// `request()` as the gateway sends it: capped at the default.
fn ceiling_of(model_in: f64, model_out: f64) -> f64 {
    let mut req = request();
    req.max_tokens = Some(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS));
    let u = UsageBound::chat(&req).usage(DEFAULT_MAX_TOKENS);
    (u.input_tokens as f64 * model_in + u.output_tokens as f64 * model_out) / 1e6
}

#[tokio::test]
async fn every_attempt_holds_its_ceiling_and_settles_what_it_cost() {
    let usage = Usage {
        input_tokens: 10,
        output_tokens: 20,
        ..Usage::default()
    };
    let a = FaultServer::start("primary", vec![status(500), ok_with("hi", usage)])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let (ctx, gate) = gated(1.0);
    let out = h
        .gateway
        .chat(&ctx, &targets(&[("primary", "model-a")]), &request())
        .await;
    assert_eq!(text(&out), "hi");
    let ceiling = ceiling_of(1.0, 2.0);
    let cost = (10.0 * 1.0 + 20.0 * 2.0) / 1e6;
    // The 500 was not billed; the answer settled at its reported usage.
    let holds = lock(&gate.1).clone();
    assert_eq!(holds.len(), 2);
    assert_eq!(holds[0], (ceiling, Some(0.0)));
    assert!((holds[1].1.unwrap() - cost).abs() < 1e-15);
    assert!((*lock(&gate.0) - (1.0 - cost)).abs() < 1e-12);
}

#[tokio::test]
async fn a_gate_that_refuses_stops_the_call_before_anything_is_sent() {
    let a = FaultServer::start("primary", vec![ok("never")])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("never")])
        .await
        .unwrap();
    let h = harness(vec![a.settings(), b.settings()], policy());
    let (ctx, gate) = gated(ceiling_of(1.0, 2.0) / 2.0);
    let out = h
        .gateway
        .chat(
            &ctx,
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(all_failed(&out).kinds(), [ErrorKind::BudgetExceeded]);
    assert_eq!((a.hits(), b.hits()), (0, 0));
    assert!(out.attempts.is_empty() && lock(&gate.1).is_empty());
}

#[tokio::test]
async fn a_timed_out_attempt_keeps_its_ceiling_and_the_next_holds_its_own() {
    let a = FaultServer::start("primary", vec![delayed(ok("late"), Duration::from_secs(3))])
        .await
        .unwrap();
    let b = FaultServer::start("secondary", vec![ok("from b")])
        .await
        .unwrap();
    let h = harness(
        vec![
            with_timeout(a.settings(), Duration::from_millis(200)),
            b.settings(),
        ],
        RetryPolicy {
            max_attempts: 1,
            ..policy()
        },
    );
    let (ctx, gate) = gated(1.0);
    let out = h
        .gateway
        .chat(
            &ctx,
            &targets(&[("primary", "model-a"), ("secondary", "model-b")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "from b");
    let holds = lock(&gate.1).clone();
    // The timed-out call may have been billed: never settled, its ceiling
    // stays spent. The fallback held model-b's (dearer) ceiling.
    assert_eq!(holds[0], (ceiling_of(1.0, 2.0), None));
    assert_eq!(holds[1].0, ceiling_of(3.0, 6.0));
    assert!(holds[1].1.is_some());
}

#[tokio::test]
async fn an_unpriced_model_is_recorded_at_the_dearest_price_never_zero() {
    let usage = Usage {
        input_tokens: 1000,
        output_tokens: 1000,
        ..Usage::default()
    };
    let a = FaultServer::start("primary", vec![ok_with("hi", usage)])
        .await
        .unwrap();
    let h = harness(vec![a.settings()], policy());
    let out = h
        .gateway
        .chat(
            &ctx(),
            &targets(&[("primary", "model-unpriced")]),
            &request(),
        )
        .await;
    assert_eq!(text(&out), "hi");
    // The table's dearest for this usage: model-b at $3 + $6 per Mtok.
    assert!(
        (out.attempts[0].cost_usd - 0.009).abs() < 1e-12,
        "{:?}",
        out.attempts[0]
    );
    assert_eq!(h.sink.records()[0].cost_usd, out.attempts[0].cost_usd);
}
