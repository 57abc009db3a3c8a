//! The ledger under load on the real binary: `triage serve` with a task
//! answered by a rule, many keep-alive clients on the unix socket, then
//! SIGTERM (every answered request must be in the ledger) or kill -9 (at most
//! the ledger's group-commit window of rows may be lost).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn rule_config(ledger: &Path) -> String {
    format!(
        r#"
[ledger]
url = "sqlite://{}"

[tasks.faq]
strategy = "router"

[tasks.faq.intent]
kind = "rules"
default = "other"
rules = [{{ route = "hours", any = ["open"] }}]

[tasks.faq.routes.hours]
handler = "template"
template = "We are open 9:00-17:00."

[tasks.faq.routes.other]
handler = "template"
template = "Please write to us."
"#,
        ledger.display()
    )
}

fn start(dir: &Path) -> anyhow::Result<(Child, std::path::PathBuf, String)> {
    let sock = dir.join("l.sock");
    let db = dir.join("ledger.db");
    let config = dir.join("rule.toml");
    std::fs::write(&config, rule_config(&db))?;
    let child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&sock)
        .args(["--drain-timeout", "10"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = UnixStream::connect(&sock).and_then(|mut s| {
            s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out.starts_with("HTTP/1.1 200"))
        });
        if ok.unwrap_or(false) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, sock, format!("sqlite://{}", db.display())))
}

/// Clients sending `/v1/execute` back to back until `stop` or the connection
/// drops; counts 200 answers received in full, and any other status.
fn load(
    sock: &Path,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> (
    Vec<std::thread::JoinHandle<()>>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
) {
    let answered = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let body = r#"{"task": "faq", "input": "are you open on friday?"}"#;
    let request = format!(
        "POST /v1/execute HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let threads = (0..clients)
        .map(|_| {
            let (sock, stop, answered, other, request) = (
                sock.to_path_buf(),
                stop.clone(),
                answered.clone(),
                other.clone(),
                request.clone(),
            );
            std::thread::spawn(move || {
                let Ok(stream) = UnixStream::connect(&sock) else {
                    return;
                };
                let Ok(mut w) = stream.try_clone() else {
                    return;
                };
                let mut r = BufReader::new(stream);
                while !stop.load(Ordering::Relaxed) {
                    if w.write_all(request.as_bytes()).is_err() {
                        return;
                    }
                    let mut status = String::new();
                    if r.read_line(&mut status).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    if status.contains(" 200 ") {
                        answered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        other.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    (threads, answered, other)
}

/// Requests in the ledger, through `triage costs --json`.
fn ledger_requests(url: &str) -> anyhow::Result<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["costs", "--ledger", url, "--json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(rows.iter().filter_map(|r| r["requests"].as_u64()).sum())
}

#[test]
fn sigterm_under_load_exits_soon_with_every_answer_in_the_ledger() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, sock, url) = start(dir.path())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (threads, answered, other) = load(&sock, 16, stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    let term = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let status = child.wait()?;
    let took = term.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let answered = answered.load(Ordering::Relaxed);
    let rows = ledger_requests(&url)?;
    eprintln!(
        "answered {answered} (other statuses {}), ledger rows {rows}, exit after {took:?}",
        other.load(Ordering::Relaxed)
    );
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(15), "SIGTERM took {took:?}");
    assert!(answered > 1000, "only {answered} answered");
    // Every answer is in the ledger; a request cut off after its row was
    // queued may add one row per client.
    assert!(
        rows >= answered && rows <= answered + 16,
        "{rows} rows for {answered} answers"
    );
    Ok(())
}

#[test]
fn kill_9_under_load_loses_at_most_the_commit_window() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, sock, url) = start(dir.path())?;
    let stop = Arc::new(AtomicBool::new(false));
    let (threads, answered, _) = load(&sock, 16, stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    child.kill()?;
    child.wait()?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let answered = answered.load(Ordering::Relaxed);
    let rows = ledger_requests(&url)?;
    let lost = answered.saturating_sub(rows);
    eprintln!("answered {answered}, ledger rows {rows}, lost {lost}");
    assert!(answered > 1000, "only {answered} answered");
    let allowed = (answered / 40).max(2000);
    assert!(
        lost <= allowed,
        "lost {lost} of {answered} (allowed {allowed})"
    );
    assert!(rows <= answered + 16, "{rows} rows for {answered} answers");
    Ok(())
}
