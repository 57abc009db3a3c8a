//! `triage audit` and `triage calibrate` end to end (interfaces used by
//! acceptance checks): the real default toxicity specialist on a slice of the
//! shared tweeteval-offensive validation set, offline and live against a
//! local fake of OpenAI's chat endpoint (answer cache, spending cap), the
//! band written back with toml_edit, shadow agreement from the ledger, and
//! bad input refused before any work.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn val_slice(n: usize) -> Option<String> {
    let shared = std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let path = shared.join("data/toxicity/tweeteval-offensive/val.jsonl");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.lines().take(n).map(|l| format!("{l}\n")).collect()),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must provide the shared tweeteval data"
            );
            eprintln!("SKIPPED: no shared tweeteval data at {}", path.display());
            None
        }
    }
}

fn triage(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_triage"));
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_out(out: &Output) -> Result<Value> {
    assert!(out.status.success(), "{}", stderr(out));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A moderation cascade: the default toxicity specialist, then hosted
/// moderation and an LLM (the shipped example's shape and prices).
fn moderation_config(dir: &Path) -> Result<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::copy(repo.join("examples/prices.toml"), dir.join("prices.toml"))?;
    let text = std::fs::read_to_string(repo.join("examples/moderation.toml"))?
        .replace("[ledger]", "[ledger]\ndisabled = true");
    let path = dir.join("moderation.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

const CONFIG_WITHOUT_MODEL: &str = r#"# a comment that must survive
[ledger]
disabled = true

[local.toxicity]
model = "./no-such-model"   # never loaded: every check below comes first

[providers.openai]
kind = "openai"
api_key_env = "OPENAI_API_KEY"

[tasks.moderation]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]

[[tasks.moderation.tiers]]
name = "local"
local = "toxicity"
lo = 0.2
hi = 0.8

[[tasks.moderation.tiers]]
name = "llm"
provider = "openai"
model = "gpt-4o-mini"
"#;

#[test]
fn offline_audit_matches_the_local_scores_and_prices_the_rest() -> Result<()> {
    let Some(data) = val_slice(150) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = moderation_config(dir.path())?;
    let data_path = dir.path().join("val.jsonl");
    std::fs::write(&data_path, &data)?;
    let html = dir.path().join("report.html");
    let out = triage(
        &[
            "audit",
            "--config",
            config.to_str().unwrap(),
            "--task",
            "moderation",
            "--data",
            data_path.to_str().unwrap(),
            "--offline",
            "--hosted-accuracy",
            "0.9",
            "--json",
            "--out",
            html.to_str().unwrap(),
        ],
        &[],
    )?;
    let r = json_out(&out)?;
    assert_eq!(String::from_utf8(out.stdout.clone())?.lines().count(), 1);
    for key in [
        "n",
        "task",
        "tiers",
        "accuracy",
        "assumptions",
        "cost_per_100k_usd",
        "all_llm_cost_per_100k_usd",
        "savings_pct",
        "frontier",
    ] {
        assert!(r.get(key).is_some(), "no `{key}` in {r}");
    }
    assert_eq!(r["n"], 150);
    assert_eq!(r["task"], "moderation");

    // The same items scored independently with `triage moderate`, then the
    // cascade's rule applied by hand: accept outside (0.2, 0.8).
    let out = triage(
        &[
            "moderate",
            "--model",
            "toxicity",
            "--file",
            data_path.to_str().unwrap(),
        ],
        &[],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let gold: Vec<bool> = data
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["label"] == 1)
        .collect();
    let (mut accepted, mut correct) = (0usize, 0usize);
    for (line, g) in String::from_utf8(out.stdout)?.lines().zip(&gold) {
        let p = f(&serde_json::from_str::<Value>(line)?["scores"]["offensive"]);
        if p <= 0.2 || p >= 0.8 {
            accepted += 1;
            correct += usize::from((p >= 0.5) == *g);
        }
    }
    let tiers = r["tiers"].as_array().context("tiers")?;
    assert_eq!(tiers.len(), 3);
    let local = &tiers[0];
    assert_eq!(local["tier"], "local");
    assert!(
        (f(&local["share"]) - accepted as f64 / 150.0).abs() < 1e-9,
        "{local}"
    );
    assert!((f(&local["accuracy"]) - correct as f64 / accepted as f64).abs() < 1e-9);
    assert!(
        f(&local["latency_ms_p50"]) > 0.0
            && f(&local["latency_ms_p99"]) >= f(&local["latency_ms_p50"])
    );
    // Offline, escalated items are answered by the last tier at the stated accuracy.
    let last = &tiers[2];
    assert!((f(&last["share"]) - (150 - accepted) as f64 / 150.0).abs() < 1e-9);
    assert!((f(&last["accuracy"]) - 0.9).abs() < 1e-12);
    assert!(last["latency_ms_p50"].is_null());
    let overall = (correct as f64 + 0.9 * (150 - accepted) as f64) / 150.0;
    assert!((f(&r["accuracy"]) - overall).abs() < 1e-9);
    assert!(
        r["assumptions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("hosted accuracy 0.9"))
    );
    // gpt-4o-mini for every item costs more than the cascade.
    let cost = f(&r["cost_per_100k_usd"]);
    let all = f(&r["all_llm_cost_per_100k_usd"]);
    assert!(cost > 0.0 && cost < all, "{cost} vs {all}");
    assert!((f(&r["savings_pct"]) - 100.0 * (1.0 - cost / all)).abs() < 1e-6);
    let sum: f64 = tiers.iter().map(|t| f(&t["cost_usd"])).sum();
    assert!((sum / 150.0 * 100_000.0 - cost).abs() < 1e-6);

    // The frontier re-scores the same run: its point for the configured band
    // is the audit itself, and a wider band never answers more locally.
    let frontier = r["frontier"].as_array().context("frontier")?;
    assert!(frontier.len() >= 100);
    let at = |lo: f64, hi: f64| {
        frontier
            .iter()
            .find(|p| f(&p["lo"]) == lo && f(&p["hi"]) == hi)
            .unwrap_or_else(|| panic!("no band {lo}-{hi}"))
    };
    assert!((f(&at(0.2, 0.8)["local_share"]) - f(&local["share"])).abs() < 1e-12);
    assert!((f(&at(0.2, 0.8)["cost_per_100k_usd"]) - cost).abs() < 1e-9);
    assert!(f(&at(0.1, 0.9)["local_share"]) <= f(&at(0.2, 0.8)["local_share"]));
    assert_eq!(f(&at(0.5, 0.5)["local_share"]), 1.0);

    let page = std::fs::read_to_string(&html)?;
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<svg"));
    assert!(page.contains("class=\"chosen\"") && page.contains("gpt-4o-mini"));
    assert!(
        !page.contains("src=") && !page.contains("<link"),
        "self-contained"
    );
    Ok(())
}

#[test]
fn png_report_like_eval() -> Result<()> {
    let Some(data) = val_slice(40) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = moderation_config(dir.path())?;
    let data_path = dir.path().join("val.jsonl");
    std::fs::write(&data_path, &data)?;
    let png = dir.path().join("frontier.png");
    let out = triage(
        &[
            "audit",
            "--config",
            config.to_str().unwrap(),
            "--task",
            "moderation",
            "--data",
            data_path.to_str().unwrap(),
            "--sample",
            "30",
            "--out",
            png.to_str().unwrap(),
        ],
        &[],
    )?;
    let r = json_out(&out)?;
    assert_eq!(r["n"], 30);
    assert_eq!(r["mode"], "offline");
    assert!(std::fs::read(&png)?.starts_with(b"\x89PNG\r\n\x1a\n"));
    Ok(())
}

#[test]
fn calibrate_meets_the_target_writes_the_band_and_audit_agrees() -> Result<()> {
    let Some(data) = val_slice(200) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = moderation_config(dir.path())?;
    let before = std::fs::read_to_string(&config)?;
    let data_path = dir.path().join("val.jsonl");
    std::fs::write(&data_path, &data)?;
    let c = config.to_str().unwrap();
    let d = data_path.to_str().unwrap();
    let out = triage(
        &[
            "calibrate",
            "--config",
            c,
            "--task",
            "moderation",
            "--tier",
            "local",
            "--data",
            d,
            "--target-accuracy",
            "0.9",
            "--write",
            "--json",
        ],
        &[],
    )?;
    let cal = json_out(&out)?;
    for key in ["tier", "lo", "hi", "local_share", "local_accuracy", "ci95"] {
        assert!(cal.get(key).is_some(), "no `{key}` in {cal}");
    }
    let (lo, hi) = (f(&cal["lo"]), f(&cal["hi"]));
    assert!(lo <= hi && (0.0..=0.5).contains(&lo) && (0.5..=1.0).contains(&hi));
    let acc = f(&cal["local_accuracy"]);
    let share = f(&cal["local_share"]);
    // The default rule: the one-sided 95% lower bound reaches the target.
    let accepted = share * 200.0;
    assert!(
        acc - 1.645 * (acc * (1.0 - acc) / accepted).sqrt() >= 0.9,
        "{cal}"
    );
    let ci = &cal["ci95"];
    assert!(f(&ci["local_accuracy"][0]) <= acc && acc <= f(&ci["local_accuracy"][1]));
    assert!(f(&ci["local_share"][0]) <= share && share <= f(&ci["local_share"][1]));

    // Written in place: comments and layout kept, a .bak of the original.
    let after = std::fs::read_to_string(&config)?;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("moderation.toml.bak"))?,
        before
    );
    for comment in [
        "# On tweeteval-offensive validation this band",
        "# Nothing personal leaves the machine in clear.",
    ] {
        assert!(after.contains(comment), "lost `{comment}`:\n{after}");
    }
    assert!(
        after.contains(&format!("lo = {lo}\nhi = {hi}\ncalibrated_accuracy = ")),
        "{after}"
    );
    // Only the local tier changed: hosted moderation keeps its own band.
    assert_eq!(
        after.matches("lo = 0.2\n").count(),
        before.matches("lo = 0.2\n").count() - usize::from(lo != 0.2)
    );
    let check = triage(&["config", "check", c], &[])?;
    assert!(check.status.success(), "{}", stderr(&check));

    // Auditing the written band on the same data finds the same figures.
    let out = triage(
        &[
            "audit",
            "--config",
            c,
            "--task",
            "moderation",
            "--data",
            d,
            "--json",
        ],
        &[],
    )?;
    let r = json_out(&out)?;
    assert_eq!(f(&r["band"]["lo"]), lo);
    assert_eq!(f(&r["band"]["hi"]), hi);
    assert!((f(&r["tiers"][0]["share"]) - share).abs() < 1e-12);
    assert!((f(&r["tiers"][0]["accuracy"]) - acc).abs() < 1e-12);

    // Other targets, and a target the data cannot reach.
    let out = triage(
        &[
            "calibrate",
            "--config",
            c,
            "--task",
            "moderation",
            "--tier",
            "local",
            "--data",
            d,
            "--target-local-share",
            "0.7",
            "--sample",
            "80",
        ],
        &[],
    )?;
    assert!(f(&json_out(&out)?["local_share"]) >= 0.7);
    let out = triage(
        &[
            "calibrate",
            "--config",
            c,
            "--task",
            "moderation",
            "--tier",
            "local",
            "--data",
            d,
            "--target-accuracy",
            "0.999",
            "--sample",
            "80",
        ],
        &[],
    )?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("no band reaches local accuracy 0.999"),
        "{err}"
    );
    let out = triage(
        &[
            "calibrate",
            "--config",
            c,
            "--task",
            "moderation",
            "--tier",
            "local",
            "--data",
            d,
            "--target-accuracy",
            "0.9",
            "--margin",
            "0.0",
            "--sample",
            "80",
            "--json",
        ],
        &[],
    )?;
    let fixed = json_out(&out)?;
    assert!(f(&fixed["local_accuracy"]) >= 0.9);
    assert!(fixed["rule"].as_str().unwrap().contains("+ 0"));
    assert!(
        err.contains("the best this data allows is local accuracy"),
        "{err}"
    );
    Ok(())
}

