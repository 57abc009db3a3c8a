//! The ledger against a real SQLite file: order, batching, refused rows,
//! a failing database, a full disk, minute totals.

use super::writer::{chunks, insert_sql};
use super::*;
use sqlx::{AssertSqlSafe, Row};

fn rec(request_id: &str, tier: &str, cost: f64, outcome: &str) -> AttemptRecord {
    AttemptRecord {
        request_id: request_id.into(),
        task: "moderation".into(),
        tier: tier.into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        operation: "chat".into(),
        ts_ms: millis(SystemTime::now()),
        input_tokens: 100,
        output_tokens: 10,
        cached_input_tokens: 0,
        reasoning_tokens: 0,
        audio_seconds: 0.0,
        latency_ms: 12.0,
        cost_usd: cost,
        outcome: outcome.into(),
        error: (outcome == "failed").then(|| "Server (HTTP 500): boom".into()),
    }
}

#[tokio::test]
async fn stores_attempts_in_order_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sub/ledger.db").display());
    let ledger = Ledger::open(&url).await.unwrap();
    ledger.record(rec("r1", "llm", 0.0, "failed"));
    ledger.record(rec("r1", "llm", 0.002, "answered"));
    ledger.record(rec("r2", "local", 0.0001, "answered"));
    ledger.record_request(RequestRecord {
        request_id: "r1".into(),
        task: "moderation".into(),
        answered_by: "llm".into(),
        model: "gpt-4o-mini".into(),
        outcome: "answered".into(),
        latency_ms: 30.0,
        cost_usd: 0.002,
        all_llm_cost_usd: 0.01,
        caller_id: None,
        key_name: None,
        trace: None,
        input_text: None,
    });
    ledger.flush().await.unwrap();
    let got = ledger.attempts("r1").await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].outcome, "failed");
    assert_eq!(
        got[1],
        rec("r1", "llm", 0.002, "answered").clone_with_ts(got[1].ts_ms)
    );
    let by_tier = ledger.summary(0, GroupBy::Tier).await.unwrap();
    let llm = by_tier.iter().find(|r| r.key == "llm").unwrap();
    assert_eq!((llm.attempts, llm.failed_attempts, llm.requests), (2, 1, 1));
    assert!((llm.cost_usd - 0.002).abs() < 1e-12);
    assert!((llm.all_llm_cost_usd - 0.01).abs() < 1e-12);
    let future = ledger
        .summary(millis(SystemTime::now()) + 60_000, GroupBy::Task)
        .await
        .unwrap();
    assert!(future.is_empty());
    // Reopening runs no migration twice and keeps the rows.
    drop(ledger);
    let again = Ledger::open(&url).await.unwrap();
    assert_eq!(again.attempts("r1").await.unwrap().len(), 2);
    assert_eq!(
        again.request("r1").await.unwrap().unwrap().answered_by,
        "llm"
    );
}

