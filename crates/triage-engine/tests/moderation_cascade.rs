//! End to end: `examples/moderation.toml` with the real local toxicity
//! specialist, OpenAI's moderation and chat endpoints served locally in their
//! wire format, and the SQLite ledger.

use crate::support::openai::{FakeOpenAi, Reply};
use crate::support::*;
use triage_engine::{Engine, Input, Overrides};

async fn engine(fake: &FakeOpenAi, dir: &tempfile::TempDir) -> Engine {
    let mut config = example("moderation.toml", dir);
    point(&mut config, "openai", &fake.base_url);
    Engine::new(config).await.unwrap()
}

fn text(s: &str) -> Input {
    Input::Text(s.to_owned())
}

#[tokio::test]
async fn confident_local_answer_never_leaves_the_machine() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![]).await;
    let engine = engine(&fake, &dir).await;
    let clean = engine
        .execute(
            "moderation",
            text("Thank you so much, this was a lovely and helpful discussion!"),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        decisions(&clean.trace),
        vec![("local".into(), "accepted".into())]
    );
    assert_eq!(clean.answer.to_json()["flagged"], false);
    let toxic = engine
        .execute(
            "moderation",
            text("you are a stupid worthless idiot"),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(toxic.trace.answered_by().unwrap().tier, "local");
    assert_eq!(toxic.answer.to_json()["flagged"], true);
    assert!(toxic.answer.to_json()["labels"]["toxic"].as_f64().unwrap() >= 0.9);
    assert!(fake.seen().moderations.is_empty() && fake.seen().chats.is_empty());
    for e in [&clean, &toxic] {
        assert_costs_add_up(&e.trace);
        // Local compute is priced, and far below the strongest model alone.
        assert!(e.trace.cost_usd > 0.0);
        assert!(
            e.trace.all_llm_cost_usd > 10.0 * e.trace.cost_usd,
            "{:?}",
            e.trace
        );
    }
}

/// A text the local model is unsure about (checked below), with an e-mail
/// address that must not reach the hosted tiers.
const UNSURE: &str = "that referee was blind and useless today, write to me at fan@example.com";

#[tokio::test]
async fn uncertain_item_is_answered_by_hosted_moderation_with_pii_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![Reply::Moderation(vec![
        ("harassment", 0.93),
        ("violence", 0.99),
        ("hate", 0.1),
    ])])
    .await;
    let engine = engine(&fake, &dir).await;
    let e = engine
        .execute("moderation", text(UNSURE), &Overrides::default())
        .await
        .unwrap();
    assert_eq!(
        decisions(&e.trace),
        vec![
            ("local".into(), "escalated".into()),
            ("hosted-moderation".into(), "accepted".into())
        ]
    );
    let local = &e.trace.tiers[0];
    assert!(local.reason.starts_with("uncertain"), "{}", local.reason);
    let s = local.score.unwrap();
    assert!(s > 0.1 && s < 0.9, "{s}");
    // Only mapped categories count: violence (0.99) is not mapped to `toxic`.
    assert!((e.answer.to_json()["labels"]["toxic"].as_f64().unwrap() - 0.93).abs() < 1e-6);
    assert_eq!(e.answer.to_json()["flagged"], true);
    let seen = fake.seen();
    assert_eq!(seen.moderations.len(), 1);
    let sent = seen.moderations[0]["input"].to_string();
    assert!(
        sent.contains("[EMAIL_1]") && !sent.contains("fan@example.com"),
        "{sent}"
    );
    assert_eq!(seen.moderations[0]["model"], "omni-moderation-latest");
    assert_costs_add_up(&e.trace);
    let ledger = engine.ledger.as_ref().unwrap();
    ledger.flush().await.unwrap();
    let rows = ledger.attempts(&e.request_id).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.tier.as_str(), r.provider.as_str(), r.outcome.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("local", "local", "answered"),
            ("hosted-moderation", "openai", "answered")
        ]
    );
    let req = ledger.request(&e.request_id).await.unwrap().unwrap();
    assert_eq!(req.answered_by, "hosted-moderation");
    assert!((req.cost_usd - e.trace.cost_usd).abs() < 1e-12);
}

