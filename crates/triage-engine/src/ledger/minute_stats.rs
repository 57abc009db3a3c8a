//! The ledger's per-minute totals: one row per (minute, kind, task, tier,
//! decision) with counts, dollars, latency sum and a latency histogram,
//! updated by the ledger's writer in the same transaction as the rows it
//! sums. The dashboard reads only these, so its queries cost the number of
//! minutes in the window, not the number of requests (a spend page that
//! scans raw rows stops loading somewhere under a million of them).

use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};
use std::collections::BTreeMap;

/// Upper bounds (ms) of the latency histogram's buckets; the last is open.
pub const LATENCY_BUCKETS_MS: [f64; 11] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
const NB: usize = LATENCY_BUCKETS_MS.len() + 1;

/// The schema step that creates the table, and the backfill's cursor: rows
/// already in the ledger are summed afterwards by [`backfill`], newest
/// first, while the server runs. (Summed here, inside the migration, 5M
/// rows held `triage serve` back for 25 s before it was ready.) The cursor
/// starts just past the newest row there is; every row written from now on
/// is counted by the writer. A new, empty ledger gets no cursor: there is
/// nothing to sum, and no backfill runs beside its first writes.
pub(crate) fn migration() -> String {
    let cols: Vec<String> = (0..NB).map(|i| format!("h{i} BIGINT NOT NULL")).collect();
    format!(
        "CREATE TABLE minute_stats (
        minute BIGINT NOT NULL,
        kind TEXT NOT NULL,
        task TEXT NOT NULL,
        tier TEXT NOT NULL,
        decision TEXT NOT NULL,
        n BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        all_llm_cost_usd DOUBLE PRECISION NOT NULL,
        latency_ms_sum DOUBLE PRECISION NOT NULL,
        {},
        PRIMARY KEY (minute, kind, task, tier, decision)
    );
    {BACKFILL_TABLE};
    INSERT INTO minute_stats_backfill (id, before_ms)
        SELECT 1, newest + 1 FROM (
            SELECT MAX(ts) AS newest FROM (
                SELECT MAX(ts_ms) AS ts FROM requests
                UNION ALL SELECT MAX(ts_ms) AS ts FROM attempts
            ) AS u
        ) AS n WHERE newest IS NOT NULL",
        cols.join(", ")
    )
}

/// The backfill's cursor: rows with `ts_ms < before_ms` are not summed yet.
/// No row: nothing left. (Its own schema step for ledgers whose step 4
/// summed the old rows itself; there it stays empty.)
pub(crate) const BACKFILL_TABLE: &str = "CREATE TABLE IF NOT EXISTS minute_stats_backfill (
        id BIGINT PRIMARY KEY,
        before_ms BIGINT NOT NULL
    )";

/// The rows each source table adds: (kind, table, tier column, all-LLM cost).
const SOURCES: [(&str, &str, &str, &str); 2] = [
    ("request", "requests", "answered_by", "all_llm_cost_usd"),
    ("attempt", "attempts", "tier", "0.0"),
];

/// Requests summed per backfill transaction: a chunk holds SQLite's write
/// lock for a fraction of a second, so the ledger's writer is not held up.
pub(crate) const BACKFILL_CHUNK: i64 = 20_000;

