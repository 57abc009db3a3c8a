//! The SQLite ledger's writer connection: one rusqlite connection, used from
//! the blocking pool by the writer task, that inserts a batch through cached
//! prepared statements (one per table, bound row by row: no SQL is built or
//! parsed per batch, and no value is copied into a driver's own argument
//! list) and adds the batch's per-minute totals in the same transaction.
//!
//! Durability per batch: a batch with a hosted attempt (money spent or
//! possibly spent) or one that a caller flushes (a hosted answer waiting for
//! its rows, shutdown, reload) commits with `synchronous = FULL`, fsync'd
//! before it is reported, so it survives a power cut. Any other batch
//! (local and rule answers) commits with `synchronous = NORMAL`: in WAL
//! mode that survives a crash of the process (kill -9) and is made durable
//! by the next FULL commit or checkpoint, but a power cut may lose the last
//! of them. Reads (reports, the dashboard, budgets) stay on sqlx's pool.
//!
//! The writer never checkpoints (copies the WAL back into the database and
//! fsyncs it): a [`Checkpointer`] on its own connection does, beside it. A
//! checkpoint inside the writer's commit held the writer for milliseconds
//! every 4 MB of WAL, the queue filled behind it, and admission waited: p99
//! 3.9-4.6 ms against 2.2-2.5 ms without (64 clients, rule task, 15 s).

use super::minute_stats::{self, Counted};
use super::writer::{
    ATTEMPT_COLUMNS, OneByOne, Queued, REQUEST_COLUMNS, SHADOW_COLUMNS, Written, all_written,
    counted, insert_sql,
};
use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use std::time::Duration;

/// The writer's own connection to a SQLite ledger.
pub(super) struct SqliteWriter {
    conn: Connection,
    /// One row's INSERT per table (attempts, requests, shadow), the same
    /// columns as PostgreSQL's multi-row inserts.
    inserts: [String; 3],
    /// The per-minute totals' upsert.
    upsert: String,
    /// Whether the connection is at `synchronous = FULL` now.
    full: bool,
    #[cfg(test)]
    file: String,
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteWriter")
    }
}

impl SqliteWriter {
    /// Open the ledger file the pool has created and migrated.
    pub(super) fn open(file: &str) -> Result<Self, rusqlite::Error> {
        let conn = connect(file)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.set_prepared_statement_cache_capacity(8);
        Ok(Self {
            conn,
            inserts: [
                insert_sql("attempts", ATTEMPT_COLUMNS, 1),
                insert_sql("requests", REQUEST_COLUMNS, 1),
                insert_sql("shadow", SHADOW_COLUMNS, 1),
            ],
            upsert: minute_stats::upsert_sql(),
            full: true,
            #[cfg(test)]
            file: file.to_owned(),
        })
    }

    /// Write `rows` in one transaction; if SQLite refuses it, write each
    /// row in its own, so one bad row costs only itself. Same contract as
    /// the pool's [`super::writer::write_rows`]: `rows` keeps what is not
    /// committed when the database itself fails, and that error comes back.
    pub(super) fn write(
        &mut self,
        rows: &mut Vec<Queued>,
        durable: bool,
    ) -> (Written, Option<rusqlite::Error>) {
        #[cfg(test)]
        self.apply_test_page_cap();
        if let Err(e) = self.set_sync(durable) {
            return (Written::default(), Some(e));
        }
        let refused = match self.batch(rows) {
            Ok(()) => return (all_written(rows), None),
            Err(e) => e,
        };
        let mut one = OneByOne::after(&refused, rows.len(), database_fault, row_error);
        for row in std::mem::take(rows) {
            if let Some(row) = one.next(row) {
                let result = self.batch(std::slice::from_ref(&row));
                one.tried(row, result);
            }
        }
        one.finish(rows)
    }

    fn set_sync(&mut self, full: bool) -> Result<(), rusqlite::Error> {
        if self.full != full {
            self.conn
                .pragma_update(None, "synchronous", if full { "FULL" } else { "NORMAL" })?;
            self.full = full;
        }
        Ok(())
    }

