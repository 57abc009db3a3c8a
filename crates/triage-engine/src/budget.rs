//! Dollar budgets per key and per task, per UTC day or month (`[[budgets]]`).
//! Before a hosted call its estimated cost is reserved against every budget
//! that applies; a reservation that would pass a limit refuses the call
//! ([`BudgetExceeded`], HTTP 429 `budget_exceeded`), so the tiers before it
//! (local models, rules) keep answering. When the call returns the
//! reservation is settled with what the attempts actually cost; a call
//! dropped mid-flight keeps its estimate as spent. Spending since the start
//! of the window is read back from the ledger when the engine starts, so a
//! restart does not reset a budget. With a PostgreSQL ledger the running
//! totals and holds are rows in it (`ledger/budget_rows.rs`), shared by
//! every replica; otherwise each replica keeps its own (docs/ledger.md).

use crate::ledger::{Ledger, LedgerError, reserve_shared, settle_shared, shared_window};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use triage_cloud::prices::PriceTable;
use triage_cloud::spend::{BoxFuture, Charge, SpendGate, SpendHold};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The window `today` (`YYYY-MM-DD`, UTC) falls in: the date or its month.
    pub(crate) fn window(self, today: &str) -> String {
        match self {
            Period::Day => today.to_owned(),
            Period::Month => today.get(..7).unwrap_or(today).to_owned(),
        }
    }

    /// Unix milliseconds at the start of the window `today` falls in.
    pub(crate) fn start_ms(self, today: &str) -> i64 {
        let Ok(date) = today.parse::<jiff::civil::Date>() else {
            return 0;
        };
        let date = match self {
            Period::Day => date,
            Period::Month => date.first_of_month(),
        };
        jiff::tz::TimeZone::UTC
            .to_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
            .map(|t| t.as_millisecond())
            .unwrap_or(0)
    }
}

/// One `[[budgets]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSpec {
    pub name: String,
    pub period: Period,
    pub usd: f64,
    /// Only this task's calls (default: every task).
    pub task: Option<String>,
    /// Only calls made with this API key (by name; default: every caller).
    pub key: Option<String>,
}

impl BudgetSpec {
    pub(crate) fn applies(&self, task: &str, key: Option<&str>) -> bool {
        self.task.as_deref().is_none_or(|t| t == task)
            && self.key.as_deref().is_none_or(|k| Some(k) == key)
    }
}

/// A hosted call refused because a budget it counts against is spent.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "budget `{name}` ({usd} USD per {period}) is exhausted: {spent:.6} USD spent or reserved, this call is estimated at {estimate:.6} USD"
)]
pub struct BudgetExceeded {
    pub name: String,
    pub period: &'static str,
    pub usd: f64,
    pub spent: f64,
    pub estimate: f64,
}

/// Why a hosted call was not allowed to start.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(transparent)]
    Exceeded(#[from] BudgetExceeded),
    /// The shared budget store (the PostgreSQL ledger) could not be read or
    /// written: the call is refused rather than made unaccounted.
    #[error("the shared budget store could not reserve this call")]
    Store(#[source] LedgerError),
}

#[derive(Debug, Default, Clone)]
struct Window {
    id: String,
    spent: f64,
    reserved: f64,
}

/// The budgets of one engine and what has been spent against them.
///
/// With a SQLite ledger (one process) the running totals live in memory and
/// are read back from the ledger at start. With a PostgreSQL ledger they live
/// in the database (`triage_budget_spend`, `triage_budget_holds`), so every
/// replica reserves against the same totals: a reservation locks its budget's
/// row, so two replicas cannot both take the last dollar.
#[derive(Debug, Default)]
pub struct Budgets {
    pub(crate) specs: Vec<BudgetSpec>,
    windows: Mutex<Vec<Window>>,
    shared: Option<Ledger>,
    /// Dollars providers billed beyond the ceilings held for their calls.
    overrun_usd: Mutex<f64>,
}

/// One budget as it stands now (`/metrics`, the dashboard).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BudgetStatus {
    pub name: String,
    pub period: &'static str,
    /// The current window: `YYYY-MM-DD` or `YYYY-MM`.
    pub window: String,
    pub usd: f64,
    /// Settled spending in the window (with a shared store: every replica's,
    /// as this replica last read it).
    pub spent_usd: f64,
    /// Held by this replica's calls in flight.
    pub reserved_usd: f64,
    /// `usd - spent - reserved`, never below 0.
    pub left_usd: f64,
}

