//! `[[budgets]]` on the real binary (`triage serve` over TCP with keys),
//! against a fake OpenAI-compatible provider that bills like a real one: it
//! answers slowly, writes as much as it is allowed (a long answer when the
//! call is uncapped) and reports the usage it billed. What it billed must
//! stay within the budget whatever the concurrency; spending overrides need
//! `allow_overrides`; jobs spend as their key; a provider that bills past
//! the cap it was sent is counted and flagged.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The fake's prices, and the config's: dollars per million tokens.
const INPUT_PER_MTOK: f64 = 2.5;
const OUTPUT_PER_MTOK: f64 = 10.0;
/// What the fake writes when nothing caps it (a long story): more than
/// triage's default cap would allow.
const NATURAL_OUTPUT_TOKENS: u64 = 8000;

/// A fake provider and what it billed.
struct Provider {
    base_url: String,
    /// Billed dollars, in micro-dollars.
    billed_micro: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    /// The `max_tokens` of every request it received (`None`: uncapped).
    caps: Arc<Mutex<Vec<Option<u64>>>>,
    _rt: tokio::runtime::Runtime,
}

impl Provider {
    /// `overbill`: report twice the output it was allowed (a provider that
    /// ignores the cap).
    fn start(delay: Duration, overbill: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let billed_micro = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let caps = Arc::new(Mutex::new(Vec::new()));
        let (b, c, k) = (billed_micro.clone(), calls.clone(), caps.clone());
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move |body: axum::Json<Value>| {
                let (b, c, k) = (b.clone(), c.clone(), k.clone());
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    let cap = body.0["max_tokens"]
                        .as_u64()
                        .or(body.0["max_completion_tokens"].as_u64());
                    k.lock().unwrap().push(cap);
                    let bytes: usize = body.0["messages"]
                        .as_array()
                        .map(|m| {
                            m.iter()
                                .map(|m| m["content"].as_str().map_or(0, str::len))
                                .sum()
                        })
                        .unwrap_or(0);
                    // Bytes / 4 plus the template: well under triage's bound.
                    let prompt = bytes as u64 / 4 + 7;
                    let allowed = cap.map_or(NATURAL_OUTPUT_TOKENS, |c| c.min(NATURAL_OUTPUT_TOKENS));
                    let completion = if overbill { allowed * 2 } else { allowed };
                    let usd = (prompt as f64 * INPUT_PER_MTOK + completion as f64 * OUTPUT_PER_MTOK)
                        / 1e6;
                    // Billed when the request is taken, as real providers do.
                    b.fetch_add((usd * 1e6).round() as u64, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    axum::Json(json!({
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": 1_764_000_000,
                        "model": body.0["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Once upon a time.", "refusal": null}, "logprobs": null, "finish_reason": "length"}],
                        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
                    }))
                }
            }),
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        Self {
            base_url: format!("http://{addr}/v1"),
            billed_micro,
            calls,
            caps,
            _rt: rt,
        }
    }

    fn billed_usd(&self) -> f64 {
        self.billed_micro.load(Ordering::SeqCst) as f64 / 1e6
    }
}

/// A config with one chat task on the fake, keys `app` (no overrides) and
/// `ops` (allow_overrides), and `budgets` (TOML) appended.
pub(crate) fn config(dir: &Path, provider: &str, ledger_url: &str, budgets: &str) -> PathBuf {
    let path = dir.join("triage.toml");
    let toml = format!(
        r#"
[ledger]
url = "{ledger_url}"

[providers.fake]
kind = "openai_compatible"
base_url = "{provider}"

[retry]
max_attempts = 1

[[price]]
provider = "fake"
model = "big"
effective = "2024-01-01"
input_per_mtok = {INPUT_PER_MTOK}
output_per_mtok = {OUTPUT_PER_MTOK}

[server]
chat_task = "chat"

[[server.keys]]
name = "app"
key_env = "TRIAGE_TEST_APP_KEY"

[[server.keys]]
name = "ops"
key_env = "TRIAGE_TEST_OPS_KEY"
allow_overrides = true

[tasks.chat]
strategy = "cascade"
kind = "chat"

[[tasks.chat.tiers]]
name = "llm"
provider = "fake"
model = "big"
{budgets}
"#
    );
    std::fs::write(&path, toml).unwrap();
    path
}

pub(crate) const APP_KEY: &str = "sk-app-0123456789";
const OPS_KEY: &str = "sk-ops-0123456789";

/// `triage serve` on a free loopback port; killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: String,
    stderr: PathBuf,
}

