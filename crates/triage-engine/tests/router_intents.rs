//! The router's other intent steps: a local classifier whose labels are the
//! routes, and a cheap LLM answering through a JSON schema of the routes.

use crate::support::openai::{FakeOpenAi, Reply};
use crate::support::*;
use triage_engine::{Config, Engine, Input, Overrides};

fn config(toml: &str, dir: &tempfile::TempDir) -> Config {
    let mut c = Config::from_toml(toml, "test.toml", dir.path()).unwrap();
    c.ledger_url = Some(format!(
        "sqlite://{}",
        dir.path().join("ledger.db").display()
    ));
    c
}

#[tokio::test]
async fn a_local_classifier_chooses_the_route() {
    let dir = tempfile::tempdir().unwrap();
    // The toxicity specialist's labels double as routes: abuse goes to a
    // canned reply, everything else to a template with the extracted ticket.
    let toml = r#"
[local.toxicity]
model = "toxicity"

[tasks.inbox]
strategy = "router"
[tasks.inbox.intent]
kind = "local"
local = "toxicity"
default = "not-offensive"
min_score = 0.8
[[tasks.inbox.extract]]
field = "ticket"
regex = "T-(\\d+)"
[tasks.inbox.routes.offensive]
handler = "template"
template = "Please keep it civil."
[tasks.inbox.routes.not-offensive]
handler = "template"
template = "Thanks, ticket {ticket} is logged."
requires = ["ticket"]
"#;
    let engine = Engine::new(config(toml, &dir)).await.unwrap();
    let rude = engine
        .execute(
            "inbox",
            Input::Text("you stupid worthless idiot, fix T-42".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(rude.answer.to_json()["text"], "Please keep it civil.");
    let intent = &rude.trace.tiers[0];
    assert_eq!(
        (intent.tier.as_str(), intent.model.as_str()),
        ("intent", "local/toxicity")
    );
    assert!(intent.score.unwrap() >= 0.8 && intent.cost_usd >= 0.0);
    let polite = engine
        .execute(
            "inbox",
            Input::Text("Hello, the printer in room T-42 is jammed again.".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        polite.answer.to_json()["text"],
        "Thanks, ticket 42 is logged."
    );
    assert_costs_add_up(&polite.trace);
    // A missing required field with no `otherwise` route is a typed error.
    let err = engine
        .execute(
            "inbox",
            Input::Text("Hello, the printer is jammed.".into()),
            &Overrides::default(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ticket"), "{err}");
}

#[tokio::test]
async fn a_cheap_llm_chooses_the_route_through_a_json_schema() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![
        Reply::Chat {
            content: "{\"route\": \"billing\"}".into(),
            prompt_tokens: 40,
            completion_tokens: 5,
        },
        Reply::Chat {
            content: "{\"route\": \"no-such-route\"}".into(),
            prompt_tokens: 40,
            completion_tokens: 6,
        },
    ])
    .await;
    let toml = format!(
        r#"
prices_file = "{prices}"
[providers.openai]
kind = "openai"
api_key_env = "TRIAGE_TEST_UNSET_KEY"
base_url = "{url}"
[tasks.desk]
strategy = "router"
[tasks.desk.intent]
kind = "llm"
provider = "openai"
model = "gpt-4o-mini"
default = "other"
[tasks.desk.routes.billing]
handler = "template"
template = "Billing will reply within a day."
[tasks.desk.routes.other]
handler = "template"
template = "We will get back to you."
"#,
        prices = repo().join("examples/prices.toml").display(),
        url = fake.base_url
    );
    let mut c = config(&toml, &dir);
    point(&mut c, "openai", &fake.base_url);
    let engine = Engine::new(c).await.unwrap();
    let e = engine
        .execute(
            "desk",
            Input::Text("I was charged twice".into()),
            &Overrides::default(),
        )
        .await
        .unwrap();
    assert_eq!(e.answer.to_json()["route"], "billing");
    let body = &fake.seen().chats[0];
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["properties"]["route"]["enum"],
        serde_json::json!(["billing", "other"])
    );
    let intent = &e.trace.tiers[0];
    assert!((intent.cost_usd - (40.0 * 0.15 + 5.0 * 0.60) / 1e6).abs() < 1e-12);
    assert_costs_add_up(&e.trace);
    // An answer outside the routes falls back to the default route.
    let e = engine
        .execute("desk", Input::Text("hello".into()), &Overrides::default())
        .await
        .unwrap();
    assert_eq!(e.answer.to_json()["route"], "other");
    // A forced route skips the intent step.
    let forced = Overrides {
        route: Some("billing".into()),
        ..Overrides::default()
    };
    let e = engine
        .execute("desk", Input::Text("hello".into()), &forced)
        .await
        .unwrap();
    assert_eq!(e.answer.to_json()["route"], "billing");
    assert_eq!(fake.seen().chats.len(), 2);
}

#[tokio::test]
async fn message_and_context_share_one_placeholder_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![Reply::Chat {
        content: "We will write to [EMAIL_2].".into(),
        prompt_tokens: 30,
        completion_tokens: 6,
    }])
    .await;
    let toml = format!(
        r#"
[providers.openai]
kind = "openai"
api_key_env = "TRIAGE_TEST_UNSET_KEY"
base_url = "{url}"
[tasks.desk]
strategy = "router"
redact = ["email"]
[tasks.desk.intent]
kind = "rules"
default = "help"
[[tasks.desk.extract]]
field = "contact"
regex = "reply to (\\S+@\\S+)"
[tasks.desk.routes.help]
handler = "model"
provider = "openai"
model = "gpt-4o-mini"
"#,
        url = fake.base_url
    );
    let mut c = config(&toml, &dir);
    point(&mut c, "openai", &fake.base_url);
    let engine = Engine::new(c).await.unwrap();
    let text = "I am a@example.com but please reply to b@example.org";
    let e = engine
        .execute("desk", Input::Text(text.into()), &Overrides::default())
        .await
        .unwrap();
    let body = fake.seen().chats[0].to_string();
    assert!(!body.contains("@example"), "{body}");
    assert!(
        body.contains("contact: [EMAIL_2]"),
        "the context uses the message's numbering: {body}"
    );
    assert_eq!(
        e.answer.to_json()["text"],
        "We will write to b@example.org."
    );
}