#[tokio::test]
async fn still_uncertain_goes_to_the_llm_through_a_json_schema_and_is_priced() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![
        Reply::Moderation(vec![("harassment", 0.5)]),
        Reply::Chat {
            content: "{\"toxic\": 0.12}".into(),
            prompt_tokens: 120,
            completion_tokens: 8,
        },
    ])
    .await;
    let engine = engine(&fake, &dir).await;
    let e = engine
        .execute("moderation", text(UNSURE), &Overrides::default())
        .await
        .unwrap();
    assert_eq!(
        decisions(&e.trace),
        vec![
            ("local".into(), "escalated".into()),
            ("hosted-moderation".into(), "escalated".into()),
            ("llm".into(), "accepted".into())
        ]
    );
    assert_eq!(e.answer.to_json()["flagged"], false);
    let seen = fake.seen();
    let body = &seen.chats[0];
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["required"],
        serde_json::json!(["toxic"])
    );
    assert!(!body.to_string().contains("fan@example.com"));
    // gpt-4o-mini from examples/prices.toml: $0.15 / $0.60 per million tokens.
    let expected = 120.0 * 0.15 / 1e6 + 8.0 * 0.60 / 1e6;
    let llm = &e.trace.tiers[2];
    assert!(
        (llm.cost_usd - expected).abs() < 1e-12,
        "{} vs {expected}",
        llm.cost_usd
    );
    assert_costs_add_up(&e.trace);
    let ledger = engine.ledger.as_ref().unwrap();
    ledger.flush().await.unwrap();
    let rows = ledger.attempts(&e.request_id).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!((rows[2].input_tokens, rows[2].output_tokens), (120, 8));
    assert!((rows[2].cost_usd - expected).abs() < 1e-12);
    let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
    assert!((total - e.trace.cost_usd).abs() < 1e-12);
}

#[tokio::test]
async fn a_failing_tier_escalates_and_every_attempt_is_in_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    // Three 503s use up the moderation tier's retries (3 attempts).
    let fake = FakeOpenAi::start(vec![
        Reply::Status(503),
        Reply::Status(503),
        Reply::Status(503),
        Reply::Chat {
            content: "{\"toxic\": 0.97}".into(),
            prompt_tokens: 100,
            completion_tokens: 6,
        },
    ])
    .await;
    let mut config = example("moderation.toml", &dir);
    point(&mut config, "openai", &fake.base_url);
    config.retry.base_delay = std::time::Duration::from_millis(1);
    config.retry.max_delay = std::time::Duration::from_millis(5);
    let engine = Engine::new(config).await.unwrap();
    let e = engine
        .execute("moderation", text(UNSURE), &Overrides::default())
        .await
        .unwrap();
    assert_eq!(
        decisions(&e.trace),
        vec![
            ("local".into(), "escalated".into()),
            ("hosted-moderation".into(), "failed".into()),
            ("llm".into(), "accepted".into())
        ]
    );
    assert!(
        e.trace.tiers[1].reason.contains("Unavailable"),
        "{}",
        e.trace.tiers[1].reason
    );
    assert_eq!(fake.seen().moderations.len(), 3);
    let ledger = engine.ledger.as_ref().unwrap();
    ledger.flush().await.unwrap();
    let rows = ledger.attempts(&e.request_id).await.unwrap();
    let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        vec!["answered", "failed", "failed", "failed", "answered"]
    );
    assert_costs_add_up(&e.trace);
}

