//! The web UI's files and API through `oneshot`: the embedded files are the
//! repository's, the access rules (open page, admin-only data on TCP, open
//! socket), the graph of every shipped example, designer saves with version
//! checks and history, and the dashboard against `/metrics` and the ledger.
//! No model runs: the tasks here answer from rules and templates.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tower::ServiceExt;
use triage_server::{ApiKey, AppState, Limits, Peer, router};

const ADMIN: &str = "admin-key-for-tests";
const USER: &str = "user-key-for-tests";

fn config_text(ledger: &Path, edit: bool) -> String {
    config_with_ledger(&format!("sqlite://{}", ledger.display()), edit)
}

fn config_with_ledger(ledger_url: &str, edit: bool) -> String {
    format!(
        r#"# a comment the designer must keep
[server.ui]
edit = {edit}

[ledger]
url = "{ledger_url}"

[providers.mock]
kind = "openai_compatible"
base_url = "http://127.0.0.1:9/v1"

[tasks.support]
strategy = "router"

[tasks.support.intent]
kind = "rules"
default = "general"
rules = [{{ route = "greeting", any = ["hello"] }}]

[tasks.support.routes.greeting]
handler = "template"
template = "Hello there."

[tasks.support.routes.general]
handler = "model"
provider = "mock"
model = "small"

[tasks.chat]
strategy = "cascade"
kind = "chat"

[[tasks.chat.tiers]]
name = "cheap"
provider = "mock"
model = "small"
hi = 0.8 # keep me

[[tasks.chat.tiers]]
name = "strong"
provider = "mock"
model = "big"
"#
    )
}

struct Fixture {
    app: axum::Router,
    state: std::sync::Arc<AppState>,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

async fn fixture(edit: bool) -> anyhow::Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let text = config_text(&dir.path().join("ledger.db"), edit);
    fixture_with(dir, &text).await
}

async fn fixture_with(dir: tempfile::TempDir, text: &str) -> anyhow::Result<Fixture> {
    let config = dir.path().join("triage.toml");
    std::fs::write(&config, text)?;
    let engine = triage_engine::Engine::new(triage_engine::Config::load(&config)?).await?;
    let key = |key: &str, name: &str, admin| ApiKey {
        key: key.into(),
        name: name.into(),
        tasks: vec![],
        rpm: None,
        allow_overrides: false,
        admin,
    };
    let state = AppState::new(
        engine,
        Limits::default(),
        vec![key(ADMIN, "admin", true), key(USER, "user", false)],
    );
    Ok(Fixture {
        app: router(state.clone()),
        state,
        config,
        _dir: dir,
    })
}

async fn call(
    app: &axum::Router,
    req: Request<Body>,
) -> anyhow::Result<(StatusCode, axum::http::HeaderMap, Vec<u8>)> {
    let resp = app.clone().oneshot(req).await?;
    let (parts, body) = resp.into_parts();
    Ok((
        parts.status,
        parts.headers,
        body.collect().await?.to_bytes().to_vec(),
    ))
}

fn tcp(mut req: Request<Body>, key: Option<&str>) -> anyhow::Result<Request<Body>> {
    req.extensions_mut()
        .insert(ConnectInfo(Peer::Tcp("127.0.0.1:9".parse()?)));
    if let Some(k) = key {
        req.headers_mut()
            .insert("authorization", format!("Bearer {k}").parse()?);
    }
    Ok(req)
}

fn unix(mut req: Request<Body>) -> Request<Body> {
    req.extensions_mut().insert(ConnectInfo(Peer::Unix {
        pid: None,
        uid: 0,
        gid: 0,
    }));
    req
}

fn get(uri: &str) -> anyhow::Result<Request<Body>> {
    Ok(Request::get(uri).body(Body::empty())?)
}

fn post(uri: &str, body: &Value) -> anyhow::Result<Request<Body>> {
    Ok(Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))?)
}

async fn admin_json(f: &Fixture, req: Request<Body>) -> anyhow::Result<(StatusCode, Value)> {
    let (s, _, b) = call(&f.app, tcp(req, Some(ADMIN))?).await?;
    Ok((s, serde_json::from_slice(&b).unwrap_or(Value::Null)))
}

