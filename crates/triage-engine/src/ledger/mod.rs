//! The cost ledger: one row per attempt (local or hosted) and one per request
//! with its counterfactual all-LLM cost. Embedded SQLite (WAL) by default,
//! PostgreSQL for several replicas (`postgres` feature); both through sqlx's
//! `Any` driver with `$n` parameters, which both dialects accept.
//!
//! Writes go through a queue to one writer task, so recording never blocks
//! a request. The queue is bounded by rows, not by messages: a request is
//! admitted ([`Ledger::admit`]) only while fewer than `max_pending` rows wait,
//! and is refused after a short wait otherwise, so memory stays flat under
//! any load and a kill -9 loses at most the queue. The writer group-commits
//! what arrives within `commit_interval` (20 ms) as multi-row inserts in one
//! transaction; a batch the database refuses is written again row by row, so
//! one bad row never takes the others with it. [`Ledger::flush`] waits until
//! everything sent so far is committed.

mod budget_rows;
pub mod minute_stats;
mod records;
mod reports;
mod schema;
mod sqlite_writer;
mod writer;

pub(crate) use budget_rows::{create_budget_tables, reserve_shared, settle_shared, shared_window};
pub use records::*;

use schema::{backfill_minutes, migrate};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Connection, Executor};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, mpsc, oneshot};
use triage_cloud::gateway::{Attempt, AttemptSink};
use writer::{Msg, Queued, Sink, hard_bound, writer};

/// Whether this build can open a PostgreSQL ledger (the `postgres`
/// feature); tests in other crates, which cannot see the feature, ask this.
pub const POSTGRES: bool = cfg!(feature = "postgres");

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot open the ledger at {url}: {source}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create the ledger's folder {path}: {source}")]
    Folder {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger migration {version} failed: {source}")]
    Migrate {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    #[error("ledger query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("the ledger's writer has stopped")]
    WriterGone,
    /// The queue held `max_pending` rows for the whole admission wait.
    #[error("the cost ledger is behind ({max_pending} rows waiting); retry shortly")]
    Full {
        max_pending: usize,
        retry_after: Duration,
    },
}

/// How the ledger queues rows: the bound and what a caller gets when it is
/// reached (`[ledger]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LedgerOptions {
    /// Rows accepted but not yet committed. At this many, new requests wait
    /// (up to `admit_wait`) and are then refused: memory does not grow with
    /// load, and a kill -9 loses at most this many rows.
    pub max_pending: usize,
    /// How long a new request waits for room in a full queue.
    pub admit_wait: Duration,
    /// How long the writer gathers rows into one transaction (group commit).
    pub commit_interval: Duration,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self {
            // A kill -9 loses at most the queue: a request answered by a rule
            // writes one row, so this keeps the loss under 2,000 answered
            // requests at any rate (3072 lost 2,502 in a measurement).
            max_pending: 1024,
            admit_wait: Duration::from_millis(1000),
            commit_interval: Duration::from_millis(20),
        }
    }
}

/// The ledger's state, for `/ready` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerHealth {
    /// Rows accepted and not yet committed.
    pub pending: usize,
    pub max_pending: usize,
    /// Rows committed since the ledger was opened.
    pub written: u64,
    /// Rows the database refused one by one (logged, then dropped).
    pub rejected: u64,
    /// Requests refused because the queue stayed full.
    pub refused_requests: u64,
    /// The database's last error while the writer cannot commit (full disk,
    /// lost connection); `None` once a commit succeeds again.
    pub failing: Option<String>,
}

impl LedgerHealth {
    /// Whether the ledger can take more work now.
    pub fn ready(&self) -> bool {
        self.failing.is_none() && self.pending < self.max_pending
    }
}

/// What the handles and the writer share.
#[derive(Debug)]
struct Shared {
    options: LedgerOptions,
    /// Rows sent and not yet committed (or rejected).
    pending: AtomicUsize,
    /// Woken after every commit, for requests waiting for room.
    room: Notify,
    /// Attempt sequence numbers: unique in the process, so with a unique
    /// request id the key is unique, and increasing, so a request's
    /// attempts keep their order.
    seq: AtomicI64,
    written: AtomicU64,
    rejected: AtomicU64,
    refused: AtomicU64,
    failing: Mutex<Option<String>>,
}