    /// One transaction: the rows, by table in their order, then the
    /// minute totals they add.
    fn batch(&mut self, rows: &[Queued]) -> Result<(), rusqlite::Error> {
        // IMMEDIATE: the write lock at BEGIN, so the pool's writers (budget
        // rows, the backfill) wait on busy_timeout instead of deadlocking
        // an upgrade.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for kind in [0, 1, 2] {
            for row in rows.iter().filter(|r| r.table_order() == kind) {
                match row {
                    Queued::Attempt(a, seq) => {
                        tx.prepare_cached(&self.inserts[0])?.execute(params![
                            a.request_id,
                            seq,
                            a.ts_ms,
                            a.task,
                            a.tier,
                            a.provider,
                            a.model,
                            a.operation,
                            a.input_tokens,
                            a.output_tokens,
                            a.cached_input_tokens,
                            a.reasoning_tokens,
                            a.audio_seconds,
                            a.latency_ms,
                            a.cost_usd,
                            a.outcome,
                            a.error,
                        ])?;
                    }
                    Queued::Request(r, ts) => {
                        tx.prepare_cached(&self.inserts[1])?.execute(params![
                            r.request_id,
                            ts,
                            r.task,
                            r.answered_by,
                            r.model,
                            r.outcome,
                            r.latency_ms,
                            r.cost_usd,
                            r.all_llm_cost_usd,
                            r.caller_id,
                            r.key_name,
                            r.trace,
                            r.input_text,
                        ])?;
                    }
                    Queued::Shadow(s, ts) => {
                        tx.prepare_cached(&self.inserts[2])?.execute(params![
                            s.request_id,
                            ts,
                            s.task,
                            s.tier,
                            s.shadow_tier,
                            i64::from(s.agree),
                            s.score,
                            s.shadow_score,
                        ])?;
                    }
                }
            }
        }
        let counted: Vec<Counted<'_>> = counted(rows);
        for ((minute, kind, task, tier, decision), s) in minute_stats::sum(&counted) {
            let mut stmt = tx.prepare_cached(&self.upsert)?;
            let mut values: Vec<rusqlite::types::Value> = vec![
                minute.into(),
                kind.to_owned().into(),
                task.to_owned().into(),
                tier.to_owned().into(),
                decision.to_owned().into(),
                s.n.into(),
                s.cost.into(),
                s.all.into(),
                s.latency.into(),
            ];
            values.extend(s.h.iter().map(|&h| rusqlite::types::Value::from(h)));
            stmt.execute(rusqlite::params_from_iter(values))?;
        }
        tx.commit()
    }

    /// Tests cap the database's pages (a full disk) on every connection;
    /// the writer's own connection follows the cap set for its file.
    #[cfg(test)]
    fn apply_test_page_cap(&mut self) {
        if let Some(pages) = super::tests::page_cap_for(&self.file) {
            let _ = self.conn.pragma_update(None, "max_page_count", pages);
        }
    }
}

/// How often the [`Checkpointer`] runs while rows are being written.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// WAL frames (pages) past which a checkpoint also restarts the WAL from its
/// start: 65,536 frames, 256 MB, about 7 s of writing at 65k rows/s. A
/// restart holds the writer through its fsyncs, and requests queue behind
/// the full ledger meanwhile: at 64 MB that was 45 ms every 1.5 s (p99 up
/// to 4.1 ms), at 512 MB 170 ms every 14 s; at 256 MB it is 95 ms every 7 s
/// and p99 2.5-2.9 ms (64 clients, rule task, 15 s, 2026-12-08).
const RESTART_FRAMES: i64 = 65_536;

/// Checkpoints the ledger's WAL on its own connection, on the blocking pool
/// beside the writer. A PASSIVE checkpoint copies what it can without
/// waiting for anyone; while the writer writes without pause it never
/// catches up, so past [`RESTART_FRAMES`] a RESTART one follows (it waits
/// for the writer's current transaction, copies the few frames written
/// since, and makes the next write start the WAL over): the WAL stays
/// bounded under sustained load.
pub(super) struct Checkpointer {
    conn: Connection,
    restart_frames: i64,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checkpointer")
    }
}

impl Checkpointer {
    pub(super) fn open(file: &str) -> Result<Self, rusqlite::Error> {
        Ok(Self {
            conn: connect(file)?,
            restart_frames: RESTART_FRAMES,
        })
    }

    /// One checkpoint; the WAL's length in frames before it.
    pub(super) fn run(&mut self) -> Result<i64, rusqlite::Error> {
        let started = std::time::Instant::now();
        let log = self.checkpoint("PASSIVE")?;
        let passive = started.elapsed();
        if log >= self.restart_frames {
            self.checkpoint("RESTART")?;
        }
        tracing::debug!(
            frames = log,
            passive_ms = passive.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "ledger WAL checkpoint"
        );
        Ok(log)
    }

    fn checkpoint(&self, mode: &str) -> Result<i64, rusqlite::Error> {
        // (busy, frames in the WAL, frames copied); mode is a constant.
        self.conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                r.get::<_, i64>(1)
            })
    }
}

/// A connection to the ledger file the pool has created and migrated, for
/// the writer or the checkpointer: it never checkpoints on its own commits
/// (the [`Checkpointer`] does), and waits up to 5 s for a lock.
fn connect(file: &str) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// SQLite's primary result code (the low byte of an extended one).
fn primary_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code & 0xff),
        _ => None,
    }
}

/// Whether SQLite failed for its own state (busy, locked, out of memory,
/// read-only, I/O, corrupt, full, cannot open, protocol), whatever the row.
fn database_fault(e: &rusqlite::Error) -> bool {
    matches!(
        primary_code(e),
        Some(5 | 6 | 7 | 8 | 10 | 11 | 13 | 14 | 15)
    )
}

/// Whether SQLite refused the row for what it holds (a constraint, a value
/// too big or of the wrong type).
fn row_error(e: &rusqlite::Error) -> bool {
    matches!(primary_code(e), Some(18 | 19 | 20 | 25))
        || matches!(e, rusqlite::Error::ToSqlConversionFailure(_))
}

#[cfg(test)]
impl Checkpointer {
    pub(super) fn restarting_past(mut self, frames: i64) -> Self {
        self.restart_frames = frames;
        self
    }
}

#[cfg(test)]
impl SqliteWriter {
    /// `PRAGMA synchronous` as SQLite reports it (1 NORMAL, 2 FULL).
    pub(super) fn synchronous(&self) -> i64 {
        self.conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap_or(-1)
    }
}
