//! Reading the ledger back: one request's attempts, recent requests,
//! spending per window, shadow agreement, per-minute totals, summaries.

use super::*;
use sqlx::{AssertSqlSafe, Row};

impl Ledger {
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
            Vec<crate::ledger::minute_stats::WindowRow>,
            Vec<crate::ledger::minute_stats::MinutePoint>,
        ),
        LedgerError,
    > {
        Ok(crate::ledger::minute_stats::window(&self.pool, since_ms).await?)
    }

    /// Rows older than this (unix ms) are not in the per-minute totals yet:
    /// a ledger from before them is summed in the background after it opens.
    /// `None` once every row is counted.
    pub async fn minute_backfill_before(&self) -> Result<Option<i64>, LedgerError> {
        Ok(crate::ledger::minute_stats::backfill_before(&self.pool).await?)
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
