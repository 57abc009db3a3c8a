//! The writer task: rows queue in a bounded channel and are group-committed,
//! on SQLite through the writer's own connection ([`SqliteWriter`]), on
//! PostgreSQL as multi-row inserts through the pool; a batch the database
//! refuses is written again row by row, so one bad row never takes the
//! others with it.

use super::sqlite_writer::{CHECKPOINT_EVERY, Checkpointer, SqliteWriter};
use super::*;
use sqlx::{AnyPool, AssertSqlSafe};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// One row on its way to the database.
pub(super) enum Queued {
    Attempt(Box<AttemptRecord>, i64),
    Request(Box<RequestRecord>, i64),
    Shadow(Box<ShadowRecord>, i64),
}

pub(super) enum Msg {
    Row(Queued),
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ledger message")
    }
}

/// Most rows written in one transaction.
pub(super) const BATCH: usize = 8192;
/// Longest pause between retries of a batch the database would not take.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The channel's hard capacity for a queue admitted up to `max_pending`
/// rows: room for every admitted request's rows several times over.
pub(super) fn hard_bound(max_pending: usize) -> usize {
    max_pending.saturating_mul(8).max(8192)
}

/// Where the writer commits.
pub(super) enum Sink {
    /// SQLite: the writer's own connection and its checkpointer.
    Sqlite(Box<SqliteSink>),
    /// PostgreSQL (and in-memory SQLite): multi-row inserts through the pool.
    Pool(AnyPool),
}

/// The SQLite writer's connection, used on the blocking pool (taken out
/// while a batch is written there), and the WAL's checkpointer, which runs
/// on the blocking pool beside it.
pub(super) struct SqliteSink {
    conn: Option<SqliteWriter>,
    checkpointer: Option<Checkpointer>,
    checkpointing: Option<tokio::task::JoinHandle<Checkpointer>>,
    last_checkpoint: tokio::time::Instant,
}

impl SqliteSink {
    pub(super) fn new(conn: SqliteWriter, checkpointer: Checkpointer) -> Self {
        Self {
            conn: Some(conn),
            checkpointer: Some(checkpointer),
            checkpointing: None,
            last_checkpoint: tokio::time::Instant::now(),
        }
    }

    /// Start a checkpoint beside the writer when the last one has finished
    /// and [`CHECKPOINT_EVERY`] has passed since it started.
    fn checkpoint_when_due(&mut self) {
        if self.checkpointing.as_ref().is_some_and(|h| h.is_finished()) {
            self.checkpointer = self.take_finished();
        }
        if self.last_checkpoint.elapsed() < CHECKPOINT_EVERY {
            return;
        }
        let Some(mut checkpointer) = self.checkpointer.take() else {
            return;
        };
        self.last_checkpoint = tokio::time::Instant::now();
        self.checkpointing = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = checkpointer.run() {
                tracing::warn!(error = %e, "the ledger's WAL checkpoint failed; retrying later");
            }
            checkpointer
        }));
    }

    /// The checkpointer back from a finished run (none after a panic: the
    /// WAL is then checkpointed when the ledger closes).
    fn take_finished(&mut self) -> Option<Checkpointer> {
        let handle = self.checkpointing.take()?;
        match futures_util::FutureExt::now_or_never(handle) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                tracing::error!(error = %e, "the ledger's checkpointer failed");
                None
            }
            None => None,
        }
    }

    /// Wait for a checkpoint in flight (at shutdown).
    async fn settle(&mut self) {
        if let Some(handle) = self.checkpointing.take() {
            self.checkpointer = handle.await.ok();
        }
    }
}

impl Sink {
    /// Write `rows` (see [`write_rows`]); the database's error, if any, as
    /// its message.
    async fn write(&mut self, rows: &mut Vec<Queued>, durable: bool) -> (Written, Option<String>) {
        let sqlite = match self {
            Sink::Pool(pool) => {
                let (report, e) = write_rows(pool, rows).await;
                return (report, e.map(|e| crate::error::chain(&e)));
            }
            Sink::Sqlite(sqlite) => sqlite,
        };
        let Some(mut conn) = sqlite.conn.take() else {
            return (
                Written::default(),
                Some("the ledger's writer connection is gone".into()),
            );
        };
        let mut batch = std::mem::take(rows);
        let done = tokio::task::spawn_blocking(move || {
            let (report, e) = conn.write(&mut batch, durable);
            (conn, batch, report, e.map(|e| crate::error::chain(&e)))
        })
        .await;
        let result = match done {
            Ok((conn, batch, report, e)) => {
                sqlite.conn = Some(conn);
                *rows = batch;
                (report, e)
            }
            // A panic while writing: the batch is lost with the connection,
            // and every later write says so.
            Err(e) => {
                tracing::error!(error = %e, "the ledger's writer failed");
                (
                    Written::default(),
                    Some(format!("the ledger's writer failed: {e}")),
                )
            }
        };
        sqlite.checkpoint_when_due();
        result
    }

