//! A small closed-loop load generator over a unix socket: C connections, each
//! sending keep-alive HTTP/1.1 requests back to back for S seconds; prints
//! requests/s, latency percentiles and the count of each status as one JSON
//! line. A connection the server closes (shutdown, kill -9) ends that
//! client; what it counted until then is kept, so `answered` is the number
//! of 200 answers received in full.
//!
//! `cargo run --release -p triage-server --example load -- SOCKET PATH BODY_OR_- CONCURRENCY SECONDS`
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Default)]
struct Counts {
    latencies: Vec<Duration>,
    statuses: std::collections::BTreeMap<String, usize>,
    dropped: usize,
}

async fn one_connection(sock: String, request: Vec<u8>, until: Instant) -> Counts {
    let mut counts = Counts::default();
    // An error means the server went away: this client stops.
    if requests(&sock, &request, until, &mut counts).await.is_err() {
        counts.dropped += 1;
    }
    counts
}

async fn requests(
    sock: &str,
    request: &[u8],
    until: Instant,
    counts: &mut Counts,
) -> anyhow::Result<()> {
    let stream = tokio::net::UnixStream::connect(sock).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    while Instant::now() < until {
        let t0 = Instant::now();
        w.write_all(request).await?;
        let mut status = String::new();
        if r.read_line(&mut status).await? == 0 {
            anyhow::bail!("connection closed");
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                anyhow::bail!("connection closed");
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).await?;
        counts.latencies.push(t0.elapsed());
        let code = status.split_whitespace().nth(1).unwrap_or("?").to_owned();
        *counts.statuses.entry(code).or_default() += 1;
    }
    Ok(())
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
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    let mut dropped = 0;
    for t in tasks {
        let c = t.await?;
        all.extend(c.latencies);
        for (k, v) in c.statuses {
            *statuses.entry(k).or_default() += v;
        }
        dropped += c.dropped;
    }
    let answered = statuses.get("200").copied().unwrap_or(0);
    let errors = all.len() - answered;
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let line = serde_json::json!({
        "path": path, "concurrency": concurrency, "requests": all.len(), "answered": answered,
        "errors": errors, "statuses": statuses, "dropped_connections": dropped,
        "rps": all.len() as f64 / elapsed, "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0),
    });
    println!("{line}");
    Ok(())
}