/// Run `triage` with `args` against CONFIG_WITHOUT_MODEL; the failure must
/// be ours, not the missing model's, and leave the config untouched.
fn refused(dir: &Path, args: &[&str], data: &str, want: &str) -> Result<()> {
    let config = dir.join("c.toml");
    std::fs::write(&config, CONFIG_WITHOUT_MODEL)?;
    let data_path = dir.join("d.jsonl");
    std::fs::write(&data_path, data)?;
    let mut full: Vec<&str> = args.to_vec();
    let (c, d) = (config.to_str().unwrap(), data_path.to_str().unwrap());
    full.extend(["--config", c, "--data", d]);
    if !args.contains(&"--task") {
        full.extend(["--task", "moderation"]);
    }
    let out = triage(&full, &[])?;
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = stderr(&out);
    assert!(err.contains(want), "{args:?}: wanted `{want}` in {err}");
    assert!(
        !err.contains("no-such-model"),
        "the model was loaded first: {err}"
    );
    assert_eq!(std::fs::read_to_string(&config)?, CONFIG_WITHOUT_MODEL);
    Ok(())
}

#[test]
fn bad_input_is_refused_before_any_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ok = "{\"text\": \"hello\", \"label\": 0}\n";
    let audit = ["audit"];
    let cal = ["calibrate", "--tier", "local", "--target-accuracy", "0.9"];
    refused(
        d,
        &audit,
        "{\"text\": \"x\", \"label\": \"spam\"}\n",
        "label `spam` is not one of the task's labels (toxic)",
    )?;
    refused(
        d,
        &cal,
        "{\"text\": \"x\", \"label\": [\"toxic\", \"spam\"]}\n",
        "label `spam`",
    )?;
    refused(d, &audit, "{\"text\": \"x\", \"label\": 2}\n", "line 1")?;
    refused(d, &audit, "", "has no labelled items")?;
    refused(d, &cal, "\n\n", "has no labelled items")?;
    refused(
        d,
        &["calibrate", "--tier", "lokal", "--target-accuracy", "0.9"],
        ok,
        "task `moderation` has no tier `lokal`; its tiers are: local, llm",
    )?;
    refused(
        d,
        &["calibrate", "--tier", "llm", "--target-accuracy", "0.9"],
        ok,
        "is the last tier (it always answers)",
    )?;
    refused(d, &["audit", "--task", "nope"], ok, "unknown task `nope`")?;
    refused(d, &["audit", "--out", "r.pdf"], ok, ".html, .png or .json")?;

    // A --write target whose .bak cannot be replaced (a folder in the way):
    // refused even for root, before the model loads.
    std::fs::create_dir_all(d.join("c.toml.bak"))?;
    refused(
        d,
        &[
            "calibrate",
            "--tier",
            "local",
            "--target-accuracy",
            "0.9",
            "--write",
        ],
        ok,
        "cannot write",
    )?;
    std::fs::remove_dir(d.join("c.toml.bak"))?;
    // A read-only config (meaningful where permissions apply, i.e. not root).
    let config = d.join("c.toml");
    std::fs::write(&config, CONFIG_WITHOUT_MODEL)?;
    let mut perms = std::fs::metadata(&config)?.permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&config, perms.clone())?;
    let root = std::fs::OpenOptions::new()
        .append(true)
        .open(&config)
        .is_ok();
    if !root {
        let data_path = d.join("d.jsonl");
        std::fs::write(&data_path, ok)?;
        let out = triage(
            &[
                "calibrate",
                "--config",
                config.to_str().unwrap(),
                "--task",
                "moderation",
                "--tier",
                "local",
                "--data",
                data_path.to_str().unwrap(),
                "--target-accuracy",
                "0.9",
                "--write",
            ],
            &[],
        )?;
        assert!(
            stderr(&out).contains("cannot be opened for writing"),
            "{}",
            stderr(&out)
        );
        assert_eq!(std::fs::read_to_string(&config)?, CONFIG_WITHOUT_MODEL);
    }
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&config, perms)?;
    Ok(())
}

/// A fake of OpenAI's chat endpoint: answers the moderation JSON schema
/// (`toxic` high when the text has an obvious insult) and counts calls.
async fn fake_openai(calls: Arc<AtomicUsize>) -> Result<String> {
    serve(chat_app(calls)).await
}

fn chat_app(calls: Arc<AtomicUsize>) -> axum::Router {
    use axum::routing::post;
    axum::Router::new().route(
        "/v1/chat/completions",
        post(move |body: axum::Json<Value>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let user = body.0["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or_default()
                    .to_lowercase();
                let content = json!({"toxic": if rude(&user) { 0.9 } else { 0.1 }}).to_string();
                axum::Json(json!({
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1_764_000_000,
                    "model": body.0["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}
                }))
            }
        }),
    )
}

async fn serve(app: axum::Router) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/v1"))
}

const LIVE_CONFIG: &str = r#"[ledger]
disabled = true

[[price]]
provider = "openai"
model = "gpt-4o-mini"
effective = "2024-07-18"
input_per_mtok = 1000.0   # $0.10 for the fake's 100 prompt tokens
output_per_mtok = 0.0

[local.toxicity]
model = "toxicity"

[providers.openai]
kind = "openai"
api_key_env = "OPENAI_API_KEY"

[tasks.moderation]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]

[[tasks.moderation.tiers]]
name = "local"
local = "toxicity"
lo = 0.3
hi = 0.7

[[tasks.moderation.tiers]]
name = "llm"
provider = "openai"
model = "gpt-4o-mini"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_audit_caches_answers_and_stops_at_the_spending_cap() -> Result<()> {
    let Some(data) = val_slice(40) else {
        return Ok(());
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let base = fake_openai(calls.clone()).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("live.toml");
    std::fs::write(&config, LIVE_CONFIG)?;
    let data_path = dir.path().join("val.jsonl");
    std::fs::write(&data_path, &data)?;
    let run = |cache: &str, cap: &str| {
        let args: Vec<String> = [
            "audit",
            "--config",
            config.to_str().unwrap(),
            "--task",
            "moderation",
            "--data",
            data_path.to_str().unwrap(),
            "--live",
            "--max-cost-usd",
            cap,
            "--cache",
            dir.path().join(cache).to_str().unwrap(),
            "--json",
        ]
        .map(String::from)
        .to_vec();
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            triage(
                &args,
                &[
                    ("TRIAGE_PROVIDER_OPENAI_BASE_URL", base.as_str()),
                    ("OPENAI_API_KEY", "sk-test-not-a-real-key"),
                ],
            )
        })
    };

    let r = json_out(&run("cache", "100").await??)?;
    assert_eq!(r["mode"], "live");
    let live = &r["live"];
    let escalated = (f(&r["tiers"][1]["share"]) * 40.0).round() as usize;
    assert!(escalated > 3, "too few escalated items to test: {r}");
    assert_eq!(calls.load(Ordering::SeqCst), escalated);
    assert_eq!(live["calls"], escalated);
    assert_eq!(live["cached"], 0);
    assert!((f(&live["spent_usd"]) - 0.1 * escalated as f64).abs() < 1e-9);
    assert!((f(&r["tiers"][1]["cost_usd"]) - 0.1 * escalated as f64).abs() < 1e-9);
    assert!(f(&r["tiers"][1]["latency_ms_p50"]) > 0.0);
    let hosted_accuracy = f(&r["tiers"][1]["accuracy"]);
    assert!(
        r["assumptions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| !a.as_str().unwrap().contains("hosted accuracy"))
    );

    // The rerun is free: every escalated answer comes from the cache.
    let r2 = json_out(&run("cache", "100").await??)?;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        escalated,
        "the rerun called the provider"
    );
    assert_eq!(r2["live"]["calls"], 0);
    assert_eq!(r2["live"]["cached"], escalated);
    assert_eq!(f(&r2["live"]["spent_usd"]), 0.0);
    assert_eq!(f(&r2["tiers"][1]["accuracy"]), hosted_accuracy);
    assert_eq!(r2["accuracy"], r["accuracy"]);

    // A fresh cache and a cap of $0.35: no call that could pass it is made.
    let r3 = json_out(&run("cache2", "0.35").await??)?;
    let made = calls.load(Ordering::SeqCst) - escalated;
    let live = &r3["live"];
    assert!((1..=3).contains(&made), "{made} calls under a $0.35 cap");
    assert_eq!(live["calls"], made);
    assert!(f(&live["spent_usd"]) <= 0.35);
    assert_eq!(live["skipped_over_budget"], escalated - made);
    assert!(
        r3["assumptions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("--max-cost-usd 0.35"))
    );
    Ok(())
}