impl Shared {
    fn failing(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Handle to the ledger; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    url: String,
}

pub(crate) fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Ledger {
    /// Open (creating the file and folder for SQLite) and migrate, with the
    /// default queue.
    pub async fn open(url: &str) -> Result<Self, LedgerError> {
        Self::open_with(url, LedgerOptions::default()).await
    }

    /// Open and migrate, queueing at most `options.max_pending` rows.
    pub async fn open_with(url: &str, options: LedgerOptions) -> Result<Self, LedgerError> {
        install_default_drivers();
        let open_err = |source| LedgerError::Open {
            url: url.to_owned(),
            source,
        };
        let sqlite = url.starts_with("sqlite:");
        let connect_url = if let Some(path) = url.strip_prefix("sqlite://") {
            let file = path.split('?').next().unwrap_or(path);
            if file != ":memory:"
                && let Some(dir) = Path::new(file)
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
            {
                // The data folder is the owner's alone (0700) when triage
                // makes it; the ledger holds request text and spending.
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| LedgerError::Folder {
                        path: dir.display().to_string(),
                        source,
                    })?;
            }
            if path.contains('?') {
                url.to_owned()
            } else {
                format!("{url}?mode=rwc")
            }
        } else {
            url.to_owned()
        };
        let mut options_pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            // A connection comes back to the pool only outside a transaction.
            // When SQLite rolls a transaction back itself (a full disk, an
            // I/O error), sqlx's ROLLBACK then fails and its count of open
            // transactions on that connection stays at one: the next
            // transaction there would be a savepoint inside one that never
            // commits, and every row "committed" on it would stay invisible
            // to other connections and be lost at exit (the full-disk test
            // caught 229 of 300 rows so). Such a connection is closed and a
            // new one opened. On SQLite the ping lets the connection's worker
            // finish the rollback a dropped transaction queued before the
            // count is read (PostgreSQL's driver counts it at once).
            .after_release(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        conn.ping().await?;
                    }
                    Ok(!conn.is_in_transaction())
                })
            });
        if sqlite {
            options_pool = options_pool.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    // WAL with FULL sync: a commit is on disk (fsync'd)
                    // before the writer reports it, so a row survives a
                    // kill -9 and a power cut. Group commit keeps this to
                    // one fsync per batch.
                    conn.execute("PRAGMA synchronous = FULL").await?;
                    #[cfg(test)]
                    if let Some(pages) = tests::page_cap(conn).await {
                        conn.execute(sqlx::AssertSqlSafe(format!(
                            "PRAGMA max_page_count = {pages}"
                        )))
                        .await?;
                    }
                    Ok(())
                })
            });
        }
        let pool = options_pool.connect(&connect_url).await.map_err(open_err)?;
        if sqlite {
            pool.execute("PRAGMA journal_mode = WAL")
                .await
                .map_err(open_err)?;
        }
        migrate(&pool).await?;
        let sink = match url.strip_prefix("sqlite://") {
            Some(path) => {
                let file = path.split('?').next().unwrap_or(path);
                owner_only(file);
                // The writer's own connection (an in-memory database is one
                // per connection: its rows go through the pool).
                if file == ":memory:" {
                    Sink::Pool(pool.clone())
                } else {
                    let open_err = |e: rusqlite::Error| LedgerError::Open {
                        url: url.to_owned(),
                        source: sqlx::Error::Configuration(Box::new(e)),
                    };
                    Sink::Sqlite(Box::new(writer::SqliteSink::new(
                        sqlite_writer::SqliteWriter::open(file).map_err(open_err)?,
                        sqlite_writer::Checkpointer::open(file).map_err(open_err)?,
                    )))
                }
            }
            None => Sink::Pool(pool.clone()),
        };
        // [`Ledger::admit`] holds new requests back while `pending` (every
        // row until it is committed) is at `max_pending`. Requests admitted
        // together can still overshoot it by their rows, so the channel has a
        // hard bound as well, far above what admission lets through: past it
        // a row is refused and counted, never buffered without end.
        let (tx, rx) = mpsc::channel(hard_bound(options.max_pending));
        let shared = Arc::new(Shared {
            options,
            pending: AtomicUsize::new(0),
            room: Notify::new(),
            seq: AtomicI64::new(1),
            written: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failing: Mutex::new(None),
        });
        tokio::spawn(writer(sink, rx, shared.clone()));
        // Only a ledger with rows from before the per-minute totals has a
        // cursor; a new one has none, and no backfill runs beside its writer.
        let backfill = crate::ledger::minute_stats::backfill_before(&pool)
            .await
            .map_err(open_err)?;
        if backfill.is_some() {
            tokio::spawn(backfill_minutes(
                pool.clone(),
                crate::ledger::minute_stats::BACKFILL_CHUNK,
            ));
        }
        Ok(Self {
            pool,
            tx,
            shared,
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this ledger is a PostgreSQL database (shared by replicas).
    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres:") || self.url.starts_with("postgresql:")
    }

    /// The connection pool, for state kept beside the ledger (shared budgets).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn options(&self) -> LedgerOptions {
        self.shared.options
    }

    /// Wait for room for a new request's rows: at once while fewer than
    /// `max_pending` rows are queued, else up to `admit_wait` for the writer
    /// to commit some. A full queue that stays full (a slow or failing
    /// database) is [`LedgerError::Full`]: the request is refused before it
    /// costs anything, instead of being buffered without bound.
    pub async fn admit(&self) -> Result<(), LedgerError> {
        let s = &self.shared;
        let has_room = || s.pending.load(Ordering::Acquire) < s.options.max_pending;
        if has_room() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + s.options.admit_wait;
        loop {
            let notified = s.room.notified();
            if has_room() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if has_room() {
                    return Ok(());
                }
                s.refused.fetch_add(1, Ordering::Relaxed);
                return Err(LedgerError::Full {
                    max_pending: s.options.max_pending,
                    retry_after: Duration::from_secs(1),
                });
            }
        }
    }

    fn send(&self, row: Queued) {
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(Msg::Row(row)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                self.shared.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!("the ledger's queue is at its hard bound: a row was refused");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                tracing::error!("the ledger's writer has stopped: a row was lost");
            }
        }
    }

    pub fn record(&self, record: AttemptRecord) {
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        self.send(Queued::Attempt(Box::new(record), seq));
    }

    pub fn record_request(&self, record: RequestRecord) {
        self.send(Queued::Request(Box::new(record), millis(SystemTime::now())));
    }

    pub fn record_shadow(&self, record: ShadowRecord) {
        self.send(Queued::Shadow(Box::new(record), millis(SystemTime::now())));
    }

    /// Wait until every record sent before this call is committed.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .await
            .map_err(|_| LedgerError::WriterGone)?;
        rx.await.map_err(|_| LedgerError::WriterGone)
    }

    /// Queue depth, rows written and refused, and whether the database is
    /// failing now.
    pub fn health(&self) -> LedgerHealth {
        let s = &self.shared;
        LedgerHealth {
            pending: s.pending.load(Ordering::Acquire),
            max_pending: s.options.max_pending,
            written: s.written.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            refused_requests: s.refused.load(Ordering::Relaxed),
            failing: s.failing().clone(),
        }
    }
}

impl AttemptSink for Ledger {
    fn record(&self, attempt: &Attempt) {
        Ledger::record(self, AttemptRecord::from_attempt(attempt));
    }
}

#[cfg(test)]
mod tests;

/// Make a SQLite ledger's files (the database, its WAL and shared memory)
/// readable by their owner only: they hold request text and spending.
fn owner_only(file: &str) {
    use std::os::unix::fs::PermissionsExt;
    if file == ":memory:" {
        return;
    }
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{file}{suffix}");
        if let Ok(meta) = std::fs::metadata(&p)
            && meta.permissions().mode() & 0o077 != 0
            && let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
        {
            tracing::warn!(file = p, error = %e, "cannot make a ledger file owner-only");
        }
    }
}

/// The most of a request's text one ledger row keeps by default.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 64 << 10;

/// `text` cut to at most `max` bytes (at a character boundary), the cut
/// marked with how much was left out.
pub fn capped_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… [{} more bytes not kept]",
        &text[..end],
        text.len() - end
    )
}
