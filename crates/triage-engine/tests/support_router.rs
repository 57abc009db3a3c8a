//! End to end: `examples/support-router.toml` with the real NER specialist,
//! a real SQLite order table, llama.cpp's `llama-server` (SmolLM2) as the
//! cheap model and OpenAI's wire format served locally as the strong one.

use crate::support::llama::LlamaServer;
use crate::support::openai::{FakeOpenAi, Reply};
use crate::support::*;
use triage_engine::config::Strategy;
use triage_engine::{Engine, Input, Overrides};

async fn orders_db(dir: &tempfile::TempDir) -> String {
    use sqlx::Executor;
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", dir.path().join("orders.db").display());
    let pool = sqlx::AnyPool::connect(&format!("{url}?mode=rwc"))
        .await
        .unwrap();
    let sql = std::fs::read_to_string(repo().join("examples/orders.sql")).unwrap();
    for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        pool.execute(sqlx::AssertSqlSafe(statement.to_owned()))
            .await
            .unwrap();
    }
    pool.close().await;
    url
}

struct Setup {
    engine: Engine,
    fake: FakeOpenAi,
    _llama: Option<LlamaServer>,
    _dir: tempfile::TempDir,
}

/// `None` only when the test needs llama-server and TRIAGE_SKIP_LLAMA=1.
async fn setup(script: Vec<Reply>, with_llama: bool) -> Option<Setup> {
    let dir = tempfile::tempdir().unwrap();
    let llama = if with_llama {
        Some(
            tokio::task::spawn_blocking(LlamaServer::start)
                .await
                .unwrap()?,
        )
    } else {
        None
    };
    let fake = FakeOpenAi::start(script).await;
    let mut config = example("support-router.toml", &dir);
    point(&mut config, "openai", &fake.base_url);
    if let Some(l) = &llama {
        config
            .providers
            .get_mut("local-llm")
            .unwrap()
            .config
            .base_url = l.base_url();
    }
    let db = orders_db(&dir).await;
    let task = config.tasks.get_mut("support").unwrap();
    let Strategy::Router(r) = &mut task.strategy else {
        panic!("not a router")
    };
    r.retrieve.as_mut().unwrap().database = db;
    Some(Setup {
        engine: Engine::new(config).await.unwrap(),
        fake,
        _llama: llama,
        _dir: dir,
    })
}

#[tokio::test]
async fn refund_request_goes_to_the_cheap_model_with_the_order_in_context() {
    let Some(s) = setup(vec![], true).await else {
        return;
    };
    let e = s
        .engine
        .execute(
            "support",
            Input::Text("My order #12345 hasn't arrived, and I need a refund ASAP".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    let d = decisions(&e.trace);
    assert_eq!(d[0], ("intent".into(), "ran".into()));
    assert!(
        e.trace.tiers[0].reason.starts_with("route=refund"),
        "{}",
        e.trace.tiers[0].reason
    );
    let answered = e.trace.answered_by().unwrap();
    assert_eq!(answered.tier, "route:refund");
    assert!(
        answered.model.starts_with("local-llm/"),
        "{}",
        answered.model
    );
    assert_eq!(e.answer.to_json()["route"], "refund");
    assert_eq!(e.answer.to_json()["fields"]["order_id"], "12345");
    assert_eq!(e.answer.to_json()["fields"]["status"], "delayed in transit");
    assert_eq!(e.answer.to_json()["fields"]["refundable"], "1");
    assert!(
        !e.answer.to_json()["text"]
            .as_str()
            .unwrap()
            .trim()
            .is_empty()
    );
    let retrieve = e.trace.tiers.iter().find(|t| t.tier == "retrieve").unwrap();
    assert_eq!(retrieve.reason, "1 row(s)");
    // The strong model was never called.
    assert!(s.fake.seen().chats.is_empty());
    assert_costs_add_up(&e.trace);
    // The self-hosted model costs nothing per token; the strong one would have.
    assert!(e.trace.all_llm_cost_usd > e.trace.cost_usd);
    let ledger = s.engine.ledger.as_ref().unwrap();
    ledger.flush().await.unwrap();
    let rows = ledger.attempts(&e.request_id).await.unwrap();
    let llm = rows.iter().find(|r| r.provider == "local-llm").unwrap();
    assert!(
        llm.input_tokens > 0 && llm.output_tokens > 0,
        "usage recorded: {llm:?}"
    );
}

#[tokio::test]
async fn order_status_is_answered_by_a_template_without_any_model() {
    let s = setup(vec![], false).await.unwrap();
    let e = s
        .engine
        .execute(
            "support",
            Input::Text("Where is my order #12346?".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        e.answer.to_json()["text"],
        "Order #12346 is out for delivery with UPS; expected delivery today."
    );
    let answered = e.trace.answered_by().unwrap();
    assert_eq!(
        (answered.tier.as_str(), answered.model.as_str()),
        ("route:order_status", "template")
    );
    assert!(s.fake.seen().chats.is_empty());
    assert_costs_add_up(&e.trace);
}

#[tokio::test]
async fn missing_order_number_falls_to_the_strong_model() {
    let s = setup(
        vec![Reply::Chat {
            content: "Could you share your order number?".into(),
            prompt_tokens: 80,
            completion_tokens: 9,
        }],
        false,
    )
    .await
    .unwrap();
    let e = s
        .engine
        .execute(
            "support",
            Input::Text("Where is my order? Mail me at jo@example.org".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        decisions(&e.trace)
            .into_iter()
            .filter(|(t, _)| t.starts_with("route:"))
            .collect::<Vec<_>>(),
        vec![
            ("route:order_status".into(), "escalated".into()),
            ("route:general".into(), "accepted".into())
        ]
    );
    assert_eq!(
        e.answer.to_json()["text"],
        "Could you share your order number?"
    );
    let seen = s.fake.seen();
    assert_eq!(seen.chats[0]["model"], "gpt-4o");
    assert!(!seen.chats[0].to_string().contains("jo@example.org"));
    // gpt-4o: $2.50 / $10.00 per million tokens.
    let expected = 80.0 * 2.5 / 1e6 + 9.0 * 10.0 / 1e6;
    assert!((e.trace.answered_by().unwrap().cost_usd - expected).abs() < 1e-12);
    assert_costs_add_up(&e.trace);
}
