//! Long inputs: personal data past the NER model's first window is redacted
//! before anything reaches a hosted tier, and an input over
//! `max_input_tokens` is refused before any model or provider runs.

use crate::support::openai::{FakeOpenAi, Reply};
use crate::support::*;
use triage_engine::{Config, Engine, ErrorClass, Input, Overrides};

/// `examples/moderation.toml` with the default NER specialist redacting
/// people too, its ledger in `dir` and OpenAI at `fake`.
async fn engine(fake: &FakeOpenAi, dir: &tempfile::TempDir, extra_local: &str) -> Engine {
    let text = std::fs::read_to_string(repo().join("examples/moderation.toml")).unwrap();
    let text = text
        .replace(
            r#"redact = ["email", "phone", "card"]"#,
            r#"redact = ["email", "phone", "card", "ner:PER"]"#,
        )
        .replace(
            "[local.toxicity]",
            &format!("[local.ner]\nmodel = \"ner\"\n\n[local.toxicity]\n{extra_local}"),
        );
    let mut config = Config::from_toml(&text, "test", &repo().join("examples")).unwrap();
    config.ledger_url = Some(format!(
        "sqlite://{}",
        dir.path().join("ledger.db").display()
    ));
    point(&mut config, "openai", &fake.base_url);
    Engine::new(config).await.unwrap()
}

/// Sixty sentences of filler with a name, an e-mail address and a phone
/// number in the first sentence and again far past the first window.
fn long_text() -> String {
    let mut s = String::from("Maria Garcia opened the meeting and thanked everyone for coming. ");
    for i in 0..60 {
        s.push_str(&format!(
            "Item {i} on the agenda was the budget for the spring campaign and its timeline. "
        ));
        if i == 30 {
            s.push_str("Jonathan Whitaker said to call him at +1 415 555 0134 about it. ");
        }
        if i == 55 {
            s.push_str(
                "Afterwards Priya Raman asked for the notes at priya.raman@example.org today. ",
            );
        }
    }
    s
}

#[tokio::test]
async fn names_emails_and_phones_past_the_first_window_never_leave() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![Reply::Moderation(vec![("harassment", 0.01)])]).await;
    let engine = engine(&fake, &dir, "").await;
    let text = long_text();
    // The NER model sees this text in many windows.
    let ner = engine.specialists.get("ner").unwrap();
    let triage_engine::specialists::Specialist::Tagger { handle, .. } = ner else {
        panic!("ner is a tagger");
    };
    let tagged = handle
        .tag(&text, triage_core::Aggregation::Simple)
        .await
        .unwrap();
    let people: Vec<&str> = tagged
        .entities
        .iter()
        .filter(|e| e.label == "PER")
        .map(|e| e.text.as_str())
        .collect();
    // Past the first window (sentence 30 and 55 of 60), names are found.
    assert!(
        people.iter().any(|p| p.contains("Jonathan"))
            && people
                .iter()
                .any(|p| p.contains("Pri") || p.contains("Raman")),
        "entities past the first window are found: {people:?}"
    );
    let chars: Vec<char> = text.chars().collect();
    for e in &tagged.entities {
        let span: String = chars[e.start..e.end].iter().collect();
        assert_eq!(span, e.text, "offsets index the original string");
    }
    let e = engine
        .execute(
            "moderation",
            Input::Text(text.clone()),
            &Overrides {
                start_tier: Some("hosted-moderation".into()),
                ..Overrides::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(e.trace.answered_by().unwrap().tier, "hosted-moderation");
    let seen = fake.seen();
    assert_eq!(seen.moderations.len(), 1);
    let sent = seen.moderations[0]["input"].to_string();
    for secret in [
        "Maria",
        "Jonathan",
        "Whitaker",
        "Pri",
        "Raman",
        "priya.raman@example.org",
        "555 0134",
    ] {
        assert!(
            !sent.contains(secret),
            "`{secret}` left the machine: {sent}"
        );
    }
    assert!(
        sent.contains("[EMAIL_1]") && sent.contains("[PHONE_1]") && sent.contains("[PER_"),
        "{sent}"
    );
    // The rest of the text is sent as it was.
    assert!(sent.contains("Item 59 on the agenda"), "{sent}");
}

#[tokio::test]
async fn an_input_over_max_input_tokens_is_refused_before_any_tier_runs() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![]).await;
    let engine = engine(&fake, &dir, "max_input_tokens = 256\n").await;
    let err = engine
        .execute(
            "moderation",
            Input::Text(long_text()),
            &Overrides::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::TooLarge);
    let message = triage_engine::error::chain(&err);
    assert!(
        message.contains("256") && message.contains("max_input_tokens"),
        "{message}"
    );
    // Neither hosted tier was paid to try.
    let seen = fake.seen();
    assert!(seen.moderations.is_empty() && seen.chats.is_empty());
    // Within the limit, the same engine answers.
    let ok = engine
        .execute(
            "moderation",
            Input::Text("have a lovely day".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(ok.trace.answered_by().unwrap().tier, "local");
    let local = &ok.trace.tiers[0];
    assert!(
        local.compute_ms.is_some() && local.queue_ms.is_some(),
        "{local:?}"
    );
}

#[tokio::test]
async fn repeat_texts_are_scored_from_the_cache_at_no_cost() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![
        Reply::Moderation(vec![("harassment", 0.01)]),
        Reply::Moderation(vec![("harassment", 0.01)]),
    ])
    .await;
    let engine = engine(&fake, &dir, "cache_entries = 16\n").await;
    let overrides = Overrides::default();
    let run = || {
        engine.execute(
            "moderation",
            Input::Text("Thanks for the  quick reply, see you on Monday!".into()),
            &overrides,
        )
    };
    let first = run().await.unwrap();
    let second = run().await.unwrap();
    let stats = engine.specialists.cache_stats();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0].0, "toxicity");
    assert_eq!((stats[0].1.hits, stats[0].1.misses), (1, 1), "{stats:?}");
    let local = |e: &triage_engine::Execution| e.trace.tiers[0].clone();
    assert_eq!(local(&first).score, local(&second).score);
    assert!(local(&first).cost_usd > 0.0);
    assert_eq!(local(&second).cost_usd, 0.0, "a cache hit runs no model");
}
