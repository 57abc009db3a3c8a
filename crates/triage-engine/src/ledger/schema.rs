//! The schema: numbered migrations, each run once in a transaction, and
//! the summing of rows from before the per-minute totals into them.

use super::writer::MAX_BACKOFF;
use super::*;
use sqlx::{AnyPool, AssertSqlSafe, Executor, Row};
use std::time::{Duration, SystemTime};

/// Numbered schema steps; each runs once, in a transaction, and is recorded.
pub(super) const MIGRATIONS: &[(i64, &str)] = &[
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
    (6, crate::ledger::minute_stats::BACKFILL_TABLE),
];

pub(super) async fn migrate(pool: &AnyPool) -> Result<(), LedgerError> {
    pool.execute("CREATE TABLE IF NOT EXISTS triage_migrations (version BIGINT PRIMARY KEY, ts_ms BIGINT NOT NULL)")
        .await
        .map_err(|source| LedgerError::Migrate { version: 0, source })?;
    // Step 4 is generated (the per-minute totals' histogram columns).
    let mut steps: Vec<(i64, String)> = MIGRATIONS
        .iter()
        .map(|(v, s)| (*v, (*s).to_owned()))
        .chain([(4, crate::ledger::minute_stats::migration())])
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
/// [`crate::ledger::minute_stats::backfill`]); a chunk that fails (the database busy
/// past its timeout, another replica's chunk in the way) is tried again.
pub(super) async fn backfill_minutes(pool: AnyPool, chunk: i64) {
    let mut pause = Duration::from_millis(100);
    loop {
        match crate::ledger::minute_stats::backfill(&pool, chunk).await {
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