#[tokio::test]
async fn from_ledger_estimates_accuracy_from_shadow_agreement_and_warns_on_drift() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("ledger.db");
    let url = format!("sqlite://{}", db.display());
    let ledger = triage_engine::Ledger::open(&url).await?;
    for i in 0..50 {
        ledger.record_shadow(triage_engine::ledger::ShadowRecord {
            request_id: format!("r{i}"),
            task: "moderation".into(),
            tier: "local".into(),
            shadow_tier: "llm".into(),
            agree: i < 35,
            score: Some(0.9),
            shadow_score: Some(0.8),
        });
    }
    ledger.flush().await?;
    let config_with = |promise: f64| -> Result<PathBuf> {
        let text = CONFIG_WITHOUT_MODEL
            .replace("disabled = true", &format!("url = \"{url}\""))
            .replace(
                "hi = 0.8",
                &format!("hi = 0.8\ncalibrated_accuracy = {promise}"),
            );
        let path = dir.path().join(format!("c{promise}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let drifted = config_with(0.92)?;
    let out = tokio::task::spawn_blocking(move || {
        triage(
            &[
                "audit",
                "--config",
                drifted.to_str().unwrap(),
                "--task",
                "moderation",
                "--from-ledger",
                "--since",
                "7d",
                "--json",
            ],
            &[],
        )
    })
    .await??;
    let r = json_out(&out)?;
    let line = &r["tiers"][0];
    assert_eq!(line["checked"], 50);
    assert!((f(&line["agreement"]) - 0.7).abs() < 1e-12);
    assert_eq!(f(&line["calibrated_accuracy"]), 0.92);
    assert_eq!(r["drift"], true);
    assert!(
        stderr(&out).contains("warning: tier `local`: agreement with `llm` is 0.700"),
        "{}",
        stderr(&out)
    );

    let fine = config_with(0.6)?;
    let out = tokio::task::spawn_blocking(move || {
        triage(
            &[
                "audit",
                "--config",
                fine.to_str().unwrap(),
                "--task",
                "moderation",
                "--from-ledger",
                "--json",
            ],
            &[],
        )
    })
    .await??;
    let r = json_out(&out)?;
    assert_eq!(r["drift"], false);
    assert!(r["tiers"][0]["warning"].is_null());
    assert!(!stderr(&out).contains("warning:"));
    Ok(())
}

/// A two-label cascade on the committed tiny multi-label checkpoint: label
/// lists in the data, the cascade's mapping, and the every-label band rule,
/// checked against `triage moderate`'s scores.
#[test]
fn multi_label_audit_applies_the_band_to_every_label() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/distilbert-seq-multilabel");
    let config = dir.path().join("multi.toml");
    std::fs::write(
        &config,
        format!(
            r#"[ledger]
disabled = true

[local.tiny]
model = "{}"

[providers.openai]
kind = "openai"
api_key_env = "OPENAI_API_KEY"

[tasks.abuse]
strategy = "cascade"
kind = "moderation"
labels = ["toxic", "insult"]
threshold = 0.5

[[tasks.abuse.tiers]]
name = "local"
local = "tiny"
lo = 0.49
hi = 0.51
map = {{ toxic = "toxic", insult = "insult" }}

[[tasks.abuse.tiers]]
name = "llm"
provider = "openai"
model = "gpt-4o-mini"
"#,
            model.display()
        ),
    )?;
    let texts = [
        ("you are a complete idiot", json!(["toxic", "insult"])),
        ("have a lovely day", json!([])),
        ("I will find you", json!("toxic")),
        ("what a stupid question", json!(["insult"])),
        ("the weather is fine", json!([])),
        ("get lost, moron", json!(["toxic", "insult"])),
        ("thanks for the help", json!([])),
        ("nobody likes you", json!("insult")),
    ];
    let data: String = texts
        .iter()
        .map(|(t, l)| format!("{}\n", json!({"text": t, "label": l})))
        .collect();
    let data_path = dir.path().join("d.jsonl");
    std::fs::write(&data_path, &data)?;
    let (c, d) = (config.to_str().unwrap(), data_path.to_str().unwrap());
    let r = json_out(&triage(
        &[
            "audit", "--config", c, "--task", "abuse", "--data", d, "--json",
        ],
        &[],
    )?)?;

    let scored = triage(
        &["moderate", "--model", model.to_str().unwrap(), "--file", d],
        &[],
    )?;
    assert!(scored.status.success(), "{}", stderr(&scored));
    let (mut accepted, mut correct) = (0usize, 0usize);
    for (line, (_, gold)) in String::from_utf8(scored.stdout)?.lines().zip(&texts) {
        let v: Value = serde_json::from_str(line)?;
        let gold: Vec<&str> = match gold {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap()).collect(),
            _ => unreachable!(),
        };
        let s = [f(&v["scores"]["toxic"]), f(&v["scores"]["insult"])];
        if s.iter().all(|x| *x <= 0.49 || *x >= 0.51) {
            accepted += 1;
            let flags = [s[0] >= 0.5, s[1] >= 0.5];
            correct += usize::from(flags == [gold.contains(&"toxic"), gold.contains(&"insult")]);
        }
    }
    let local = &r["tiers"][0];
    assert!(
        (f(&local["share"]) - accepted as f64 / 8.0).abs() < 1e-12,
        "{r}"
    );
    if accepted > 0 {
        assert!((f(&local["accuracy"]) - correct as f64 / accepted as f64).abs() < 1e-12);
    } else {
        assert!(local["accuracy"].is_null());
    }

    // 0/1 labels are ambiguous with two task labels.
    std::fs::write(&data_path, "{\"text\": \"x\", \"label\": 1}\n")?;
    let out = triage(
        &["audit", "--config", c, "--task", "abuse", "--data", d],
        &[],
    )?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("0/1 labels need a single-label task"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

fn shared() -> Option<PathBuf> {
    let shared = std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    if shared.join("data").is_dir() {
        Some(shared)
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide the shared data"
        );
        eprintln!("SKIPPED: no shared data at {}", shared.display());
        None
    }
}

/// `triage moderate --model toxicity` on the JSONL file: P(offensive) per line.
fn offensive_scores(data: &Path) -> Result<Vec<f64>> {
    let out = triage(
        &[
            "moderate",
            "--model",
            "toxicity",
            "--file",
            data.to_str().unwrap(),
        ],
        &[],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| Ok(f(&serde_json::from_str::<Value>(l)?["scores"]["offensive"])))
        .collect()
}

fn gold_bits(data: &str) -> Vec<bool> {
    data.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["label"] == 1)
        .collect()
}

fn router_config(dir: &Path, prices: &str) -> Result<PathBuf> {
    let path = dir.join("router.toml");
    std::fs::write(
        &path,
        format!(
            r#"{prices}

[ledger]
disabled = true

[local.toxicity]
model = "toxicity"

[providers.openai]
kind = "openai"
api_key_env = "OPENAI_API_KEY"

[tasks.replies]
strategy = "router"

[tasks.replies.intent]
kind = "local"
local = "toxicity"
default = "not-offensive"
min_score = 0.7

[tasks.replies.routes.offensive]
handler = "template"
template = "Please keep it civil."

[tasks.replies.routes.not-offensive]
handler = "model"
provider = "openai"
model = "gpt-4o-mini"
max_tokens = 100
"#
        ),
    )?;
    Ok(path)
}

/// tweeteval lines as router data: the route is the gold label's name.
fn as_routes(data: &str) -> String {
    data.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let route = if v["label"] == 1 {
                "offensive"
            } else {
                "not-offensive"
            };
            format!("{}\n", json!({"text": v["text"], "route": route}))
        })
        .collect()
}