    async fn close(&mut self) {
        if let Sink::Sqlite(sqlite) = self {
            sqlite.settle().await;
        }
    }
}

/// Rows gathered at which a batch is written before `commit_interval` has
/// passed: an eighth of the queue, so a busy writer writes while the queue
/// still has room (admission never waits behind a gathering window) and in
/// short stretches (a quarter, then half, of the queue per batch took p99
/// from 2.5-2.9 ms to 3.7-4.2 and 4.5-5.1 ms: each batch holds a core
/// longer, and on 2 cores the async workers wait for it).
pub(super) fn early_commit(max_pending: usize) -> usize {
    (max_pending / 8).clamp(1, BATCH)
}

pub(super) async fn writer(mut sink: Sink, mut rx: mpsc::Receiver<Msg>, shared: Arc<Shared>) {
    let mut rows: Vec<Queued> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut open = true;
    let early = early_commit(shared.options.max_pending);
    while open {
        let Some(first) = rx.recv().await else { break };
        // Group commit: gather what arrives within `commit_interval` of the
        // first row into one transaction, so a row is committed within that
        // interval plus one write. A flush, or an eighth of the queue, is
        // written at once.
        let deadline = tokio::time::Instant::now() + shared.options.commit_interval;
        let mut msg = Some(first);
        loop {
            match msg.take() {
                Some(Msg::Row(r)) => rows.push(r),
                Some(Msg::Flush(done)) => flushes.push(done),
                None => {}
            }
            if rows.len() >= early {
                break;
            }
            match rx.try_recv() {
                Ok(m) => {
                    msg = Some(m);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if !flushes.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => msg = Some(m),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(50);
        // Fsync'd before it is reported when it holds money or someone
        // waits for it; see [`SqliteWriter`].
        let durable = !flushes.is_empty() || rows.iter().any(Queued::hosted);
        while !rows.is_empty() {
            let (report, failed) = sink.write(&mut rows, durable).await;
            // Rows committed (or dropped as bad) leave the queue even when
            // the database failed on a later row of the same batch.
            shared
                .written
                .fetch_add(report.written as u64, Ordering::Relaxed);
            shared
                .rejected
                .fetch_add(report.rejected as u64, Ordering::Relaxed);
            shared
                .pending
                .fetch_sub(report.written + report.rejected, Ordering::AcqRel);
            match failed {
                None => *shared.failing() = None,
                Some(message) => {
                    // The database itself is failing (full disk, lost
                    // connection): keep the rows, which keeps the queue full,
                    // which makes new requests wait and then refuses them.
                    tracing::error!(error = %message, rows = rows.len(), "the ledger cannot commit; retrying");
                    *shared.failing() = Some(message);
                    shared.room.notify_waiters();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        shared.room.notify_waiters();
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
    sink.close().await;
}

/// What became of a batch.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub(super) written: usize,
    pub(super) rejected: usize,
}

/// A batch that went in whole: `rows` is emptied and counted.
pub(super) fn all_written(rows: &mut Vec<Queued>) -> Written {
    let written = rows.len();
    rows.clear();
    Written {
        written,
        rejected: 0,
    }
}

/// The rows of a refused batch, written again one by one (each driver's
/// writer tries them; this decides what becomes of each): a row the
/// database takes is written; a row it refuses for the row's own fault (a
/// constraint), or while it takes others, is logged and dropped; once it
/// fails for its own state (a full disk, a lost connection), that row and
/// every one after it are kept, untried, with the error.
pub(super) struct OneByOne<E> {
    report: Written,
    kept: Vec<Queued>,
    error: Option<E>,
    database_fault: fn(&E) -> bool,
    row_error: fn(&E) -> bool,
}

impl<E: std::fmt::Display> OneByOne<E> {
    /// After `refused` refused a batch of `rows` rows.
    pub(super) fn after(
        refused: &E,
        rows: usize,
        database_fault: fn(&E) -> bool,
        row_error: fn(&E) -> bool,
    ) -> Self {
        tracing::warn!(error = %refused, rows, "ledger batch refused; writing its rows one by one");
        Self {
            report: Written::default(),
            kept: Vec::new(),
            error: None,
            database_fault,
            row_error,
        }
    }

    /// `row`, when it is to be tried; `None` once the database has failed
    /// (the row is then kept).
    pub(super) fn next(&mut self, row: Queued) -> Option<Queued> {
        if self.error.is_some() {
            self.kept.push(row);
            return None;
        }
        Some(row)
    }

    /// What writing `row` on its own gave.
    pub(super) fn tried(&mut self, row: Queued, result: Result<(), E>) {
        let Err(e) = result else {
            self.report.written += 1;
            return;
        };
        if !(self.database_fault)(&e) && ((self.row_error)(&e) || self.report.written > 0) {
            tracing::error!(error = %e, row = %row.describe(), "the ledger refused a row; dropped");
            self.report.rejected += 1;
        } else {
            self.kept.push(row);
            self.error = Some(e);
        }
    }

    /// The report; `rows` now holds what is kept.
    pub(super) fn finish(self, rows: &mut Vec<Queued>) -> (Written, Option<E>) {
        *rows = self.kept;
        (self.report, self.error)
    }
}

/// Write `rows` in one transaction of multi-row inserts; if the database
/// refuses it, write each row on its own, so one bad row (a duplicate key, a
/// value the database will not take) costs only itself. `rows` is emptied on
/// success; on an error that is the database's rather than a row's, the rows
/// not yet committed stay in it to be retried, and the error comes back with
/// the count of those that went in.
pub(super) async fn write_rows(
    pool: &AnyPool,
    rows: &mut Vec<Queued>,
) -> (Written, Option<sqlx::Error>) {
    let refused = match write_batch(pool, rows).await {
        Ok(()) => return (all_written(rows), None),
        Err(e) => e,
    };
    let mut one = OneByOne::after(&refused, rows.len(), is_database_fault, is_row_error);
    for row in std::mem::take(rows) {
        if let Some(row) = one.next(row) {
            let result = insert_rows(pool, std::slice::from_ref(&row)).await;
            one.tried(row, result);
        }
    }
    one.finish(rows)
}

/// Whether the database failed for its own state (a full disk, an I/O error,
/// a lost connection, resources), whatever the row: such rows are kept and
/// retried, never dropped.
pub(super) fn is_database_fault(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(d) = e else {
        return matches!(
            e,
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
        );
    };
    let Some(code) = d.code() else { return false };
    if let Ok(n) = code.parse::<i64>() {
        // SQLite primary codes (the low byte of an extended one): BUSY,
        // LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL.
        return matches!(n & 0xff, 5 | 6 | 7 | 8 | 10 | 11 | 13 | 14 | 15);
    }
    // PostgreSQL SQLSTATE classes: connection (08), resources such as a full
    // disk (53), operator intervention (57), system errors (58).
    matches!(code.get(..2), Some("08" | "53" | "57" | "58"))
}

/// Whether the database refused this row for what it holds, not for its own
/// state.
pub(super) fn is_row_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => !matches!(d.kind(), sqlx::error::ErrorKind::Other),
        sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => true,
        _ => false,
    }
}

impl Queued {
    /// A hosted provider's attempt: money spent, or possibly spent.
    pub(super) fn hosted(&self) -> bool {
        matches!(self, Queued::Attempt(a, _) if a.provider != "local")
    }

    /// Tables are written in this order: attempts, requests, shadows.
    pub(super) fn table_order(&self) -> u8 {
        match self {
            Queued::Attempt(..) => 0,
            Queued::Request(..) => 1,
            Queued::Shadow(..) => 2,
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Queued::Attempt(a, seq) => format!("attempt {} #{seq}", a.request_id),
            Queued::Request(r, _) => format!("request {}", r.request_id),
            Queued::Shadow(s, _) => format!("shadow of {}", s.request_id),
        }
    }
}

pub(super) async fn write_batch(pool: &AnyPool, rows: &[Queued]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let attempts: Vec<&Queued> = rows
        .iter()
        .filter(|r| matches!(r, Queued::Attempt(..)))
        .collect();
    let requests: Vec<&Queued> = rows
        .iter()
        .filter(|r| matches!(r, Queued::Request(..)))
        .collect();
    let shadows: Vec<&Queued> = rows
        .iter()
        .filter(|r| matches!(r, Queued::Shadow(..)))
        .collect();
    for group in [attempts, requests, shadows] {
        for chunk in chunks(&group) {
            insert_chunk(&mut tx, chunk).await?;
        }
    }
    count_minutes(&mut tx, rows).await?;
    tx.commit().await
}

pub(super) async fn insert_rows(pool: &AnyPool, rows: &[Queued]) -> Result<(), sqlx::Error> {
    let refs: Vec<&Queued> = rows.iter().collect();
    let mut tx = pool.begin().await?;
    insert_chunk(&mut tx, &refs).await?;
    count_minutes(&mut tx, rows).await?;
    tx.commit().await
}

/// Add `rows` to the per-minute totals, in the transaction that writes them.
pub(super) async fn count_minutes(
    conn: &mut sqlx::AnyConnection,
    rows: &[Queued],
) -> Result<(), sqlx::Error> {
    crate::ledger::minute_stats::add(conn, &counted(rows)).await
}

/// The rows as the per-minute totals count them (shadows are not counted).
pub(super) fn counted(rows: &[Queued]) -> Vec<crate::ledger::minute_stats::Counted<'_>> {
    rows.iter()
        .filter_map(|r| match r {
            Queued::Attempt(a, _) => Some(crate::ledger::minute_stats::Counted {
                ts_ms: a.ts_ms,
                kind: "attempt",
                task: &a.task,
                tier: &a.tier,
                decision: &a.outcome,
                cost_usd: a.cost_usd,
                all_llm_cost_usd: 0.0,
                latency_ms: a.latency_ms,
            }),
            Queued::Request(q, ts) => Some(crate::ledger::minute_stats::Counted {
                ts_ms: *ts,
                kind: "request",
                task: &q.task,
                tier: &q.answered_by,
                decision: &q.outcome,
                cost_usd: q.cost_usd,
                all_llm_cost_usd: q.all_llm_cost_usd,
                latency_ms: q.latency_ms,
            }),
            Queued::Shadow(..) => None,
        })
        .collect()
}

/// Rows per statement: powers of two up to this, so each table has a handful
/// of distinct statements for the connection's prepared-statement cache.
/// 128 rows × 18 columns stays under SQLite's and PostgreSQL's parameter
/// limits.
pub(super) const CHUNK: usize = 128;

pub(super) fn chunks<'a, 'b>(rows: &'b [&'a Queued]) -> Vec<&'b [&'a Queued]> {
    let mut out = Vec::new();
    let mut rest = rows;
    while !rest.is_empty() {
        let mut n = CHUNK;
        while n > rest.len() {
            n /= 2;
        }
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

pub(super) const ATTEMPT_COLUMNS: &str =
    "request_id, seq, ts_ms, task, tier, provider, model, operation, input_tokens, output_tokens,
    cached_input_tokens, reasoning_tokens, audio_seconds, latency_ms, cost_usd, outcome, error";
pub(super) const REQUEST_COLUMNS: &str = "request_id, ts_ms, task, answered_by, model, outcome, latency_ms, cost_usd, all_llm_cost_usd, caller_id, key_name, trace, input_text";
pub(super) const SHADOW_COLUMNS: &str =
    "request_id, ts_ms, task, tier, shadow_tier, agree, score, shadow_score";

/// `INSERT INTO table (columns) VALUES ($1, ..), ($n+1, ..), ..` for `rows` rows.
pub(super) fn insert_sql(table: &str, columns: &str, rows: usize) -> String {
    let width = columns.split(',').count();
    let mut sql = format!("INSERT INTO {table} ({columns}) VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", r * width + c + 1));
        }
        sql.push(')');
    }
    sql
}

