//! The ledger on PostgreSQL (the `postgres` feature), as several stateless
//! replicas would share it. `scripts/test` starts a throwaway server
//! (`scripts/test-postgres`) and exports `TRIAGE_TEST_POSTGRES_URL`.
#![cfg(feature = "postgres")]

use sqlx::Executor;
use triage_engine::ledger::{AttemptRecord, GroupBy, Ledger, RequestRecord};

/// A fresh database on the test server, so parallel tests do not meet.
async fn fresh_database() -> String {
    let url = std::env::var("TRIAGE_TEST_POSTGRES_URL").expect(
        "TRIAGE_TEST_POSTGRES_URL is not set: run `eval \"$(scripts/test-postgres start)\"` (scripts/test does)",
    );
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&url).await.unwrap();
    let name = format!("triage_test_{}_{}", std::process::id(), rand_suffix());
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

fn attempt(request_id: &str, tier: &str, outcome: &str, cost: f64) -> AttemptRecord {
    AttemptRecord {
        request_id: request_id.into(),
        task: "moderation".into(),
        tier: tier.into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        operation: "chat".into(),
        ts_ms: 1_700_000_000_000,
        input_tokens: 120,
        output_tokens: 8,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
        audio_seconds: 0.0,
        latency_ms: 20.0,
        cost_usd: cost,
        outcome: outcome.into(),
        error: (outcome == "failed").then(|| "Unavailable (HTTP 503)".into()),
    }
}

#[tokio::test]
async fn two_replicas_share_one_ledger() {
    let url = fresh_database().await;
    let a = Ledger::open(&url).await.unwrap();
    // The second replica finds the schema in place and migrates nothing twice.
    let b = Ledger::open(&url).await.unwrap();
    a.record(attempt("r-a", "llm", "failed", 0.0));
    a.record(attempt("r-a", "llm", "answered", 0.0000228));
    b.record(attempt("r-b", "local", "answered", 0.0000004));
    for (ledger, id, tier, cost) in [
        (&a, "r-a", "llm", 0.0000228),
        (&b, "r-b", "local", 0.0000004),
    ] {
        ledger.record_request(RequestRecord {
            request_id: id.into(),
            task: "moderation".into(),
            answered_by: tier.into(),
            model: "m".into(),
            outcome: "answered".into(),
            latency_ms: 30.0,
            cost_usd: cost,
            all_llm_cost_usd: 0.00002,
            caller_id: None,
            key_name: None,
            trace: None,
            input_text: None,
        });
    }
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    // Either replica reads what both wrote.
    let rows = b.attempts("r-a").await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.outcome.as_str()).collect::<Vec<_>>(),
        vec!["failed", "answered"]
    );
    assert_eq!(rows[1], attempt("r-a", "llm", "answered", 0.0000228));
    let by_task = a.summary(0, GroupBy::Task).await.unwrap();
    assert_eq!(by_task.len(), 1);
    let m = &by_task[0];
    assert_eq!(
        (m.requests, m.attempts, m.failed_attempts, m.input_tokens),
        (2, 3, 1, 360)
    );
    assert!((m.cost_usd - 0.0000232).abs() < 1e-12);
    let by_tier = a.summary(0, GroupBy::Tier).await.unwrap();
    assert_eq!(
        by_tier
            .iter()
            .map(|r| (r.key.as_str(), r.requests))
            .collect::<Vec<_>>(),
        vec![("llm", 1), ("local", 1)]
    );
}

#[tokio::test]
async fn the_router_looks_orders_up_in_postgres() {
    use triage_engine::config::Strategy;
    use triage_engine::{Config, Engine, Input, Overrides};
    let url = fresh_database().await;
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    for statement in [
        "CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL, carrier TEXT NOT NULL, eta TEXT NOT NULL, total REAL NOT NULL, refundable INTEGER NOT NULL)",
        "INSERT INTO orders VALUES ('12346', 'out for delivery', 'UPS', 'today', 19.5, 0)",
    ] {
        pool.execute(statement).await.unwrap();
    }
    pool.close().await;
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut config = Config::load(&examples.join("support-router.toml")).unwrap();
    // The ledger goes to the same server: one store for several replicas.
    config.ledger_url = Some(url.clone());
    let Strategy::Router(r) = &mut config.tasks.get_mut("support").unwrap().strategy else {
        panic!()
    };
    r.retrieve.as_mut().unwrap().database = url.clone();
    let engine = Engine::new(config).await.unwrap();
    let e = engine
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
    assert_eq!(e.answer.to_json()["fields"]["total"], "19.5");
    assert_eq!(e.answer.to_json()["fields"]["refundable"], "0");
    let ledger = engine.ledger.as_ref().unwrap();
    ledger.flush().await.unwrap();
    let req = ledger.request(&e.request_id).await.unwrap().unwrap();
    assert_eq!(req.answered_by, "route:order_status");
}