/// A router whose intent is the toxicity specialist: route accuracy, the
/// share per route and the model route's price, checked against the
/// specialist's own scores.
#[test]
fn router_audit_measures_route_accuracy_and_share_per_route() -> Result<()> {
    let Some(data) = val_slice(120) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // The local tier is priced by its measured time, which a loaded test
    // machine without VNNI stretched until the router cost more than the
    // all-LLM path (6.27 against 6.24 per 100k): a tenth of the example's
    // CPU price keeps that comparison about routing, not about load.
    let prices = std::fs::read_to_string(repo.join("examples/prices.toml"))?;
    assert!(
        prices.contains("cpu_hour_usd = 0.04\n"),
        "examples/prices.toml changed"
    );
    std::fs::write(
        dir.path().join("prices.toml"),
        prices.replace("cpu_hour_usd = 0.04\n", "cpu_hour_usd = 0.004\n"),
    )?;
    let config = router_config(dir.path(), "prices_file = \"prices.toml\"")?;
    let text_path = dir.path().join("val.jsonl");
    std::fs::write(&text_path, &data)?;
    let data_path = dir.path().join("routes.jsonl");
    std::fs::write(&data_path, as_routes(&data))?;
    let html = dir.path().join("r.html");
    let (c, d) = (config.to_str().unwrap(), data_path.to_str().unwrap());
    let r = json_out(&triage(
        &[
            "audit",
            "--config",
            c,
            "--task",
            "replies",
            "--data",
            d,
            "--offline",
            "--json",
            "--out",
            html.to_str().unwrap(),
        ],
        &[],
    )?)?;
    for key in [
        "n",
        "task",
        "tiers",
        "accuracy",
        "assumptions",
        "cost_per_100k_usd",
        "all_llm_cost_per_100k_usd",
        "savings_pct",
        "frontier",
    ] {
        assert!(r.get(key).is_some(), "no `{key}` in {r}");
    }
    assert_eq!(r["n"], 120);
    assert_eq!(r["metric"], "route accuracy");

    // The same texts through the specialist: the route is its top label when
    // that is at least min_score (0.7), else the default.
    let gold = gold_bits(&data);
    let (mut right, mut to_offensive, mut offensive_right) = (0usize, 0usize, 0usize);
    for (p, g) in offensive_scores(&text_path)?.iter().zip(&gold) {
        let offensive = *p >= 0.7;
        right += usize::from(offensive == *g);
        if offensive {
            to_offensive += 1;
            offensive_right += usize::from(*g);
        }
    }
    let tiers = r["tiers"].as_array().context("tiers")?;
    let mut names: Vec<&str> = tiers.iter().map(|t| t["tier"].as_str().unwrap()).collect();
    assert_eq!(names.remove(0), "intent");
    names.sort_unstable();
    assert_eq!(names, ["route:not-offensive", "route:offensive"]);
    let tier = |name: &str| tiers.iter().find(|t| t["tier"] == name).unwrap();
    let (intent, offensive, other) = (
        tier("intent"),
        tier("route:offensive"),
        tier("route:not-offensive"),
    );
    assert_eq!(intent["model"], "local/toxicity");
    assert_eq!(f(&intent["share"]), 1.0);
    assert!(
        (f(&intent["accuracy"]) - right as f64 / 120.0).abs() < 1e-12,
        "{r}"
    );
    assert!((f(&r["accuracy"]) - right as f64 / 120.0).abs() < 1e-12);
    assert!(f(&intent["cost_usd"]) > 0.0 && f(&intent["latency_ms_p50"]) > 0.0);
    assert!((f(&offensive["share"]) - to_offensive as f64 / 120.0).abs() < 1e-12);
    assert!((f(&other["share"]) - (120 - to_offensive) as f64 / 120.0).abs() < 1e-12);
    assert!(
        (f(&offensive["accuracy"]) - offensive_right as f64 / to_offensive as f64).abs() < 1e-12
    );
    // The template costs nothing; the model route is priced, not called.
    assert_eq!(f(&offensive["cost_usd"]), 0.0);
    assert_eq!(other["model"], "openai/gpt-4o-mini");
    assert!(f(&other["cost_usd"]) > 0.0 && other["latency_ms_p50"].is_null());
    let cost = f(&r["cost_per_100k_usd"]);
    assert!(
        cost > 0.0 && cost < f(&r["all_llm_cost_per_100k_usd"]),
        "{r}"
    );
    assert!(f(&r["savings_pct"]) > 0.0);
    assert!(r["assumptions"].as_array().unwrap().iter().any(|a| {
        a.as_str()
            .unwrap()
            .contains("offline: no hosted provider was called")
    }));
    // The frontier re-scores the intent's min_score from each item's top
    // label and score: its point at the configured 0.7 is this audit, and
    // at 0.9 only the surest offensive items keep the template route.
    let frontier = r["frontier"].as_array().context("frontier")?;
    assert!(frontier.len() >= 21);
    assert!(frontier.iter().all(|p| p["knob"] == "min_score"));
    let at = |m: f64| {
        frontier
            .iter()
            .find(|p| (f(&p["value"]) - m).abs() < 1e-12)
            .unwrap_or_else(|| panic!("no min_score {m}"))
    };
    assert_eq!(r["setting"], *at(0.7));
    assert!((f(&at(0.7)["accuracy"]) - f(&r["accuracy"])).abs() < 1e-12);
    assert!(
        (f(&at(0.7)["cost_per_100k_usd"]) - cost).abs() < 1e-9,
        "{r}"
    );
    assert!((f(&at(0.7)["share"]) - f(&offensive["share"])).abs() < 1e-12);
    let scores = offensive_scores(&text_path)?;
    let surest = scores.iter().filter(|p| **p >= 0.9).count();
    let right_at_09 = scores
        .iter()
        .zip(&gold)
        .filter(|(p, g)| (**p >= 0.9) == **g)
        .count();
    assert!((f(&at(0.9)["share"]) - surest as f64 / 120.0).abs() < 1e-12);
    assert!((f(&at(0.9)["accuracy"]) - right_at_09 as f64 / 120.0).abs() < 1e-12);
    // Fewer template answers, more model calls: never cheaper.
    for w in frontier.windows(2) {
        assert!(f(&w[0]["value"]) <= f(&w[1]["value"]));
        assert!(f(&w[0]["share"]) >= f(&w[1]["share"]));
        assert!(f(&w[0]["cost_per_100k_usd"]) <= f(&w[1]["cost_per_100k_usd"]) + 1e-12);
    }
    assert!(r["assumptions"].as_array().unwrap().iter().any(|a| {
        a.as_str()
            .unwrap()
            .starts_with("frontier: the intent's min_score")
    }));
    let page = std::fs::read_to_string(&html)?;
    assert!(page.contains("route:not-offensive") && page.contains("route accuracy"));
    assert!(page.contains("<svg") && page.contains("class=\"chosen\""));
    assert!(page.contains("min_score 0.7"));

    let png = dir.path().join("r.png");
    let out = triage(
        &[
            "audit",
            "--config",
            c,
            "--task",
            "replies",
            "--data",
            d,
            "--out",
            png.to_str().unwrap(),
        ],
        &[],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read(&png)?.starts_with(b"\x89PNG\r\n\x1a\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_router_audit_caches_answers_and_stops_at_the_spending_cap() -> Result<()> {
    let Some(data) = val_slice(30) else {
        return Ok(());
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let base = fake_openai(calls.clone()).await?;
    let dir = tempfile::tempdir()?;
    // $0.08 per answer (8 completion tokens); the worst case before a call is
    // its whole max_tokens (100): $1.
    let config = router_config(
        dir.path(),
        "[[price]]\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\neffective = \"2024-07-18\"\ninput_per_mtok = 0.0\noutput_per_mtok = 10000.0",
    )?;
    let data_path = dir.path().join("routes.jsonl");
    std::fs::write(&data_path, as_routes(&data))?;
    let run = |cache: &str, cap: &str| {
        let args: Vec<String> = [
            "audit",
            "--config",
            config.to_str().unwrap(),
            "--task",
            "replies",
            "--data",
            data_path.to_str().unwrap(),
            "--live",
            "--max-cost-usd",
            cap,
            "--cache",
            dir.path().join(cache).to_str().unwrap(),
            "--json",
        ]
        .map(String::from)
        .to_vec();
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            triage(
                &args,
                &[
                    ("TRIAGE_PROVIDER_OPENAI_BASE_URL", base.as_str()),
                    ("OPENAI_API_KEY", "sk-test-not-a-real-key"),
                ],
            )
        })
    };
    let r = json_out(&run("cache", "100").await??)?;
    assert_eq!(r["mode"], "live");
    let model_route = |r: &Value| {
        r["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tier"] == "route:not-offensive")
            .cloned()
            .unwrap()
    };
    let routed = (f(&model_route(&r)["share"]) * 30.0).round() as usize;
    assert!(routed > 8, "too few items for the model route: {r}");
    assert_eq!(calls.load(Ordering::SeqCst), routed);
    assert_eq!(r["live"]["calls"], 30);
    assert!((f(&r["live"]["spent_usd"]) - 0.08 * routed as f64).abs() < 1e-9);
    assert!((f(&model_route(&r)["cost_usd"]) - 0.08 * routed as f64).abs() < 1e-9);
    assert!(f(&model_route(&r)["latency_ms_p50"]) > 0.0);

    let r2 = json_out(&run("cache", "100").await??)?;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        routed,
        "the rerun called the provider"
    );
    assert_eq!(r2["live"]["cached"], 30);
    assert_eq!(f(&r2["live"]["spent_usd"]), 0.0);
    assert_eq!(r2["accuracy"], r["accuracy"]);
    assert_eq!(r2["tiers"], r["tiers"]);

    // A fresh cache and a $1.50 cap: an item runs only while its $1 worst
    // case fits, so the spend stays under the cap and the rest wait.
    let r3 = json_out(&run("cache2", "1.5").await??)?;
    let live = &r3["live"];
    let spent = f(&live["spent_usd"]);
    assert!(spent <= 1.5 && spent + 1.0 > 1.5, "{live}");
    assert!(f(&live["skipped_over_budget"]) > 0.0, "{live}");
    assert_eq!(
        f(&live["calls"]) as usize + f(&live["skipped_over_budget"]) as usize,
        30
    );
    assert_eq!(r3["n"], live["calls"]);
    Ok(())
}

/// CoNLL-2003 validation sentences as `{"text", "entities"}` with character
/// offsets (tokens joined by spaces).
fn conll_as_entities(shared: &Path, n: usize) -> Result<String> {
    let text = std::fs::read_to_string(shared.join("data/ner/conll2003/validation.jsonl"))?;
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(n) {
        let v: Value = serde_json::from_str(line)?;
        let tokens: Vec<&str> = v["tokens"]
            .as_array()
            .context("tokens")?
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let tags: Vec<&str> = v["tags"]
            .as_array()
            .context("tags")?
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let mut sentence = String::new();
        let mut spans = Vec::new();
        let mut open: Option<(String, usize, usize)> = None;
        for (tok, tag) in tokens.iter().zip(&tags) {
            if !sentence.is_empty() {
                sentence.push(' ');
            }
            let start = sentence.chars().count();
            sentence.push_str(tok);
            let end = sentence.chars().count();
            let (bio, ty) = tag.split_once('-').unwrap_or((tag, ""));
            match (bio, &mut open) {
                ("I", Some((t, _, e))) if t == ty => *e = end,
                ("B" | "I", _) => {
                    spans.extend(open.take());
                    open = Some((ty.to_owned(), start, end));
                }
                _ => spans.extend(open.take()),
            }
        }
        spans.extend(open.take());
        let entities: Vec<Value> = spans
            .into_iter()
            .map(|(label, start, end)| json!({"label": label, "start": start, "end": end}))
            .collect();
        out.push_str(&format!(
            "{}\n",
            json!({"text": sentence, "entities": entities})
        ));
    }
    Ok(out)
}