/// A ledger from before the per-minute totals gets them summed from its
/// rows, chunk by chunk, exactly once even with two backfills at once
/// (a reloaded engine, or two replicas), to the totals the writer keeps.
#[tokio::test]
async fn older_rows_are_summed_once_into_the_minute_totals() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let ledger = Ledger::open(&url).await.unwrap();
    let now = millis(SystemTime::now());
    // 60 requests over 30 minutes (several per timestamp), 2 attempts each.
    for i in 0..60_i64 {
        let ts = now - (i / 2) * 60_000 - 1;
        let id = format!("r{i}");
        let (tier, outcome) = if i % 3 == 0 {
            ("llm", "failed")
        } else {
            ("local", "answered")
        };
        ledger.record(AttemptRecord {
            latency_ms: (i * 7 % 300) as f64,
            ..rec(&id, "local", 0.0001, "answered").clone_with_ts(ts)
        });
        ledger.record(rec(&id, tier, 0.002, outcome).clone_with_ts(ts));
        ledger.send(Queued::Request(
            Box::new(RequestRecord {
                answered_by: tier.into(),
                outcome: outcome.into(),
                latency_ms: (i * 13 % 900) as f64,
                cost_usd: 0.002,
                all_llm_cost_usd: 0.01,
                ..request(&id, None)
            }),
            ts,
        ));
    }
    ledger.flush().await.unwrap();
    let since = now - 3_600_000;
    let (kept, kept_points) = ledger.minute_window(since).await.unwrap();
    assert_eq!(
        kept.iter()
            .filter(|r| r.kind == "request")
            .map(|r| r.n)
            .sum::<i64>(),
        60
    );
    assert_eq!(ledger.minute_backfill_before().await.unwrap(), None);
    // As a ledger from before the totals: none kept, a cursor past the rows.
    let pool = ledger.pool().clone();
    pool.execute("DELETE FROM minute_stats").await.unwrap();
    pool.execute(AssertSqlSafe(format!(
        "INSERT INTO minute_stats_backfill (id, before_ms) VALUES (1, {})",
        now + 1
    )))
    .await
    .unwrap();
    assert_eq!(
        ledger.minute_backfill_before().await.unwrap(),
        Some(now + 1)
    );
    // Chunks of 7 requests: every boundary falls inside a minute, and
    // two rows share each timestamp.
    tokio::join!(
        backfill_minutes(pool.clone(), 7),
        backfill_minutes(pool.clone(), 7)
    );
    assert_eq!(ledger.minute_backfill_before().await.unwrap(), None);
    let (again, again_points) = ledger.minute_window(since).await.unwrap();
    assert_eq!(again.len(), kept.len());
    for (a, b) in again.iter().zip(&kept) {
        assert_eq!(
            (
                &a.kind,
                &a.task,
                &a.tier,
                &a.decision,
                a.n,
                &a.latency_histogram
            ),
            (
                &b.kind,
                &b.task,
                &b.tier,
                &b.decision,
                b.n,
                &b.latency_histogram
            )
        );
        assert!((a.cost_usd - b.cost_usd).abs() < 1e-12, "{a:?} {b:?}");
        assert!((a.all_llm_cost_usd - b.all_llm_cost_usd).abs() < 1e-12);
        assert!((a.latency_ms_sum - b.latency_ms_sum).abs() < 1e-9);
    }
    assert_eq!(
        again_points
            .iter()
            .map(|p| (p.minute, p.requests))
            .collect::<Vec<_>>(),
        kept_points
            .iter()
            .map(|p| (p.minute, p.requests))
            .collect::<Vec<_>>()
    );
}

fn request(id: &str, caller: Option<&str>) -> RequestRecord {
    RequestRecord {
        request_id: id.into(),
        task: "faq".into(),
        answered_by: "route:hours".into(),
        model: String::new(),
        outcome: "answered".into(),
        latency_ms: 0.1,
        cost_usd: 0.0,
        all_llm_cost_usd: 0.0,
        caller_id: caller.map(Into::into),
        key_name: None,
        trace: None,
        input_text: None,
    }
}

async fn count(ledger: &Ledger, table: &str) -> i64 {
    sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(&ledger.pool)
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

async fn temp_ledger(options: LedgerOptions) -> (tempfile::TempDir, Ledger) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
    let ledger = Ledger::open_with(&url, options).await.unwrap();
    (dir, ledger)
}

#[tokio::test]
async fn many_rows_go_in_as_multi_row_inserts_in_order() {
    let (_dir, ledger) = temp_ledger(LedgerOptions::default()).await;
    // More than one chunk and an odd remainder, across three tables.
    for i in 0..1000 {
        ledger.record(rec(&format!("r{}", i % 7), "llm", 0.001, "answered"));
        ledger.record_request(request(&format!("q{i}"), None));
    }
    ledger.record_shadow(ShadowRecord {
        request_id: "q1".into(),
        task: "moderation".into(),
        tier: "local".into(),
        shadow_tier: "llm".into(),
        agree: true,
        score: Some(0.9),
        shadow_score: None,
    });
    ledger.flush().await.unwrap();
    assert_eq!(count(&ledger, "attempts").await, 1000);
    assert_eq!(count(&ledger, "requests").await, 1000);
    assert_eq!(ledger.shadow_count("moderation").await.unwrap(), (1, 1));
    let h = ledger.health();
    assert_eq!((h.pending, h.written, h.rejected), (0, 2001, 0));
    let r0 = ledger.attempts("r0").await.unwrap();
    assert_eq!(r0.len(), 143);
}