#[tokio::test]
async fn the_served_files_are_the_repository_files_with_a_strict_policy() -> anyhow::Result<()> {
    let f = fixture(false).await?;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    on_disk.sort();
    let mut served: Vec<String> = triage_server::ui::ASSETS
        .iter()
        .map(|(n, _, _)| (*n).to_owned())
        .collect();
    served.sort();
    assert_eq!(
        on_disk, served,
        "every file in ui/ is embedded, and only those"
    );
    for name in &served {
        let uri = if name == "index.html" {
            "/ui/".to_owned()
        } else {
            format!("/ui/{name}")
        };
        // Over TCP without any key: the files hold no data.
        let (s, h, body) = call(&f.app, tcp(get(&uri)?, None)?).await?;
        assert_eq!(s, StatusCode::OK, "{uri}");
        assert_eq!(
            body,
            std::fs::read(dir.join(name))?,
            "{uri} differs from ui/{name}"
        );
        let csp = h["content-security-policy"].to_str()?;
        assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'"));
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
    }
    // No third-party code: nothing the page loads names another origin.
    for (name, _, bytes) in triage_server::ui::ASSETS {
        let text = String::from_utf8_lossy(bytes);
        for pattern in ["https://", "//cdn", "src=\"http"] {
            assert!(!text.contains(pattern), "{name} refers to {pattern}");
        }
    }
    let (s, _, _) = call(&f.app, tcp(get("/ui/nope.js")?, None)?).await?;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "unknown paths under /ui need a key"
    );
    Ok(())
}

#[tokio::test]
async fn ui_data_needs_an_admin_key_on_tcp_and_is_open_on_the_socket() -> anyhow::Result<()> {
    let f = fixture(false).await?;
    let (s, h, _) = call(&f.app, tcp(get("/ui/api/config")?, None)?).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("content-security-policy"));
    let (s, _, b) = call(&f.app, tcp(get("/ui/api/config")?, Some(USER))?).await?;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&b).contains("admin key"));
    let (s, _, b) = call(&f.app, tcp(get("/ui/api/dashboard")?, Some(USER))?).await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&b));
    // The user key still works for the API it was made for.
    let (s, _, _) = call(
        &f.app,
        tcp(
            post("/v1/execute", &json!({"task": "support", "input": "hello"}))?,
            Some(USER),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    let (s, h, b) = call(&f.app, tcp(get("/ui/api/config")?, Some(ADMIN))?).await?;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["cache-control"], "no-store");
    let v: Value = serde_json::from_slice(&b)?;
    let names: Vec<&str> = v["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"support") && names.contains(&"chat"),
        "{names:?}"
    );
    let (s, _, _) = call(&f.app, unix(get("/ui/api/config")?)).await?;
    assert_eq!(s, StatusCode::OK);
    Ok(())
}

/// Every task, tier, stage and route name of a shipped example.
fn names(path: &Path) -> anyhow::Result<Vec<String>> {
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(path)?)?;
    let mut out = Vec::new();
    for (task, t) in doc["tasks"].as_table().into_iter().flatten() {
        out.push(task.clone());
        for list in ["tiers", "stages"] {
            for x in t.get(list).and_then(|v| v.as_array()).into_iter().flatten() {
                out.push(x["name"].as_str().unwrap_or_default().to_owned());
            }
        }
        if let Some(r) = t.get("routes").and_then(|r| r.as_table()) {
            out.extend(r.keys().cloned());
        }
    }
    Ok(out)
}

