//! A small closed-loop load generator over a unix socket: C connections, each
//! sending keep-alive HTTP/1.1 requests back to back for S seconds; prints
//! requests/s and latency percentiles as one JSON line.
//!
//! `cargo run --release -p triage-server --example load -- SOCKET PATH BODY_OR_- CONCURRENCY SECONDS`
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

async fn one_connection(
    sock: String,
    request: Vec<u8>,
    until: Instant,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let stream = tokio::net::UnixStream::connect(&sock).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut latencies = Vec::new();
    let mut errors = 0;
    while Instant::now() < until {
        let t0 = Instant::now();
        w.write_all(&request).await?;
        let mut status = String::new();
        r.read_line(&mut status).await?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).await?;
        latencies.push(t0.elapsed());
        if !status.contains(" 200 ") {
            errors += 1;
        }
    }
    Ok((latencies, errors))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [sock, path, body, concurrency, seconds] = args.as_slice() else {
        anyhow::bail!("usage: load SOCKET PATH BODY_OR_- CONCURRENCY SECONDS");
    };
    let concurrency: usize = concurrency.parse()?;
    let seconds: f64 = seconds.parse()?;
    let request = if body == "-" {
        format!("GET {path} HTTP/1.1\r\nHost: triage\r\n\r\n").into_bytes()
    } else {
        format!("POST {path} HTTP/1.1\r\nHost: triage\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
    };
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(one_connection(sock.clone(), request.clone(), until)))
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await??;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let line = serde_json::json!({
        "path": path, "concurrency": concurrency, "requests": all.len(), "errors": errors,
        "rps": all.len() as f64 / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
    });
    println!("{line}");
    Ok(())
}
