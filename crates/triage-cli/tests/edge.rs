//! The HTTP edge of the real binary against slow and hostile clients: a
//! request head that never ends and a body that never arrives are closed,
//! past the connection cap a client gets 503, a JSON body over the limit is
//! 413 before it is read, and a huge form field from a key that may not use
//! the task is refused without the server's memory growing.

use crate::budgets::{APP_KEY, Server, config};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `Server::start` sets it for the config's `scoped` key.
const SCOPED_KEY: &str = "sk-scoped-0123456789";

/// The budget tests' config (no provider is called here) with `server`
/// lines added to `[server]` and a key that may use `chat` only.
fn edge_config(dir: &Path, server: &str) -> PathBuf {
    let path = config(dir, "http://127.0.0.1:9/v1", "sqlite://ledger.db", "");
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[server]\n",
        &format!(
            "[server]\n{server}\n\n[[server.keys]]\nname = \"scoped\"\nkey_env = \"TRIAGE_TEST_SCOPED_KEY\"\ntasks = [\"chat\"]\n\n[server]\n"
        ),
        1,
    );
    // Tables cannot repeat: fold the second `[server]` header away.
    let text = fold_server(&text);
    std::fs::write(&path, text).unwrap();
    path
}

/// Move the keys' `[[server.keys]]` tables after the `[server]` keys.
fn fold_server(text: &str) -> String {
    let (head, rest) = text.split_once("[server]\n").unwrap();
    let (inserted, rest) = rest.split_once("\n[server]\n").unwrap();
    let (settings, key) = inserted.split_once("\n\n[[server.keys]]").unwrap();
    format!("{head}[server]\n{settings}\n{rest}\n[[server.keys]]{key}\n")
}

fn start(dir: &Path, server: &str, name: &str) -> Server {
    Server::start(&edge_config(dir, server), dir, name)
}

/// Read until the peer closes; `Err` if it is still open after `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> Result<(Duration, String), String> {
    let started = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                return Ok((
                    started.elapsed(),
                    String::from_utf8_lossy(&out).into_owned(),
                ));
            }
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok((
                    started.elapsed(),
                    String::from_utf8_lossy(&out).into_owned(),
                ));
            }
            Err(e) => return Err(format!("still open after {within:?} ({e}): {out:?}")),
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn metric(server: &Server, line_start: &str) -> f64 {
    let (_, text) = server.get("/metrics", Some(APP_KEY)).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in {text}"))
}

#[test]
fn a_head_that_never_ends_is_closed_at_the_default_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "", "h");
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"POST /v1/execute HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .unwrap();
    let (after, _) = closed_within(&mut s, Duration::from_secs(30)).unwrap();
    assert!(after >= Duration::from_secs(9), "{after:?}");
    // Counted, and the server still answers.
    assert!(
        metric(
            &server,
            "triage_timed_out_connections_total{listener=\"tcp\"}"
        ) >= 1.0
    );
}

#[test]
fn a_body_that_never_arrives_is_closed_and_a_kept_alive_idle_connection_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        "body_idle_timeout_s = 2\nkeep_alive_idle_s = 3",
        "b",
    );
    // A declared 1 GB body of which 10 bytes arrive.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let head = format!(
        "POST /v1/execute HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {APP_KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\na\r\n{{\"task\": \"\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let (after, answer) = closed_within(&mut s, Duration::from_secs(20)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_secs(10),
        "{after:?}"
    );
    // A kept-alive connection that asks nothing more is closed.
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (after, answer) = closed_within(&mut s, Duration::from_secs(20)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(after < Duration::from_secs(12), "{after:?}");
}

#[test]
fn past_the_connection_cap_a_client_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "max_connections_tcp = 2", "c");
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut third = TcpStream::connect(&server.addr).unwrap();
    let (_, answer) = closed_within(&mut third, Duration::from_secs(5)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("Retry-After: 1") && answer.contains("too_many_connections"),
        "{answer}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        metric(
            &server,
            "triage_refused_connections_total{listener=\"tcp\"}"
        ) >= 1.0
    );
}