#[tokio::test]
async fn a_row_the_database_refuses_costs_only_itself() {
    let (_dir, ledger) = temp_ledger(LedgerOptions::default()).await;
    ledger.record_request(request("dup", None));
    ledger.flush().await.unwrap();
    // The same key again, between good rows of the same batch.
    ledger.record_request(request("a", Some("mine")));
    ledger.record_request(request("dup", None));
    ledger.record(rec("a", "local", 0.0, "answered"));
    ledger.record_request(request("b", Some("mine")));
    ledger.flush().await.unwrap();
    assert_eq!(count(&ledger, "requests").await, 3);
    assert_eq!(count(&ledger, "attempts").await, 1);
    let h = ledger.health();
    assert_eq!((h.rejected, h.pending, h.failing), (1, 0, None));
    // A caller's id is a tag: two requests may carry the same one.
    assert_eq!(
        ledger
            .request("b")
            .await
            .unwrap()
            .unwrap()
            .caller_id
            .as_deref(),
        Some("mine")
    );
}

#[tokio::test]
async fn a_failing_database_fills_the_queue_and_requests_are_refused_until_it_recovers() {
    let options = LedgerOptions {
        max_pending: 3,
        admit_wait: Duration::from_millis(100),
        commit_interval: Duration::from_millis(5),
    };
    let (_dir, ledger) = temp_ledger(options).await;
    ledger.admit().await.unwrap();
    // Every insert into `requests` now fails: the database's fault, not
    // a row's, so the rows are kept and retried, not dropped.
    sqlx::query("ALTER TABLE requests RENAME TO requests_away")
        .execute(&ledger.pool)
        .await
        .unwrap();
    for id in ["x", "y", "z"] {
        ledger.record_request(request(id, None));
    }
    let refused = ledger.admit().await.unwrap_err();
    assert!(
        matches!(refused, LedgerError::Full { max_pending: 3, .. }),
        "{refused}"
    );
    let h = ledger.health();
    assert_eq!((h.pending, h.refused_requests), (3, 1));
    assert!(h.failing.is_some() && !h.ready(), "{h:?}");
    sqlx::query("ALTER TABLE requests_away RENAME TO requests")
        .execute(&ledger.pool)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), ledger.flush())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count(&ledger, "requests").await, 3);
    let h = ledger.health();
    assert!(h.ready() && h.pending == 0 && h.written == 3, "{h:?}");
    ledger.admit().await.unwrap();
}

/// Page caps by database file, for connections opened after
/// [`cap_pages`] (a full disk stays full when the pool replaces a
/// connection).
static PAGE_CAPS: std::sync::Mutex<Vec<(String, i64)>> = std::sync::Mutex::new(Vec::new());

/// The cap [`cap_pages`] set for the database `conn` is on.
pub(super) async fn page_cap(conn: &mut sqlx::AnyConnection) -> Option<i64> {
    let caps = PAGE_CAPS.lock().unwrap().clone();
    if caps.is_empty() {
        return None;
    }
    let file: String = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
        .fetch_one(&mut *conn)
        .await
        .ok()?
        .try_get(0)
        .ok()?;
    caps.iter().find(|(f, _)| *f == file).map(|(_, p)| *p)
}

/// The cap [`cap_pages`] set for the database file `file`, for the
/// writer's own connection.
pub(super) fn page_cap_for(file: &str) -> Option<i64> {
    let caps = PAGE_CAPS.lock().unwrap();
    if caps.is_empty() {
        return None;
    }
    let want = std::fs::canonicalize(file).ok()?;
    caps.iter()
        .find(|(f, _)| std::fs::canonicalize(f).ok().as_ref() == Some(&want))
        .map(|(_, p)| *p)
}

