//! A local server that speaks OpenAI's wire format for `/v1/moderations` and
//! `/v1/chat/completions`, answering from a script, so the hosted tiers of
//! the shipped configs run end to end without the internet. It records every
//! request body it receives.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `/moderations`: category scores for the first input.
    Moderation(Vec<(&'static str, f64)>),
    /// `/chat/completions`: this content with this usage (prompt, completion).
    Chat {
        content: String,
        prompt_tokens: u64,
        completion_tokens: u64,
    },
    /// An error status with OpenAI's error body.
    Status(u16),
}

#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub moderations: Vec<Value>,
    pub chats: Vec<Value>,
}

#[derive(Debug, Clone, Default)]
struct Shared {
    script: Arc<Mutex<VecDeque<Reply>>>,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug)]
pub struct FakeOpenAi {
    pub base_url: String,
    shared: Shared,
}

impl FakeOpenAi {
    pub async fn start(script: Vec<Reply>) -> Self {
        let shared = Shared {
            script: Arc::new(Mutex::new(script.into())),
            seen: Arc::default(),
        };
        let app = Router::new()
            .route("/v1/moderations", post(moderations))
            .route("/v1/chat/completions", post(chat))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base_url: format!("http://{addr}/v1"),
            shared,
        }
    }

    /// A copy of what the server has received so far.
    pub fn seen(&self) -> Seen {
        self.shared.seen.lock().unwrap().clone()
    }
}

fn next(shared: &Shared) -> Option<Reply> {
    shared.script.lock().unwrap().pop_front()
}

fn error(status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap();
    let body = json!({"error": {"message": format!("scripted {status}"), "type": "server_error", "param": null, "code": null}});
    (code, axum::Json(body)).into_response()
}

async fn moderations(State(s): State<Shared>, body: axum::Json<Value>) -> Response {
    s.seen.lock().unwrap().moderations.push(body.0.clone());
    match next(&s) {
        Some(Reply::Moderation(scores)) => {
            let mut categories = serde_json::Map::new();
            let mut category_scores = serde_json::Map::new();
            for (c, x) in &scores {
                categories.insert((*c).into(), json!(*x >= 0.5));
                category_scores.insert((*c).into(), json!(x));
            }
            let flagged = scores.iter().any(|(_, x)| *x >= 0.5);
            axum::Json(json!({
                "id": "modr-test",
                "model": "omni-moderation-2024-09-26",
                "results": [{"flagged": flagged, "categories": categories, "category_scores": category_scores}]
            }))
            .into_response()
        }
        Some(Reply::Status(code)) => error(code),
        other => panic!("moderation request but the script says {other:?}"),
    }
}

async fn chat(State(s): State<Shared>, body: axum::Json<Value>) -> Response {
    s.seen.lock().unwrap().chats.push(body.0.clone());
    match next(&s) {
        Some(Reply::Chat { content, prompt_tokens, completion_tokens }) => axum::Json(json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 1_764_000_000,
            "model": body.0["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        }))
        .into_response(),
        Some(Reply::Status(code)) => error(code),
        other => panic!("chat request but the script says {other:?}"),
    }
}