/// One multi-row insert of rows of the same table.
pub(super) async fn insert_chunk(
    conn: &mut sqlx::AnyConnection,
    rows: &[&Queued],
) -> Result<(), sqlx::Error> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let (table, columns) = match first {
        Queued::Attempt(..) => ("attempts", ATTEMPT_COLUMNS),
        Queued::Request(..) => ("requests", REQUEST_COLUMNS),
        Queued::Shadow(..) => ("shadow", SHADOW_COLUMNS),
    };
    // The table and column names are constants; values are bound.
    let sql = insert_sql(table, columns, rows.len());
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for row in rows {
        q = match row {
            Queued::Attempt(a, seq) => q
                .bind(a.request_id.as_str())
                .bind(*seq)
                .bind(a.ts_ms)
                .bind(a.task.as_str())
                .bind(a.tier.as_str())
                .bind(a.provider.as_str())
                .bind(a.model.as_str())
                .bind(a.operation.as_str())
                .bind(a.input_tokens)
                .bind(a.output_tokens)
                .bind(a.cached_input_tokens)
                .bind(a.reasoning_tokens)
                .bind(a.audio_seconds)
                .bind(a.latency_ms)
                .bind(a.cost_usd)
                .bind(a.outcome.as_str())
                .bind(a.error.as_deref()),
            Queued::Request(r, ts) => q
                .bind(r.request_id.as_str())
                .bind(*ts)
                .bind(r.task.as_str())
                .bind(r.answered_by.as_str())
                .bind(r.model.as_str())
                .bind(r.outcome.as_str())
                .bind(r.latency_ms)
                .bind(r.cost_usd)
                .bind(r.all_llm_cost_usd)
                .bind(r.caller_id.as_deref())
                .bind(r.key_name.as_deref())
                .bind(r.trace.as_deref())
                .bind(r.input_text.as_deref()),
            Queued::Shadow(s, ts) => q
                .bind(s.request_id.as_str())
                .bind(*ts)
                .bind(s.task.as_str())
                .bind(s.tier.as_str())
                .bind(s.shadow_tier.as_str())
                .bind(i64::from(s.agree))
                .bind(s.score)
                .bind(s.shadow_score),
        };
    }
    q.execute(conn).await.map(|_| ())
}
