//! The gateway against a real OpenAI-compatible server: llama.cpp's
//! `llama-server` with SmolLM2-135M (installed by scripts/fetch-llama-server),
//! with the SQLite ledger as the attempt sink. SmolLM2 is often wrong on
//! facts, so these tests check shapes, constrained output and accounting.

use crate::support::llama::LlamaServer;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use triage_cloud::gateway::{AttemptSink, CallContext, Gateway, ProviderSettings, Target};
use triage_cloud::prices::PriceTable;
use triage_cloud::retry::RetryPolicy;
use triage_cloud::{ProviderConfig, ProviderKind};
use triage_core::llm::{Answer, ChatRequest, JsonSchema, Message};
use triage_engine::Ledger;

const PRICES: &str = r#"
[[price]]
provider = "llama"
model = "smollm2"
effective = "2024-01-01"
input_per_mtok = 0.5
output_per_mtok = 1.5
"#;

struct Setup {
    gateway: Gateway,
    ledger: Ledger,
    _llama: LlamaServer,
    _dir: tempfile::TempDir,
}

/// `None` only when TRIAGE_SKIP_LLAMA=1 (the helper fails the test when the
/// server is merely missing).
async fn setup() -> Option<Setup> {
    let llama = tokio::task::spawn_blocking(LlamaServer::start)
        .await
        .unwrap()?;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&format!(
        "sqlite://{}",
        dir.path().join("ledger.db").display()
    ))
    .await
    .unwrap();
    let provider = ProviderSettings::new(ProviderConfig {
        name: "llama".into(),
        kind: ProviderKind::OpenaiCompatible,
        base_url: llama.base_url(),
        api_key: None,
        api_key_env: None,
        timeout: Duration::from_secs(60),
    });
    let gateway = Gateway::new(
        vec![provider],
        Arc::new(PriceTable::from_toml_str(PRICES).unwrap()),
        RetryPolicy::default(),
        Some(Arc::new(ledger.clone()) as Arc<dyn AttemptSink>),
    );
    Some(Setup {
        gateway,
        ledger,
        _llama: llama,
        _dir: dir,
    })
}

fn ctx(id: &str) -> CallContext {
    CallContext {
        request_id: id.into(),
        task: "llama".into(),
        tier: "cheap".into(),
        gate: None,
    }
}

fn targets() -> Vec<Target> {
    vec![Target::new("llama", LlamaServer::MODEL)]
}

async fn assert_one_priced_row(s: &Setup, id: &str) -> (i64, i64) {
    s.ledger.flush().await.unwrap();
    let rows = s.ledger.attempts(id).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (r.provider.as_str(), r.outcome.as_str()),
        ("llama", "answered")
    );
    assert!(r.input_tokens > 0 && r.output_tokens > 0, "{r:?}");
    let expected = r.input_tokens as f64 * 0.5 / 1e6 + r.output_tokens as f64 * 1.5 / 1e6;
    assert!(
        (r.cost_usd - expected).abs() < 1e-12,
        "{} vs {expected}",
        r.cost_usd
    );
    (r.input_tokens, r.output_tokens)
}

#[tokio::test]
async fn chat_call_with_usage_in_the_ledger() {
    let Some(s) = setup().await else { return };
    let req = ChatRequest {
        messages: vec![
            Message::system("You are a terse assistant."),
            Message::user("Say hello in three words."),
        ],
        max_tokens: Some(16),
        temperature: Some(0.0),
        top_logprobs: Some(2),
        ..ChatRequest::default()
    };
    let out = s.gateway.chat(&ctx("chat-1"), &targets(), &req).await;
    let resp = out.result.unwrap();
    assert!(!resp.answer.text().unwrap().trim().is_empty());
    assert!(resp.usage.output_tokens > 0 && resp.usage.output_tokens <= 16);
    let lp = resp
        .logprobs
        .expect("llama-server returns logprobs when asked");
    assert!(!lp.is_empty() && lp.iter().all(|t| t.logprob <= 0.0));
    let (input, output) = assert_one_priced_row(&s, "chat-1").await;
    assert_eq!(
        (input as u64, output as u64),
        (resp.usage.input_tokens, resp.usage.output_tokens)
    );
}

#[tokio::test]
async fn json_schema_output_is_enforced() {
    let Some(s) = setup().await else { return };
    let req = ChatRequest {
        messages: vec![Message::user(
            "Rate how toxic this is: 'you are lovely'. Answer as JSON.",
        )],
        max_tokens: Some(40),
        temperature: Some(0.0),
        json_schema: Some(JsonSchema {
            name: "moderation".into(),
            schema: serde_json::json!({
                "type": "object",
                "properties": {"toxic": {"type": "number"}, "reason": {"type": "string", "maxLength": 40}},
                "required": ["toxic", "reason"],
                "additionalProperties": false
            }),
            strict: true,
        }),
        ..ChatRequest::default()
    };
    let resp = s
        .gateway
        .chat(&ctx("json-1"), &targets(), &req)
        .await
        .result
        .unwrap();
    let Answer::Text { text } = &resp.answer else {
        panic!("refusal")
    };
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(v["toxic"].is_number(), "{v}");
    assert!(v["reason"].is_string(), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    assert_one_priced_row(&s, "json-1").await;
}

#[tokio::test]
async fn streamed_call_concatenates_and_records_usage_when_it_ends() {
    let Some(s) = setup().await else { return };
    let req = ChatRequest {
        messages: vec![Message::user("Count from one to five in words.")],
        max_tokens: Some(24),
        temperature: Some(0.0),
        stream: true,
        ..ChatRequest::default()
    };
    let out = s
        .gateway
        .chat_stream(&ctx("stream-1"), &targets(), &req)
        .await;
    assert!(out.attempts.is_empty());
    let mut stream = out.result.unwrap();
    let (mut text, mut chunks, mut usage) = (String::new(), 0, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&chunk.delta);
        chunks += 1;
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    drop(stream);
    assert!(chunks > 2, "{chunks} chunks");
    assert!(!text.trim().is_empty());
    let usage = usage.expect("stream_options.include_usage gives a usage chunk");
    let (input, output) = assert_one_priced_row(&s, "stream-1").await;
    assert_eq!(
        (input as u64, output as u64),
        (usage.input_tokens, usage.output_tokens)
    );
}

#[tokio::test]
async fn a_bad_request_is_a_typed_non_retryable_error() {
    let Some(s) = setup().await else { return };
    // llama-server answers 400 invalid_request_error for a schema it cannot
    // turn into a grammar.
    let req = ChatRequest {
        messages: vec![Message::user("hi")],
        max_tokens: Some(4),
        json_schema: Some(JsonSchema {
            name: "x".into(),
            schema: serde_json::json!({"type": "nonsense"}),
            strict: true,
        }),
        ..ChatRequest::default()
    };
    let out = s.gateway.chat(&ctx("bad-1"), &targets(), &req).await;
    let err = out.result.unwrap_err();
    let last = err.last().unwrap();
    assert_eq!(last.status, Some(400), "{last}");
    assert!(!last.is_retryable());
    assert_eq!(out.attempts.len(), 1, "a 400 is not retried");
}
