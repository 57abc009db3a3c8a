//! The server with a config (`triage serve --config`): router tests through
//! `oneshot` against the strategies engine, whose hosted tiers talk to a small
//! local server that speaks OpenAI's `/moderations` and `/chat/completions`.
//! The local tier is the default toxicity specialist (its base encoder comes
//! from the hub mirror that scripts/test fills).

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tower::ServiceExt;
use triage_server::{AppState, Limits, Peer, router};

/// Harassment score the fake moderation endpoint gives: high for insults.
fn fake_score(text: &str) -> f64 {
    if text.contains("idiot") { 0.95 } else { 0.02 }
}

/// A local OpenAI-compatible server; counts the calls it gets.
async fn fake_openai() -> anyhow::Result<(String, Arc<AtomicUsize>)> {
    let calls = Arc::new(AtomicUsize::new(0));
    let (c1, c2) = (calls.clone(), calls.clone());
    let app = axum::Router::new()
        .route(
            "/v1/moderations",
            post(move |axum::Json(body): axum::Json<Value>| async move {
                c1.fetch_add(1, Ordering::SeqCst);
                let text = body["input"][0].as_str().unwrap_or_default().to_owned();
                let s = fake_score(&text);
                axum::Json(json!({
                    "id": "modr-fake", "model": "omni-moderation-latest",
                    "results": [{"flagged": s > 0.5, "categories": {"harassment": s > 0.5},
                                 "category_scores": {"harassment": s, "violence": 0.01}}]
                }))
            }),
        )
        .route(
            "/v1/chat/completions",
            post(move |axum::Json(_body): axum::Json<Value>| async move {
                c2.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": "mock-chat",
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                                 "message": {"role": "assistant", "content": "Hello from the mock, with a few more words to stream in pieces."}}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
                }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}/v1"), calls))
}

/// The test config. `moderation` always escalates past the local tier (its
/// band is all of 0..1); `moderation_local` always accepts the local answer
/// (an empty band); `moderation_down` escalates to a provider nobody listens
/// on. `chat` first tries that provider too.
/// Config keys read their value from the environment: `CARGO_PKG_NAME` is
/// set by cargo for every test process, so the key is `triage-server`.
fn config_text(base_url: &str, harassment_label: &str, with_chat: bool) -> String {
    let chat_task = if with_chat {
        "chat_task = \"chat\""
    } else {
        ""
    };
    format!(
        r#"
[server]
moderation_task = "moderation"
{chat_task}

[server.categories]
toxic = "{harassment_label}"

[[server.keys]]
name = "moderation-only"
key_env = "CARGO_PKG_NAME"
tasks = ["moderation", "moderation_local"]

[ledger]
disabled = true

[retry]
max_attempts = 1

[compute]
cpu_hour_usd = 0.04

[[price]]
provider = "mock"
model = "omni-moderation-latest"
effective = "2024-01-01"
input_per_mtok = 0.0
output_per_mtok = 0.0
per_request = 0.001

[[price]]
provider = "mock"
model = "mock-chat"
effective = "2024-01-01"
input_per_mtok = 1.0
output_per_mtok = 2.0

[local.toxicity]
model = "toxicity"

[providers.mock]
kind = "openai_compatible"
base_url = "{base_url}"
timeout_ms = 5000

[providers.dead]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"
timeout_ms = 2000

[tasks.moderation]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]
threshold = 0.5
shadow = 0.0

[[tasks.moderation.tiers]]
name = "local"
local = "toxicity"
lo = 0.0
hi = 1.0

[[tasks.moderation.tiers]]
name = "hosted"
provider = "mock"
model = "omni-moderation-latest"
operation = "moderation"
map = {{ harassment = "toxic" }}

[tasks.moderation_local]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]
threshold = 0.5
shadow = 0.0

[[tasks.moderation_local.tiers]]
name = "local"
local = "toxicity"
lo = 0.5
hi = 0.5