/// Dollars held against budgets for one hosted call.
#[derive(Debug)]
pub struct Reservation {
    budgets: Arc<Budgets>,
    /// (budget index, window id, dollars)
    held: Vec<(usize, String, f64)>,
    /// The hold's id in the shared store.
    hold_id: Option<String>,
    settled: bool,
}

impl Reservation {
    /// The call is over: replace the hold with what it cost, at once in this
    /// replica's totals and, with a shared store, in the background there
    /// (until then the store keeps counting the hold, never less).
    pub fn settle_now(mut self, actual_usd: f64) {
        self.finish(Some(actual_usd));
    }

    /// Release the hold as `actual` dollars (`None`: at the hold, the call
    /// may have been billed), here and in the shared store.
    fn finish(&mut self, actual: Option<f64>) {
        self.settled = true;
        let held = std::mem::take(&mut self.held);
        self.budgets.release(&held, actual);
        if let (Some(ledger), Some(id)) = (&self.budgets.shared, self.hold_id.take()) {
            let ledger = ledger.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = settle_shared(&ledger, &id, actual).await {
                        tracing::error!(error = %crate::error::chain(&e), hold = id, "settling a shared budget hold failed; it will count as its ceiling when it expires");
                    }
                });
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Dropped mid-call (a timeout, a caller gone): it may have been
        // billed, so the hold counts as spent.
        if !self.settled {
            self.finish(None);
        }
    }
}

