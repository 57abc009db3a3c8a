//! `triage serve` as a process: it starts on a unix socket, answers, and on
//! SIGTERM finishes the request in flight before it exits.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn shared() -> Option<PathBuf> {
    let p = std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    if p.join("models/whisper-tiny.en/ggml-model-f16.bin")
        .is_file()
    {
        Some(p)
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide the shared Whisper model"
        );
        eprintln!("SKIPPED: no shared Whisper model");
        None
    }
}

fn http(sock: &std::path::Path, request: &[u8]) -> std::io::Result<String> {
    let mut s = UnixStream::connect(sock)?;
    s.write_all(request)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn sigterm_drains_the_request_in_flight() -> anyhow::Result<()> {
    let Some(shared) = shared() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("t.sock");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models/distilbert-seq-multilabel");
    let mut child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg("--moderation-model")
        .arg(&model)
        .arg("--whisper-model")
        .arg(shared.join("models/whisper-tiny.en/ggml-model-f16.bin"))
        .args(["--category-map", "toxic=harassment"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http(
        &sock,
        b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        assert!(Instant::now() < deadline, "server did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A transcription of several seconds, then SIGTERM while it runs.
    let audio = std::fs::read(shared.join("data/speech/librivox_ss01_0870.wav"))?;
    let boundary = "b0undary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n").into_bytes();
    body.extend(&audio);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut request = format!(
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend(body);
    let sock2 = sock.clone();
    let in_flight = std::thread::spawn(move || http(&sock2, &request));
    std::thread::sleep(Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(killed.success());

    let answer = in_flight
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the request in flight must finish: {answer}"
    );
    assert!(answer.contains("Dashwood"), "{answer}");
    let status = child.wait()?;
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "the socket file is removed on shutdown");
    Ok(())
}

/// A config with one router task answered by a template (no model), so the
/// process starts at once.
fn greeting_config(greeting: &str) -> String {
    format!(
        r#"
[ledger]
disabled = true

[tasks.greet]
strategy = "router"

[tasks.greet.intent]
kind = "rules"
default = "hello"
rules = []

[tasks.greet.routes.hello]
handler = "template"
template = "{greeting}"
"#
    )
}

fn execute_greet(sock: &std::path::Path) -> std::io::Result<String> {
    let body = r#"{"task": "greet", "input": "hi"}"#;
    let request = format!(
        "POST /v1/execute HTTP/1.1\r\nHost: t\r\nConnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    http(sock, request.as_bytes())
}

/// Poll until `execute_greet` answers with `want`, or fail after 20 s.
fn wait_for_answer(sock: &std::path::Path, want: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = execute_greet(sock).unwrap_or_default();
        if out.contains(want) {
            return Ok(out);
        }
        anyhow::ensure!(Instant::now() < deadline, "no `{want}` in: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_config_answers_execute_and_reloads_on_sighup() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("c.sock");
    let config = dir.path().join("triage.toml");
    std::fs::write(&config, greeting_config("first answer"))?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        let out = wait_for_answer(&sock, "first answer")?;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("\"trace\""), "{out}");
        let hup = |pid: u32| {
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
        };
        std::fs::write(&config, greeting_config("second answer"))?;
        assert!(hup(child.id())?.success());
        wait_for_answer(&sock, "second answer")?;
        // A broken file is refused; the running config stays.
        std::fs::write(&config, "[tasks.greet\n")?;
        assert!(hup(child.id())?.success());
        std::thread::sleep(Duration::from_millis(500));
        wait_for_answer(&sock, "second answer")?;
        anyhow::ensure!(child.try_wait()?.is_none(), "the server exited");
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait()?;
    result?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[test]
fn serve_refuses_a_socket_path_that_is_a_regular_file_and_keeps_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "do not delete")?;
    let config = dir.path().join("triage.toml");
    std::fs::write(&config, greeting_config("hello"))?;
    let out = Command::new(env!("CARGO_BIN_EXE_triage"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&file)
        .stdout(Stdio::null())
        .output()?;
    assert!(!out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file)?, "do not delete");
    Ok(())
}