/// A text pipeline with the default NER specialist: entity-level precision,
/// recall and F1 against CoNLL-2003, checked against `triage entities`.
#[test]
fn ner_audit_scores_entities_by_type_and_text() -> Result<()> {
    let Some(shared) = shared() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ner.toml");
    std::fs::write(
        &config,
        "[ledger]\ndisabled = true\n\n[local.ner]\nmodel = \"ner\"\n\n\
         [tasks.people]\nstrategy = \"pipeline\"\n\n\
         [[tasks.people.stages]]\nname = \"entities\"\nkind = \"entities\"\nlocal = \"ner\"\n\
         entities = [\"PER\", \"ORG\", \"LOC\"]\n",
    )?;
    let data = conll_as_entities(&shared, 60)?;
    let data_path = dir.path().join("ner.jsonl");
    std::fs::write(&data_path, &data)?;
    let d = data_path.to_str().unwrap();
    let r = json_out(&triage(
        &[
            "audit",
            "--config",
            config.to_str().unwrap(),
            "--task",
            "people",
            "--data",
            d,
            "--json",
        ],
        &[],
    )?)?;
    assert_eq!(r["n"], 60);
    assert_eq!(r["metric"], "entity-level F1");

    // Only the texts: `triage entities` passes other input fields through.
    let texts_path = dir.path().join("texts.jsonl");
    let texts: String = data
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{}\n", json!({"text": v["text"]}))
        })
        .collect();
    std::fs::write(&texts_path, texts)?;
    let out = triage(
        &[
            "entities",
            "--model",
            "ner",
            "--aggregation",
            "simple",
            "--file",
            texts_path.to_str().unwrap(),
        ],
        &[],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let (mut tp, mut predicted, mut gold_n, mut misc) = (0usize, 0usize, 0usize, 0usize);
    for (tagged, line) in String::from_utf8(out.stdout)?.lines().zip(data.lines()) {
        let item: Value = serde_json::from_str(line)?;
        let chars: Vec<char> = item["text"].as_str().unwrap().chars().collect();
        let mut gold: Vec<(String, String)> = Vec::new();
        for e in item["entities"].as_array().unwrap() {
            let label = e["label"].as_str().unwrap().to_owned();
            if label == "MISC" {
                misc += 1;
                continue;
            }
            let (s, en) = (e["start"].as_u64().unwrap(), e["end"].as_u64().unwrap());
            let t: String = chars[s as usize..en as usize].iter().collect();
            if !gold.contains(&(label.clone(), t.clone())) {
                gold.push((label, t));
            }
        }
        let mut got: Vec<(String, String)> = Vec::new();
        for e in serde_json::from_str::<Value>(tagged)?["entities"]
            .as_array()
            .unwrap()
        {
            let label = e["label"].as_str().unwrap().to_owned();
            let t = e["text"].as_str().unwrap().trim().to_owned();
            if ["PER", "ORG", "LOC"].contains(&label.as_str())
                && !t.is_empty()
                && !got.contains(&(label.clone(), t.clone()))
            {
                got.push((label, t));
            }
        }
        tp += got.iter().filter(|g| gold.contains(g)).count();
        predicted += got.len();
        gold_n += gold.len();
    }
    let (p, rc) = (tp as f64 / predicted as f64, tp as f64 / gold_n as f64);
    let f1 = 2.0 * p * rc / (p + rc);
    let stage = &r["tiers"][0];
    assert_eq!(stage["tier"], "entities");
    assert_eq!(f(&stage["share"]), 1.0);
    assert!((f(&stage["precision"]) - p).abs() < 1e-12, "{r} vs P {p}");
    assert!((f(&stage["recall"]) - rc).abs() < 1e-12, "{r} vs R {rc}");
    assert!((f(&stage["accuracy"]) - f1).abs() < 1e-12);
    assert!((f(&r["accuracy"]) - f1).abs() < 1e-12);
    // A sanity bound: these first sentences are mostly upper-case headlines.
    assert!(f1 > 0.6, "entity F1 {f1} of the default NER specialist");
    assert!(misc > 0);
    assert!(
        r["assumptions"].as_array().unwrap().iter().any(|a| a
            .as_str()
            .unwrap()
            .starts_with(&format!("{misc} gold entit"))),
        "{r}"
    );
    Ok(())
}

/// Transcribe with the real Whisper tiny.en, then a hosted summary (priced
/// offline): WER against the development clips' references.
#[test]
fn transcription_audit_reports_word_error_rate() -> Result<()> {
    let Some(shared) = shared() else {
        return Ok(());
    };
    let ggml = shared.join("models/whisper-tiny.en/ggml-model-f16.bin");
    let dir = tempfile::tempdir()?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::copy(
        repo.join("examples/prices.toml"),
        dir.path().join("prices.toml"),
    )?;
    let config = dir.path().join("speech.toml");
    std::fs::write(
        &config,
        format!(
            "prices_file = \"prices.toml\"\n\n[ledger]\ndisabled = true\n\n\
             [local.whisper]\nmodel = \"{}\"\nkind = \"whisper\"\n\n\
             [providers.openai]\nkind = \"openai\"\napi_key_env = \"OPENAI_API_KEY\"\n\n\
             [tasks.notes]\nstrategy = \"pipeline\"\n\n\
             [[tasks.notes.stages]]\nname = \"transcribe\"\nkind = \"transcribe\"\nlocal = \"whisper\"\n\n\
             [[tasks.notes.stages]]\nname = \"summary\"\nkind = \"summarize\"\n\
             min_transcript_confidence = 0.5\n\
             tiers = [{{ provider = \"openai\", model = \"gpt-4o-mini\" }}, {{ provider = \"openai\", model = \"gpt-4o\" }}]\n",
            ggml.display()
        ),
    )?;
    // The shared manifest is already {"audio", "text"} with paths relative
    // to it; a copy elsewhere names the files absolutely.
    let speech = shared.join("data/speech");
    let manifest = std::fs::read_to_string(speech.join("manifest.jsonl"))?;
    let data: String = manifest
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(4)
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["audio"] = json!(speech.join(v["audio"].as_str().unwrap()));
            format!("{v}\n")
        })
        .collect();
    let data_path = dir.path().join("speech.jsonl");
    std::fs::write(&data_path, data)?;
    let r = json_out(&triage(
        &[
            "audit",
            "--config",
            config.to_str().unwrap(),
            "--task",
            "notes",
            "--data",
            data_path.to_str().unwrap(),
            "--json",
        ],
        &[],
    )?)?;
    assert_eq!(r["n"], 4);
    assert_eq!(r["metric"], "1 - WER");
    let wer = f(&r["wer"]);
    assert!(
        (0.0..0.2).contains(&wer),
        "WER {wer} of tiny.en on clean clips: {r}"
    );
    assert!((f(&r["accuracy"]) - (1.0 - wer)).abs() < 1e-12);
    let (stt, summary) = (&r["tiers"][0], &r["tiers"][1]);
    assert_eq!(stt["tier"], "transcribe");
    assert_eq!(f(&stt["wer"]), wer);
    assert_eq!(f(&stt["share"]), 1.0);
    assert!(f(&stt["latency_ms_p50"]) > 0.0 && f(&stt["cost_usd"]) > 0.0);
    assert_eq!(summary["model"], "openai/gpt-4o-mini");
    assert!(summary["accuracy"].is_null() && summary["latency_ms_p50"].is_null());
    assert!(f(&summary["cost_usd"]) > 0.0);
    // The frontier varies the summary's min_transcript_confidence: at 0 every
    // transcript goes to gpt-4o-mini, at 1 all to gpt-4o; WER stays.
    let frontier = r["frontier"].as_array().context("frontier")?;
    let at = |m: f64| {
        frontier
            .iter()
            .find(|p| (f(&p["value"]) - m).abs() < 1e-12)
            .unwrap_or_else(|| panic!("no setting {m}"))
    };
    assert!(
        frontier
            .iter()
            .all(|p| p["knob"] == "min_transcript_confidence")
    );
    assert_eq!(f(&at(0.0)["share"]), 1.0);
    assert_eq!(f(&at(1.0)["share"]), 0.0);
    assert!(f(&at(1.0)["cost_per_100k_usd"]) > f(&at(0.0)["cost_per_100k_usd"]));
    assert!(frontier.iter().all(|p| p["accuracy"] == r["accuracy"]));
    assert_eq!(r["setting"], *at(0.5));
    assert!(
        (f(&at(0.5)["cost_per_100k_usd"]) - f(&r["cost_per_100k_usd"])).abs() < 1e-9,
        "{r}"
    );
    // Whisper-1 at $0.006 a minute and gpt-4o-mini for every meeting cost
    // more than local transcription and the same summary.
    assert!(
        f(&r["cost_per_100k_usd"]) < f(&r["all_llm_cost_per_100k_usd"]),
        "{r}"
    );
    Ok(())
}

