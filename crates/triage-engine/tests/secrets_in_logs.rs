//! API keys come from the environment variables a config names and never
//! appear in logs or errors, even when a provider echoes the key back.

use crate::support::*;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::post;
use std::io::Write;
use std::sync::{Arc, Mutex};
use triage_cloud::SecretString;
use triage_engine::{Engine, Input, Overrides};

const KEY: &str = "sk-live-TOPSECRET-0123456789abcdef";

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Answers 401 and echoes whatever credentials it was sent, as a careless
/// proxy might.
async fn echo(headers: HeaderMap, uri: Uri) -> impl IntoResponse {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let body = serde_json::json!({"error": {"message": format!("Incorrect API key provided: {auth} ({uri})"), "type": "invalid_request_error", "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, axum::Json(body))
}

#[tokio::test]
async fn keys_never_reach_logs_or_errors() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = Router::new()
        .route("/v1/moderations", post(echo))
        .route("/v1/chat/completions", post(echo));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let mut config = example("moderation.toml", &dir);
    let p = config.providers.get_mut("openai").unwrap();
    p.config.base_url = format!("http://{addr}/v1");
    p.config.api_key = Some(SecretString::new(KEY));
    let debug_dump = format!("{config:?}");
    let engine = Engine::new(config).await.unwrap();
    let o = Overrides {
        start_tier: Some("hosted-moderation".into()),
        ..Overrides::default()
    };
    let err = engine
        .execute("moderation", Input::Text("hello".into()), &o)
        .await
        .unwrap_err();
    let message = triage_engine::error::chain(&err);
    let debug = format!("{err:?}");
    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();

    assert!(message.contains("Unauthorized"), "{message}");
    assert!(
        logs.contains("every target failed"),
        "the failure is logged: {logs}"
    );
    for (what, text) in [
        ("error", &message),
        ("error debug", &debug),
        ("logs", &logs),
        ("config debug", &debug_dump),
    ] {
        assert!(
            !text.contains("TOPSECRET"),
            "the key leaked into the {what}: {text}"
        );
    }
}