#[test]
fn every_shipped_example_becomes_a_graph_with_all_its_names() -> anyhow::Result<()> {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for file in [
        "moderation.toml",
        "support-router.toml",
        "meeting-notes.toml",
    ] {
        let path = examples.join(file);
        let config = triage_engine::Config::load(&path)?;
        let graphs = triage_server::ui::graph::tasks(config.tasks.values(), &Default::default());
        let v = serde_json::to_value(&graphs)?;
        let mut drawn: Vec<String> = Vec::new();
        for t in v.as_array().into_iter().flatten() {
            drawn.push(t["name"].as_str().unwrap_or_default().to_owned());
            let ids: Vec<&str> = t["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["id"].as_str())
                .collect();
            for n in t["nodes"].as_array().into_iter().flatten() {
                drawn.push(n["name"].as_str().unwrap_or_default().to_owned());
            }
            for e in t["edges"].as_array().into_iter().flatten() {
                for end in ["from", "to"] {
                    let id = e[end].as_str().unwrap_or_default();
                    assert!(ids.contains(&id), "{file}: edge to a missing node {id}");
                }
            }
        }
        for name in names(&path)? {
            assert!(
                drawn.contains(&name),
                "{file}: {name} is not drawn: {drawn:?}"
            );
        }
    }
    // Provider, model and band are on the nodes.
    let config = triage_engine::Config::load(&examples.join("moderation.toml"))?;
    let g = triage_server::ui::graph::tasks(config.tasks.values(), &Default::default());
    let v = serde_json::to_value(&g)?;
    let tier = v[0]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == "hosted-moderation")
        .cloned()
        .unwrap_or_default();
    assert_eq!(tier["provider"], "openai");
    assert_eq!(tier["model"], "omni-moderation-latest");
    assert_eq!(tier["band"], json!([0.2, 0.8]));
    Ok(())
}