/// Two local tiers: the second is calibrated on what the first escalates,
/// replayed with the first's configured band.
#[test]
fn calibrating_a_middle_tier_replays_the_tiers_before_it() -> Result<()> {
    let Some(data) = val_slice(200) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("two.toml");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::copy(
        repo.join("examples/prices.toml"),
        dir.path().join("prices.toml"),
    )?;
    std::fs::write(
        &config,
        "prices_file = \"prices.toml\"\n[ledger]\ndisabled = true\n\n\
         [local.fast]\nmodel = \"toxicity\"\n[local.second]\nmodel = \"toxicity\"\n\n\
         [providers.openai]\nkind = \"openai\"\napi_key_env = \"OPENAI_API_KEY\"\n\n\
         [tasks.moderation]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"toxic\"]\n\n\
         # the first tier: only very sure answers\n\
         [[tasks.moderation.tiers]]\nname = \"fast\"\nlocal = \"fast\"\nlo = 0.1\nhi = 0.9\n\n\
         [[tasks.moderation.tiers]]\nname = \"second\"\nlocal = \"second\"\nlo = 0.3\nhi = 0.7\n\n\
         [[tasks.moderation.tiers]]\nname = \"llm\"\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\n",
    )?;
    let data_path = dir.path().join("val.jsonl");
    std::fs::write(&data_path, &data)?;
    let (c, d) = (config.to_str().unwrap(), data_path.to_str().unwrap());
    let cal = json_out(&triage(
        &[
            "calibrate",
            "--config",
            c,
            "--task",
            "moderation",
            "--tier",
            "second",
            "--data",
            d,
            "--target-local-share",
            "0.5",
            "--write",
            "--json",
        ],
        &[],
    )?)?;
    assert_eq!(cal["tier"], "second");
    assert_eq!(cal["n"], 200);
    // Only the items the first tier left inside (0.1, 0.9) reach the second.
    let scores = offensive_scores(&data_path)?;
    let gold = gold_bits(&data);
    let reaching: Vec<(f64, bool)> = scores
        .iter()
        .zip(&gold)
        .filter(|(p, _)| **p > 0.1 && **p < 0.9)
        .map(|(p, g)| (*p, *g))
        .collect();
    assert_eq!(cal["reached"], reaching.len(), "{cal}");
    let (lo, hi) = (f(&cal["lo"]), f(&cal["hi"]));
    let accepted: Vec<&(f64, bool)> = reaching
        .iter()
        .filter(|(p, _)| *p <= lo || *p >= hi)
        .collect();
    let share = accepted.len() as f64 / reaching.len() as f64;
    assert!((f(&cal["local_share"]) - share).abs() < 1e-12, "{cal}");
    assert!(share >= 0.5);
    let right = accepted.iter().filter(|(p, g)| (*p >= 0.5) == *g).count();
    assert!((f(&cal["local_accuracy"]) - right as f64 / accepted.len() as f64).abs() < 1e-12);
    // Written into the second tier only; the first keeps its band and comment.
    let after = std::fs::read_to_string(&config)?;
    assert!(after.contains("# the first tier: only very sure answers\n[[tasks.moderation.tiers]]\nname = \"fast\"\nlocal = \"fast\"\nlo = 0.1\nhi = 0.9\n"), "{after}");
    assert!(
        after.contains(&format!(
            "name = \"second\"\nlocal = \"second\"\nlo = {lo}\nhi = {hi}\ncalibrated_accuracy = "
        )),
        "{after}"
    );
    Ok(())
}

/// Two task labels from the toxicity specialist's two classes: calibrate
/// chooses a band per label, writes `bands`, and audit applies them.
#[test]
fn multi_label_calibration_chooses_and_writes_a_band_per_label() -> Result<()> {
    let Some(data) = val_slice(200) else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::copy(
        repo.join("examples/prices.toml"),
        dir.path().join("prices.toml"),
    )?;
    let config = dir.path().join("two-labels.toml");
    std::fs::write(
        &config,
        "prices_file = \"prices.toml\"\n[ledger]\ndisabled = true\n\n\
         [local.toxicity]\nmodel = \"toxicity\"\n\n\
         [providers.openai]\nkind = \"openai\"\napi_key_env = \"OPENAI_API_KEY\"\n\n\
         [tasks.tone]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"toxic\", \"polite\"]\n\n\
         [[tasks.tone.tiers]]\nname = \"local\"\nlocal = \"toxicity\"\nlo = 0.2\nhi = 0.8  # kept\n\
         map = { offensive = \"toxic\", not-offensive = \"polite\" }\n\n\
         [[tasks.tone.tiers]]\nname = \"llm\"\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\n",
    )?;
    let labelled: String = data
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let label = if v["label"] == 1 { "toxic" } else { "polite" };
            format!("{}\n", json!({"text": v["text"], "label": [label]}))
        })
        .collect();
    let data_path = dir.path().join("tone.jsonl");
    std::fs::write(&data_path, &labelled)?;
    let (c, d) = (config.to_str().unwrap(), data_path.to_str().unwrap());
    let cal = json_out(&triage(
        &[
            "calibrate",
            "--config",
            c,
            "--task",
            "tone",
            "--tier",
            "local",
            "--data",
            d,
            "--target-accuracy",
            "0.85",
            "--write",
            "--json",
        ],
        &[],
    )?)?;
    let band = |label: &str| (f(&cal["lo"][label]), f(&cal["hi"][label]));
    let (t, p) = (band("toxic"), band("polite"));
    assert!(cal["rule"].as_str().unwrap().contains("band per label"));

    // The per-label rule by hand on the specialist's own scores.
    let scores: Vec<(f64, f64)> = {
        let out = triage(&["moderate", "--model", "toxicity", "--file", d], &[])?;
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout)?
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    f(&v["scores"]["offensive"]),
                    f(&v["scores"]["not-offensive"]),
                )
            })
            .collect()
    };
    let gold = gold_bits(&data);
    let outside = |s: f64, (lo, hi): (f64, f64)| s <= lo || s >= hi;
    let (mut accepted, mut right) = (0usize, 0usize);
    for ((off, not), g) in scores.iter().zip(&gold) {
        if outside(*off, t) && outside(*not, p) {
            accepted += 1;
            right += usize::from((*off >= 0.5) == *g && (*not >= 0.5) != *g);
        }
    }
    assert!(
        (f(&cal["local_share"]) - accepted as f64 / 200.0).abs() < 1e-12,
        "{cal}"
    );
    let acc = right as f64 / accepted as f64;
    assert!((f(&cal["local_accuracy"]) - acc).abs() < 1e-12);
    assert!(acc - 1.645 * (acc * (1.0 - acc) / accepted as f64).sqrt() >= 0.85);

    // Written as bands per label; the tier's lo/hi and comment are kept.
    let after = std::fs::read_to_string(&config)?;
    assert!(after.contains("hi = 0.8  # kept"), "{after}");
    let doc: toml::Table = after.parse()?;
    let tier = &doc["tasks"]["tone"]["tiers"][0];
    for (label, (lo, hi)) in [("toxic", t), ("polite", p)] {
        let b = &tier["bands"][label];
        assert_eq!(b["lo"].as_float(), Some(lo), "{after}");
        assert_eq!(b["hi"].as_float(), Some(hi), "{after}");
    }
    assert!(after.contains("bands = { toxic = { lo = "), "{after}");
    let check = triage(&["config", "check", c], &[])?;
    assert!(check.status.success(), "{}", stderr(&check));
    // Audit reads the written bands back: the same share and accuracy.
    let r = json_out(&triage(
        &[
            "audit", "--config", c, "--task", "tone", "--data", d, "--json",
        ],
        &[],
    )?)?;
    assert!(
        (f(&r["tiers"][0]["share"]) - f(&cal["local_share"])).abs() < 1e-12,
        "{r}"
    );
    assert!((f(&r["tiers"][0]["accuracy"]) - acc).abs() < 1e-12);
    Ok(())
}