[[tasks.moderation_local.tiers]]
name = "hosted"
provider = "mock"
model = "omni-moderation-latest"
operation = "moderation"
map = {{ harassment = "toxic" }}

[tasks.moderation_down]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]
threshold = 0.5
shadow = 0.0

[[tasks.moderation_down.tiers]]
name = "local"
local = "toxicity"
lo = 0.0
hi = 1.0

[[tasks.moderation_down.tiers]]
name = "hosted"
provider = "dead"
model = "omni-moderation-latest"
operation = "moderation"
map = {{ harassment = "toxic" }}

[providers.keyless]
kind = "openai"
api_key_env = "TRIAGE_TEST_KEY_THAT_IS_NEVER_SET"

[tasks.chat_keyless]
strategy = "cascade"
kind = "chat"

[[tasks.chat_keyless.tiers]]
name = "llm"
provider = "keyless"
model = "gpt-4o-mini"

[tasks.chat]
strategy = "cascade"
kind = "chat"

[[tasks.chat.tiers]]
name = "broken"
provider = "dead"
model = "nothing"
hi = 0.5
lo = 0.0

[[tasks.chat.tiers]]
name = "llm"
provider = "mock"
model = "mock-chat"
"#
    )
}

struct Fixture {
    state: Arc<AppState>,
    app: axum::Router,
    config: PathBuf,
    calls: Arc<AtomicUsize>,
    base_url: String,
    _dir: tempfile::TempDir,
}

async fn fixture() -> anyhow::Result<Fixture> {
    let (base_url, calls) = fake_openai().await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("triage.toml");
    std::fs::write(&config, config_text(&base_url, "harassment", true))?;
    let engine = triage_engine::Engine::new(triage_engine::Config::load(&config)?).await?;
    let limits = Limits::default();
    let state = AppState::new(engine, limits, vec![]);
    Ok(Fixture {
        app: router(state.clone()),
        state,
        config,
        calls,
        base_url,
        _dir: dir,
    })
}

async fn call(
    app: &axum::Router,
    req: Request<Body>,
) -> anyhow::Result<(StatusCode, axum::http::HeaderMap, Value)> {
    let resp = app.clone().oneshot(req).await?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((parts.status, parts.headers, v))
}

fn post_json(uri: &str, body: &Value) -> anyhow::Result<Request<Body>> {
    Ok(Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))?)
}

fn over_tcp(mut req: Request<Body>, key: Option<&str>) -> anyhow::Result<Request<Body>> {
    req.extensions_mut()
        .insert(ConnectInfo(Peer::Tcp("127.0.0.1:9".parse()?)));
    if let Some(k) = key {
        req.headers_mut()
            .insert("authorization", format!("Bearer {k}").parse()?);
    }
    Ok(req)
}

fn cost(headers: &axum::http::HeaderMap) -> anyhow::Result<f64> {
    Ok(headers["x-triage-cost-usd"].to_str()?.parse()?)
}

