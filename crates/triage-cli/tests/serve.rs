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