#[test]
fn bad_input_of_other_shapes_is_refused_before_any_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let config = d.join("c.toml");
    std::fs::write(
        &config,
        "[ledger]\ndisabled = true\n\n\
         [local.toxicity]\nmodel = \"./no-such-model\"\n\
         [local.ner]\nmodel = \"./no-such-model\"\nkind = \"tagger\"\n\
         [local.whisper]\nmodel = \"./no-such-model.bin\"\nkind = \"whisper\"\n\n\
         [providers.openai]\nkind = \"openai\"\napi_key_env = \"OPENAI_API_KEY\"\n\n\
         [tasks.router]\nstrategy = \"router\"\n\
         [tasks.router.intent]\nkind = \"local\"\nlocal = \"toxicity\"\ndefault = \"ok\"\n\
         [tasks.router.routes.ok]\nhandler = \"template\"\ntemplate = \"fine\"\n\
         [tasks.router.routes.offensive]\nhandler = \"template\"\ntemplate = \"no\"\n\n\
         [tasks.llm_router]\nstrategy = \"router\"\n\
         [tasks.llm_router.intent]\nkind = \"llm\"\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\ndefault = \"ok\"\n\
         [tasks.llm_router.routes.ok]\nhandler = \"template\"\ntemplate = \"fine\"\n\n\
         [tasks.ner]\nstrategy = \"pipeline\"\n\
         [[tasks.ner.stages]]\nname = \"e\"\nkind = \"entities\"\nlocal = \"ner\"\n\n\
         [tasks.stt]\nstrategy = \"pipeline\"\n\
         [[tasks.stt.stages]]\nname = \"t\"\nkind = \"transcribe\"\nlocal = \"whisper\"\n\n\
         [tasks.chat]\nstrategy = \"cascade\"\nkind = \"chat\"\n\
         [[tasks.chat.tiers]]\nname = \"llm\"\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\n\n\
         [tasks.late]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"toxic\"]\n\
         [[tasks.late.tiers]]\nname = \"hosted\"\nprovider = \"openai\"\nmodel = \"omni-moderation-latest\"\noperation = \"moderation\"\nlo = 0.2\nhi = 0.8\n\
         [[tasks.late.tiers]]\nname = \"local\"\nlocal = \"toxicity\"\nlo = 0.2\nhi = 0.8\n\
         [[tasks.late.tiers]]\nname = \"llm\"\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\n\n\
         [tasks.three]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"toxic\"]\n\
         [[tasks.three.tiers]]\nname = \"local\"\nlocal = \"toxicity\"\nlo = 0.2\nhi = 0.8\n\
         [[tasks.three.tiers]]\nname = \"hosted\"\nprovider = \"openai\"\nmodel = \"omni-moderation-latest\"\noperation = \"moderation\"\nlo = 0.2\nhi = 0.8\n\
         [[tasks.three.tiers]]\nname = \"llm\"\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\n",
    )?;
    let before = std::fs::read_to_string(&config)?;
    let data_path = d.join("d.jsonl");
    let check = |args: &[&str], data: &str, want: &str| -> Result<()> {
        std::fs::write(&data_path, data)?;
        let mut full: Vec<&str> = args.to_vec();
        full.extend([
            "--config",
            config.to_str().unwrap(),
            "--data",
            data_path.to_str().unwrap(),
        ]);
        let out = triage(&full, &[])?;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: wanted `{want}` in {err}");
        assert!(
            !err.contains("no-such-model"),
            "a model was loaded first: {err}"
        );
        Ok(())
    };
    let audit = |task: &'static str| ["audit", "--task", task];
    check(
        &audit("router"),
        "{\"text\": \"hi\", \"route\": \"refund\"}\n",
        "route `refund` is not one of the router's routes (offensive, ok)",
    )?;
    check(
        &audit("router"),
        "{\"text\": \"hi\", \"label\": 1}\n",
        "no string field `route`",
    )?;
    check(&audit("router"), "\n", "has no labelled items")?;
    check(
        &audit("llm_router"),
        "{\"text\": \"hi\", \"route\": \"ok\"}\n",
        "cannot be audited offline: its intent step is an LLM",
    )?;
    check(
        &audit("ner"),
        "{\"text\": \"Angela Merkel\", \"entities\": [{\"label\": \"POLITICIAN\", \"text\": \"Angela Merkel\"}]}\n",
        "entity label `POLITICIAN` is not one the task extracts (PER, ORG)",
    )?;
    check(
        &audit("ner"),
        "{\"text\": \"Paris\", \"entities\": [{\"label\": \"LOC\", \"start\": 0, \"end\": 9}]}\n",
        "are not a span of the text's 5 characters",
    )?;
    check(&audit("ner"), "", "has no labelled items")?;
    check(
        &audit("stt"),
        "{\"audio\": \"missing.wav\", \"text\": \"hello\"}\n",
        "line 1: audio file",
    )?;
    check(&audit("chat"), "{\"text\": \"hi\"}\n", "is a chat cascade")?;
    check(
        &[
            "calibrate",
            "--task",
            "late",
            "--tier",
            "local",
            "--target-accuracy",
            "0.9",
        ],
        "{\"text\": \"hi\", \"label\": 0}\n",
        "`hosted` is hosted",
    )?;
    check(
        &[
            "calibrate",
            "--task",
            "router",
            "--tier",
            "x",
            "--target-accuracy",
            "0.9",
        ],
        "{\"text\": \"hi\", \"route\": \"ok\"}\n",
        "calibrate the bands of moderation cascades",
    )?;
    let hosted = |extra: &[&'static str]| {
        let mut v = vec![
            "calibrate",
            "--task",
            "three",
            "--tier",
            "hosted",
            "--target-accuracy",
            "0.9",
        ];
        v.extend_from_slice(extra);
        v
    };
    let ok = "{\"text\": \"hi\", \"label\": 0}\n";
    check(
        &hosted(&[]),
        ok,
        "is hosted: calibrating it asks its provider",
    )?;
    check(
        &hosted(&["--live", "--max-cost-usd=-1"]),
        ok,
        "--max-cost-usd -1 is not a dollar amount",
    )?;
    check(
        &hosted(&["--live", "--max-cost-usd", "1"]),
        "{\"text\": \"hi\", \"label\": \"spam\"}\n",
        "label `spam`",
    )?;
    check(
        &[
            "calibrate",
            "--task",
            "three",
            "--tier",
            "llm",
            "--target-accuracy",
            "0.9",
            "--live",
            "--max-cost-usd",
            "1",
        ],
        ok,
        "is the last tier",
    )?;
    assert_eq!(std::fs::read_to_string(&config)?, before);
    Ok(())
}

/// What the fake hosted moderation answers for `text` (OpenAI's
/// `harassment` category): an obvious insult scores 0.55–0.95, anything else
/// 0–0.56, spread by the text's length so that some answers fall inside the
/// band (0.3, 0.7) and go on to the LLM.
fn fake_harassment(text: &str) -> f64 {
    let len = text.chars().count();
    if rude(text) {
        0.55 + (len % 5) as f64 * 0.1
    } else {
        (len % 8) as f64 * 0.08
    }
}

/// [`fake_harassment`] as the cascade reads it: OpenAI's moderation scores
/// are parsed as 32-bit floats.
fn harassment_read(text: &str) -> f64 {
    f64::from(fake_harassment(text) as f32)
}

/// The fake LLM's verdict (as `fake_openai`): toxic when there is an insult.
fn rude(text: &str) -> bool {
    let lower = text.to_lowercase();
    ["idiot", "stupid", "shit", "fuck", "ass"]
        .iter()
        .any(|w| lower.contains(w))
}

/// A fake of OpenAI speaking both wire formats a three-tier moderation
/// cascade uses: `/v1/moderations` (scores from [`fake_harassment`]) and
/// `/v1/chat/completions` (as [`fake_openai`]). Counts each.
async fn fake_moderation_and_chat(
    moderations: Arc<AtomicUsize>,
    chats: Arc<AtomicUsize>,
) -> Result<String> {
    use axum::routing::post;
    let app = chat_app(chats).route(
        "/v1/moderations",
        post(move |body: axum::Json<Value>| {
            let moderations = moderations.clone();
            async move {
                moderations.fetch_add(1, Ordering::SeqCst);
                let input = match &body.0["input"] {
                    Value::Array(a) => a
                        .first()
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    v => v.as_str().unwrap_or_default().to_owned(),
                };
                let score = fake_harassment(&input);
                axum::Json(json!({
                    "id": "modr-fake",
                    "model": "omni-moderation-2024-09-26",
                    "results": [{
                        "flagged": score >= 0.5,
                        "categories": {"harassment": score >= 0.5, "violence": false},
                        "category_scores": {"harassment": score, "violence": 0.01}
                    }]
                }))
            }
        }),
    );
    serve(app).await
}

/// Local toxicity specialist, then hosted moderation ($0.01 a request) with
/// its own band, then gpt-4o-mini ($0.10 for the fakes' 100 prompt tokens).
const THREE_TIERS: &str = r#"# three tiers: local, hosted moderation, LLM
[ledger]
disabled = true

[[price]]
provider = "openai"
model = "gpt-4o-mini"
effective = "2024-07-18"
input_per_mtok = 1000.0
output_per_mtok = 0.0

[[price]]
provider = "openai"
model = "omni-moderation-latest"
effective = "2024-09-26"
input_per_mtok = 0.0
output_per_mtok = 0.0
per_request = 0.01

[local.toxicity]
model = "toxicity"

[providers.openai]
kind = "openai"
api_key_env = "OPENAI_API_KEY"

[tasks.moderation]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]

[[tasks.moderation.tiers]]
name = "local"
local = "toxicity"
lo = 0.2
hi = 0.8

# the middle tier: hosted moderation
[[tasks.moderation.tiers]]
name = "hosted-moderation"
provider = "openai"
model = "omni-moderation-latest"
operation = "moderation"
lo = 0.3   # its band decides what goes on to the LLM
hi = 0.7
map = { harassment = "toxic" }

[[tasks.moderation.tiers]]
name = "llm"
provider = "openai"
model = "gpt-4o-mini"
"#;