impl Server {
    pub(crate) fn start(config: &Path, dir: &Path, name: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let stderr = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_triage"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--socket")
            .arg(dir.join(format!("{name}.sock")))
            .args(["--listen", &addr])
            .env("TRIAGE_TEST_APP_KEY", APP_KEY)
            .env("TRIAGE_TEST_OPS_KEY", OPS_KEY)
            // The edge tests' key scoped to one task.
            .env("TRIAGE_TEST_SCOPED_KEY", "sk-scoped-0123456789")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut server = Self {
            child,
            addr,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.get("/health", None).map(|(s, _)| s) != Some(200) {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("the server exited ({status}): {}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "the server did not start: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// One request (`line` is `METHOD PATH`), with `headers` (each ending in
    /// CRLF): the status and the body.
    pub(crate) fn request(
        &self,
        line: &str,
        headers: &str,
        body: &[u8],
        key: Option<&str>,
    ) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let req = format!(
            "{line} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}{headers}Content-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.get(9..12)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        Some((status, body))
    }

    pub(crate) fn get(&self, path: &str, key: Option<&str>) -> Option<(u16, String)> {
        self.request(&format!("GET {path}"), "", b"", key)
    }

    pub(crate) fn post_json(&self, path: &str, body: &Value, key: &str) -> (u16, String) {
        self.request(
            &format!("POST {path}"),
            "Content-Type: application/json\r\n",
            body.to_string().as_bytes(),
            Some(key),
        )
        .unwrap_or((0, String::new()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An uncapped chat completion, as a careless client sends it.
fn uncapped_chat() -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": "Tell me a very long story."}]})
}

/// `n` uncapped chat completions at once: their statuses and bodies.
fn burst(server: &Arc<Server>, n: usize, key: &'static str) -> Vec<(u16, String)> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let s = server.clone();
            std::thread::spawn(move || s.post_json("/v1/chat/completions", &uncapped_chat(), key))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// `triage costs --config C --budgets --json`, by budget name.
fn stored_budgets(config: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["costs", "--budgets", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

fn assert_refused_by_budget(results: &[(u16, String)]) -> usize {
    let answered = results.iter().filter(|(s, _)| *s == 200).count();
    for (status, body) in results.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 429, "{body}");
        assert!(body.contains("budget_exceeded"), "{body}");
    }
    answered
}

const CHAT_BUDGET: &str = r#"
[[budgets]]
name = "chat-daily"
period = "day"
usd = 0.05
task = "chat"
"#;

#[test]
fn concurrent_uncapped_calls_cannot_pass_a_small_budget() {
    let provider = Provider::start(Duration::from_millis(1500), false);
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = config(dir.path(), &provider.base_url, &ledger, CHAT_BUDGET);
    let server = Arc::new(Server::start(&config, dir.path(), "a"));

    let results = burst(&server, 20, APP_KEY);
    let answered = assert_refused_by_budget(&results);
    assert!(answered >= 1, "{results:?}");
    let billed = provider.billed_usd();
    assert!(billed <= 0.05 * 1.02, "the provider billed ${billed}");
    // triage capped every call it sent (the caller set no max_tokens).
    let caps = provider.caps.lock().unwrap().clone();
    assert_eq!(caps.len(), answered);
    assert!(
        caps.iter().all(|c| c.is_some_and(|c| c <= 4096)),
        "{caps:?}"
    );

    // The budget's figures, live and from the ledger, match the bill.
    let (status, metrics) = server.get("/metrics", Some(APP_KEY)).unwrap();
    assert_eq!(status, 200);
    let spent_line = metrics
        .lines()
        .find(|l| l.starts_with("triage_budget_spent_usd{budget=\"chat-daily\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    let spent: f64 = spent_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((spent - billed).abs() < 1e-5, "{spent_line} vs {billed}");
    assert!(
        metrics.contains("triage_budget_reserved_usd{budget=\"chat-daily\",period=\"day\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("triage_budget_overrun_usd_total 0"),
        "{metrics}"
    );
    drop(server);
    let stored = stored_budgets(&config);
    assert_eq!(stored[0]["name"], "chat-daily");
    let spent = stored[0]["spent_usd"].as_f64().unwrap();
    assert!((spent - billed).abs() < 1e-5, "{stored:?} vs {billed}");
    assert!((stored[0]["left_usd"].as_f64().unwrap() - (0.05 - spent)).abs() < 1e-9);
}

#[test]
fn spending_overrides_need_allow_overrides() {
    let provider = Provider::start(Duration::ZERO, false);
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let roomy = CHAT_BUDGET.replace("usd = 0.05", "usd = 1.0");
    let config = config(dir.path(), &provider.base_url, &ledger, &roomy);
    let server = Server::start(&config, dir.path(), "o");
    for overrides in [
        json!({"shadow": 1.0}),
        json!({"route": "anything"}),
        json!({"start_tier": "llm"}),
        json!({"tiers": ["llm"]}),
        json!({"hi": 0.9}),
        json!({"lo": 0.1}),
    ] {
        let body = json!({"task": "chat", "input": "hello", "overrides": overrides});
        let (status, text) = server.post_json("/v1/execute", &body, APP_KEY);
        assert_eq!(status, 403, "{overrides}: {text}");
        assert!(text.contains("allow_overrides"), "{text}");
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 0);
    // The caller's own request id spends nothing: allowed.
    let body = json!({"task": "chat", "input": "hello", "overrides": {"request_id": "r-1"}});
    assert_eq!(server.post_json("/v1/execute", &body, APP_KEY).0, 200);
    // A key with allow_overrides may.
    let body = json!({"task": "chat", "input": "hello", "overrides": {"shadow": 1.0}});
    let (status, text) = server.post_json("/v1/execute", &body, OPS_KEY);
    assert_eq!(status, 200, "{text}");
}

#[test]
fn jobs_spend_as_their_key() {
    let provider = Provider::start(Duration::ZERO, false);
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let budgets = r#"
[[budgets]]
name = "app-daily"
period = "day"
usd = 0.05
key = "app"
"#;
    let config = config(dir.path(), &provider.base_url, &ledger, budgets);
    let server = Server::start(&config, dir.path(), "j");
    let submit = |key: &str| {
        let boundary = "XyZbOuNdArY";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"task\"\r\n\r\nchat\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"story.txt\"\r\nContent-Type: text/plain\r\n\r\nTell me a very long story.\r\n--{boundary}--\r\n"
        );
        let (status, text) = server
            .request(
                "POST /v1/jobs",
                &format!("Content-Type: multipart/form-data; boundary={boundary}\r\n"),
                body.as_bytes(),
                Some(key),
            )
            .unwrap();
        assert_eq!(status, 202, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let finished = |id: &str, key: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, text) = server.get(&format!("/v1/jobs/{id}"), Some(key)).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            if matches!(v["status"].as_str(), Some("succeeded" | "failed")) {
                return v;
            }
            assert!(Instant::now() < deadline, "{v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The first job fits (its ceiling is 4096 tokens out, $0.041) and
    // spends $0.041 of the key's $0.05: the uncapped answer stops at the cap.
    let first = finished(&submit(APP_KEY), APP_KEY);
    assert_eq!(first["status"], "succeeded", "{first}");
    // The second does not fit in what is left: it fails without a call.
    let second = finished(&submit(APP_KEY), APP_KEY);
    assert_eq!(second["status"], "failed", "{second}");
    assert!(second.to_string().contains("budget"), "{second}");
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    // Another key's job is not counted against `app`.
    let other_id = submit(OPS_KEY);
    let other = finished(&other_id, OPS_KEY);
    assert_eq!(other["status"], "succeeded", "{other}");
    // A job belongs to its key: another key cannot read or cancel it.
    let (status, _) = server
        .get(&format!("/v1/jobs/{other_id}"), Some(APP_KEY))
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = server
        .request(
            &format!("POST /v1/jobs/{other_id}/cancel"),
            "",
            b"",
            Some(APP_KEY),
        )
        .unwrap();
    assert_eq!(status, 404);
    drop(server);
    // The ledger carries the job's key: the key's budget reads it back.
    let stored = stored_budgets(&config);
    let spent = stored[0]["spent_usd"].as_f64().unwrap();
    let one_call = provider.billed_usd() / 2.0;
    assert!(
        (spent - one_call).abs() < 1e-5,
        "{stored:?}, one call ${one_call}"
    );
}

#[test]
fn a_provider_that_bills_past_the_cap_is_counted_and_flagged() {
    let provider = Provider::start(Duration::ZERO, true);
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let config = config(dir.path(), &provider.base_url, &ledger, CHAT_BUDGET);
    let server = Server::start(&config, dir.path(), "x");
    let body = json!({"model": "chat", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi."}]});
    let (status, text) = server.post_json("/v1/chat/completions", &body, APP_KEY);
    assert_eq!(status, 200, "{text}");
    assert_eq!(*provider.caps.lock().unwrap(), [Some(100)]);
    let (_, metrics) = server.get("/metrics", Some(APP_KEY)).unwrap();
    let overrun: f64 = metrics
        .lines()
        .find(|l| l.starts_with("triage_budget_overrun_usd_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    // It reported 200 output tokens where 100 were allowed: $0.001 over
    // the output's share of the ceiling, less the input bound's slack.
    assert!(overrun > 0.0009 && overrun <= 0.001, "{overrun}");
    // The budget counts what the provider reported, not the ceiling.
    let spent: f64 = metrics
        .lines()
        .find(|l| l.starts_with("triage_budget_spent_usd{budget=\"chat-daily\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((spent - provider.billed_usd()).abs() < 1e-5, "{spent}");
    let log = server.log();
    assert!(
        log.contains("more usage than the call was allowed")
            && log.contains("fake")
            && log.contains("big"),
        "{log}"
    );
}

#[test]
fn config_check_refuses_unpriced_models_and_bad_budgets_under_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let check = |budgets: &str, model: &str| {
        let path = config(
            dir.path(),
            "http://127.0.0.1:9/v1",
            "sqlite://l.db",
            budgets,
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replacen(
            "name = \"llm\"\nprovider = \"fake\"\nmodel = \"big\"",
            &format!("name = \"llm\"\nprovider = \"fake\"\nmodel = \"{model}\""),
            1,
        );
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_triage"))
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = check(CHAT_BUDGET, "big");
    assert!(ok, "{text}");
    let (ok, text) = check(CHAT_BUDGET, "unpriced-model");
    assert!(!ok, "{text}");
    assert!(
        text.contains("budgets[0] (chat-daily)")
            && text.contains("fake/unpriced-model")
            && text.contains("[[price]]"),
        "{text}"
    );
    // Without a budget the unpriced model is allowed (recorded at the
    // provider's dearest price).
    let (ok, text) = check("", "unpriced-model");
    assert!(ok, "{text}");
    for (budget, field) in [
        (
            CHAT_BUDGET.replace("usd = 0.05", "usd = 0"),
            "budgets[0] (chat-daily).usd",
        ),
        (
            CHAT_BUDGET.replace("usd = 0.05", "usd = -1"),
            "budgets[0] (chat-daily).usd",
        ),
        (
            CHAT_BUDGET.replace("\"day\"", "\"week\""),
            "budgets[0] (chat-daily).period",
        ),
        (
            CHAT_BUDGET.replace("task = \"chat\"", "task = \"nope\""),
            "budgets[0] (chat-daily).task",
        ),
        (
            CHAT_BUDGET.replace("task = \"chat\"", "key = \"nobody\""),
            "budgets[0] (chat-daily).key",
        ),
    ] {
        let (ok, text) = check(&budget, "big");
        assert!(!ok && text.contains(field), "{field}: {text}");
    }
}

/// A fresh database on the throwaway PostgreSQL `scripts/test` starts, or
/// `None` (skipped) where there is none.
fn fresh_postgres() -> Option<String> {
    let Ok(url) = std::env::var("TRIAGE_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide TRIAGE_TEST_POSTGRES_URL (scripts/test starts one)"
        );
        eprintln!("SKIPPED: no TRIAGE_TEST_POSTGRES_URL");
        return None;
    };
    let name = format!(
        "triage_budgets_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let out = Command::new("psql")
        .arg(&url)
        .args(["-c", &format!("CREATE DATABASE {name}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (base, _) = url.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

#[test]
fn two_servers_sharing_postgresql_stay_within_one_budget() {
    let Some(ledger) = fresh_postgres() else {
        return;
    };
    let provider = Provider::start(Duration::from_millis(1500), false);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &provider.base_url, &ledger, CHAT_BUDGET);
    let a = Arc::new(Server::start(&config, dir.path(), "pa"));
    let b = Arc::new(Server::start(&config, dir.path(), "pb"));
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| burst(&a, 10, APP_KEY));
        let hb = s.spawn(|| burst(&b, 10, APP_KEY));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    let results: Vec<_> = ra.into_iter().chain(rb).collect();
    let answered = assert_refused_by_budget(&results);
    assert!(answered >= 1, "{results:?}");
    let billed = provider.billed_usd();
    assert!(
        billed <= 0.05 * 1.02,
        "two replicas let the provider bill ${billed}"
    );
    // Both replicas settled into the shared rows: the store's total is the bill.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored = stored_budgets(&config);
        let spent = stored[0]["spent_usd"].as_f64().unwrap();
        let held = stored[0]["reserved_usd"].as_f64().unwrap();
        if (spent - billed).abs() < 1e-5 && held == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{stored:?} vs billed ${billed}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