fn histogram_columns() -> String {
    (0..NB)
        .map(|i| format!("h{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `SET` of an upsert that adds the new row's sums to the old one's.
fn add_on_conflict() -> String {
    let updates: Vec<String> = ["n", "cost_usd", "all_llm_cost_usd", "latency_ms_sum"]
        .iter()
        .map(|c| c.to_string())
        .chain((0..NB).map(|i| format!("h{i}")))
        .map(|c| format!("{c} = minute_stats.{c} + excluded.{c}"))
        .collect();
    format!(
        "ON CONFLICT (minute, kind, task, tier, decision) DO UPDATE SET {}",
        updates.join(", ")
    )
}

/// Sum the rows the ledger held before it had per-minute totals into them,
/// newest first (so the dashboard's hour and day fill first), a chunk per
/// transaction. Each chunk moves the cursor in the transaction that adds its
/// sums, so a crash repeats no row; a replica (or a reloaded engine) that
/// read the same cursor claims nothing and reads it again. Returns the
/// chunks summed.
pub(crate) async fn backfill(pool: &sqlx::AnyPool, chunk: i64) -> Result<u64, sqlx::Error> {
    let mut chunks = 0;
    while backfill_chunk(pool, chunk).await? {
        chunks += 1;
        tokio::task::yield_now().await;
    }
    Ok(chunks)
}

/// One chunk; false once nothing is left.
async fn backfill_chunk(pool: &sqlx::AnyPool, chunk: i64) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let Some(before) = sqlx::query("SELECT before_ms FROM minute_stats_backfill WHERE id = 1")
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get::<i64, _>(0))
        .transpose()?
    else {
        return Ok(false);
    };
    // The chunk is [lo, before), so every row of one timestamp falls in one
    // chunk; the last chunk takes all that is left.
    let lo = sqlx::query(
        "SELECT ts_ms FROM requests WHERE ts_ms < $1 ORDER BY ts_ms DESC LIMIT 1 OFFSET $2",
    )
    .bind(before)
    .bind(chunk)
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| r.try_get::<i64, _>(0))
    .transpose()?;
    let claimed =
        match lo {
            Some(lo) => sqlx::query(
                "UPDATE minute_stats_backfill SET before_ms = $1 WHERE id = 1 AND before_ms = $2",
            )
            .bind(lo)
            .bind(before)
            .execute(&mut *tx)
            .await?,
            None => {
                sqlx::query("DELETE FROM minute_stats_backfill WHERE id = 1 AND before_ms = $1")
                    .bind(before)
                    .execute(&mut *tx)
                    .await?
            }
        }
        .rows_affected();
    if claimed == 0 {
        // Another ledger on this database moved the cursor first.
        tx.rollback().await?;
        return Ok(true);
    }
    for (kind, table, tier, all) in SOURCES {
        let buckets: Vec<String> = (0..NB)
            .map(|i| format!("CAST(SUM({}) AS BIGINT)", bucket_case(i)))
            .collect();
        // Constant text; the range is bound.
        let sql = format!(
            "INSERT INTO minute_stats (minute, kind, task, tier, decision, n, cost_usd, all_llm_cost_usd, latency_ms_sum, {hs})
             SELECT ts_ms / 60000, '{kind}', task, {tier}, outcome, COUNT(*), SUM(cost_usd), SUM({all}), SUM(latency_ms), {b}
             FROM {table} WHERE ts_ms >= $1 AND ts_ms < $2 GROUP BY ts_ms / 60000, task, {tier}, outcome
             {upsert}",
            hs = histogram_columns(),
            b = buckets.join(", "),
            upsert = add_on_conflict(),
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(lo.unwrap_or(i64::MIN))
            .bind(before)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Where the backfill stands: rows before this (unix ms) are not in the
/// totals yet; `None` once every row is.
pub(crate) async fn backfill_before(pool: &sqlx::AnyPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query("SELECT before_ms FROM minute_stats_backfill WHERE id = 1")
        .fetch_optional(pool)
        .await?
        .map(|r| r.try_get::<i64, _>(0))
        .transpose()
}

fn bucket_case(i: usize) -> String {
    let lo = i.checked_sub(1).map(|j| LATENCY_BUCKETS_MS[j]);
    let hi = LATENCY_BUCKETS_MS.get(i);
    let cond = match (lo, hi) {
        (None, Some(h)) => format!("latency_ms <= {h}"),
        (Some(l), Some(h)) => format!("latency_ms > {l} AND latency_ms <= {h}"),
        (Some(l), None) => format!("latency_ms > {l}"),
        (None, None) => "1 = 1".into(),
    };
    format!("CASE WHEN {cond} THEN 1 ELSE 0 END")
}

fn bucket_of(latency_ms: f64) -> usize {
    LATENCY_BUCKETS_MS
        .iter()
        .position(|b| latency_ms <= *b)
        .unwrap_or(NB - 1)
}

/// One row of the ledger as the totals see it.
#[derive(Debug, Clone)]
pub(crate) struct Counted<'a> {
    pub ts_ms: i64,
    pub kind: &'static str,
    pub task: &'a str,
    pub tier: &'a str,
    pub decision: &'a str,
    pub cost_usd: f64,
    pub all_llm_cost_usd: f64,
    pub latency_ms: f64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Sum {
    pub n: i64,
    pub cost: f64,
    pub all: f64,
    pub latency: f64,
    pub h: [i64; NB],
}

/// A batch's sums, by (minute, kind, task, tier, decision).
pub(crate) type Sums<'a> = BTreeMap<(i64, &'a str, &'a str, &'a str, &'a str), Sum>;

/// Sum `rows` by minute and key, in memory: one upsert per key and batch,
/// however many rows the batch has.
pub(crate) fn sum<'a>(rows: &[Counted<'a>]) -> Sums<'a> {
    let mut sums: Sums<'a> = BTreeMap::new();
    for r in rows {
        let s = sums
            .entry((
                r.ts_ms.div_euclid(60_000),
                r.kind,
                r.task,
                r.tier,
                r.decision,
            ))
            .or_default();
        s.n += 1;
        s.cost += r.cost_usd;
        s.all += r.all_llm_cost_usd;
        s.latency += r.latency_ms;
        s.h[bucket_of(r.latency_ms)] += 1;
    }
    sums
}

/// The upsert that adds one key's sums to its minute: parameters minute,
/// kind, task, tier, decision, n, cost, all-LLM cost, latency sum, then the
/// histogram's buckets.
pub(crate) fn upsert_sql() -> String {
    let params: Vec<String> = (1..=9 + NB).map(|i| format!("${i}")).collect();
    format!(
        "INSERT INTO minute_stats (minute, kind, task, tier, decision, n, cost_usd, all_llm_cost_usd, latency_ms_sum, {})
         VALUES ({})
         {}",
        histogram_columns(),
        params.join(", "),
        add_on_conflict()
    )
}

