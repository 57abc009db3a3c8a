//! Router tests through `oneshot` (no socket), and end to end over a real
//! unix socket and TCP.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;
use triage_server::{ApiKey, AppState, Limits, Peer, router};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn shared_dir() -> PathBuf {
    std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

fn whisper_model() -> Option<PathBuf> {
    let p = shared_dir().join("models/whisper-tiny.en/ggml-model-f16.bin");
    if p.is_file() {
        Some(p)
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "Whisper model missing at {}",
            p.display()
        );
        eprintln!("SKIPPED: no Whisper model at {}", p.display());
        None
    }
}

/// A router with the Whisper engine and one of the shared speech clips, or
/// `None` (test skipped) when the shared folder is absent outside CI.
async fn whisper_app(
    limits: Limits,
    clip: &str,
) -> anyhow::Result<Option<(axum::Router, Vec<u8>)>> {
    if whisper_model().is_none() {
        return Ok(None);
    }
    let st = state_with(Batching::default(), true, limits).await?;
    let audio = std::fs::read(shared_dir().join("data/speech").join(clip))?;
    Ok(Some((router(st), audio)))
}

fn default_limits() -> Limits {
    Limits {
        moderation_body_bytes: 4096,
        ..Limits::default()
    }
}

/// Queue and batch limits of the test classifier (`None`: the defaults).
#[derive(Debug, Default, Clone, Copy)]
struct Batching {
    queue_capacity: Option<usize>,
    max_batch_size: Option<usize>,
}

async fn state(batching: Batching, whisper: bool) -> anyhow::Result<Arc<AppState>> {
    state_with(batching, whisper, default_limits()).await
}

/// The server as `triage serve` builds it: an engine from a config whose
/// moderation task is one local tier (the tiny multi-label fixture) and, when
/// asked, a transcription task on the shared Whisper model.
async fn state_with(
    batching: Batching,
    whisper: bool,
    limits: Limits,
) -> anyhow::Result<Arc<AppState>> {
    state_with_whisper(batching, whisper.then_some(""), limits).await
}

/// [`state_with`], with `whisper_extra` (TOML lines) added to the Whisper
/// specialist when there is one.
async fn state_with_whisper(
    batching: Batching,
    whisper_extra: Option<&str>,
    limits: Limits,
) -> anyhow::Result<Arc<AppState>> {
    let model = fixture("distilbert-seq-multilabel");
    let mut config = format!(
        r#"
[ledger]
disabled = true

[server]
moderation_task = "moderation"

[server.categories]
toxic = "harassment"
threat = "violence"

[local.tiny]
model = "{}"
kind = "classifier"
"#,
        model.display()
    );
    if let Some(n) = batching.queue_capacity {
        config.push_str(&format!("queue_capacity = {n}\n"));
    }
    if let Some(n) = batching.max_batch_size {
        config.push_str(&format!("max_batch_size = {n}\n"));
    }
    config.push_str(
        r#"
[tasks.moderation]
strategy = "cascade"
kind = "moderation"
labels = ["toxic", "insult", "threat", "identity_hate"]
threshold = 0.5

[[tasks.moderation.tiers]]
name = "local:tiny-toxicity"
local = "tiny"
map = { toxic = "toxic", insult = "insult", threat = "threat", identity_hate = "identity_hate" }
"#,
    );
    if let (Some(extra), Some(p)) = (whisper_extra, whisper_model()) {
        config.push_str(&format!(
            r#"
[local.whisper]
model = "{}"
kind = "whisper"
threads = 2
{extra}

[tasks.transcription]
strategy = "pipeline"

[[tasks.transcription.stages]]
name = "transcribe"
kind = "transcribe"
local = "whisper"
"#,
            p.display()
        ));
    }
    let config = triage_engine::Config::from_toml(&config, "test", std::path::Path::new("."))?;
    let engine = triage_engine::Engine::new(config).await?;
    Ok(AppState::new(
        engine,
        limits,
        vec![
            ApiKey {
                key: "sekret".into(),
                name: "ci".into(),
                tasks: vec!["moderation".into()],
                rpm: None,
                allow_overrides: false,
                admin: false,
            },
            ApiKey {
                key: "slow".into(),
                name: "slow".into(),
                tasks: vec![],
                rpm: Some(3),
                allow_overrides: false,
                admin: false,
            },
        ],
    ))
}

