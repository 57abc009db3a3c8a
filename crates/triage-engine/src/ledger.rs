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

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, AssertSqlSafe, Connection, Executor, Row};
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, mpsc, oneshot};
use triage_cloud::gateway::{Attempt, AttemptOutcome, AttemptSink};

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

/// Numbered schema steps; each runs once, in a transaction, and is recorded.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE attempts (
        request_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        ts_ms BIGINT NOT NULL,
        task TEXT NOT NULL,
        tier TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        operation TEXT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cached_input_tokens BIGINT NOT NULL,
        reasoning_tokens BIGINT NOT NULL,
        audio_seconds DOUBLE PRECISION NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        outcome TEXT NOT NULL,
        error TEXT,
        PRIMARY KEY (request_id, seq)
    );
    CREATE INDEX attempts_ts ON attempts (ts_ms);
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        ts_ms BIGINT NOT NULL,
        task TEXT NOT NULL,
        answered_by TEXT NOT NULL,
        model TEXT NOT NULL,
        outcome TEXT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        all_llm_cost_usd DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX requests_ts ON requests (ts_ms);
    CREATE TABLE shadow (
        request_id TEXT NOT NULL,
        ts_ms BIGINT NOT NULL,
        task TEXT NOT NULL,
        tier TEXT NOT NULL,
        shadow_tier TEXT NOT NULL,
        agree BIGINT NOT NULL,
        score DOUBLE PRECISION,
        shadow_score DOUBLE PRECISION
    )",
    ),
    // Request ids are the server's own; a caller's id is kept beside it.
    (2, "ALTER TABLE requests ADD COLUMN caller_id TEXT"),
    // The API key (by name) a request came with, for budgets per key.
    (3, "ALTER TABLE requests ADD COLUMN key_name TEXT"),
    // (4 is generated: `minute_stats`.) Each request's trace (tiers,
    // decisions, scores, costs, latency; no text) for the request explorer,
    // and its text only where `[ledger] store_text = true`.
    (
        5,
        "ALTER TABLE requests ADD COLUMN trace TEXT;
        ALTER TABLE requests ADD COLUMN input_text TEXT",
    ),
    // The per-minute backfill's cursor, for ledgers whose step 4 was the
    // earlier one that summed the old rows itself (no cursor: nothing to do).
    (6, crate::minute_stats::BACKFILL_TABLE),
];

/// One attempt as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRecord {
    pub request_id: String,
    pub task: String,
    pub tier: String,
    pub provider: String,
    pub model: String,
    pub operation: String,
    pub ts_ms: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub reasoning_tokens: i64,
    pub audio_seconds: f64,
    pub latency_ms: f64,
    pub cost_usd: f64,
    /// `answered`, `refused` or `failed`.
    pub outcome: String,
    pub error: Option<String>,
}

impl AttemptRecord {
    pub fn from_attempt(a: &Attempt) -> Self {
        let (outcome, error) = match &a.outcome {
            AttemptOutcome::Answered => ("answered", None),
            AttemptOutcome::Refused => ("refused", None),
            AttemptOutcome::Failed {
                kind,
                status,
                message,
            } => (
                "failed",
                Some(match status {
                    Some(s) => format!("{kind:?} (HTTP {s}): {message}"),
                    None => format!("{kind:?}: {message}"),
                }),
            ),
        };
        let to_i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Self {
            request_id: a.request_id.clone(),
            task: a.task.clone(),
            tier: a.tier.clone(),
            provider: a.provider.clone(),
            model: a.model.clone(),
            operation: a.operation.to_owned(),
            ts_ms: millis(a.started_at),
            input_tokens: to_i(a.usage.input_tokens),
            output_tokens: to_i(a.usage.output_tokens),
            cached_input_tokens: to_i(a.usage.cached_input_tokens),
            reasoning_tokens: to_i(a.usage.reasoning_tokens),
            audio_seconds: a.audio_seconds,
            latency_ms: a.latency.as_secs_f64() * 1000.0,
            cost_usd: a.cost_usd,
            outcome: outcome.into(),
            error,
        }
    }