#[tokio::test]
async fn the_designer_saves_with_a_version_check_keeps_history_and_reloads() -> anyhow::Result<()> {
    let f = fixture(true).await?;
    let (_, cfg) = admin_json(&f, get("/ui/api/config")?).await?;
    assert_eq!(cfg["editable"], true);
    let v1 = cfg["version"].as_str().unwrap_or_default().to_owned();
    let original = std::fs::read_to_string(&f.config)?;
    let band = |lo: f64, hi: f64, version: &str, save: bool| {
        json!({"version": version, "save": save,
               "edits": [{"op": "set_band", "task": "chat", "tier": 0, "lo": lo, "hi": hi}]})
    };
    // Invalid: the problem names the tier's key, nothing changes.
    let (s, v) = admin_json(&f, post("/ui/api/config/edit", &band(0.9, 0.1, &v1, true))?).await?;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["problems"][0]["key"]
            .as_str()
            .unwrap_or_default()
            .starts_with("tasks.chat.tiers[0]"),
        "{v}"
    );
    assert_eq!(std::fs::read_to_string(&f.config)?, original);
    // A check alone writes nothing and shows the diff.
    let (s, v) = admin_json(
        &f,
        post("/ui/api/config/edit", &band(0.1, 0.9, &v1, false))?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["diff"].to_string().contains("lo = 0.1"), "{v}");
    assert_eq!(std::fs::read_to_string(&f.config)?, original);
    // Save: written with the comments, engine reloaded.
    let (s, v) = admin_json(&f, post("/ui/api/config/edit", &band(0.1, 0.9, &v1, true))?).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    let v2 = v["version"].as_str().unwrap_or_default().to_owned();
    let saved = std::fs::read_to_string(&f.config)?;
    assert!(
        saved.contains("hi = 0.9 # keep me")
            && saved.contains("# a comment the designer must keep"),
        "{saved}"
    );
    let engine = f.state.engine.current();
    let triage_engine::config::Strategy::Cascade(c) = &engine.config.tasks["chat"].strategy else {
        panic!("not a cascade")
    };
    assert_eq!(c.tiers[0].band, Some((0.1, 0.9)));
    // A second browser still at v1 is told the file changed.
    let (s, v) = admin_json(&f, post("/ui/api/config/edit", &band(0.3, 0.7, &v1, true))?).await?;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["current_version"], v2.as_str());
    // A hand edit is detected too.
    std::fs::write(&f.config, format!("{saved}\n# by hand\n"))?;
    let (s, _) = admin_json(&f, post("/ui/api/config/edit", &band(0.3, 0.7, &v2, true))?).await?;
    assert_eq!(s, StatusCode::CONFLICT);
    std::fs::write(&f.config, &saved)?;
    // History: both versions, the diff, rollback.
    let (_, h) = admin_json(&f, get("/ui/api/history")?).await?;
    assert_eq!(h["versions"].as_array().map(Vec::len), Some(2), "{h}");
    let (_, d) = admin_json(&f, get("/ui/api/history/2")?).await?;
    let changed: Vec<(String, String)> = d["diff"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["op"] != " ")
        .map(|l| {
            (
                l["op"].as_str().unwrap_or_default().to_owned(),
                l["line"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        changed,
        [
            ("-".to_owned(), "hi = 0.8 # keep me".to_owned()),
            ("+".to_owned(), "hi = 0.9 # keep me".to_owned()),
            ("+".to_owned(), "lo = 0.1".to_owned()),
        ],
        "{d}"
    );
    let (s, v) = admin_json(
        &f,
        post(
            "/ui/api/config/rollback",
            &json!({"version": v2, "number": 1}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(std::fs::read_to_string(&f.config)?, original);
    let engine = f.state.engine.current();
    let triage_engine::config::Strategy::Cascade(c) = &engine.config.tasks["chat"].strategy else {
        panic!("not a cascade")
    };
    assert_eq!(c.tiers[0].band, Some((0.0, 0.8)));
    // Templates add tasks that run.
    let (_, cfg) = admin_json(&f, get("/ui/api/config")?).await?;
    let v3 = cfg["version"].as_str().unwrap_or_default().to_owned();
    let (s, v) = admin_json(
        &f,
        post(
            "/ui/api/config/edit",
            &json!({"version": v3, "save": true,
            "edits": [{"op": "add_task", "name": "triage_router", "template": "router"}]}),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, b) = call(
        &f.app,
        tcp(
            post(
                "/v1/execute",
                &json!({"task": "triage_router", "input": "hello"}),
            )?,
            Some(ADMIN),
        )?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    Ok(())
}

#[tokio::test]
async fn editing_is_off_unless_the_config_allows_it() -> anyhow::Result<()> {
    let f = fixture(false).await?;
    let (_, cfg) = admin_json(&f, get("/ui/api/config")?).await?;
    assert_eq!(cfg["editable"], false);
    let body = json!({"version": cfg["version"], "save": true,
        "edits": [{"op": "set_band", "task": "chat", "tier": 0, "lo": 0.1, "hi": 0.9}]});
    let before = std::fs::read_to_string(&f.config)?;
    let (s, v) = admin_json(&f, post("/ui/api/config/edit", &body)?).await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v.to_string().contains("[server.ui] edit = true"), "{v}");
    assert_eq!(std::fs::read_to_string(&f.config)?, before);
    Ok(())
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_dashboard_counts_what_metrics_and_the_ledger_count() -> anyhow::Result<()> {
    let f = fixture(false).await?;
    let n = 7;
    for i in 0..n {
        let (s, _, _) = call(
            &f.app,
            unix(post(
                "/v1/execute",
                &json!({"task": "support", "input": format!("hello {i}")}),
            )?),
        )
        .await?;
        assert_eq!(s, StatusCode::OK);
    }
    for l in f.state.ledgers() {
        l.flush().await?;
    }
    let (_, _, m) = call(&f.app, unix(get("/metrics")?)).await?;
    let m = String::from_utf8_lossy(&m).into_owned();
    let (s, d) = admin_json(&f, get("/ui/api/dashboard")?).await?;
    assert_eq!(s, StatusCode::OK, "{d}");
    let ok = metric(
        &m,
        r#"triage_task_requests_total{task="support",outcome="ok"}"#,
    );
    assert_eq!(ok, n as f64, "{m}");
    assert_eq!(d["since_start"]["support"]["ok"], json!(n));
    let answered = metric(
        &m,
        r#"triage_answers_total{task="support",tier="route:greeting"}"#,
    );
    assert_eq!(
        d["since_start"]["support"]["tiers"]["route:greeting"]["answered"].as_f64(),
        Some(answered)
    );
    let hour = &d["windows"][0];
    assert_eq!(hour["name"], "hour");
    assert_eq!(hour["requests"], json!(n), "{hour}");
    let task = &hour["tasks"][0];
    assert_eq!(task["task"], "support");
    assert!(task["p50_ms"].as_f64().is_some(), "{task}");
    Ok(())
}

/// `n_ok` greetings (a template answers) and `n_failed` general questions
/// (the provider does not answer) through `/v1/execute`, committed.
async fn make_requests(f: &Fixture, n_ok: usize, n_failed: usize) -> anyhow::Result<()> {
    for i in 0..n_ok + n_failed {
        let input = if i < n_ok {
            format!("hello {i}")
        } else {
            format!("what is the time {i}")
        };
        let (s, _, b) = call(
            &f.app,
            unix(post(
                "/v1/execute",
                &json!({"task": "support", "input": input}),
            )?),
        )
        .await?;
        let ok = i < n_ok;
        assert_eq!(s.is_success(), ok, "{s} {}", String::from_utf8_lossy(&b));
    }
    for l in f.state.ledgers() {
        l.flush().await?;
    }
    Ok(())
}

/// A fresh database on the throwaway PostgreSQL server of the tests.
async fn fresh_postgres_database() -> anyhow::Result<String> {
    use sqlx::Executor;
    let url = std::env::var("TRIAGE_TEST_POSTGRES_URL").map_err(|_| {
        anyhow::anyhow!(
            "TRIAGE_TEST_POSTGRES_URL is not set: run `eval \"$(scripts/test-postgres start)\"` (scripts/test does)"
        )
    })?;
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect(&url).await?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let name = format!(
        "triage_ui_{}_{}",
        std::process::id(),
        nanos.as_nanos() % 1_000_000_007
    );
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    admin.close().await;
    let (base, _) = url
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("no database in {url}"))?;
    Ok(format!("{base}/{name}"))
}

/// The per-minute totals on PostgreSQL: the writer's upsert counts the
/// requests made, the dashboard shows them, and the schema step that sums
/// raw rows into `minute_stats` (what an older ledger gets on upgrade) gives
/// the same numbers. Runs where the build has the PostgreSQL driver
/// (`--features triage-engine/postgres`, as scripts/test builds).
#[tokio::test]
async fn the_dashboard_counts_the_requests_in_a_postgres_ledger() -> anyhow::Result<()> {
    if !triage_engine::ledger::POSTGRES {
        eprintln!("skipped: built without the PostgreSQL driver (triage-engine/postgres)");
        return Ok(());
    }
    let url = fresh_postgres_database().await?;
    let (n_ok, n_failed) = (5, 2);
    let f = fixture_with(tempfile::tempdir()?, &config_with_ledger(&url, false)).await?;
    assert!(
        f.state.ledgers().iter().all(|l| l.is_postgres()),
        "the fixture's ledger is not the PostgreSQL one"
    );
    make_requests(&f, n_ok, n_failed).await?;
    let (_, _, m) = call(&f.app, unix(get("/metrics")?)).await?;
    let m = String::from_utf8_lossy(&m).into_owned();
    let (s, d) = admin_json(&f, get("/ui/api/dashboard")?).await?;
    assert_eq!(s, StatusCode::OK, "{d}");
    let failed_metric = metric(
        &m,
        r#"triage_task_requests_total{task="support",outcome="error"}"#,
    );
    assert_eq!(failed_metric, n_failed as f64, "{m}");
    for w in 0..2 {
        let window = &d["windows"][w];
        assert_eq!(window["requests"], json!(n_ok + n_failed), "{window}");
        let tasks = window["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 1, "{window}");
        let t = &tasks[0];
        assert_eq!(
            (
                t["task"].as_str(),
                t["requests"].as_i64(),
                t["failed"].as_i64()
            ),
            (
                Some("support"),
                Some((n_ok + n_failed) as i64),
                Some(n_failed as i64)
            ),
            "{t}"
        );
        let greeting = t["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["tier"] == "route:greeting")
            .unwrap_or_else(|| panic!("no route:greeting tier in {t}"));
        assert_eq!(greeting["answered"], json!(n_ok), "{greeting}");
        assert!(t["p50_ms"].as_f64().is_some(), "{t}");
    }
    // Minutes: the per-minute series sums to the window.
    let per_minute: i64 = d["windows"][1]["per_minute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(per_minute, (n_ok + n_failed) as i64);

    // As a ledger from before the totals: no tables, step 4 not recorded.
    {
        use sqlx::Executor;
        let pool = sqlx::AnyPool::connect(&url).await?;
        pool.execute("DROP TABLE minute_stats").await?;
        pool.execute("DROP TABLE minute_stats_backfill").await?;
        pool.execute("DELETE FROM triage_migrations WHERE version = 4")
            .await?;
        pool.close().await;
    }
    // Two replicas start on it: both sum the old rows in the background,
    // and each chunk is claimed by one of them.
    let g = fixture_with(tempfile::tempdir()?, &config_with_ledger(&url, false)).await?;
    let _h = fixture_with(tempfile::tempdir()?, &config_with_ledger(&url, false)).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let again = loop {
        let (s, again) = admin_json(&g, get("/ui/api/dashboard")?).await?;
        assert_eq!(s, StatusCode::OK, "{again}");
        if again["backfill_before_ms"].is_null() {
            break again;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old rows were not summed: {again}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    for w in 0..2 {
        let (a, b) = (&d["windows"][w], &again["windows"][w]);
        assert_eq!(a["requests"], b["requests"], "{a}\n{b}");
        for (x, y) in a["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .zip(b["tasks"].as_array().unwrap())
        {
            assert_eq!(x["requests"], y["requests"]);
            assert_eq!(x["failed"], y["failed"]);
            // Same histogram, so the same quantiles.
            assert_eq!(x["p95_ms"], y["p95_ms"]);
            let tiers = |t: &Value| -> Vec<(String, i64, i64, i64)> {
                t["tiers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        (
                            r["tier"].as_str().unwrap_or_default().to_owned(),
                            r["attempts"].as_i64().unwrap_or(-1),
                            r["failed_attempts"].as_i64().unwrap_or(-1),
                            r["answered"].as_i64().unwrap_or(-1),
                        )
                    })
                    .collect()
            };
            assert!(!tiers(x).is_empty(), "{x}");
            assert_eq!(tiers(x), tiers(y));
            let close = |k: &str| (x[k].as_f64().unwrap() - y[k].as_f64().unwrap()).abs() < 1e-9;
            assert!(close("cost_usd") && close("all_llm_cost_usd"), "{x}\n{y}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn socket_edit_off_leaves_saving_to_admin_keys_and_the_trail_names_them() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let text = config_text(&dir.path().join("ledger.db"), true).replacen(
        "edit = true\n",
        "edit = true\nsocket_edit = false\n",
        1,
    );
    let f = fixture_with(dir, &text).await?;
    let (_, cfg) = admin_json(&f, get("/ui/api/config")?).await?;
    let body = json!({"version": cfg["version"], "save": true,
        "edits": [{"op": "set_band", "task": "chat", "tier": 0, "lo": 0.1, "hi": 0.9}]});
    let before = std::fs::read_to_string(&f.config)?;
    let (s, _, b) = call(&f.app, unix(post("/ui/api/config/edit", &body)?)).await?;
    assert_eq!(s, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("socket_edit"));
    assert_eq!(std::fs::read_to_string(&f.config)?, before);
    // An admin key over TCP may, and the audit trail says who.
    let (s, v) = admin_json(&f, post("/ui/api/config/edit", &body)?).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, hist) = admin_json(&f, get("/ui/api/history")?).await?;
    let change = &hist["changes"][0];
    assert_eq!(change["action"], "save", "{hist}");
    assert_eq!(change["who"], "key admin", "{hist}");
    assert!(
        change["diff"].as_array().is_some_and(|d| d
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.starts_with('+')))),
        "{hist}"
    );
    Ok(())
}