async fn call(
    app: axum::Router,
    req: Request<Body>,
) -> anyhow::Result<(StatusCode, axum::http::HeaderMap, Value)> {
    let resp = app.oneshot(req).await?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((parts.status, parts.headers, v))
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap_or_default()
}

#[tokio::test]
async fn moderation_answers_in_openai_shape_with_triage_headers() -> anyhow::Result<()> {
    let app = router(state(Batching::default(), false).await?);
    let (status, headers, v) = call(
        app.clone(),
        post_json(
            "/v1/moderations",
            r#"{"input": ["hello there", "you idiot"], "model": "omni-moderation-latest"}"#,
        ),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(headers["x-triage-tier"], "local:tiny-toxicity");
    assert!(headers["x-triage-cost-usd"].to_str()?.parse::<f64>()? >= 0.0);
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    for r in results {
        let scores = r["category_scores"].as_object().expect("scores");
        assert_eq!(
            scores.len(),
            triage_server::routes::moderation::OPENAI_CATEGORIES.len()
        );
        let harassment = scores["harassment"].as_f64().expect("harassment score");
        assert!(
            (harassment - r["triage"]["labels"]["toxic"].as_f64().expect("toxic")).abs() < 1e-6
        );
        assert_eq!(
            r["categories"]["harassment"].as_bool(),
            Some(harassment >= 0.5)
        );
        let any = r["categories"]
            .as_object()
            .expect("categories")
            .values()
            .any(|b| b == true);
        assert_eq!(r["flagged"].as_bool(), Some(any));
    }
    // A single string works too.
    let (status, _, v) = call(app, post_json("/v1/moderations", r#"{"input": "one"}"#)).await?;
    assert_eq!(
        (status, v["results"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_typed_openai_errors() -> anyhow::Result<()> {
    let app = router(state(Batching::default(), false).await?);
    for (body, status, code) in [
        ("{not json", StatusCode::BAD_REQUEST, "invalid_request"),
        (
            r#"{"input": 5}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            r#"{"input": []}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            r#"{"input": "x", "model": "gpt-9"}"#,
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
    ] {
        let (s, headers, v) = call(app.clone(), post_json("/v1/moderations", body)).await?;
        assert_eq!(s, status, "{body}: {v}");
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(headers.contains_key("x-triage-tier"));
    }
    let big = format!(r#"{{"input": "{}"}}"#, "a".repeat(10_000));
    let (s, _, v) = call(app.clone(), post_json("/v1/moderations", &big)).await?;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "request_too_large");
    let (s, _, v) = call(app, Request::get("/nope").body(Body::empty())?).await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    Ok(())
}

#[tokio::test]
async fn tcp_peers_need_a_key_with_the_right_scope() -> anyhow::Result<()> {
    let app = router(state(Batching::default(), false).await?);
    let tcp = |req: Request<Body>| {
        let mut req = req;
        req.extensions_mut()
            .insert(ConnectInfo(Peer::Tcp("127.0.0.1:9".parse().expect("addr"))));
        req
    };
    let (s, _, v) = call(
        app.clone(),
        tcp(post_json("/v1/moderations", r#"{"input": "x"}"#)),
    )
    .await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
    );
    let mut req = tcp(post_json("/v1/moderations", r#"{"input": "x"}"#));
    req.headers_mut()
        .insert("authorization", "Bearer wrong".parse()?);
    assert_eq!(call(app.clone(), req).await?.0, StatusCode::UNAUTHORIZED);
    let mut req = tcp(post_json("/v1/moderations", r#"{"input": "x"}"#));
    req.headers_mut()
        .insert("authorization", "Bearer sekret".parse()?);
    assert_eq!(call(app.clone(), req).await?.0, StatusCode::OK);
    // The key is scoped to moderation only.
    let mut req = tcp(Request::post("/v1/audio/transcriptions")
        .header("content-type", "multipart/form-data; boundary=x")
        .body(Body::from("--x--\r\n"))?);
    req.headers_mut()
        .insert("authorization", "Bearer sekret".parse()?);
    assert_eq!(call(app.clone(), req).await?.0, StatusCode::FORBIDDEN);
    // A key limited to 3 requests a minute gets 429 with Retry-After on the fourth.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let mut req = tcp(post_json("/v1/moderations", r#"{"input": "x"}"#));
        req.headers_mut()
            .insert("authorization", "Bearer slow".parse()?);
        let resp = app.clone().oneshot(req).await?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(resp.headers()["retry-after"].to_str()?.parse::<u64>()? >= 1);
        }
        statuses.push(resp.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // Health stays open.
    assert_eq!(
        call(app, tcp(Request::get("/health").body(Body::empty())?))
            .await?
            .0,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn overload_is_429_with_retry_after() -> anyhow::Result<()> {
    let app = router(
        state(
            Batching {
                queue_capacity: Some(1),
                max_batch_size: Some(1),
            },
            false,
        )
        .await?,
    );
    let inputs: Vec<String> = (0..40)
        .map(|i| format!("message number {i} about words"))
        .collect();
    let body = json!({"input": inputs}).to_string();
    let (mut ok, mut limited) = (0, 0);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (app, body) = (app.clone(), body.clone());
        set.spawn(async move {
            let req = Request::post("/v1/moderations")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap_or_default();
            app.oneshot(req).await
        });
    }
    while let Some(r) = set.join_next().await {
        let resp = r??;
        match resp.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(resp.headers().contains_key("retry-after"));
                limited += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert!(
        limited >= 1,
        "a queue of one cannot take 64 inputs at once ({ok} ok)"
    );
    Ok(())
}

#[tokio::test]
async fn models_health_ready_and_metrics() -> anyhow::Result<()> {
    let app = router(state(Batching::default(), false).await?);
    let (_, _, v) = call(app.clone(), Request::get("/v1/models").body(Body::empty())?).await?;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert!(ids.contains(&"omni-moderation-latest") && ids.contains(&"text-moderation-latest"));
    assert!(!ids.contains(&"whisper-1"), "no Whisper model was loaded");
    assert_eq!(
        call(app.clone(), Request::get("/ready").body(Body::empty())?)
            .await?
            .0,
        StatusCode::OK
    );
    call(
        app.clone(),
        post_json("/v1/moderations", r#"{"input": "x"}"#),
    )
    .await?;
    let (s, _, text) = call(app, Request::get("/metrics").body(Body::empty())?).await?;
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().unwrap_or_default().to_owned();
    assert!(
        text.contains(r#"triage_requests_total{route="/v1/moderations",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"triage_answers_total{task="moderation",tier="local:tiny-toxicity"} 1"#),
        "{text}"
    );
    assert!(text.contains("triage_request_duration_seconds_bucket"));
    Ok(())
}

fn multipart(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "triage-test-boundary";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    if let Some((name, bytes)) = file {
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn transcriptions_in_every_response_format() -> anyhow::Result<()> {
    let Some((app, audio)) = whisper_app(default_limits(), "goforward.wav").await? else {
        return Ok(());
    };
    for (format, check) in [
        ("json", "\"text\""),
        ("text", "forward"),
        // The first cue starts where speech does (VAD), within the first second.
        ("srt", "00:00:00,"),
        ("vtt", "WEBVTT"),
        ("verbose_json", "\"segments\""),
    ] {
        let (ct, body) = multipart(
            &[("model", "whisper-1"), ("response_format", format)],
            Some(("clip.wav", &audio)),
        );
        let req = Request::post("/v1/audio/transcriptions")
            .header("content-type", ct)
            .body(Body::from(body))?;
        let resp = app.clone().oneshot(req).await?;
        assert_eq!(resp.status(), StatusCode::OK, "{format}");
        assert_eq!(resp.headers()["x-triage-tier"], "local:whisper");
        let text = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
        assert!(
            text.to_lowercase().contains(check) || text.contains(check),
            "{format}: {text}"
        );
    }
    // Broken audio, a missing model field and an unknown model are 4xx in OpenAI's shape.
    for (fields, file, status) in [
        (
            vec![("model", "whisper-1")],
            Some(("x.mp3", &b"not audio at all"[..])),
            StatusCode::BAD_REQUEST,
        ),
        (
            vec![],
            Some(("clip.wav", &audio[..])),
            StatusCode::BAD_REQUEST,
        ),
        (
            vec![("model", "whisper-9")],
            Some(("clip.wav", &audio[..])),
            StatusCode::NOT_FOUND,
        ),
        (vec![("model", "whisper-1")], None, StatusCode::BAD_REQUEST),
    ] {
        let (ct, body) = multipart(&fields, file);
        let req = Request::post("/v1/audio/transcriptions")
            .header("content-type", ct)
            .body(Body::from(body))?;
        let (s, _, v) = call(app.clone(), req).await?;
        assert_eq!(s, status, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    Ok(())
}

async fn raw_http(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    request: &str,
) -> anyhow::Result<String> {
    stream.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn end_to_end_over_a_unix_socket_and_tcp() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("triage.sock");
    // A stale socket file from a dead server is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock)?);
    assert!(sock.exists());
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = tcp.local_addr()?;
    drop(tcp);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state(Batching::default(), false).await?;
    let server = tokio::spawn(triage_server::serve_until(
        st.clone(),
        Some(sock.clone()),
        Some(addr),
        async {
            let _ = stop_rx.await;
        },
    ));
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(&sock).await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock)?.permissions().mode() & 0o777,
        0o660
    );
    // A second server on the same live socket is refused.
    let err = triage_server::bind_unix(&sock).await.err();
    assert!(matches!(
        err,
        Some(triage_server::ServeError::SocketInUse(_))
    ));

    // A path that holds anything but a socket is refused and kept: a
    // regular file, and a symlink (never followed) to one.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me")?;
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&file, &link)?;
    for path in [&file, &link] {
        let err = triage_server::bind_unix(path).await.err();
        assert!(
            matches!(err, Some(triage_server::ServeError::NotASocket(_))),
            "{path:?}: {err:?}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file)?, "keep me");
    assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
    // A folder triage makes for the socket is the owner's alone.
    let fresh = dir.path().join("run/triage/t.sock");
    drop(triage_server::bind_unix(&fresh).await?);
    assert_eq!(
        std::fs::metadata(dir.path().join("run/triage"))?
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let body = r#"{"input": "hello"}"#;
    let request = format!(
        "POST /v1/moderations HTTP/1.1\r\nHost: triage\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut unix = tokio::net::UnixStream::connect(&sock).await?;
    let answer = raw_http(&mut unix, &request).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"results\""));

    let mut plain = tokio::net::TcpStream::connect(addr).await?;
    let answer = raw_http(&mut plain, &request).await?;
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "TCP without a key: {answer}"
    );
    let keyed = request.replace(
        "Connection: close",
        "Authorization: Bearer sekret\r\nConnection: close",
    );
    let mut plain = tokio::net::TcpStream::connect(addr).await?;
    let answer = raw_http(&mut plain, &keyed).await?;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "TCP with a key: {answer}"
    );

    let _ = stop_tx.send(());
    server.await??;
    assert!(!sock.exists(), "the socket file is removed on shutdown");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_to_completion_without_their_client() -> anyhow::Result<()> {
    let Some((app, audio)) = whisper_app(default_limits(), "librivox_ss01_0870.wav").await? else {
        return Ok(());
    };
    let (ct, body) = multipart(&[("task", "transcription")], Some(("long.wav", &audio)));
    // The submitting request returns at once; nobody waits on the job.
    let (s, _, v) = call(
        app.clone(),
        Request::post("/v1/jobs")
            .header("content-type", ct)
            .body(Body::from(body))?,
    )
    .await?;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().expect("job id").to_owned();

    let (s, _, early) = call(
        app.clone(),
        Request::get(format!("/v1/jobs/{id}/result")).body(Body::empty())?,
    )
    .await?;
    if s != StatusCode::OK {
        assert_eq!(s, StatusCode::CONFLICT, "{early}");
    }
    // Progress as server-sent events, ending with the final state.
    let resp = app
        .clone()
        .oneshot(Request::get(format!("/v1/jobs/{id}/events")).body(Body::empty())?)
        .await?;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = String::from_utf8(resp.into_body().collect().await?.to_bytes().to_vec())?;
    assert!(events.contains("event: done"), "{events}");
    let (s, _, status) = call(
        app.clone(),
        Request::get(format!("/v1/jobs/{id}")).body(Body::empty())?,
    )
    .await?;
    assert_eq!(
        (s, status["status"].as_str(), status["progress"].as_u64()),
        (StatusCode::OK, Some("succeeded"), Some(100))
    );
    let (s, _, result) = call(
        app.clone(),
        Request::get(format!("/v1/jobs/{id}/result")).body(Body::empty())?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK);
    assert!(
        result["text"]
            .as_str()
            .is_some_and(|t| t.contains("Dashwood")),
        "{result}"
    );

    let (s, _, _) = call(
        app.clone(),
        Request::get("/v1/jobs/job-nope").body(Body::empty())?,
    )
    .await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (ct, body) = multipart(&[], Some(("broken.mp3", b"definitely not audio")));
    let (s, _, v) = call(
        app,
        Request::post("/v1/jobs")
            .header("content-type", ct)
            .body(Body::from(body))?,
    )
    .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcriptions_past_the_queue_are_refused_at_once() -> anyhow::Result<()> {
    let limits = Limits {
        audio_parallel: 1,
        audio_queue: 1,
        ..Limits::default()
    };
    let Some((app, audio)) = whisper_app(limits, "goforward.wav").await? else {
        return Ok(());
    };
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (ct, body) = multipart(&[("model", "whisper-1")], Some(("clip.wav", &audio)));
        let app = app.clone();
        set.spawn(async move {
            let req = Request::post("/v1/audio/transcriptions")
                .header("content-type", ct)
                .body(Body::from(body))
                .unwrap_or_default();
            app.oneshot(req)
                .await
                .map(|r| (r.status(), r.headers().contains_key("retry-after")))
        });
    }
    let mut statuses = Vec::new();
    while let Some(r) = set.join_next().await {
        let (status, retry_after) = r??;
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert!(retry_after);
        }
        statuses.push(status);
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    // One runs, one waits, the other two are refused without waiting.
    assert_eq!((ok, refused), (2, 2), "{statuses:?}");
    Ok(())
}

/// A 16-bit mono 16 kHz WAV of `samples`.
fn wav_bytes(samples: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    let data = (samples.len() * 2) as u32;
    out.extend(b"RIFF");
    out.extend((36 + data).to_le_bytes());
    out.extend(b"WAVEfmt ");
    out.extend(16u32.to_le_bytes());
    out.extend(1u16.to_le_bytes());
    out.extend(1u16.to_le_bytes());
    out.extend(16_000u32.to_le_bytes());
    out.extend(32_000u32.to_le_bytes());
    out.extend(2u16.to_le_bytes());
    out.extend(16u16.to_le_bytes());
    out.extend(b"data");
    out.extend(data.to_le_bytes());
    for s in samples {
        out.extend(((s.clamp(-1.0, 1.0) * 32767.0) as i16).to_le_bytes());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_seconds_of_low_noise_transcribe_to_empty_text() -> anyhow::Result<()> {
    let Some((app, _)) = whisper_app(default_limits(), "goforward.wav").await? else {
        return Ok(());
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<f32> = (0..16_000 * 30)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        })
        .collect();
    for format in ["json", "verbose_json", "text"] {
        let (ct, body) = multipart(
            &[("model", "whisper-1"), ("response_format", format)],
            Some(("noise.wav", &wav_bytes(&noise))),
        );
        let (s, _, v) = call(
            app.clone(),
            Request::post("/v1/audio/transcriptions")
                .header("content-type", ct)
                .body(Body::from(body))?,
        )
        .await?;
        assert_eq!(s, StatusCode::OK, "{v}");
        let text = match &v {
            Value::String(t) => t.trim().to_owned(),
            other => other["text"].as_str().unwrap_or("missing").to_owned(),
        };
        assert_eq!(text, "", "{format}: {v}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_timestamps_come_back_in_openai_shape() -> anyhow::Result<()> {
    let Some((app, audio)) = whisper_app(default_limits(), "librivox_ss01_0870.wav").await? else {
        return Ok(());
    };
    let (ct, body) = multipart(
        &[
            ("model", "whisper-1"),
            ("response_format", "verbose_json"),
            ("timestamp_granularities[]", "word"),
            ("timestamp_granularities[]", "segment"),
        ],
        Some(("clip.wav", &audio)),
    );
    let (s, _, v) = call(
        app.clone(),
        Request::post("/v1/audio/transcriptions")
            .header("content-type", ct)
            .body(Body::from(body))?,
    )
    .await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    let words = v["words"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no words: {v}"))?;
    let segments = v["segments"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no segments"))?;
    assert!(words.len() > 10, "{v}");
    let mut last = 0.0;
    let mut texts = Vec::new();
    for w in words {
        let (start, end) = (
            w["start"].as_f64().unwrap_or(-1.0),
            w["end"].as_f64().unwrap_or(-1.0),
        );
        let p = w["probability"].as_f64().unwrap_or(-1.0);
        assert!(start >= last - 1e-9 && start <= end, "{w} after {last}");
        assert!((0.0..=1.0).contains(&p), "{w}");
        // Inside one of the segments.
        assert!(
            segments
                .iter()
                .any(|s| s["start"].as_f64().unwrap_or(f64::MAX) <= start
                    && end <= s["end"].as_f64().unwrap_or(0.0)),
            "{w} outside every segment"
        );
        last = end;
        texts.push(w["word"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(texts.join(" "), v["text"].as_str().unwrap_or_default());
    assert!(last <= v["duration"].as_f64().unwrap_or(0.0) + 1e-6);

    // Without the word granularity there are no words; with a format that
    // is not verbose_json it is a 400.
    let (ct, body) = multipart(
        &[("model", "whisper-1"), ("response_format", "verbose_json")],
        Some(("clip.wav", &audio)),
    );
    let (_, _, v) = call(
        app.clone(),
        Request::post("/v1/audio/transcriptions")
            .header("content-type", ct)
            .body(Body::from(body))?,
    )
    .await?;
    assert!(v.get("words").is_none(), "{v}");
    let (ct, body) = multipart(
        &[
            ("model", "whisper-1"),
            ("timestamp_granularities[]", "word"),
        ],
        Some(("clip.wav", &audio)),
    );
    let (s, _, v) = call(
        app,
        Request::post("/v1/audio/transcriptions")
            .header("content-type", ct)
            .body(Body::from(body))?,
    )
    .await?;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_limit_are_413_naming_it() -> anyhow::Result<()> {
    let limits = Limits {
        audio_upload_bytes: 50_000,
        ..default_limits()
    };
    let Some((app, audio)) = whisper_app(limits, "librivox_ss01_0870.wav").await? else {
        return Ok(());
    };
    assert!(audio.len() > 50_000);
    for route in ["/v1/audio/transcriptions", "/v1/jobs", "/v1/execute"] {
        let (ct, body) = multipart(
            &[("model", "whisper-1"), ("task", "transcription")],
            Some(("clip.wav", &audio)),
        );
        // Read as it streams (no declared length)...
        let (s, _, v) = call(
            app.clone(),
            Request::post(route)
                .header("content-type", ct.clone())
                .body(Body::from(body.clone()))?,
        )
        .await?;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{route}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("50000") && message.contains("max_upload_bytes"),
            "{route}: {v}"
        );
        // ...and refused from its declared length before any of it is read.
        let (s, _, v) = call(
            app.clone(),
            Request::post(route)
                .header("content-type", ct)
                .header("content-length", "9000000000")
                .body(Body::from(body))?,
        )
        .await?;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{route}: {v}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_stops() -> anyhow::Result<()> {
    let limits = Limits {
        audio_parallel: 1,
        ..default_limits()
    };
    let Some((app, audio)) = whisper_app(limits, "librivox_ss01_0870.wav").await? else {
        return Ok(());
    };
    // Ten copies end to end: long enough to be running when cancelled.
    let samples: Vec<f32> = {
        let one = &audio[44..];
        let mut pcm = Vec::new();
        for _ in 0..10 {
            pcm.extend(
                one.chunks_exact(2)
                    .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0),
            );
        }
        pcm
    };
    let long = wav_bytes(&samples);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (ct, body) = multipart(&[], Some(("long.wav", &long)));
        let (s, _, v) = call(
            app.clone(),
            Request::post("/v1/jobs")
                .header("content-type", ct)
                .body(Body::from(body))?,
        )
        .await?;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        ids.push(v["id"].as_str().unwrap_or_default().to_owned());
    }
    // The second waits for the only slot: cancelled, it never starts. The
    // first is cancelled once it is transcribing.
    let cancel = |id: String| {
        let app = app.clone();
        async move {
            let (s, _, v) = call(
                app,
                Request::post(format!("/v1/jobs/{id}/cancel")).body(Body::empty())?,
            )
            .await?;
            assert_eq!(s, StatusCode::OK, "{v}");
            anyhow::Ok(())
        }
    };
    cancel(ids[1].clone()).await?;
    for _ in 0..600 {
        let (_, _, v) = call(
            app.clone(),
            Request::get(format!("/v1/jobs/{}", ids[0])).body(Body::empty())?,
        )
        .await?;
        if v["status"] != "queued" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cancel(ids[0].clone()).await?;
    for id in &ids {
        let resp = app
            .clone()
            .oneshot(Request::get(format!("/v1/jobs/{id}/events")).body(Body::empty())?)
            .await?;
        let _ = resp.into_body().collect().await?;
        let (_, _, v) = call(
            app.clone(),
            Request::get(format!("/v1/jobs/{id}")).body(Body::empty())?,
        )
        .await?;
        assert_eq!(v["status"], "failed", "{v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("cancelled")),
            "{v}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn transcriptions_of_a_mono_meeting_label_who_speaks() -> anyhow::Result<()> {
    // The VAD and speaker models come from scripts/test (fetch scripts).
    let models = ["TRIAGE_VAD_MODEL", "TRIAGE_SPEAKER_MODEL"]
        .iter()
        .all(|v| std::env::var_os(v).is_some_and(|p| std::path::Path::new(&p).is_file()));
    if whisper_model().is_none() || !models {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI provides the VAD and speaker models"
        );
        eprintln!(
            "SKIPPED: no VAD or speaker model (run scripts/fetch-silero-vad, scripts/fetch-speaker-model)"
        );
        return Ok(());
    }
    let st = state_with_whisper(
        Batching::default(),
        Some("speaker_model = \"default\""),
        default_limits(),
    )
    .await?;
    let app = router(st);
    // A man, a woman, the man again, a second of silence after each.
    let mut samples = Vec::new();
    for clip in [
        "librivox_ss01_0870.wav",
        "ljspeech_LJ001-0001.wav",
        "librivox_ss01_0890.wav",
    ] {
        let bytes = std::fs::read(shared_dir().join("data/speech").join(clip))?;
        // The shared clips are 16 kHz mono 16-bit PCM after a 44-byte header.
        samples.extend(
            bytes[44..]
                .chunks_exact(2)
                .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32767.0),
        );
        samples.extend(std::iter::repeat_n(0f32, 16_000));
    }
    let wav = wav_bytes(&samples);
    let post = |format: &str| {
        let (ct, body) = multipart(
            &[("model", "whisper-1"), ("response_format", format)],
            Some(("meeting.wav", &wav)),
        );
        Request::post("/v1/audio/transcriptions")
            .header("content-type", ct)
            .body(Body::from(body))
    };
    let (status, _, v) = call(app.clone(), post("verbose_json")?).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let mut turns: Vec<&str> = Vec::new();
    for seg in v["segments"].as_array().expect("segments") {
        let who = seg["speaker"]
            .as_str()
            .expect("every segment has a speaker");
        if turns.last() != Some(&who) {
            turns.push(who);
        }
    }
    assert_eq!(turns, ["Speaker 1", "Speaker 2", "Speaker 1"], "{v}");
    // The text format reads by turn.
    let (_, _, text) = call(app, post("text")?).await?;
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains("Speaker 2: Printing"), "{text}");
    Ok(())
}

/// A small deterministic generator (xorshift), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Fuzzing the body readers: random JSON-ish bodies to the JSON routes and
/// random multipart bodies (mangled boundaries, headers, field names and
/// sizes) to the upload routes. Every answer is a typed 4xx or a 2xx in
/// OpenAI's error shape, never a 5xx, a hang or a panic.
#[tokio::test]
async fn random_json_and_multipart_bodies_get_typed_answers() -> anyhow::Result<()> {
    let app = router(state(Batching::default(), false).await?);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    const JSON_PIECES: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        "\"input\"",
        "\"task\"",
        ":",
        ",",
        "\"moderation\"",
        "null",
        "1e999",
        "-0",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "true",
        "\"overrides\"",
        "{\"shadow\": 2}",
        "\"messages\"",
        "[{\"role\": \"user\", \"content\": 5}]",
        "\u{feff}",
        "\"é\"",
        "  ",
    ];
    for round in 0..400 {
        let body: String = (0..rng.below(24))
            .map(|_| JSON_PIECES[rng.below(JSON_PIECES.len())])
            .collect();
        let route = ["/v1/moderations", "/v1/execute", "/v1/chat/completions"][round % 3];
        let res = app
            .clone()
            .oneshot(
                Request::post(route)
                    .header("content-type", "application/json")
                    .body(Body::from(body.clone()))?,
            )
            .await?;
        let status = res.status();
        assert!(!status.is_server_error(), "{route} {body:?}: {status}");
        let bytes = res.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes)?;
            assert!(v["error"]["code"].is_string(), "{route} {body:?}: {v}");
        }
    }
    const NAMES: &[&str] = &["file", "task", "model", "overrides", "language", "x", ""];
    for round in 0..300 {
        let boundary = if rng.below(10) == 0 { "" } else { "b0undary" };
        let mut body = Vec::new();
        for _ in 0..rng.below(5) {
            let name = NAMES[rng.below(NAMES.len())];
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match rng.below(4) {
                0 => body.extend_from_slice(b"Content-Disposition: form-data\r\n\r\n"),
                1 => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"a.wav\"\r\n\r\n").as_bytes(),
                ),
                _ => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            let len = [0, 3, 100, 70_000][rng.below(4)];
            body.extend((0..len).map(|_| rng.next() as u8));
            body.extend_from_slice(b"\r\n");
        }
        if rng.below(3) > 0 {
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        }
        let route = ["/v1/jobs", "/v1/execute", "/v1/audio/transcriptions"][round % 3];
        let res = app
            .clone()
            .oneshot(
                Request::post(route)
                    .header(
                        "content-type",
                        format!("multipart/form-data; boundary={boundary}"),
                    )
                    .body(Body::from(body))?,
            )
            .await?;
        let status = res.status();
        assert!(
            !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{route} round {round}: {status}"
        );
        let bytes = res.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes)?;
            assert!(v["error"]["code"].is_string(), "{route} round {round}: {v}");
        }
    }
    Ok(())
}