#[test]
fn oversized_bodies_are_refused_before_they_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "", "s");
    let pid = server.child.id();
    // 20 MiB of JSON, declared: 413 at once (the server does not wait for
    // the body; the client's writes past the answer may fail).
    let big = format!(
        "{{\"task\": \"chat\", \"input\": \"{}\"}}",
        "a".repeat(20 << 20)
    );
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let head = format!(
        "POST /v1/execute HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {APP_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut reader = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = s.write_all(big.as_bytes());
    });
    let (_, answer) = closed_within(&mut reader, Duration::from_secs(30)).unwrap();
    writer.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");
    let before = rss_kib(pid);
    // A 200 MB `model` field, streamed, from a key that may not transcribe:
    // refused without the field (or the file after it) being held.
    let boundary = "bOuNdArY";
    let mut s = TcpStream::connect(&server.addr).unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {SCOPED_KEY}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n",
        200u64 << 20
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut reader = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..200 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (_, answer) = closed_within(&mut reader, Duration::from_secs(30)).unwrap();
    writer.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 413") || answer.starts_with("HTTP/1.1 403"),
        "{answer}"
    );
    let grew = rss_kib(pid).saturating_sub(before);
    assert!(grew < 64 << 10, "the server grew by {grew} KiB");
    // The same key naming a task it may not use is refused before the file.
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF....\r\n--{boundary}--\r\n"
    );
    let (status, text) = server
        .request(
            "POST /v1/jobs",
            &format!("Content-Type: multipart/form-data; boundary={boundary}\r\n"),
            body.as_bytes(),
            Some(SCOPED_KEY),
        )
        .unwrap();
    assert_eq!(status, 403, "{text}");
    // A `task` named after the file is refused: it decides who may upload.
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nhello\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"task\"\r\n\r\nchat\r\n--{boundary}--\r\n"
    );
    let (status, text) = server
        .request(
            "POST /v1/jobs",
            &format!("Content-Type: multipart/form-data; boundary={boundary}\r\n"),
            body.as_bytes(),
            Some(APP_KEY),
        )
        .unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("before `file`"), "{text}");
}

/// A fake OpenAI-compatible provider that refuses every call the way OpenAI
/// does for a wrong key: 401 with the key echoed, masked.
fn refusing_provider() -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            (
                axum::http::StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": {
                    "message": "Incorrect API key provided: sk-fak****8899. You can find your API key at https://platform.openai.com/account/api-keys.",
                    "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})),
            )
        }),
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), rt)
}

#[test]
fn remote_clients_get_a_generic_message_for_provider_failures_and_keys_are_scrubbed() {
    let (provider, _rt) = refusing_provider();
    let dir = tempfile::tempdir().unwrap();
    let ledger = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let path = config(dir.path(), &provider, &ledger, "");
    let server = Server::start(&path, dir.path(), "p");
    let body = serde_json::json!({"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let (status, text) = server.post_json("/v1/chat/completions", &body, APP_KEY);
    assert!(status >= 500, "{status} {text}");
    assert!(text.contains("request id req-"), "{text}");
    assert!(
        !text.contains("sk-fak") && !text.contains("****") && !text.contains("Incorrect API key"),
        "{text}"
    );
    // The detail is in the log, scrubbed of the key.
    std::thread::sleep(Duration::from_millis(300));
    let log = server.log();
    assert!(
        log.contains("Incorrect API key provided: [key redacted]"),
        "{log}"
    );
    assert!(
        !log.contains("sk-fak") && !log.contains("****8899"),
        "{log}"
    );
}

#[test]
fn bearer_is_case_insensitive_and_a_peer_that_keeps_failing_is_slowed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "", "k");
    let lower = server
        .request(
            "GET /v1/models",
            &format!("Authorization: bearer {APP_KEY}\r\n"),
            b"",
            None,
        )
        .unwrap();
    assert_eq!(lower.0, 200, "{}", lower.1);
    for _ in 0..10 {
        let (status, _) = server.get("/v1/models", Some("sk-wrong-key")).unwrap();
        assert_eq!(status, 401);
    }
    // Past 10 failures in a minute, even the right key waits.
    let (status, text) = server.get("/v1/models", Some(APP_KEY)).unwrap();
    assert_eq!(status, 429, "{text}");
    let log = server.log();
    assert!(
        log.contains("WARN") && log.contains("rejected: no valid key"),
        "{log}"
    );
    // /ready over TCP without a key tells the status only.
    let (_, ready) = server.get("/ready", None).unwrap();
    assert!(
        ready.contains("\"status\"") && !ready.contains("tasks"),
        "{ready}"
    );
}