/// Cap the database at `pages` pages (default: the pages it has now) on
/// every connection, those open and those opened later: past it SQLite
/// fails a write with SQLITE_FULL, as on a full disk.
async fn cap_pages(ledger: &Ledger, pages: Option<i64>) {
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(ledger.pool.acquire().await.unwrap());
    }
    let pages = match pages {
        Some(p) => p,
        None => sqlx::query("PRAGMA page_count")
            .fetch_one(&mut *conns[0])
            .await
            .unwrap()
            .try_get::<i64, _>(0)
            .unwrap(),
    };
    let file: String = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
        .fetch_one(&mut *conns[0])
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    {
        let mut caps = PAGE_CAPS.lock().unwrap();
        caps.retain(|(f, _)| *f != file);
        caps.push((file, pages));
    }
    for c in &mut conns {
        sqlx::query(AssertSqlSafe(format!("PRAGMA max_page_count = {pages}")))
            .execute(&mut **c)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_full_disk_is_reported_sheds_load_and_loses_nothing() {
    let options = LedgerOptions {
        max_pending: 8,
        admit_wait: Duration::from_millis(100),
        commit_interval: Duration::from_millis(5),
    };
    let (_dir, ledger) = temp_ledger(options).await;
    cap_pages(&ledger, None).await;
    // Far more than the tables' free space: the writer meets SQLITE_FULL.
    for i in 0..300 {
        ledger.record_request(request(&format!("r{i}"), None));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let failing = loop {
        if let Some(f) = ledger.health().failing {
            break f;
        }
        assert!(tokio::time::Instant::now() < deadline, "never failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(failing.contains("full"), "{failing}");
    // While the disk stays full the rows stay queued: /ready is false and
    // new requests are refused (503 upstream) instead of queued.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let h = ledger.health();
    assert!(!h.ready() && h.pending >= 8 && h.rejected == 0, "{h:?}");
    assert!(h.failing.is_some(), "{h:?}");
    assert!(matches!(
        ledger.admit().await,
        Err(LedgerError::Full { max_pending: 8, .. })
    ));
    // Space comes back: every row is written, none dropped.
    cap_pages(&ledger, Some(1 << 30)).await;
    tokio::time::timeout(Duration::from_secs(20), ledger.flush())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count(&ledger, "requests").await, 300);
    // Committed for every connection, not only the writer's: a new one
    // (another process) sees them all.
    let mut fresh = sqlx::AnyConnection::connect(ledger.url()).await.unwrap();
    let seen: i64 = sqlx::query("SELECT COUNT(*) FROM requests")
        .fetch_one(&mut fresh)
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(seen, 300);
    let h = ledger.health();
    assert!(h.ready() && h.failing.is_none() && h.rejected == 0, "{h:?}");
    // Every row is accounted for: none is left counted as pending.
    assert_eq!((h.pending, h.written), (0, 300), "{h:?}");
}

#[tokio::test]
async fn a_full_queue_admits_again_once_the_writer_commits() {
    let options = LedgerOptions {
        max_pending: 2,
        admit_wait: Duration::from_secs(5),
        commit_interval: Duration::from_millis(20),
    };
    let (_dir, ledger) = temp_ledger(options).await;
    ledger.record_request(request("a", None));
    ledger.record_request(request("b", None));
    assert_eq!(ledger.health().pending, 2);
    // Waits for the group commit rather than failing at once.
    tokio::time::timeout(Duration::from_secs(5), ledger.admit())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ledger.health().refused_requests, 0);
}

#[test]
fn statements_come_in_a_few_sizes() {
    let rows: Vec<Queued> = (0..300)
        .map(|i| Queued::Request(Box::new(request(&i.to_string(), None)), 0))
        .collect();
    let refs: Vec<&Queued> = rows.iter().collect();
    let sizes: Vec<usize> = chunks(&refs).iter().map(|c| c.len()).collect();
    assert_eq!(sizes, vec![128, 128, 32, 8, 4]);
    assert!(insert_sql("t", "a, b", 2).ends_with("VALUES ($1, $2), ($3, $4)"));
}

impl AttemptRecord {
    fn clone_with_ts(mut self, ts: i64) -> Self {
        self.ts_ms = ts;
        self
    }
}

#[tokio::test]
async fn the_data_folder_and_the_ledger_files_are_the_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = format!("sqlite://{}", data.join("ledger.db").display());
    let ledger = Ledger::open(&url).await.unwrap();
    ledger.flush().await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("ledger.db")), 0o600);
}