/// Run `triage` off the async runtime (the fakes live on it).
async fn triage_async(args: Vec<String>, env: Vec<(String, String)>) -> Result<Output> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        triage(&args, &env)
    })
    .await?
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// The items the local tier escalates under (0.2, 0.8): (text, P(offensive), gold).
fn escalated_by_local(data_path: &Path, data: &str) -> Result<Vec<(String, f64, bool)>> {
    let scores = offensive_scores(data_path)?;
    let gold = gold_bits(data);
    Ok(data
        .lines()
        .zip(scores.iter().zip(&gold))
        .filter(|(_, (p, _))| **p > 0.2 && **p < 0.8)
        .map(|(l, (p, g))| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["text"].as_str().unwrap().to_owned(), *p, *g)
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tier_audit_reports_every_tier_offline_and_live() -> Result<()> {
    let Some(data) = val_slice(150) else {
        return Ok(());
    };
    let (moderations, chats) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let base = fake_moderation_and_chat(moderations.clone(), chats.clone()).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("three.toml");
    std::fs::write(&config, THREE_TIERS)?;
    let data_path = dir.path().join("val.jsonl");
    std::fs::write(&data_path, &data)?;
    let (c, d) = (config.to_str().unwrap(), data_path.to_str().unwrap());
    let env = vec![
        ("TRIAGE_PROVIDER_OPENAI_BASE_URL".to_owned(), base.clone()),
        (
            "OPENAI_API_KEY".to_owned(),
            "sk-test-not-a-real-key".to_owned(),
        ),
    ];
    let cache = dir.path().join("cache");
    let live_args = strings(&[
        "audit",
        "--config",
        c,
        "--task",
        "moderation",
        "--data",
        d,
        "--live",
        "--max-cost-usd",
        "100",
        "--cache",
        cache.to_str().unwrap(),
        "--json",
    ]);
    let r = json_out(&triage_async(live_args.clone(), env.clone()).await?)?;

    // By hand: what the local tier escalates, what hosted moderation keeps
    // (outside (0.3, 0.7)) and what goes on to the LLM.
    let escalated = escalated_by_local(&data_path, &data)?;
    let (kept, passed): (Vec<_>, Vec<_>) = escalated.iter().partition(|(t, _, _)| {
        let s = harassment_read(t);
        s <= 0.3 || s >= 0.7
    });
    assert!(
        kept.len() >= 5 && passed.len() >= 5,
        "{} kept, {} passed",
        kept.len(),
        passed.len()
    );
    assert_eq!(moderations.load(Ordering::SeqCst), escalated.len());
    assert_eq!(chats.load(Ordering::SeqCst), passed.len());
    let tiers = r["tiers"].as_array().context("tiers")?;
    let names: Vec<&str> = tiers.iter().map(|t| t["tier"].as_str().unwrap()).collect();
    assert_eq!(names, ["local", "hosted-moderation", "llm"]);
    let (local, middle, llm) = (&tiers[0], &tiers[1], &tiers[2]);
    assert!((f(&local["share"]) - (150 - escalated.len()) as f64 / 150.0).abs() < 1e-12);
    assert!(
        (f(&middle["share"]) - kept.len() as f64 / 150.0).abs() < 1e-12,
        "{r}"
    );
    assert!(
        (f(&llm["share"]) - passed.len() as f64 / 150.0).abs() < 1e-12,
        "{r}"
    );
    let right = |v: &[&(String, f64, bool)], flag: &dyn Fn(&str) -> bool| {
        v.iter().filter(|(t, _, g)| flag(t) == *g).count() as f64 / v.len() as f64
    };
    assert!((f(&middle["accuracy"]) - right(&kept, &|t| harassment_read(t) >= 0.5)).abs() < 1e-12);
    assert!((f(&llm["accuracy"]) - right(&passed, &rude)).abs() < 1e-12);
    // Each hosted tier's bill and its measured latency.
    assert!((f(&middle["cost_usd"]) - 0.01 * escalated.len() as f64).abs() < 1e-9);
    assert!((f(&llm["cost_usd"]) - 0.10 * passed.len() as f64).abs() < 1e-9);
    for t in [middle, llm] {
        assert!(
            f(&t["latency_ms_p50"]) > 0.0 && f(&t["latency_ms_p99"]) >= f(&t["latency_ms_p50"])
        );
    }
    let cost = f(&r["cost_per_100k_usd"]);
    let sum: f64 = tiers.iter().map(|t| f(&t["cost_usd"])).sum();
    assert!((sum / 150.0 * 100_000.0 - cost).abs() < 1e-6);
    // The frontier prices what was escalated at what it cost live: its point
    // at the configured band is this audit; all-local costs the local compute.
    let frontier = r["frontier"].as_array().context("frontier")?;
    let at = |lo: f64, hi: f64| {
        frontier
            .iter()
            .find(|p| f(&p["lo"]) == lo && f(&p["hi"]) == hi)
            .unwrap_or_else(|| panic!("no band {lo}-{hi}"))
    };
    assert!(
        (f(&at(0.2, 0.8)["cost_per_100k_usd"]) - cost).abs() < 1e-9,
        "{r}"
    );
    assert!((f(&r["band"]["cost_per_100k_usd"]) - cost).abs() < 1e-9);
    assert!(
        (f(&at(0.5, 0.5)["cost_per_100k_usd"]) - f(&local["cost_usd"]) / 150.0 * 100_000.0).abs()
            < 1e-9
    );

    // The rerun is free and finds the same figures.
    let r2 = json_out(&triage_async(live_args, env.clone()).await?)?;
    assert_eq!(moderations.load(Ordering::SeqCst), escalated.len());
    assert_eq!(chats.load(Ordering::SeqCst), passed.len());
    assert_eq!(r2["live"]["cached"], escalated.len());
    for (a, b) in r2["tiers"].as_array().unwrap().iter().zip(tiers).skip(1) {
        assert_eq!(a["share"], b["share"]);
        assert_eq!(a["accuracy"], b["accuracy"]);
        assert_eq!(a["cost_usd"], b["cost_usd"]);
    }

    // Offline calls nothing: the middle tier's band needs its scores, so it
    // is priced for every escalated item and answers none, as stated.
    let off = json_out(
        &triage_async(
            strings(&[
                "audit",
                "--config",
                c,
                "--task",
                "moderation",
                "--data",
                d,
                "--offline",
                "--json",
            ]),
            env,
        )
        .await?,
    )?;
    assert_eq!(moderations.load(Ordering::SeqCst), escalated.len());
    let tiers = off["tiers"].as_array().unwrap();
    assert_eq!(f(&tiers[1]["share"]), 0.0);
    assert!(tiers[1]["latency_ms_p50"].is_null());
    assert!((f(&tiers[1]["cost_usd"]) - 0.01 * escalated.len() as f64).abs() < 1e-9);
    assert!((f(&tiers[2]["share"]) - escalated.len() as f64 / 150.0).abs() < 1e-12);
    assert!(off["assumptions"].as_array().unwrap().iter().any(|a| {
        a.as_str()
            .unwrap()
            .contains("the band of hosted tier(s) `hosted-moderation`")
    }));
    let cost = f(&off["cost_per_100k_usd"]);
    let frontier = off["frontier"].as_array().unwrap();
    let point = frontier
        .iter()
        .find(|p| f(&p["lo"]) == 0.2 && f(&p["hi"]) == 0.8)
        .unwrap();
    assert!((f(&point["cost_per_100k_usd"]) - cost).abs() < 1e-9);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrating_a_hosted_middle_tier_asks_it_once_and_stops_at_the_cap() -> Result<()> {
    let Some(data) = val_slice(150) else {
        return Ok(());
    };
    let (moderations, chats) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let base = fake_moderation_and_chat(moderations.clone(), chats.clone()).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("three.toml");
    std::fs::write(&config, THREE_TIERS)?;
    let data_path = dir.path().join("val.jsonl");
    std::fs::write(&data_path, &data)?;
    let (c, d) = (config.to_str().unwrap(), data_path.to_str().unwrap());
    let env = vec![
        ("TRIAGE_PROVIDER_OPENAI_BASE_URL".to_owned(), base.clone()),
        (
            "OPENAI_API_KEY".to_owned(),
            "sk-test-not-a-real-key".to_owned(),
        ),
    ];
    let calibrate = |cache: &str, cap: &str, write: bool| {
        let mut args = strings(&[
            "calibrate",
            "--config",
            c,
            "--task",
            "moderation",
            "--tier",
            "hosted-moderation",
            "--data",
            d,
            "--target-local-share",
            "0.6",
            "--live",
            "--max-cost-usd",
            cap,
            "--cache",
            dir.path().join(cache).to_str().unwrap(),
            "--json",
        ]);
        if write {
            args.push("--write".into());
        }
        triage_async(args, env.clone())
    };

    // Without --live it is refused before any work.
    let out = triage_async(
        strings(&[
            "calibrate",
            "--config",
            c,
            "--task",
            "moderation",
            "--tier",
            "hosted-moderation",
            "--data",
            d,
            "--target-local-share",
            "0.6",
        ]),
        env.clone(),
    )
    .await?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is hosted: calibrating it asks its provider"),
        "{}",
        stderr(&out)
    );
    assert_eq!(moderations.load(Ordering::SeqCst), 0);

    let cal = json_out(&calibrate("cache", "100", true).await?)?;
    let escalated = escalated_by_local(&data_path, &data)?;
    assert_eq!(cal["tier"], "hosted-moderation");
    assert_eq!(cal["n"], 150);
    assert_eq!(cal["reached"], escalated.len(), "{cal}");
    assert_eq!(moderations.load(Ordering::SeqCst), escalated.len());
    assert_eq!(
        chats.load(Ordering::SeqCst),
        0,
        "calibrating the middle tier asked the LLM"
    );
    assert_eq!(cal["live"]["calls"], escalated.len());
    assert!((f(&cal["live"]["spent_usd"]) - 0.01 * escalated.len() as f64).abs() < 1e-9);
    // The chosen band by hand, on the fake's scores of the items that reach it.
    let (lo, hi) = (f(&cal["lo"]), f(&cal["hi"]));
    let accepted: Vec<&(String, f64, bool)> = escalated
        .iter()
        .filter(|(t, _, _)| {
            let s = harassment_read(t);
            s <= lo || s >= hi
        })
        .collect();
    let share = accepted.len() as f64 / escalated.len() as f64;
    assert!(share >= 0.6, "{cal}");
    assert!((f(&cal["local_share"]) - share).abs() < 1e-12, "{cal}");
    let right = accepted
        .iter()
        .filter(|(t, _, g)| (harassment_read(t) >= 0.5) == *g)
        .count();
    assert!((f(&cal["local_accuracy"]) - right as f64 / accepted.len() as f64).abs() < 1e-12);
    // Written into the hosted tier only, its comment kept.
    let after = std::fs::read_to_string(&config)?;
    assert!(
        after.contains("name = \"local\"\nlocal = \"toxicity\"\nlo = 0.2\nhi = 0.8\n"),
        "{after}"
    );
    assert!(
        after.contains(&format!(
            "lo = {lo}   # its band decides what goes on to the LLM\nhi = {hi}\n"
        )),
        "{after}"
    );
    assert!(after.contains("calibrated_accuracy = "));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("three.toml.bak"))?,
        THREE_TIERS
    );
    let check = triage_async(strings(&["config", "check", c]), Vec::new()).await?;
    assert!(check.status.success(), "{}", stderr(&check));

    // Again on the same cache: no call, the same band.
    std::fs::write(&config, THREE_TIERS)?;
    let again = json_out(&calibrate("cache", "100", false).await?)?;
    assert_eq!(moderations.load(Ordering::SeqCst), escalated.len());
    assert_eq!(again["live"]["cached"], escalated.len());
    assert_eq!(
        (again["lo"].clone(), again["hi"].clone()),
        (cal["lo"].clone(), cal["hi"].clone())
    );

    // A fresh cache and a $0.105 cap: ten calls at $0.01, the rest left out.
    let out = calibrate("cache2", "0.105", false).await?;
    let capped = json_out(&out)?;
    assert_eq!(capped["live"]["calls"], 10);
    assert_eq!(capped["live"]["skipped_over_budget"], escalated.len() - 10);
    assert!(f(&capped["live"]["spent_usd"]) <= 0.105);
    assert_eq!(capped["reached"], 10);
    assert!(stderr(&out).contains("were left out"), "{}", stderr(&out));
    assert_eq!(moderations.load(Ordering::SeqCst), escalated.len() + 10);
    Ok(())
}
