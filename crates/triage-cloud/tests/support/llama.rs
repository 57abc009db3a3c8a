//! A real llama.cpp `llama-server` with SmolLM2-135M-Instruct, for tests
//! that need an OpenAI-compatible chat endpoint.
//!
//! `scripts/fetch-llama-server` provides both files and `scripts/test` exports
//! their paths as `TRIAGE_LLAMA_SERVER` and `TRIAGE_SMOLLM2_GGUF`. Without
//! them [`LlamaServer::start`] fails the test, saying what to run, unless
//! `TRIAGE_SKIP_LLAMA=1`, when it returns `None` and the test should return.
//!
//! Each server is a separate process on a free port; it is killed on drop,
//! and also (by a small `sh` watchdog that holds the other end of its stdin)
//! when the test process dies without dropping it. Starting takes well under
//! a second on an idle box; [`LlamaServer::start`] blocks the calling thread
//! until `/health` answers 200, so call it outside async code or through
//! `tokio::task::spawn_blocking`. The model answers as `smollm2`
//! ([`LlamaServer::MODEL`]).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server may take to answer `/health` with 200.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(120);
/// Starts tried before giving up (another process may take the free port
/// between our probe and the server's bind).
const START_ATTEMPTS: usize = 3;

/// `exec`s the server in place of this shell, so that the child's pid is the
/// server's, after starting a watcher that kills it (`$$`, which survives the
/// `exec`) once its stdin reaches end of file, i.e. once the test process has
/// dropped the pipe or died.
const WATCHDOG: &str = r#"exec 3<&0
(read -r _ || true; kill "$$" 2>/dev/null) <&3 >/dev/null 2>&1 &
exec "$@" 3<&-"#;

/// A running `llama-server`; killed on drop.
#[derive(Debug)]
pub struct LlamaServer {
    child: Child,
    /// The watchdog's end of the pipe: dropping it stops the server too.
    stdin: Option<ChildStdin>,
    port: u16,
    log: PathBuf,
}

impl LlamaServer {
    /// The `--alias` the model answers to in `model` fields.
    pub const MODEL: &'static str = "smollm2";

    /// Start a server with the standard flags (`-c 4096 -np 2 -t 2 --jinja`).
    /// `None` only under `TRIAGE_SKIP_LLAMA=1`; any other failure panics.
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// Like [`LlamaServer::start`], with `extra` appended to the command line
    /// (later flags override earlier ones in llama.cpp).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        let (binary, model) = paths()?;
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::spawn(&binary, &model, extra) {
                Ok(server) => return Some(server),
                Err(e) => last_error = e,
            }
        }
        panic!("llama-server did not start ({START_ATTEMPTS} tries): {last_error}");
    }

    fn spawn(binary: &Path, model: &Path, extra: &[&str]) -> Result<Self, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let log = log_path(port);
        let log_file = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| format!("cannot reopen {}: {e}", log.display()))?;
        let port_arg = port.to_string();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(WATCHDOG).arg("llama-server").arg(binary);
        cmd.arg("-m").arg(model);
        cmd.args(["--alias", Self::MODEL, "--host", "127.0.0.1"]);
        cmd.args(["--port", &port_arg]);
        cmd.args(["-c", "4096", "-np", "2", "-t", "2", "--jinja", "--no-webui"]);
        cmd.args(extra);
        cmd.env("OMP_WAIT_POLICY", "passive")
            .stdin(Stdio::piped())
            .stdout(log_file)
            .stderr(log_err);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        let stdin = child.stdin.take();
        let mut server = LlamaServer {
            child,
            stdin,
            port,
            log,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(format!(
                        "llama-server exited with {status} before it was healthy; {}",
                        self.log_tail()
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("cannot poll llama-server: {e}")),
            }
            if health_ok(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "llama-server not healthy after {HEALTH_TIMEOUT:?}; {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The OpenAI-style base URL, `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The server root, `http://127.0.0.1:PORT` (for `/health`, `/metrics`).
    pub fn root_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("its log ({}) ends:\n{tail}", self.log.display())
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        // Closing the pipe makes the watchdog send SIGTERM, which llama-server
        // handles by shutting down; SIGKILL if that takes too long.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("llama-server log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// `(binary, model)` from the environment; `None` under `TRIAGE_SKIP_LLAMA=1`.
fn paths() -> Option<(PathBuf, PathBuf)> {
    if std::env::var("TRIAGE_SKIP_LLAMA").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: TRIAGE_SKIP_LLAMA=1, so no llama-server");
        return None;
    }
    let var = |name: &str| {
        let value = std::env::var_os(name).map(PathBuf::from);
        match value {
            Some(p) if p.is_file() => p,
            other => panic!(
                "{name}={other:?} is not a file. Run scripts/fetch-llama-server --print-env \
                 and export the TRIAGE_LLAMA_SERVER and TRIAGE_SMOLLM2_GGUF it prints \
                 (scripts/test does this), or set TRIAGE_SKIP_LLAMA=1 to skip the tests \
                 that need llama-server"
            ),
        }
    };
    Some((var("TRIAGE_LLAMA_SERVER"), var("TRIAGE_SMOLLM2_GGUF")))
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_path(port: u16) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "triage-llama-server-{}-{port}-{nanos}.log",
        std::process::id()
    ))
}

/// `GET /health` answered 200 (it is 503 while the model loads).
fn health_ok(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let request = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 32];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..read])
        .ok()
        .and_then(|s| s.split_whitespace().nth(1))
        == Some("200")
}