/// Add `rows` to their minutes' totals (an upsert per distinct key).
pub(crate) async fn add(
    conn: &mut sqlx::AnyConnection,
    rows: &[Counted<'_>],
) -> Result<(), sqlx::Error> {
    let sums = sum(rows);
    if sums.is_empty() {
        return Ok(());
    }
    // Constant column names; values are bound.
    let sql = upsert_sql();
    for ((minute, kind, task, tier, decision), s) in sums {
        let mut q = sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(minute)
            .bind(kind)
            .bind(task)
            .bind(tier)
            .bind(decision)
            .bind(s.n)
            .bind(s.cost)
            .bind(s.all)
            .bind(s.latency);
        for h in s.h {
            q = q.bind(h);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Totals of one (kind, task, tier, decision) over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowRow {
    /// `request` (tier: the one that answered; decision: the outcome) or
    /// `attempt` (tier: the one that ran; decision: answered, refused, failed).
    pub kind: String,
    pub task: String,
    pub tier: String,
    pub decision: String,
    pub n: i64,
    pub cost_usd: f64,
    pub all_llm_cost_usd: f64,
    pub latency_ms_sum: f64,
    /// Counts per bucket of [`LATENCY_BUCKETS_MS`] (the last is open).
    pub latency_histogram: Vec<i64>,
}

/// Requests and dollars of one minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinutePoint {
    /// Unix minute (ms / 60,000).
    pub minute: i64,
    pub requests: i64,
    pub cost_usd: f64,
    pub all_llm_cost_usd: f64,
}

pub(crate) async fn window(
    pool: &sqlx::AnyPool,
    since_ms: i64,
) -> Result<(Vec<WindowRow>, Vec<MinutePoint>), sqlx::Error> {
    let since = since_ms.div_euclid(60_000);
    let hs: Vec<String> = (0..NB)
        .map(|i| format!("CAST(SUM(h{i}) AS BIGINT)"))
        .collect();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT kind, task, tier, decision, CAST(SUM(n) AS BIGINT), SUM(cost_usd), SUM(all_llm_cost_usd), SUM(latency_ms_sum), {}
         FROM minute_stats WHERE minute >= $1 GROUP BY kind, task, tier, decision ORDER BY kind, task, tier, decision",
        hs.join(", ")
    )))
    .bind(since)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut h = Vec::with_capacity(NB);
        for i in 0..NB {
            h.push(r.try_get::<i64, _>(8 + i)?);
        }
        out.push(WindowRow {
            kind: r.try_get(0)?,
            task: r.try_get(1)?,
            tier: r.try_get(2)?,
            decision: r.try_get(3)?,
            n: r.try_get(4)?,
            cost_usd: r.try_get(5)?,
            all_llm_cost_usd: r.try_get(6)?,
            latency_ms_sum: r.try_get(7)?,
            latency_histogram: h,
        });
    }
    let points = sqlx::query(
        "SELECT minute, CAST(SUM(n) AS BIGINT), SUM(cost_usd), SUM(all_llm_cost_usd)
         FROM minute_stats WHERE minute >= $1 AND kind = 'request' GROUP BY minute ORDER BY minute",
    )
    .bind(since)
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| {
        Ok(MinutePoint {
            minute: r.try_get(0)?,
            requests: r.try_get(1)?,
            cost_usd: r.try_get(2)?,
            all_llm_cost_usd: r.try_get(3)?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok((out, points))
}

/// The latency at quantile `q` (0..1) of a histogram over
/// [`LATENCY_BUCKETS_MS`], interpolated inside its bucket; `None` when empty.
pub fn quantile_ms(histogram: &[i64], q: f64) -> Option<f64> {
    let total: i64 = histogram.iter().sum();
    if total <= 0 {
        return None;
    }
    let want = q * total as f64;
    let mut seen = 0.0;
    for (i, &c) in histogram.iter().enumerate() {
        let next = seen + c as f64;
        if next >= want && c > 0 {
            let lo = i.checked_sub(1).map_or(0.0, |j| LATENCY_BUCKETS_MS[j]);
            let hi = LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(lo * 2.0);
            return Some(lo + (hi - lo) * ((want - seen) / c as f64).clamp(0.0, 1.0));
        }
        seen = next;
    }
    LATENCY_BUCKETS_MS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(bucket_of(0.5), 0);
        assert_eq!(bucket_of(5.0), 0);
        assert_eq!(bucket_of(5.1), 1);
        assert_eq!(bucket_of(1e9), NB - 1);
        let mut h = vec![0; NB];
        h[2] = 100; // (10, 25]
        let p50 = quantile_ms(&h, 0.5).unwrap();
        assert!((p50 - 17.5).abs() < 1e-9, "{p50}");
        assert_eq!(quantile_ms(&[0; NB], 0.5), None);
    }
}
