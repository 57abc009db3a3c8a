//! The shared budget rows: running totals and holds per budget window, kept
//! in the ledger's PostgreSQL database so that replicas share one limit.
//! The limits themselves are the budget module's; this file is their SQL.

use super::{Ledger, LedgerError};
use crate::budget::{BudgetError, BudgetExceeded, BudgetSpec, Budgets};
use sqlx::Row;
use triage_cloud::prices::PriceTable;

/// How long a hold in the shared store lives without being settled (a
/// replica killed mid-call): longer than any call's deadline. When it
/// expires its estimate counts as spent, the safe side for money.
const HOLD_TTL_MS: i64 = 10 * 60 * 1000;

const SHARED_TABLES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS triage_budget_spend (
        name TEXT NOT NULL,
        win TEXT NOT NULL,
        spent_usd DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, win))",
    "CREATE TABLE IF NOT EXISTS triage_budget_holds (
        id TEXT NOT NULL,
        name TEXT NOT NULL,
        win TEXT NOT NULL,
        usd DOUBLE PRECISION NOT NULL,
        expires_ms BIGINT NOT NULL,
        PRIMARY KEY (id, name))",
];

/// Create the tables the shared budgets keep their rows in.
pub(crate) async fn create_budget_tables(ledger: &Ledger) -> Result<(), LedgerError> {
    for sql in SHARED_TABLES {
        sqlx::query(sql)
            .execute(ledger.pool())
            .await
            .map_err(|source| LedgerError::Migrate { version: 0, source })?;
    }
    Ok(())
}

/// Dollars held in one budget window by calls in flight, on any replica.
const HELD_SQL: &str = "SELECT CAST(COALESCE(SUM(usd), 0) AS DOUBLE PRECISION) FROM triage_budget_holds WHERE name = $1 AND win = $2";

fn store_err(source: sqlx::Error) -> BudgetError {
    BudgetError::Store(LedgerError::Query(source))
}

/// Reserve in the shared store, in one transaction that locks each budget's
/// row in config order (so replicas with the same config cannot deadlock).
pub(crate) async fn reserve_shared(
    budgets: &Budgets,
    ledger: &Ledger,
    task: &str,
    key: Option<&str>,
    estimate_usd: f64,
) -> Result<String, BudgetError> {
    let today = PriceTable::today();
    let now = super::millis(std::time::SystemTime::now());
    let id = uuid::Uuid::now_v7().to_string();
    let applicable: Vec<(usize, &BudgetSpec)> = budgets
        .specs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.applies(task, key))
        .collect();
    // A window met for the first time starts from what the ledger holds for
    // it (budgets added to a running deployment).
    let mut initial = Vec::new();
    for (_, spec) in &applicable {
        let win = spec.period.window(&today);
        let known =
            sqlx::query("SELECT COUNT(*) FROM triage_budget_spend WHERE name = $1 AND win = $2")
                .bind(&spec.name)
                .bind(&win)
                .fetch_one(ledger.pool())
                .await
                .and_then(|r| r.try_get::<i64, _>(0))
                .map_err(store_err)?;
        let spent = if known > 0 {
            0.0
        } else {
            ledger
                .spent_since(
                    spec.period.start_ms(&today),
                    spec.task.as_deref(),
                    spec.key.as_deref(),
                )
                .await
                .map_err(BudgetError::Store)?
        };
        initial.push(spent);
    }
    let mut tx = ledger.pool().begin().await.map_err(store_err)?;
    for ((_, spec), initial) in applicable.iter().zip(&initial) {
        let win = spec.period.window(&today);
        sqlx::query(
            "INSERT INTO triage_budget_spend (name, win, spent_usd) VALUES ($1, $2, $3) ON CONFLICT (name, win) DO NOTHING",
        )
        .bind(&spec.name)
        .bind(&win)
        .bind(*initial)
        .execute(&mut *tx)
        .await
        .map_err(store_err)?;
        // Holds whose replica never settled them count as spent (committed
        // on its own, whatever this call's fate).
        sqlx::query(
            "WITH gone AS (DELETE FROM triage_budget_holds WHERE name = $1 AND win = $2 AND expires_ms < $3 RETURNING usd) UPDATE triage_budget_spend SET spent_usd = spent_usd + (SELECT CAST(COALESCE(SUM(usd), 0) AS DOUBLE PRECISION) FROM gone) WHERE name = $1 AND win = $2",
        )
        .bind(&spec.name)
        .bind(&win)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store_err)?;
    }
    tx.commit().await.map_err(store_err)?;
    let mut tx = ledger.pool().begin().await.map_err(store_err)?;
    for (i, spec) in &applicable {
        let win = spec.period.window(&today);
        let spent = window_usd(
            &mut *tx,
            "SELECT spent_usd FROM triage_budget_spend WHERE name = $1 AND win = $2 FOR UPDATE",
            spec,
            &win,
        )
        .await
        .map_err(store_err)?;
        let held = window_usd(&mut *tx, HELD_SQL, spec, &win)
            .await
            .map_err(store_err)?;
        budgets.observe(*i, &win, spent);
        let used = spent + held;
        if used >= spec.usd || used + estimate_usd > spec.usd {
            // Dropping the transaction rolls it back: nothing is held.
            return Err(BudgetError::Exceeded(BudgetExceeded {
                name: spec.name.clone(),
                period: spec.period.as_str(),
                usd: spec.usd,
                spent: used,
                estimate: estimate_usd,
            }));
        }
        sqlx::query(
            "INSERT INTO triage_budget_holds (id, name, win, usd, expires_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(&spec.name)
        .bind(&win)
        .bind(estimate_usd)
        .bind(now + HOLD_TTL_MS)
        .execute(&mut *tx)
        .await
        .map_err(store_err)?;
    }
    tx.commit().await.map_err(store_err)?;
    Ok(id)
}