#[test]
fn stored_text_is_cut_at_a_character_boundary_and_the_cut_is_marked() {
    use super::capped_text;
    assert_eq!(capped_text("short", 10), "short");
    let cut = capped_text("héllo wörld", 2);
    assert_eq!(cut, "h… [12 more bytes not kept]");
    let big = "x".repeat(200_000);
    assert!(capped_text(&big, super::DEFAULT_MAX_TEXT_BYTES).len() < 66_000);
}

#[tokio::test]
async fn hosted_rows_and_flushes_are_fsynced_local_rows_are_not() {
    let (dir, ledger) = temp_ledger(LedgerOptions::default()).await;
    let file = dir.path().join("ledger.db");
    let mut w = sqlite_writer::SqliteWriter::open(file.to_str().unwrap()).unwrap();
    let local = |id: &str| {
        writer::Queued::Attempt(
            Box::new(AttemptRecord {
                provider: "local".into(),
                ..rec(id, "local", 0.0, "answered")
            }),
            1,
        )
    };
    // Local rows alone: NORMAL (a kill -9 keeps them; a power cut may not).
    let mut rows = vec![
        local("l1"),
        writer::Queued::Request(Box::new(request("l1", None)), 1),
    ];
    let durable = rows.iter().any(writer::Queued::hosted);
    assert!(!durable);
    let (report, e) = w.write(&mut rows, durable);
    assert!(e.is_none() && rows.is_empty() && report.written == 2);
    assert_eq!(w.synchronous(), 1);
    // A hosted attempt in the batch: FULL, fsync'd before it is reported.
    let mut rows = vec![
        local("l2"),
        writer::Queued::Attempt(Box::new(rec("h1", "llm", 0.01, "answered")), 2),
    ];
    let durable = rows.iter().any(writer::Queued::hosted);
    assert!(durable);
    let (report, _) = w.write(&mut rows, durable);
    assert_eq!((report.written, w.synchronous()), (2, 2));
    // And back.
    let mut rows = vec![local("l3")];
    w.write(&mut rows, false);
    assert_eq!(w.synchronous(), 1);
    // What the writer connection committed, the pool reads, totals included.
    assert_eq!(count(&ledger, "attempts").await, 4);
    let n: i64 = sqlx::query("SELECT SUM(n) FROM minute_stats WHERE kind = 'attempt'")
        .fetch_one(&ledger.pool)
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(n, 4);
}

#[tokio::test]
async fn the_checkpointer_keeps_the_wal_short_beside_the_writer() {
    let (dir, _ledger) = temp_ledger(LedgerOptions::default()).await;
    let file = dir.path().join("ledger.db");
    let wal = dir.path().join("ledger.db-wal");
    let wal_bytes = || std::fs::metadata(&wal).unwrap().len();
    let mut w = sqlite_writer::SqliteWriter::open(file.to_str().unwrap()).unwrap();
    let mut next = 0;
    let mut write = |w: &mut sqlite_writer::SqliteWriter, n: usize| {
        let mut rows: Vec<writer::Queued> = (next..next + n)
            .map(|i| writer::Queued::Request(Box::new(request(&format!("q{i}"), None)), 1))
            .collect();
        next += n;
        let (report, e) = w.write(&mut rows, false);
        assert!(e.is_none() && report.written == n);
    };
    // The writer never checkpoints: its WAL grows past SQLite's automatic
    // checkpoint (1,000 pages, 4 MB), batch after batch.
    let mut sizes = Vec::new();
    for _ in 0..20 {
        write(&mut w, 4000);
        sizes.push(wal_bytes());
    }
    assert!(sizes.windows(2).all(|p| p[1] > p[0]), "{sizes:?}");
    let grown = sizes[19];
    assert!(grown > 6 << 20, "{sizes:?}");
    // The checkpointer copies it back and, past its bound, restarts it: the
    // next writes start the WAL over instead of growing it.
    let mut checkpointer = sqlite_writer::Checkpointer::open(file.to_str().unwrap())
        .unwrap()
        .restarting_past(100);
    assert!(checkpointer.run().unwrap() > 1000);
    write(&mut w, 4000);
    write(&mut w, 4000);
    assert_eq!(wal_bytes(), grown);
}