    /// A local tier's run (no tokens; priced by compute time).
    #[allow(clippy::too_many_arguments)]
    pub fn local(
        request_id: &str,
        task: &str,
        tier: &str,
        model: &str,
        operation: &str,
        latency: Duration,
        cost_usd: f64,
        error: Option<String>,
    ) -> Self {
        Self {
            request_id: request_id.into(),
            task: task.into(),
            tier: tier.into(),
            provider: "local".into(),
            model: model.into(),
            operation: operation.into(),
            ts_ms: millis(SystemTime::now()),
            input_tokens: 0,
            output_tokens: 0,
            cached_input_tokens: 0,
            reasoning_tokens: 0,
            audio_seconds: 0.0,
            latency_ms: latency.as_secs_f64() * 1000.0,
            cost_usd,
            outcome: if error.is_some() {
                "failed"
            } else {
                "answered"
            }
            .into(),
            error,
        }
    }
}

/// One request's summary row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    pub request_id: String,
    pub task: String,
    pub answered_by: String,
    pub model: String,
    pub outcome: String,
    pub latency_ms: f64,
    pub cost_usd: f64,
    pub all_llm_cost_usd: f64,
    /// The id the caller gave (`overrides.request_id`), kept as a tag: it
    /// need not be unique.
    pub caller_id: Option<String>,
    /// The name of the API key the request came with, if any.
    pub key_name: Option<String>,
    /// The trace's tiers as JSON (no request text).
    pub trace: Option<String>,
    /// The request's text, kept only with `[ledger] store_text = true`.
    pub input_text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowRecord {
    pub request_id: String,
    pub task: String,
    pub tier: String,
    pub shadow_tier: String,
    pub agree: bool,
    pub score: Option<f64>,
    pub shadow_score: Option<f64>,
}

/// What [`Ledger::recent_requests`] lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecentFilter {
    pub task: Option<String>,
    /// The tier that answered.
    pub tier: Option<String>,
    /// `answered`, `refused` or `failed`.
    pub outcome: Option<String>,
    pub before_ms: Option<i64>,
    pub limit: i64,
}

/// One request for the explorer: its row and when it was written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecentRequest {
    pub ts_ms: i64,
    #[serde(flatten)]
    pub record: RequestRecord,
}

/// Shadow checks of one tier by the next (`triage audit --from-ledger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowAgreement {
    pub tier: String,
    pub shadow_tier: String,
    pub checked: i64,
    pub agreed: i64,
}

/// `triage costs --by`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Task,
    Tier,
    Model,
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "task" => Ok(Self::Task),
            "tier" => Ok(Self::Tier),
            "model" => Ok(Self::Model),
            _ => Err(format!("`{s}`: group by task, tier or model")),
        }
    }
}

/// One line of `triage costs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    pub key: String,
    /// Requests answered by this task/tier/model.
    pub requests: i64,
    pub attempts: i64,
    pub failed_attempts: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    /// For the requests it answered: what the strongest model alone would have cost.
    pub all_llm_cost_usd: f64,
    pub mean_latency_ms: f64,
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

/// One row on its way to the database.
enum Queued {
    Attempt(Box<AttemptRecord>, i64),
    Request(Box<RequestRecord>, i64),
    Shadow(Box<ShadowRecord>, i64),
}

