//! Rows per second the ledger's writer commits: N requests of one attempt
//! and one request row each, recorded as fast as possible (waiting for room
//! like a server does), then flushed. Prints one JSON line.
//!
//! `cargo run --release -p triage-engine --example ledger_bench -- URL [REQUESTS]`
//! (URL: `sqlite:///tmp/bench.db` or, with `--features postgres`, `postgres://...`)
#![allow(clippy::print_stdout)]

use std::time::{Instant, SystemTime, UNIX_EPOCH};
use triage_engine::ledger::{AttemptRecord, Ledger, LocalAttempt, RequestRecord};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(url) = args.first() else {
        anyhow::bail!("usage: ledger_bench URL [REQUESTS]");
    };
    let n: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let ledger = Ledger::open(url).await?;
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let started = Instant::now();
    let mut waited = 0usize;
    for i in 0..n {
        // A server would answer 503 here; the benchmark waits and counts.
        while ledger.admit().await.is_err() {
            waited += 1;
        }
        let id = format!("bench-{run}-{i}");
        ledger.record(AttemptRecord::local(LocalAttempt {
            request_id: &id,
            task: "faq",
            tier: "intent",
            model: "rules",
            operation: "route",
            latency: std::time::Duration::from_micros(40),
            cost_usd: 0.0,
            error: None,
        }));
        ledger.record_request(RequestRecord {
            request_id: id,
            task: "faq".into(),
            answered_by: "route:hours".into(),
            model: String::new(),
            outcome: "answered".into(),
            latency_ms: 0.04,
            cost_usd: 0.0,
            all_llm_cost_usd: 0.0,
            caller_id: None,
            key_name: None,
            trace: None,
            input_text: None,
        });
    }
    ledger.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    let rows = 2 * n;
    println!(
        "{}",
        serde_json::json!({
            "url": url.split('@').next_back(), "requests": n, "rows": rows,
            "seconds": secs, "rows_per_s": rows as f64 / secs,
            "admissions_refused": waited,
        })
    );
    Ok(())
}