impl Budgets {
    pub fn new(specs: Vec<BudgetSpec>) -> Self {
        let windows = specs.iter().map(|_| Window::default()).collect();
        Self {
            specs,
            windows: Mutex::new(windows),
            shared: None,
            overrun_usd: Mutex::new(0.0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Whether the running totals are kept in the shared (PostgreSQL) store.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    fn windows(&self) -> MutexGuard<'_, Vec<Window>> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Count spending through `ledger`: in the database itself when it is
    /// PostgreSQL (shared by replicas), else in memory, starting from what
    /// the ledger holds for each budget's current window.
    pub async fn attach(&mut self, ledger: &Ledger) -> Result<(), LedgerError> {
        if self.specs.is_empty() {
            return Ok(());
        }
        if ledger.is_postgres() {
            crate::ledger::create_budget_tables(ledger).await?;
            self.shared = Some(ledger.clone());
        }
        self.load(ledger).await
    }

    /// Read what has been spent in each budget's current window.
    pub async fn load(&self, ledger: &Ledger) -> Result<(), LedgerError> {
        let today = PriceTable::today();
        for (i, spec) in self.specs.iter().enumerate() {
            let spent = ledger
                .spent_since(
                    spec.period.start_ms(&today),
                    spec.task.as_deref(),
                    spec.key.as_deref(),
                )
                .await?;
            let mut windows = self.windows();
            if let Some(w) = windows.get_mut(i) {
                *w = Window {
                    id: spec.period.window(&today),
                    spent,
                    reserved: 0.0,
                };
            }
        }
        Ok(())
    }

    /// Hold `estimate_usd` against every budget that applies to a call for
    /// `task` by `key`, or refuse if one of them would pass its limit.
    pub async fn reserve(
        self: &Arc<Self>,
        task: &str,
        key: Option<&str>,
        estimate_usd: f64,
    ) -> Result<Reservation, BudgetError> {
        let mut reservation = self.reserve_local(task, key, estimate_usd)?;
        if let Some(ledger) = &self.shared
            && !reservation.held.is_empty()
        {
            match reserve_shared(self, ledger, task, key, estimate_usd).await {
                Ok(id) => reservation.hold_id = Some(id),
                Err(e) => {
                    // Nothing was held in the store; undo the local hold.
                    reservation.settled = true;
                    self.release(&reservation.held, Some(0.0));
                    return Err(e);
                }
            }
        }
        Ok(reservation)
    }

    /// The in-memory check and hold (for a shared store, a fast first check
    /// of this replica's own view; the store decides).
    fn reserve_local(
        self: &Arc<Self>,
        task: &str,
        key: Option<&str>,
        estimate_usd: f64,
    ) -> Result<Reservation, BudgetExceeded> {
        let mut held = Vec::new();
        if self.specs.is_empty() {
            return Ok(Reservation {
                budgets: self.clone(),
                held,
                hold_id: None,
                settled: false,
            });
        }
        let today = PriceTable::today();
        let mut windows = self.windows();
        for (i, spec) in self.specs.iter().enumerate() {
            if !spec.applies(task, key) {
                continue;
            }
            let Some(w) = windows.get_mut(i) else {
                continue;
            };
            let id = spec.period.window(&today);
            if w.id != id {
                *w = Window {
                    id: id.clone(),
                    ..Window::default()
                };
            }
            let used = w.spent + w.reserved;
            if used >= spec.usd || used + estimate_usd > spec.usd {
                return Err(BudgetExceeded {
                    name: spec.name.clone(),
                    period: spec.period.as_str(),
                    usd: spec.usd,
                    spent: used,
                    estimate: estimate_usd,
                });
            }
            held.push((i, id, estimate_usd));
        }
        for (i, _, usd) in &held {
            if let Some(w) = windows.get_mut(*i) {
                w.reserved += usd;
            }
        }
        Ok(Reservation {
            budgets: self.clone(),
            held,
            hold_id: None,
            settled: false,
        })
    }

    fn release(&self, held: &[(usize, String, f64)], actual: Option<f64>) {
        let mut windows = self.windows();
        for (i, id, estimate) in held {
            if let Some(w) = windows.get_mut(*i)
                && &w.id == id
            {
                w.reserved = (w.reserved - estimate).max(0.0);
                w.spent += actual.unwrap_or(*estimate);
            }
        }
    }

    /// The shared store's total for budget `i` in window `id`, as this
    /// replica last saw it (every replica's spending included).
    pub(crate) fn observe(&self, i: usize, id: &str, spent: f64) {
        let mut windows = self.windows();
        if let Some(w) = windows.get_mut(i)
            && w.id == id
        {
            w.spent = w.spent.max(spent);
        }
    }

    /// The first budget that applies to `task` and `key` and has nothing
    /// left (spent and held reach its limit), for work that would only be
    /// refused later (a job).
    pub fn spent_for(&self, task: &str, key: Option<&str>) -> Option<BudgetExceeded> {
        self.status()
            .into_iter()
            .zip(&self.specs)
            .find(|(st, spec)| spec.applies(task, key) && st.left_usd <= 0.0)
            .map(|(st, spec)| BudgetExceeded {
                name: spec.name.clone(),
                period: spec.period.as_str(),
                usd: spec.usd,
                spent: st.spent_usd + st.reserved_usd,
                estimate: 0.0,
            })
    }

    /// Every budget's current window: spent, held and left.
    pub fn status(&self) -> Vec<BudgetStatus> {
        let today = PriceTable::today();
        let windows = self.windows();
        self.specs
            .iter()
            .zip(windows.iter())
            .map(|(s, w)| {
                let window = s.period.window(&today);
                // A window that has not been used since it began is empty.
                let (spent, reserved) = if w.id == window {
                    (w.spent, w.reserved)
                } else {
                    (0.0, 0.0)
                };
                BudgetStatus {
                    name: s.name.clone(),
                    period: s.period.as_str(),
                    window,
                    usd: s.usd,
                    spent_usd: spent,
                    reserved_usd: reserved,
                    left_usd: (s.usd - spent - reserved).max(0.0),
                }
            })
            .collect()
    }

    /// [`Self::status`] as the store holds it: with a shared (PostgreSQL)
    /// store, every replica's spending and holds read from it now; otherwise
    /// this process's view (what [`Self::attach`] read from the ledger, plus
    /// what it has spent since).
    pub async fn stored_status(&self) -> Result<Vec<BudgetStatus>, LedgerError> {
        let mut status = self.status();
        if let Some(ledger) = &self.shared {
            for (st, spec) in status.iter_mut().zip(&self.specs) {
                let (spent, held) = shared_window(ledger, spec).await?;
                st.spent_usd = spent;
                st.reserved_usd = held;
                st.left_usd = (spec.usd - spent - held).max(0.0);
            }
        }
        Ok(status)
    }

    /// Dollars providers billed beyond the ceilings held for their calls,
    /// since this process started.
    pub fn overrun_usd(&self) -> f64 {
        *self
            .overrun_usd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn overran(&self, usd: f64) {
        *self
            .overrun_usd
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += usd;
    }

    /// Dollars spent (settled) in each budget's current window, by name.
    pub fn spent(&self) -> Vec<(String, f64)> {
        let windows = self.windows();
        self.specs
            .iter()
            .zip(windows.iter())
            .map(|(s, w)| (s.name.clone(), w.spent))
            .collect()
    }
}

/// The gate one request's hosted attempts pass (every strategy, shadow
/// calls, retries and fallbacks): each attempt holds its ceiling against
/// the budgets that apply to the task and the caller's key, and settles
/// what the provider billed.
#[derive(Debug)]
pub struct BudgetGate {
    budgets: Arc<Budgets>,
    task: String,
    key: Option<String>,
    /// The typed reason of the last refusal, for the engine's error.
    refused: Mutex<Option<BudgetError>>,
}

impl BudgetGate {
    pub fn new(budgets: Arc<Budgets>, task: &str, key: Option<&str>) -> Self {
        Self {
            budgets,
            task: task.to_owned(),
            key: key.map(str::to_owned),
            refused: Mutex::new(None),
        }
    }

    /// Why the gate last refused an attempt (taken once).
    pub fn take_refusal(&self) -> Option<BudgetError> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl SpendGate for BudgetGate {
    fn hold(&self, charge: Charge) -> BoxFuture<'_, Result<Box<dyn SpendHold>, String>> {
        Box::pin(async move {
            match self
                .budgets
                .reserve(&self.task, self.key.as_deref(), charge.ceiling_usd)
                .await
            {
                Ok(reservation) => Ok(Box::new(BudgetHold {
                    reservation,
                    charge,
                }) as Box<dyn SpendHold>),
                Err(e) => {
                    let reason = crate::error::chain(&e);
                    *self.refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    Err(reason)
                }
            }
        })
    }
}

/// One attempt's hold; dropped unsettled, its ceiling counts as spent.
#[derive(Debug)]
struct BudgetHold {
    reservation: Reservation,
    charge: Charge,
}

impl SpendHold for BudgetHold {
    fn settle(self: Box<Self>, usd: f64) {
        let BudgetHold {
            reservation,
            charge,
        } = *self;
        // A provider that billed past the output cap triage sent (or
        // reported more input than the bytes allow): counted at what it
        // reported, and flagged.
        let over = usd - charge.ceiling_usd;
        if over > 1e-9 * charge.ceiling_usd.max(1e-6) {
            tracing::warn!(provider = %charge.provider, model = %charge.model,
                ceiling_usd = charge.ceiling_usd, billed_usd = usd,
                "the provider reported more usage than the call was allowed; the budget counts what it reported");
            reservation.budgets.overran(over);
        }
        reservation.settle_now(usd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exceeded(e: BudgetError) -> BudgetExceeded {
        match e {
            BudgetError::Exceeded(x) => x,
            other => panic!("not a spent budget: {other}"),
        }
    }

    fn spec(name: &str, usd: f64, task: Option<&str>, key: Option<&str>) -> BudgetSpec {
        BudgetSpec {
            name: name.into(),
            period: Period::Day,
            usd,
            task: task.map(Into::into),
            key: key.map(Into::into),
        }
    }

    #[tokio::test]
    async fn reserve_then_settle_and_refuse_past_the_limit() {
        let b = Arc::new(Budgets::new(vec![
            spec("team-a", 1.0, None, Some("a")),
            spec("moderation", 0.5, Some("moderation"), None),
        ]));
        // Another key and another task are not counted.
        b.reserve("chat", Some("b"), 10.0)
            .await
            .unwrap()
            .settle_now(10.0);
        let r = b.reserve("moderation", Some("a"), 0.3).await.unwrap();
        // Held while in flight: a second call cannot pass the task's limit.
        let e = exceeded(b.reserve("moderation", None, 0.3).await.unwrap_err());
        assert_eq!(e.name, "moderation");
        r.settle_now(0.1);
        b.reserve("moderation", None, 0.3)
            .await
            .unwrap()
            .settle_now(0.3);
        assert_eq!(b.spent()[1].1, 0.4);
        let e = exceeded(b.reserve("chat", Some("a"), 0.95).await.unwrap_err());
        assert_eq!((e.name.as_str(), e.period), ("team-a", "day"));
        // A call dropped mid-flight keeps its estimate as spent.
        drop(b.reserve("chat", Some("a"), 0.2).await.unwrap());
        assert!((b.spent()[0].1 - 0.3).abs() < 1e-12);
    }

    #[test]
    fn windows_start_at_utc_midnight_and_the_first_of_the_month() {
        assert_eq!(Period::Day.start_ms("1970-01-02"), 86_400_000);
        assert_eq!(Period::Month.start_ms("1970-02-15"), 31 * 86_400_000);
        assert_eq!(Period::Month.window("2026-11-30"), "2026-11");
    }
}