enum Msg {
    Row(Queued),
    Flush(oneshot::Sender<()>),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ledger message")
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
                std::fs::create_dir_all(dir).map_err(|source| LedgerError::Folder {
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
                        conn.execute(AssertSqlSafe(format!("PRAGMA max_page_count = {pages}")))
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
        tokio::spawn(writer(pool.clone(), rx, shared.clone()));
        // Only a ledger with rows from before the per-minute totals has a
        // cursor; a new one has none, and no backfill runs beside its writer.
        let backfill = crate::minute_stats::backfill_before(&pool)
            .await
            .map_err(open_err)?;
        if backfill.is_some() {
            tokio::spawn(backfill_minutes(
                pool.clone(),
                crate::minute_stats::BACKFILL_CHUNK,
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

    /// Every attempt of one request, in order.
    pub async fn attempts(&self, request_id: &str) -> Result<Vec<AttemptRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT request_id, task, tier, provider, model, operation, ts_ms, input_tokens, output_tokens,
                    cached_input_tokens, reasoning_tokens, audio_seconds, latency_ms, cost_usd, outcome, error
             FROM attempts WHERE request_id = $1 ORDER BY seq",
        )
        .bind(request_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRecord {
                    request_id: r.try_get(0)?,
                    task: r.try_get(1)?,
                    tier: r.try_get(2)?,
                    provider: r.try_get(3)?,
                    model: r.try_get(4)?,
                    operation: r.try_get(5)?,
                    ts_ms: r.try_get(6)?,
                    input_tokens: r.try_get(7)?,
                    output_tokens: r.try_get(8)?,
                    cached_input_tokens: r.try_get(9)?,
                    reasoning_tokens: r.try_get(10)?,
                    audio_seconds: r.try_get(11)?,
                    latency_ms: r.try_get(12)?,
                    cost_usd: r.try_get(13)?,
                    outcome: r.try_get(14)?,
                    error: r.try_get(15)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// The request's summary row, if stored.
    pub async fn request(&self, request_id: &str) -> Result<Option<RequestRecord>, LedgerError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM requests WHERE request_id = $1"
        )))
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(request_from_row)
            .transpose()
            .map_err(|e: sqlx::Error| e.into())
    }

    /// The newest requests first (before `before_ms` when given), filtered by
    /// task, answering tier and outcome; at most `limit` (capped at 500).
    /// Reads the `requests_ts` index backwards, so a page costs its rows.
    pub async fn recent_requests(
        &self,
        filter: &RecentFilter,
    ) -> Result<Vec<RecentRequest>, LedgerError> {
        let mut sql = format!("SELECT {RECORD_COLUMNS}, ts_ms FROM requests WHERE 1 = 1");
        let mut n = 0;
        let mut binds: Vec<&str> = Vec::new();
        for (col, v) in [
            ("task", &filter.task),
            ("answered_by", &filter.tier),
            ("outcome", &filter.outcome),
        ] {
            if let Some(v) = v {
                n += 1;
                sql.push_str(&format!(" AND {col} = ${n}"));
                binds.push(v);
            }
        }
        if filter.before_ms.is_some() {
            n += 1;
            sql.push_str(&format!(" AND ts_ms < ${n}"));
        }
        n += 1;
        sql.push_str(&format!(" ORDER BY ts_ms DESC LIMIT ${n}"));
        // Column names are constants; values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for b in binds {
            q = q.bind(b);
        }
        if let Some(before) = filter.before_ms {
            q = q.bind(before);
        }
        q = q.bind(filter.limit.clamp(1, 500));
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(RecentRequest {
                    ts_ms: r.try_get(RECORD_COLUMN_COUNT)?,
                    record: request_from_row(r)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Dollars spent on attempts since `since_ms`, for one task and/or one
    /// API key (budgets read this at start).
    pub async fn spent_since(
        &self,
        since_ms: i64,
        task: Option<&str>,
        key: Option<&str>,
    ) -> Result<f64, LedgerError> {
        let mut sql =
            "SELECT CAST(COALESCE(SUM(a.cost_usd), 0) AS DOUBLE PRECISION) FROM attempts a"
                .to_owned();
        if key.is_some() {
            sql.push_str(" JOIN requests r ON r.request_id = a.request_id");
        }
        sql.push_str(" WHERE a.ts_ms >= $1");
        let mut n = 1;
        if task.is_some() {
            n += 1;
            sql.push_str(&format!(" AND a.task = ${n}"));
        }
        if key.is_some() {
            n += 1;
            sql.push_str(&format!(" AND r.key_name = ${n}"));
        }
        // Only placeholders are added to the SQL; the values are bound.
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(since_ms);
        if let Some(t) = task {
            q = q.bind(t);
        }
        if let Some(k) = key {
            q = q.bind(k);
        }
        let row = q.fetch_one(&self.pool).await?;
        Ok(row.try_get(0)?)
    }

    pub async fn shadow_count(&self, task: &str) -> Result<(i64, i64), LedgerError> {
        let row = sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(agree), 0) AS BIGINT) FROM shadow WHERE task = $1",
        )
        .bind(task)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Shadow checks of `task` since `since_ms` (unix milliseconds), one
    /// row per (tier, shadow tier): how many, and how many agreed.
    pub async fn shadow_agreement(
        &self,
        task: &str,
        since_ms: i64,
    ) -> Result<Vec<ShadowAgreement>, LedgerError> {
        let rows = sqlx::query(
            "SELECT tier, shadow_tier, COUNT(*), CAST(COALESCE(SUM(agree), 0) AS BIGINT)
             FROM shadow WHERE task = $1 AND ts_ms >= $2
             GROUP BY tier, shadow_tier ORDER BY tier, shadow_tier",
        )
        .bind(task)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ShadowAgreement {
                    tier: r.try_get(0)?,
                    shadow_tier: r.try_get(1)?,
                    checked: r.try_get(2)?,
                    agreed: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The per-minute totals since `since_ms` (unix milliseconds): summed
    /// per (kind, task, tier, decision), and requests and dollars per
    /// minute. Reads the pre-aggregated table only, never the raw rows.
    pub async fn minute_window(
        &self,
        since_ms: i64,
    ) -> Result<
        (
            Vec<crate::minute_stats::WindowRow>,
            Vec<crate::minute_stats::MinutePoint>,
        ),
        LedgerError,
    > {
        Ok(crate::minute_stats::window(&self.pool, since_ms).await?)
    }

    /// Rows older than this (unix ms) are not in the per-minute totals yet:
    /// a ledger from before them is summed in the background after it opens.
    /// `None` once every row is counted.
    pub async fn minute_backfill_before(&self) -> Result<Option<i64>, LedgerError> {
        Ok(crate::minute_stats::backfill_before(&self.pool).await?)
    }

    /// Totals since `since_ms` (unix milliseconds), grouped by task, tier or model.
    pub async fn summary(
        &self,
        since_ms: i64,
        by: GroupBy,
    ) -> Result<Vec<SummaryRow>, LedgerError> {
        let (attempt_col, request_col) = match by {
            GroupBy::Task => ("task", "task"),
            GroupBy::Tier => ("tier", "answered_by"),
            GroupBy::Model => ("model", "model"),
        };
        // The column names come from `GroupBy`, never from the caller.
        let attempts = sqlx::query(AssertSqlSafe(format!(
            "SELECT {attempt_col}, COUNT(*), CAST(SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS BIGINT),
                    CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT), SUM(cost_usd), AVG(latency_ms)
             FROM attempts WHERE ts_ms >= $1 GROUP BY {attempt_col} ORDER BY {attempt_col}"
        )))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        let requests = sqlx::query(AssertSqlSafe(format!(
            "SELECT {request_col}, COUNT(*), SUM(all_llm_cost_usd)
             FROM requests WHERE ts_ms >= $1 GROUP BY {request_col}"
        )))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<SummaryRow> = Vec::new();
        for r in &attempts {
            out.push(SummaryRow {
                key: r.try_get(0)?,
                requests: 0,
                attempts: r.try_get(1)?,
                failed_attempts: r.try_get(2)?,
                input_tokens: r.try_get(3)?,
                output_tokens: r.try_get(4)?,
                cost_usd: r.try_get(5)?,
                all_llm_cost_usd: 0.0,
                mean_latency_ms: r.try_get(6)?,
            });
        }
        for r in &requests {
            let key: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            let all: f64 = r.try_get(2)?;
            match out.iter_mut().find(|row| row.key == key) {
                Some(row) => {
                    row.requests = n;
                    row.all_llm_cost_usd = all;
                }
                None => out.push(SummaryRow {
                    key,
                    requests: n,
                    attempts: 0,
                    failed_attempts: 0,
                    input_tokens: 0,
                    output_tokens: 0,
                    cost_usd: 0.0,
                    all_llm_cost_usd: all,
                    mean_latency_ms: 0.0,
                }),
            }
        }
        Ok(out)
    }
}

impl AttemptSink for Ledger {
    fn record(&self, attempt: &Attempt) {
        Ledger::record(self, AttemptRecord::from_attempt(attempt));
    }
}

/// The `requests` columns a [`RequestRecord`] is read from, in the order
/// [`request_from_row`] reads them.
const RECORD_COLUMNS: &str = "request_id, task, answered_by, model, outcome, latency_ms, cost_usd, all_llm_cost_usd, caller_id, key_name, trace, input_text";
const RECORD_COLUMN_COUNT: usize = 12;

fn request_from_row(r: &sqlx::any::AnyRow) -> Result<RequestRecord, sqlx::Error> {
    Ok(RequestRecord {
        request_id: r.try_get(0)?,
        task: r.try_get(1)?,
        answered_by: r.try_get(2)?,
        model: r.try_get(3)?,
        outcome: r.try_get(4)?,
        latency_ms: r.try_get(5)?,
        cost_usd: r.try_get(6)?,
        all_llm_cost_usd: r.try_get(7)?,
        caller_id: r.try_get(8)?,
        key_name: r.try_get(9)?,
        trace: r.try_get(10)?,
        input_text: r.try_get(11)?,
    })
}

async fn migrate(pool: &AnyPool) -> Result<(), LedgerError> {
    pool.execute("CREATE TABLE IF NOT EXISTS triage_migrations (version BIGINT PRIMARY KEY, ts_ms BIGINT NOT NULL)")
        .await
        .map_err(|source| LedgerError::Migrate { version: 0, source })?;
    // Step 4 is generated (the per-minute totals' histogram columns).
    let mut steps: Vec<(i64, String)> = MIGRATIONS
        .iter()
        .map(|(v, s)| (*v, (*s).to_owned()))
        .chain([(4, crate::minute_stats::migration())])
        .collect();
    steps.sort_by_key(|(v, _)| *v);
    for (version, sql) in steps {
        let version = &version;
        let err = |source| LedgerError::Migrate {
            version: *version,
            source,
        };
        let mut tx = pool.begin().await.map_err(err)?;
        let done = sqlx::query("SELECT COUNT(*) FROM triage_migrations WHERE version = $1")
            .bind(*version)
            .fetch_one(&mut *tx)
            .await
            .and_then(|r| r.try_get::<i64, _>(0))
            .map_err(err)?;
        if done > 0 {
            continue;
        }
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            // The schema's own constant text (step 4 generated from constants).
            sqlx::query(AssertSqlSafe(statement.to_owned()))
                .execute(&mut *tx)
                .await
                .map_err(err)?;
        }
        sqlx::query("INSERT INTO triage_migrations (version, ts_ms) VALUES ($1, $2)")
            .bind(*version)
            .bind(millis(SystemTime::now()))
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
    }
    Ok(())
}

/// Sum the rows from before the per-minute totals into them (see
/// [`crate::minute_stats::backfill`]); a chunk that fails (the database busy
/// past its timeout, another replica's chunk in the way) is tried again.
async fn backfill_minutes(pool: AnyPool, chunk: i64) {
    let mut pause = Duration::from_millis(100);
    loop {
        match crate::minute_stats::backfill(&pool, chunk).await {
            Ok(0) => return,
            Ok(chunks) => {
                tracing::info!(
                    chunks,
                    "per-minute totals: the older ledger rows are summed"
                );
                return;
            }
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(error = %e, "per-minute totals: summing older rows failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Most rows written in one transaction.
const BATCH: usize = 8192;
/// Longest pause between retries of a batch the database would not take.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The channel's hard capacity for a queue admitted up to `max_pending`
/// rows: room for every admitted request's rows several times over.
fn hard_bound(max_pending: usize) -> usize {
    max_pending.saturating_mul(8).max(8192)
}

async fn writer(pool: AnyPool, mut rx: mpsc::Receiver<Msg>, shared: Arc<Shared>) {
    let mut rows: Vec<Queued> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut open = true;
    while open {
        let Some(first) = rx.recv().await else { break };
        // Group commit: gather what arrives within `commit_interval` of the
        // first row into one transaction (one fsync), so a row is durable
        // within that interval plus one write. A flush is written at once.
        let deadline = tokio::time::Instant::now() + shared.options.commit_interval;
        let mut msg = Some(first);
        loop {
            match msg.take() {
                Some(Msg::Row(r)) => rows.push(r),
                Some(Msg::Flush(done)) => flushes.push(done),
                None => {}
            }
            if rows.len() >= BATCH {
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
        while !rows.is_empty() {
            let (report, failed) = write_rows(&pool, &mut rows).await;
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
                Some(e) => {
                    // The database itself is failing (full disk, lost
                    // connection): keep the rows, which keeps the queue full,
                    // which makes new requests wait and then refuses them.
                    let message = crate::error::chain(&e);
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
}

/// What became of a batch.
#[derive(Debug, Default)]
struct Written {
    written: usize,
    rejected: usize,
}

/// Write `rows` in one transaction of multi-row inserts; if the database
/// refuses it, write each row on its own, so one bad row (a duplicate key, a
/// value the database will not take) costs only itself. `rows` is emptied on
/// success; on an error that is the database's rather than a row's, the rows
/// not yet committed stay in it to be retried, and the error comes back with
/// the count of those that went in.
async fn write_rows(pool: &AnyPool, rows: &mut Vec<Queued>) -> (Written, Option<sqlx::Error>) {
    match write_batch(pool, rows).await {
        Ok(()) => {
            let written = rows.len();
            rows.clear();
            return (
                Written {
                    written,
                    rejected: 0,
                },
                None,
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, rows = rows.len(), "ledger batch refused; writing its rows one by one");
        }
    }
    let mut report = Written::default();
    let mut kept = Vec::new();
    let mut last_db_error = None;
    for row in rows.drain(..) {
        if last_db_error.is_some() {
            kept.push(row);
            continue;
        }
        let one = std::slice::from_ref(&row);
        match insert_rows(pool, one).await {
            Ok(()) => report.written += 1,
            Err(e) if !is_database_fault(&e) && (is_row_error(&e) || report.written > 0) => {
                // This row's own fault (a constraint), or another row of the
                // same batch went in: the database works, this row is bad.
                tracing::error!(error = %e, row = %row.describe(), "the ledger refused a row; dropped");
                report.rejected += 1;
            }
            Err(e) => {
                kept.push(row);
                last_db_error = Some(e);
            }
        }
    }
    *rows = kept;
    (report, last_db_error)
}

/// Whether the database failed for its own state (a full disk, an I/O error,
/// a lost connection, resources), whatever the row: such rows are kept and
/// retried, never dropped.
fn is_database_fault(e: &sqlx::Error) -> bool {
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
fn is_row_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => !matches!(d.kind(), sqlx::error::ErrorKind::Other),
        sqlx::Error::Encode(_) | sqlx::Error::TypeNotFound { .. } => true,
        _ => false,
    }
}

impl Queued {
    fn describe(&self) -> String {
        match self {
            Queued::Attempt(a, seq) => format!("attempt {} #{seq}", a.request_id),
            Queued::Request(r, _) => format!("request {}", r.request_id),
            Queued::Shadow(s, _) => format!("shadow of {}", s.request_id),
        }
    }
}

async fn write_batch(pool: &AnyPool, rows: &[Queued]) -> Result<(), sqlx::Error> {
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

async fn insert_rows(pool: &AnyPool, rows: &[Queued]) -> Result<(), sqlx::Error> {
    let refs: Vec<&Queued> = rows.iter().collect();
    let mut tx = pool.begin().await?;
    insert_chunk(&mut tx, &refs).await?;
    count_minutes(&mut tx, rows).await?;
    tx.commit().await
}

/// Add `rows` to the per-minute totals, in the transaction that writes them.
async fn count_minutes(conn: &mut sqlx::AnyConnection, rows: &[Queued]) -> Result<(), sqlx::Error> {
    let counted: Vec<crate::minute_stats::Counted<'_>> = rows
        .iter()
        .filter_map(|r| match r {
            Queued::Attempt(a, _) => Some(crate::minute_stats::Counted {
                ts_ms: a.ts_ms,
                kind: "attempt",
                task: &a.task,
                tier: &a.tier,
                decision: &a.outcome,
                cost_usd: a.cost_usd,
                all_llm_cost_usd: 0.0,
                latency_ms: a.latency_ms,
            }),
            Queued::Request(q, ts) => Some(crate::minute_stats::Counted {
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
        .collect();
    crate::minute_stats::add(conn, &counted).await
}

/// Rows per statement: powers of two up to this, so each table has a handful
/// of distinct statements for the connection's prepared-statement cache.
/// 128 rows × 18 columns stays under SQLite's and PostgreSQL's parameter
/// limits.
const CHUNK: usize = 128;

fn chunks<'a, 'b>(rows: &'b [&'a Queued]) -> Vec<&'b [&'a Queued]> {
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

const ATTEMPT_COLUMNS: &str =
    "request_id, seq, ts_ms, task, tier, provider, model, operation, input_tokens, output_tokens,
    cached_input_tokens, reasoning_tokens, audio_seconds, latency_ms, cost_usd, outcome, error";
const REQUEST_COLUMNS: &str = "request_id, ts_ms, task, answered_by, model, outcome, latency_ms, cost_usd, all_llm_cost_usd, caller_id, key_name, trace, input_text";
const SHADOW_COLUMNS: &str =
    "request_id, ts_ms, task, tier, shadow_tier, agree, score, shadow_score";

/// `INSERT INTO table (columns) VALUES ($1, ..), ($n+1, ..), ..` for `rows` rows.
fn insert_sql(table: &str, columns: &str, rows: usize) -> String {
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
async fn insert_chunk(conn: &mut sqlx::AnyConnection, rows: &[&Queued]) -> Result<(), sqlx::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