async fn metrics(app: &axum::Router) -> anyhow::Result<String> {
    let (_, _, v) = call(app, Request::get("/metrics").body(Body::empty())?).await?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn moderation_runs_the_cascade_and_maps_labels_to_openai_categories() -> anyhow::Result<()> {
    let f = fixture().await?;
    let (s, h, v) = call(
        &f.app,
        post_json(
            "/v1/moderations",
            &json!({"input": ["you are an idiot", "have a nice day"]}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The local band covers everything: both inputs escalate to the hosted tier.
    assert_eq!(h["x-triage-tier"], "hosted");
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);
    // Two hosted requests at $0.001 plus a little local compute.
    let usd = cost(&h)?;
    assert!((0.002..0.0021).contains(&usd), "{usd}");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    for (r, text) in results.iter().zip(["you are an idiot", "have a nice day"]) {
        let scores = r["category_scores"].as_object().expect("scores");
        let categories = r["categories"].as_object().expect("categories");
        assert_eq!(
            scores.len(),
            triage_server::routes::moderation::OPENAI_CATEGORIES.len()
        );
        assert_eq!(categories.len(), scores.len());
        let want = fake_score(text);
        assert!(
            (scores["harassment"].as_f64().unwrap_or(-1.0) - want).abs() < 1e-6,
            "{r}"
        );
        assert_eq!(categories["harassment"], json!(want >= 0.5), "{r}");
        assert_eq!(r["flagged"], json!(want >= 0.5), "{r}");
        // Unmapped categories are present, false and zero.
        assert_eq!(categories["violence"], json!(false));
        assert_eq!(scores["violence"], json!(0.0));
        assert_eq!(r["triage"]["tier"], "hosted");
    }
    // A configured task named as the model; its empty band lets the local tier answer.
    let (s, h, v) = call(
        &f.app,
        post_json(
            "/v1/moderations",
            &json!({"input": "hello", "model": "moderation_local"}),
        )?,
    )
    .await?;
    assert_eq!(
        (s, &h["x-triage-tier"]),
        (StatusCode::OK, &"local".parse()?),
        "{v}"
    );
    assert_eq!(f.calls.load(Ordering::SeqCst), 2, "no hosted call");
    let local_usd = cost(&h)?;
    assert!(local_usd > 0.0 && local_usd < 0.0001, "{local_usd}");
    // OpenAI's model names mean the moderation task; other names are 404.
    let (s, h, _) = call(
        &f.app,
        post_json(
            "/v1/moderations",
            &json!({"input": "hello", "model": "text-moderation-latest"}),
        )?,
    )
    .await?;
    assert_eq!(
        (s, &h["x-triage-tier"]),
        (StatusCode::OK, &"hosted".parse()?)
    );
    let (s, _, v) = call(
        &f.app,
        post_json("/v1/moderations", &json!({"input": "x", "model": "gpt-9"}))?,
    )
    .await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );

    let m = metrics(&f.app).await?;
    for line in [
        r#"triage_escalations_total{task="moderation",tier="local",reason="uncertain"} 3"#,
        r#"triage_answers_total{task="moderation",tier="hosted"} 3"#,
        r#"triage_answers_total{task="moderation_local",tier="local"} 1"#,
        r#"triage_task_requests_total{task="moderation",outcome="ok"} 3"#,
        r#"triage_task_duration_seconds_count{task="moderation"} 3"#,
        r#"triage_cost_usd_total{task="moderation",tier="hosted"} 0.003"#,
    ] {
        assert!(m.contains(line), "missing {line} in\n{m}");
    }
    assert!(!m.contains(r#"tier="local",reason="error""#), "{m}");
    Ok(())
}

#[tokio::test]
async fn execute_answers_with_the_answer_and_its_trace() -> anyhow::Result<()> {
    let f = fixture().await?;
    let (s, h, v) = call(
        &f.app,
        post_json(
            "/v1/execute",
            &json!({"task": "moderation", "input": "you idiot", "overrides": {"start_tier": "hosted"}}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["answer".to_owned(), "trace".to_owned()])
    );
    assert_eq!(v["answer"]["flagged"], true);
    assert!((v["answer"]["labels"]["toxic"].as_f64().unwrap_or(0.0) - 0.95).abs() < 1e-6);
    let tiers = v["trace"]["tiers"].as_array().expect("tiers");
    assert_eq!(tiers.len(), 1, "start_tier skips the local tier: {v}");
    assert_eq!(tiers[0]["tier"], "hosted");
    assert_eq!(tiers[0]["decision"], "accepted");
    assert!((v["trace"]["cost_usd"].as_f64().unwrap_or(0.0) - 0.001).abs() < 1e-9);
    assert_eq!(h["x-triage-tier"], "hosted");
    assert!(h["x-request-id"].to_str()?.starts_with("req-"));
    // Chat input as an object with messages.
    let (s, _, v) = call(
        &f.app,
        post_json(
            "/v1/execute",
            &json!({"task": "chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["answer"]["text"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Hello from the mock")
    );
    // Typed errors in OpenAI's shape.
    for (body, status) in [
        (json!({"task": "nope", "input": "x"}), StatusCode::NOT_FOUND),
        (
            json!({"task": "moderation", "input": "x", "overrides": {"hi": 2.0}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"task": "moderation", "input": "x", "overrides": {"bogus": 1}}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"task": "moderation", "input": 5}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (s, _, v) = call(&f.app, post_json("/v1/execute", &body)?).await?;
        assert_eq!(s, status, "{body}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    Ok(())
}

#[tokio::test]
async fn a_failed_request_still_counts_its_escalations_and_dollars() -> anyhow::Result<()> {
    let f = fixture().await?;
    let (s, _, v) = call(
        &f.app,
        post_json(
            "/v1/execute",
            &json!({"task": "moderation_down", "input": "have a nice day"}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    let m = metrics(&f.app).await?;
    for line in [
        r#"triage_task_requests_total{task="moderation_down",outcome="error"} 1"#,
        r#"triage_escalations_total{task="moderation_down",tier="local",reason="uncertain"} 1"#,
        r#"triage_escalations_total{task="moderation_down",tier="hosted",reason="error"} 1"#,
    ] {
        assert!(m.contains(line), "{line} missing after {v}:\n{m}");
    }
    assert!(
        !m.contains(r#"triage_answers_total{task="moderation_down""#),
        "nobody answered: {m}"
    );
    // The local tier ran on the CPU before the failure: its compute is spent.
    let local_usd: f64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"triage_cost_usd_total{task="moderation_down",tier="local"} "#)
        })
        .ok_or_else(|| anyhow::anyhow!("no local dollars in:\n{m}"))?
        .parse()?;
    assert!(local_usd > 0.0, "{local_usd}");
    assert_eq!(
        f.calls.load(Ordering::SeqCst),
        0,
        "the live mock was not asked"
    );
    Ok(())
}

#[tokio::test]
async fn a_provider_without_its_key_answers_503_naming_the_variable() -> anyhow::Result<()> {
    let f = fixture().await?;
    let (s, h, v) = call(
        &f.app,
        post_json(
            "/v1/execute",
            &json!({"task": "chat_keyless", "input": "hi"}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "provider_not_configured", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("TRIAGE_TEST_KEY_THAT_IS_NEVER_SET"),
        "the message names the variable: {message}"
    );
    assert!(h.get("retry-after").is_none(), "retrying won't help: {h:?}");
    Ok(())
}

#[tokio::test]
async fn config_keys_are_scoped_to_their_tasks_over_tcp() -> anyhow::Result<()> {
    let f = fixture().await?;
    assert!(f.state.has_keys());
    let key = env!("CARGO_PKG_NAME");
    let moderate = || {
        post_json(
            "/v1/execute",
            &json!({"task": "moderation_local", "input": "hi"}),
        )
    };
    let (s, _, v) = call(&f.app, over_tcp(moderate()?, None)?).await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
    );
    let (s, _, v) = call(&f.app, over_tcp(moderate()?, Some(key))?).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = call(&f.app, over_tcp(moderate()?, Some("wrong"))?).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    // Outside the key's scope: chat, through either route.
    let (s, _, v) = call(
        &f.app,
        over_tcp(
            post_json("/v1/execute", &json!({"task": "chat", "input": "hi"}))?,
            Some(key),
        )?,
    )
    .await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{v}"
    );
    let (s, _, _) = call(
        &f.app,
        over_tcp(
            post_json(
                "/v1/chat/completions",
                &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
            )?,
            Some(key),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // In scope through the OpenAI route too.
    let (s, _, _) = call(
        &f.app,
        over_tcp(
            post_json(
                "/v1/moderations",
                &json!({"input": "hi", "model": "moderation_local"}),
            )?,
            Some(key),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    // A job belongs to whoever submitted it: a `chat` job submitted on the
    // socket is not readable with a TCP key, by any of its routes (404, as
    // for a job that does not exist: its id tells nothing).
    let (content_type, body) = multipart(&[("task", "chat")], ("q.txt", b"hello"));
    let submit = Request::post("/v1/jobs")
        .header("content-type", content_type)
        .body(Body::from(body))?;
    let (s, _, v) = call(&f.app, submit).await?;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    assert!(id.len() > 24, "ids carry random bits: {id}");
    for path in [
        format!("/v1/jobs/{id}"),
        format!("/v1/jobs/{id}/result"),
        format!("/v1/jobs/{id}/events"),
    ] {
        let req = over_tcp(Request::get(&path).body(Body::empty())?, Some(key))?;
        let (s, _, v) = call(&f.app, req).await?;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
    }
    let (s, _, _) = call(
        &f.app,
        Request::get(format!("/v1/jobs/{id}")).body(Body::empty())?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn chat_completions_plain_and_streamed() -> anyhow::Result<()> {
    let f = fixture().await?;
    let text = "Hello from the mock, with a few more words to stream in pieces.";
    let (s, h, v) = call(
        &f.app,
        post_json(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o-mini", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "temperature": 0.2, "max_completion_tokens": 50}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert!(
        v["id"]
            .as_str()
            .unwrap_or_default()
            .starts_with("chatcmpl-")
    );
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], text);
    assert_eq!(v["choices"][0]["message"]["refusal"], Value::Null);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        (
            &v["usage"]["prompt_tokens"],
            &v["usage"]["completion_tokens"],
            &v["usage"]["total_tokens"]
        ),
        (&json!(12), &json!(5), &json!(17))
    );
    assert_eq!(h["x-triage-tier"], "llm");
    // 12 input tokens at $1/M and 5 output at $2/M.
    assert!(
        (cost(&h)? - 22e-6).abs() < 1e-9,
        "{:?}",
        h["x-triage-cost-usd"]
    );
    let m = metrics(&f.app).await?;
    assert!(
        m.contains(r#"triage_escalations_total{task="chat",tier="broken",reason="error"} 1"#),
        "{m}"
    );

    // Streamed, with usage: role chunk, content chunks, finish, usage, [DONE].
    let resp = f
        .app
        .clone()
        .oneshot(post_json(
            "/v1/chat/completions",
            &json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                    "stream": true, "stream_options": {"include_usage": true}}),
        )?)
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-triage-tier"], "llm");
    let body = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d))
        .collect::<Result<_, _>>()?;
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "chat")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, text);
    assert!(
        chunks.len() >= 5,
        "the answer comes in several pieces: {body}"
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("stop")]);
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["total_tokens"], 17);
    Ok(())
}

#[tokio::test]
async fn reload_swaps_the_engine_and_a_bad_config_keeps_the_old_one() -> anyhow::Result<()> {
    let f = fixture().await?;
    let score = |v: &Value, c: &str| {
        v["results"][0]["category_scores"][c]
            .as_f64()
            .map(|x| (x * 1e4).round() / 1e4)
    };
    let harassment = |v: &Value| score(v, "harassment");
    let ask = || post_json("/v1/moderations", &json!({"input": "you idiot"}));
    let (_, _, v) = call(&f.app, ask()?).await?;
    assert_eq!(harassment(&v), Some(0.95));
    // A request in flight holds the engine it started with.
    let in_flight = f.state.engine.current();

    // toxic → hate, and no chat task: the specialists are reused.
    std::fs::write(&f.config, config_text(&f.base_url, "hate", false))?;
    let reloaded = f.state.reload(&f.config).await?;
    assert!(reloaded.reused_specialists);
    let (_, _, v) = call(&f.app, ask()?).await?;
    assert_eq!(harassment(&v), Some(0.0), "{v}");
    assert_eq!(score(&v, "hate"), Some(0.95));
    let (s, _, v) = call(
        &f.app,
        post_json(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
        )?,
    )
    .await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    assert_eq!(in_flight.config.server.categories["toxic"], "harassment");
    assert!(in_flight.config.server.chat_task.is_some());

    // Not TOML, then valid TOML naming an unknown specialist: both refused, the hate mapping stays.
    std::fs::write(&f.config, "this is [not toml")?;
    assert!(matches!(
        f.state.reload(&f.config).await,
        Err(triage_server::ReloadError::Config(_))
    ));
    let broken = config_text(&f.base_url, "violence", true)
        .replace("local = \"toxicity\"", "local = \"missing\"");
    std::fs::write(&f.config, broken)?;
    let err = f
        .state
        .reload(&f.config)
        .await
        .expect_err("unknown specialist");
    assert!(
        triage_engine::error::chain(&err).contains("missing"),
        "{err}"
    );
    let (_, _, v) = call(&f.app, ask()?).await?;
    assert_eq!(score(&v, "hate"), Some(0.95));
    assert_eq!(f.state.config_path().as_deref(), Some(f.config.as_path()));
    Ok(())
}

fn shared_dir() -> PathBuf {
    std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn multipart(fields: &[(&str, &str)], file: (&str, &[u8])) -> (String, Vec<u8>) {
    let boundary = "triage-test-boundary";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n", file.0).as_bytes());
    body.extend(file.1);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Whisper from the config: `/v1/audio/transcriptions` uses the transcription
/// task's model, `/v1/execute` takes the audio as multipart, and a job with a
/// `task` runs the pipeline in the background.
#[tokio::test]
async fn audio_tasks_through_transcriptions_execute_and_jobs() -> anyhow::Result<()> {
    let whisper = shared_dir().join("models/whisper-tiny.en/ggml-model-f16.bin");
    if !whisper.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "Whisper model missing at {}",
            whisper.display()
        );
        eprintln!("SKIPPED: no Whisper model at {}", whisper.display());
        return Ok(());
    }
    let audio = std::fs::read(shared_dir().join("data/speech/goforward.wav"))?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("notes.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
transcription_task = "notes"
[ledger]
disabled = true
[local.whisper]
model = "{}"
kind = "whisper"
threads = 2
[tasks.notes]
strategy = "pipeline"
[[tasks.notes.stages]]
name = "transcribe"
kind = "transcribe"
local = "whisper"
[[tasks.notes.stages]]
name = "action_items"
kind = "action_items"
"#,
            whisper.display()
        ),
    )?;
    let engine = triage_engine::Engine::new(triage_engine::Config::load(&config)?).await?;
    let limits = Limits::default();
    let state = AppState::new(engine, limits, vec![]);
    let app = router(state);
    let form = |fields: &[(&str, &str)], uri: &str| -> anyhow::Result<Request<Body>> {
        let (ct, body) = multipart(fields, ("clip.wav", &audio));
        Ok(Request::post(uri)
            .header("content-type", ct)
            .body(Body::from(body))?)
    };
    let (s, _, v) = call(
        &app,
        form(
            &[("model", "whisper-1"), ("response_format", "text")],
            "/v1/audio/transcriptions",
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v.as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("forward"),
        "{v}"
    );

    let (s, _, v) = call(&app, form(&[("task", "notes")], "/v1/execute")?).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["answer"].is_object() && v["trace"]["tiers"].is_array(),
        "{v}"
    );
    assert!(v.to_string().to_lowercase().contains("forward"), "{v}");

    let (s, _, v) = call(&app, form(&[("task", "notes")], "/v1/jobs")?).await?;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().expect("id").to_owned();
    let mut done = Value::Null;
    for _ in 0..600 {
        let (_, _, v) = call(
            &app,
            Request::get(format!("/v1/jobs/{id}")).body(Body::empty())?,
        )
        .await?;
        if v["status"] == "succeeded" || v["status"] == "failed" {
            done = v;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["task"], "notes");
    let (s, _, v) = call(
        &app,
        Request::get(format!("/v1/jobs/{id}/result")).body(Body::empty())?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    assert!(v["answer"].is_object() && v["trace"].is_object(), "{v}");
    // An unknown task is still refused up front.
    let (s, _, _) = call(&app, form(&[("task", "nope")], "/v1/jobs")?).await?;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    Ok(())
}

/// A rule-answered task with a small ledger queue: when the database stops
/// taking rows, the queue fills, `/ready` and `/metrics` say so, and new
/// requests get a 503 with Retry-After instead of being buffered; when it
/// takes rows again, everything queued is written and requests are answered.
#[tokio::test]
async fn a_failing_ledger_sheds_load_with_503_and_recovers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("ledger.db");
    let config = dir.path().join("triage.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[ledger]
url = "sqlite://{}"
max_pending = 2
admit_wait_ms = 50

[tasks.faq]
strategy = "router"
[tasks.faq.intent]
kind = "rules"
default = "other"
rules = []
[tasks.faq.routes.other]
handler = "template"
template = "Please write to us."
"#,
            db.display()
        ),
    )?;
    let engine = triage_engine::Engine::new(triage_engine::Config::load(&config)?).await?;
    let app = router(AppState::new(engine, Limits::default(), vec![]));
    let ask = || {
        post_json(
            "/v1/execute",
            &json!({"task": "faq", "input": "hi", "overrides": {"request_id": "same"}}),
        )
    };
    let (s, h, _) = call(&app, ask()?).await?;
    assert_eq!(s, StatusCode::OK);
    let first_id = h["x-request-id"].to_str()?.to_owned();
    // Its row is committed within the group-commit interval.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, _, v) = call(&app, Request::get("/ready").body(Body::empty())?).await?;
        if v["ledger"]["written"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    sqlx::any::install_default_drivers();
    let other = sqlx::AnyPool::connect(&format!("sqlite://{}", db.display())).await?;
    sqlx::query("ALTER TABLE requests RENAME TO requests_away")
        .execute(&other)
        .await?;
    // Two requests fill the queue (their rows cannot be written) ...
    for _ in 0..2 {
        let (s, _, v) = call(&app, ask()?).await?;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    // ... and the next is refused after its short wait, before it runs.
    let (s, h, v) = call(&app, ask()?).await?;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "ledger_backlog", "{v}");
    assert!(h.contains_key("retry-after"));
    let (s, _, v) = call(&app, Request::get("/ready").body(Body::empty())?).await?;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["ledger"]["pending"], 2, "{v}");
    assert!(v["ledger"]["failing"].is_string(), "{v}");
    let m = metrics(&app).await?;
    assert!(m.contains("triage_ledger_failing 1"), "{m}");
    assert!(m.contains("triage_ledger_refused_requests_total 1"), "{m}");
    assert!(m.trim_end().ends_with("# EOF"), "{m}");

    sqlx::query("ALTER TABLE requests_away RENAME TO requests")
        .execute(&other)
        .await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (s, _, _) = call(&app, Request::get("/ready").body(Body::empty())?).await?;
        if s == StatusCode::OK {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the ledger did not recover"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (s, h, _) = call(&app, ask()?).await?;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(
        h["x-request-id"].to_str()?,
        first_id,
        "ids are the server's"
    );
    // Every answered request is in the ledger, each under its own id, all
    // tagged with the caller's (reused) id.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let row: (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(DISTINCT request_id) FROM requests WHERE caller_id = 'same'",
        )
        .fetch_one(&other)
        .await?;
        if row == (4, 4) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "rows: {row:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}
