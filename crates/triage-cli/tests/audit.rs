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
        "is not a local specialist",
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
    use axum::routing::post;
    let app = axum::Router::new().route(
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
                let rude = ["idiot", "stupid", "shit", "fuck", "ass"]
                    .iter()
                    .any(|w| user.contains(w));
                let content = json!({"toxic": if rude { 0.9 } else { 0.1 }}).to_string();
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
    );
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
