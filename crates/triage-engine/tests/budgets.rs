//! `[[budgets]]` against a fake OpenAI: a hosted call reserves its estimate
//! and settles what it cost; past the limit it is refused with a typed error
//! naming the budget, a rule-answered task keeps answering, and a restart
//! reads what was spent back from the ledger.

use crate::support::openai::{FakeOpenAi, Reply};
use triage_core::ErrorClass;
use triage_engine::{Config, Engine, EngineError, Input, Overrides};

fn config(base_url: &str, dir: &tempfile::TempDir) -> Config {
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    config_at(base_url, &url, dir)
}

/// The budget test's config with its ledger at `ledger_url`.
pub fn config_at(base_url: &str, ledger_url: &str, dir: &tempfile::TempDir) -> Config {
    let toml = format!(
        r#"
[ledger]
url = "{ledger_url}"

[providers.openai]
kind = "openai"
api_key_env = "TRIAGE_TEST_UNSET_KEY"
base_url = "{base_url}"

[retry]
max_attempts = 1

# $0.001 per output token: a call is estimated at 64 tokens = $0.064 and
# costs 5 tokens = $0.005.
[[price]]
provider = "openai"
model = "gpt-4o-mini"
effective = "2024-01-01"
input_per_mtok = 0.0
output_per_mtok = 1000.0

[[budgets]]
name = "moderation-daily"
period = "day"
usd = 0.075
task = "moderation"

[tasks.moderation]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]

[[tasks.moderation.tiers]]
name = "llm"
provider = "openai"
model = "gpt-4o-mini"
max_tokens = 64

[tasks.faq]
strategy = "router"
[tasks.faq.intent]
kind = "rules"
default = "other"
rules = []
[tasks.faq.routes.other]
handler = "template"
template = "Please write to us."
"#
    );
    let mut c = Config::from_toml(&toml, "budgets.toml", dir.path()).unwrap();
    c.providers.get_mut("openai").unwrap().config.api_key =
        Some(triage_cloud::SecretString::new("sk-test-not-a-real-key"));
    c
}

pub fn chat() -> Reply {
    Reply::Chat {
        content: "{\"toxic\": 0.9}".into(),
        prompt_tokens: 40,
        completion_tokens: 5,
    }
}

pub async fn moderate(engine: &Engine) -> Result<f64, EngineError> {
    engine
        .execute(
            "moderation",
            Input::Text("you idiot".into()),
            &Overrides::default(),
        )
        .await
        .map(|e| e.trace.cost_usd)
}

#[tokio::test]
async fn a_spent_budget_refuses_hosted_calls_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![chat(), chat(), chat(), chat()]).await;
    let engine = Engine::new(config(&fake.base_url, &dir)).await.unwrap();
    // 0 + 0.064, 0.005 + 0.064 and 0.010 + 0.064 fit in 0.075 ...
    for _ in 0..3 {
        let usd = moderate(&engine).await.unwrap();
        assert!((usd - 0.005).abs() < 1e-9, "{usd}");
    }
    // ... 0.015 + 0.064 does not: refused before anything is sent.
    let e = moderate(&engine).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::BudgetExceeded);
    let msg = triage_engine::error::chain(&e);
    assert!(msg.contains("moderation-daily"), "{msg}");
    assert_eq!(fake.seen().chats.len(), 3);
    // A task that costs nothing keeps answering.
    engine
        .execute("faq", Input::Text("hi".into()), &Overrides::default())
        .await
        .unwrap();
    engine.ledger.as_ref().unwrap().flush().await.unwrap();
    drop(engine);

    // A restart reads the day's spending back from the ledger.
    let again = Engine::new(config(&fake.base_url, &dir)).await.unwrap();
    assert!((again.budgets.spent()[0].1 - 0.015).abs() < 1e-9);
    let e = moderate(&again).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::BudgetExceeded);
    assert_eq!(fake.seen().chats.len(), 3);
}

/// Money spent is on disk before the answer is returned: a second
/// connection (another process, or the same file after a kill -9) sees the
/// hosted attempt and its request the moment `execute` returns, without a
/// flush.
#[tokio::test]
async fn a_hosted_answer_is_committed_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![chat()]).await;
    let engine = Engine::new(config(&fake.base_url, &dir)).await.unwrap();
    let done = engine
        .execute(
            "moderation",
            Input::Text("you idiot".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    sqlx::any::install_default_drivers();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let other = sqlx::AnyPool::connect(&url).await.unwrap();
    let count = |table: &str| {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {table} WHERE request_id = $1"
        )))
        .bind(done.request_id.clone())
    };
    let attempts: i64 = sqlx::Row::get(&count("attempts").fetch_one(&other).await.unwrap(), 0);
    let requests: i64 = sqlx::Row::get(&count("requests").fetch_one(&other).await.unwrap(), 0);
    assert_eq!((attempts, requests), (1, 1));
}