/// Turn a shared hold into spending: `actual` dollars, or its estimate when
/// the call was dropped mid-flight.
pub(crate) async fn settle_shared(
    ledger: &Ledger,
    id: &str,
    actual: Option<f64>,
) -> Result<(), sqlx::Error> {
    let mut tx = ledger.pool().begin().await?;
    let rows = sqlx::query(
        "DELETE FROM triage_budget_holds WHERE id = $1 RETURNING name, win, CAST(usd AS DOUBLE PRECISION)",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    for row in rows {
        let name: String = row.try_get(0)?;
        let win: String = row.try_get(1)?;
        let estimate: f64 = row.try_get(2)?;
        sqlx::query(
            "UPDATE triage_budget_spend SET spent_usd = spent_usd + $3 WHERE name = $1 AND win = $2",
        )
        .bind(&name)
        .bind(&win)
        .bind(actual.unwrap_or(estimate))
        .execute(&mut *tx)
        .await?;
    }
    // A hold that expired before this settle was already counted at its
    // estimate and is gone: nothing to add.
    tx.commit().await
}

/// What the shared store holds for `spec`'s current window: (spent, held by
/// calls in flight on any replica). A window no replica has used yet is
/// read from the ledger's rows.
pub(crate) async fn shared_window(
    ledger: &Ledger,
    spec: &BudgetSpec,
) -> Result<(f64, f64), LedgerError> {
    let today = PriceTable::today();
    let win = spec.period.window(&today);
    let spent: Option<f64> =
        sqlx::query("SELECT spent_usd FROM triage_budget_spend WHERE name = $1 AND win = $2")
            .bind(&spec.name)
            .bind(&win)
            .fetch_optional(ledger.pool())
            .await
            .and_then(|r| r.map(|r| r.try_get(0)).transpose())
            .map_err(LedgerError::Query)?;
    let spent = match spent {
        Some(s) => s,
        None => {
            ledger
                .spent_since(
                    spec.period.start_ms(&today),
                    spec.task.as_deref(),
                    spec.key.as_deref(),
                )
                .await?
        }
    };
    let held = window_usd(ledger.pool(), HELD_SQL, spec, &win)
        .await
        .map_err(LedgerError::Query)?;
    Ok((spent, held))
}

/// Dollars `sql` reads from its one row for `spec`'s budget and window
/// (bound as `$1` and `$2`).
async fn window_usd<'c, E>(
    conn: E,
    sql: &'static str,
    spec: &BudgetSpec,
    win: &str,
) -> Result<f64, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(sql)
        .bind(&spec.name)
        .bind(win)
        .fetch_one(conn)
        .await
        .and_then(|r| r.try_get(0))
}