/// Two replicas with the same `[[budgets]]` share one running total in the
/// PostgreSQL ledger: what one spends, the other cannot spend again, even
/// when both reserve at the same moment.
#[tokio::test]
async fn replicas_share_a_budget_in_postgres() {
    use crate::budgets::{chat, config_at, moderate};
    use crate::support::openai::FakeOpenAi;
    use triage_core::ErrorClass;
    let url = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    // Each call is estimated at $0.064 and costs $0.005; the budget is
    // $0.075, so three calls fit one after another (see budgets.rs).
    let fake = FakeOpenAi::start((0..8).map(|_| chat()).collect()).await;
    let a = triage_engine::Engine::new(config_at(&fake.base_url, &url, &dir))
        .await
        .unwrap();
    let b = triage_engine::Engine::new(config_at(&fake.base_url, &url, &dir))
        .await
        .unwrap();
    assert!(a.budgets.is_shared() && b.budgets.is_shared());
    moderate(&a).await.unwrap();
    moderate(&b).await.unwrap();
    // Each replica alone would still see $0.005 spent and allow a call;
    // together $0.010 is spent, so one more fits (0.010 + 0.064 <= 0.075)
    // and then nothing: at most one of two simultaneous calls goes out.
    let (x, y) = tokio::join!(moderate(&a), moderate(&b));
    let refused = [&x, &y].iter().filter(|r| r.is_err()).count();
    assert_eq!(refused, 1, "{x:?} {y:?}");
    for e in [x, y].into_iter().filter_map(Result::err) {
        assert_eq!(e.class(), ErrorClass::BudgetExceeded);
        assert!(triage_engine::error::chain(&e).contains("moderation-daily"));
    }
    let e = moderate(&a).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::BudgetExceeded);
    assert_eq!(fake.seen().chats.len(), 3);
    // The store holds the settled total and no hold is left behind.
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let row =
        sqlx::query("SELECT spent_usd FROM triage_budget_spend WHERE name = 'moderation-daily'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let spent: f64 = sqlx::Row::try_get(&row, 0).unwrap();
    assert!((spent - 0.015).abs() < 1e-9, "{spent}");
    let holds = sqlx::query("SELECT COUNT(*) FROM triage_budget_holds")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sqlx::Row::try_get::<i64, _>(&holds, 0).unwrap(), 0);
}

/// A hold left by a replica that died mid-call counts as spent at its
/// estimate once it expires; until then it is held.
#[tokio::test]
async fn an_expired_hold_counts_as_spent() {
    use crate::budgets::{chat, config_at, moderate};
    use crate::support::openai::FakeOpenAi;
    let url = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start((0..4).map(|_| chat()).collect()).await;
    let a = triage_engine::Engine::new(config_at(&fake.base_url, &url, &dir))
        .await
        .unwrap();
    moderate(&a).await.unwrap();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let day = triage_cloud::prices::PriceTable::today();
    // A replica killed after reserving $0.05, ten minutes ago.
    sqlx::query("INSERT INTO triage_budget_holds (id, name, win, usd, expires_ms) VALUES ('dead', 'moderation-daily', $1, 0.05, 1)")
        .bind(&day)
        .execute(&pool)
        .await
        .unwrap();
    // 0.005 + 0.05 + 0.064 > 0.075: refused, and the hold is now spending.
    assert!(moderate(&a).await.is_err());
    let row =
        sqlx::query("SELECT spent_usd FROM triage_budget_spend WHERE name = 'moderation-daily'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let spent: f64 = sqlx::Row::try_get(&row, 0).unwrap();
    assert!((spent - 0.055).abs() < 1e-9, "{spent}");
}
