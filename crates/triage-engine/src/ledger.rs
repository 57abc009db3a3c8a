//! The cost ledger: one row per attempt (local or hosted) and one per request
//! with its counterfactual all-LLM cost. Embedded SQLite (WAL) by default,
//! PostgreSQL for several replicas (`postgres` feature); both through sqlx's
//! `Any` driver with `$n` parameters, which both dialects accept.
//!
//! Writes go through a channel to one writer task, so recording never blocks
//! a request; [`Ledger::flush`] waits until everything sent so far is stored.

use serde::Serialize;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use triage_cloud::gateway::{Attempt, AttemptOutcome, AttemptSink};

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
}

/// Numbered schema steps; each runs once, in a transaction, and is recorded.
const MIGRATIONS: &[(i64, &str)] = &[(
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
)];

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

enum Msg {
    Attempt(Box<AttemptRecord>),
    Request(RequestRecord),
    Shadow(ShadowRecord),
    Flush(oneshot::Sender<()>),
}

/// Handle to the ledger; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
    tx: mpsc::UnboundedSender<Msg>,
    url: String,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ledger message")
    }
}

pub(crate) fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Ledger {
    /// Open (creating the file and folder for SQLite) and migrate.
    pub async fn open(url: &str) -> Result<Self, LedgerError> {
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
        let mut options = AnyPoolOptions::new().max_connections(if sqlite { 4 } else { 8 });
        if sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    // WAL with NORMAL sync: durable across crashes of the
                    // process; a power cut may lose the last commits.
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&connect_url).await.map_err(open_err)?;
        if sqlite {
            pool.execute("PRAGMA journal_mode = WAL")
                .await
                .map_err(open_err)?;
        }
        migrate(&pool).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(pool.clone(), rx));
        Ok(Self {
            pool,
            tx,
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn record(&self, record: AttemptRecord) {
        let _ = self.tx.send(Msg::Attempt(Box::new(record)));
    }

    pub fn record_request(&self, record: RequestRecord) {
        let _ = self.tx.send(Msg::Request(record));
    }

    pub fn record_shadow(&self, record: ShadowRecord) {
        let _ = self.tx.send(Msg::Shadow(record));
    }

    /// Wait until every record sent before this call is stored.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Flush(tx))
            .map_err(|_| LedgerError::WriterGone)?;
        rx.await.map_err(|_| LedgerError::WriterGone)
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
        let row = sqlx::query(
            "SELECT request_id, task, answered_by, model, outcome, latency_ms, cost_usd, all_llm_cost_usd
             FROM requests WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(RequestRecord {
                request_id: r.try_get(0)?,
                task: r.try_get(1)?,
                answered_by: r.try_get(2)?,
                model: r.try_get(3)?,
                outcome: r.try_get(4)?,
                latency_ms: r.try_get(5)?,
                cost_usd: r.try_get(6)?,
                all_llm_cost_usd: r.try_get(7)?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| e.into())
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

async fn migrate(pool: &AnyPool) -> Result<(), LedgerError> {
    pool.execute("CREATE TABLE IF NOT EXISTS triage_migrations (version BIGINT PRIMARY KEY, ts_ms BIGINT NOT NULL)")
        .await
        .map_err(|source| LedgerError::Migrate { version: 0, source })?;
    for (version, sql) in MIGRATIONS {
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
            tx.execute(statement).await.map_err(err)?;
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

/// Most records written in one transaction.
const BATCH: usize = 512;
/// How long the first record of a batch waits for company; records sent
/// before a process exits are written by [`Ledger::flush`].
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

async fn writer(pool: AnyPool, mut rx: mpsc::UnboundedReceiver<Msg>) {
    // Attempt sequence numbers per request, so the key is unique and ordered.
    let mut seq: std::collections::HashMap<String, i64> = Default::default();
    while let Some(first) = rx.recv().await {
        // Everything already queued goes into one transaction: one commit
        // (one fsync) per batch instead of one per row keeps the ledger off
        // the request path's CPU budget under load.
        // Give a trickle of requests a moment to join the batch: one
        // transaction per request costs the model workers CPU at low
        // concurrency. A flush is written at once.
        if !matches!(first, Msg::Flush(_)) {
            tokio::time::sleep(BATCH_WAIT).await;
        }
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let mut flushes = Vec::new();
        if let Err(e) = write_batch(&pool, batch, &mut seq, &mut flushes).await {
            tracing::error!(error = %e, "ledger write failed");
        }
        if seq.len() > 100_000 {
            seq.clear();
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn write_batch(
    pool: &AnyPool,
    batch: Vec<Msg>,
    seq: &mut std::collections::HashMap<String, i64>,
    flushes: &mut Vec<oneshot::Sender<()>>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for msg in batch {
        match msg {
            Msg::Flush(done) => flushes.push(done),
            Msg::Attempt(a) => {
                let n = seq.entry(a.request_id.clone()).or_insert(0);
                *n += 1;
                let n = *n;
                insert_attempt(&mut tx, &a, n).await?;
            }
            Msg::Request(r) => {
                sqlx::query(
                    "INSERT INTO requests (request_id, ts_ms, task, answered_by, model, outcome, latency_ms, cost_usd, all_llm_cost_usd)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(r.request_id)
                .bind(millis(SystemTime::now()))
                .bind(r.task)
                .bind(r.answered_by)
                .bind(r.model)
                .bind(r.outcome)
                .bind(r.latency_ms)
                .bind(r.cost_usd)
                .bind(r.all_llm_cost_usd)
                .execute(&mut *tx)
                .await?;
            }
            Msg::Shadow(s) => {
                sqlx::query(
                    "INSERT INTO shadow (request_id, ts_ms, task, tier, shadow_tier, agree, score, shadow_score)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(s.request_id)
                .bind(millis(SystemTime::now()))
                .bind(s.task)
                .bind(s.tier)
                .bind(s.shadow_tier)
                .bind(i64::from(s.agree))
                .bind(s.score)
                .bind(s.shadow_score)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await
}

async fn insert_attempt(
    conn: &mut sqlx::AnyConnection,
    a: &AttemptRecord,
    seq: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO attempts (request_id, seq, ts_ms, task, tier, provider, model, operation, input_tokens, output_tokens,
            cached_input_tokens, reasoning_tokens, audio_seconds, latency_ms, cost_usd, outcome, error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
    )
    .bind(&a.request_id)
    .bind(seq)
    .bind(a.ts_ms)
    .bind(&a.task)
    .bind(&a.tier)
    .bind(&a.provider)
    .bind(&a.model)
    .bind(&a.operation)
    .bind(a.input_tokens)
    .bind(a.output_tokens)
    .bind(a.cached_input_tokens)
    .bind(a.reasoning_tokens)
    .bind(a.audio_seconds)
    .bind(a.latency_ms)
    .bind(a.cost_usd)
    .bind(&a.outcome)
    .bind(&a.error)
    .execute(conn)
    .await
    .map(|_| ())
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

    impl AttemptRecord {
        fn clone_with_ts(mut self, ts: i64) -> Self {
            self.ts_ms = ts;
            self
        }
    }
}