#[tokio::test]
async fn without_a_key_the_needed_tier_fails_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = example("moderation.toml", &dir);
    let p = config.providers.get_mut("openai").unwrap();
    p.config.api_key = None;
    p.config.base_url = "http://127.0.0.1:9/v1".into();
    let engine = Engine::new(config).await.unwrap();
    // The local tier still answers what it is sure of...
    assert!(
        engine
            .execute(
                "moderation",
                text("you are a stupid worthless idiot"),
                &Overrides::default()
            )
            .await
            .is_ok()
    );
    // ...and an uncertain item ends in a typed error naming the variable.
    let err = engine
        .execute("moderation", text(UNSURE), &Overrides::default())
        .await
        .unwrap_err();
    let msg = triage_engine::error::chain(&err);
    assert!(
        matches!(err, triage_engine::EngineError::Cloud { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("OPENAI_API_KEY") && msg.contains("MissingKey"),
        "{msg}"
    );
}

#[tokio::test]
async fn overrides_and_unknown_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![Reply::Chat {
        content: "{\"toxic\": 0.99}".into(),
        prompt_tokens: 50,
        completion_tokens: 5,
    }])
    .await;
    let engine = engine(&fake, &dir).await;
    let o = Overrides {
        start_tier: Some("llm".into()),
        ..Overrides::default()
    };
    let e = engine
        .execute("moderation", text("hello there"), &o)
        .await
        .unwrap();
    assert_eq!(decisions(&e.trace), vec![("llm".into(), "accepted".into())]);
    let err = engine
        .execute("nope", text("x"), &Overrides::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("moderation"), "{err}");
    let bad = Overrides {
        hi: Some(0.2),
        lo: Some(0.8),
        ..Overrides::default()
    };
    assert!(
        engine
            .execute("moderation", text("x"), &bad)
            .await
            .unwrap_err()
            .is_client_error()
    );
    let audio = Input::Audio {
        bytes: vec![1, 2, 3],
        file_name: None,
    };
    assert!(
        engine
            .execute("moderation", audio, &Overrides::default())
            .await
            .unwrap_err()
            .is_client_error()
    );
}

#[tokio::test]
async fn shadow_sampling_sends_accepted_items_on_and_records_agreement() {
    let dir = tempfile::tempdir().unwrap();
    // The hosted tier agrees on the first item and disagrees on the second.
    let fake = FakeOpenAi::start(vec![
        Reply::Moderation(vec![("harassment", 0.97)]),
        Reply::Moderation(vec![("harassment", 0.02)]),
    ])
    .await;
    let engine = engine(&fake, &dir).await;
    let all = Overrides {
        shadow: Some(1.0),
        ..Overrides::default()
    };
    for text_in in [
        "you are a stupid worthless idiot",
        "you are a stupid worthless moron",
    ] {
        let e = engine
            .execute("moderation", text(text_in), &all)
            .await
            .unwrap();
        // The caller's answer does not wait for the shadow call.
        assert_eq!(
            decisions(&e.trace),
            vec![("local".into(), "accepted".into())]
        );
    }
    let ledger = engine.ledger.as_ref().unwrap();
    let mut counts = (0, 0);
    for _ in 0..100 {
        ledger.flush().await.unwrap();
        counts = ledger.shadow_count("moderation").await.unwrap();
        if counts.0 == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(counts, (2, 1), "two shadow checks, one agreeing");
    assert_eq!(fake.seen().moderations.len(), 2);
    // Without the override (2% sampling) nothing is usually sent; with 0 never.
    let none = Overrides {
        shadow: Some(0.0),
        ..Overrides::default()
    };
    engine
        .execute(
            "moderation",
            text("you are a stupid worthless idiot"),
            &none,
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(fake.seen().moderations.len(), 2);
}

#[tokio::test]
async fn shadow_calls_hold_their_ceiling_against_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![
        Reply::Moderation(vec![("harassment", 0.97)]),
        Reply::Moderation(vec![("harassment", 0.97)]),
    ])
    .await;
    let mut config = example("moderation.toml", &dir);
    point(&mut config, "openai", &fake.base_url);
    // Hosted moderation at $0.01 a call under a $0.015 budget: one shadow
    // call fits, the second does not.
    config.prices = std::sync::Arc::new(
        triage_cloud::PriceTable::from_toml_str(
            r#"
[[price]]
provider = "openai"
model = "omni-moderation-latest"
effective = "2024-01-01"
per_request = 0.01
"#,
        )
        .unwrap(),
    );
    config.budgets = vec![triage_engine::budget::BudgetSpec {
        name: "moderation-daily".into(),
        period: triage_engine::budget::Period::Day,
        usd: 0.015,
        task: Some("moderation".into()),
        key: None,
    }];
    let engine = Engine::new(config).await.unwrap();
    let all = Overrides {
        shadow: Some(1.0),
        ..Overrides::default()
    };
    for text_in in [
        "you are a stupid worthless idiot",
        "you are a stupid worthless moron",
    ] {
        engine
            .execute("moderation", text(text_in), &all)
            .await
            .unwrap();
        engine.background.idle().await;
    }
    assert_eq!(
        fake.seen().moderations.len(),
        1,
        "the second shadow call passed the budget"
    );
    let status = engine.budgets.status();
    assert!((status[0].spent_usd - 0.01).abs() < 1e-12, "{status:?}");
}
