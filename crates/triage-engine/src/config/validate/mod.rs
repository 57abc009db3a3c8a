//! Validation: raw structs in, typed runtime config out. One module per
//! part of the file: the shared tables (`local`, `providers`, prices,
//! `server`) and one per strategy (cascade, router, pipeline). Each problem
//! is collected, not returned at the first one, so a user sees every
//! mistake in one run; each names the TOML key and says how to fix it.

mod cascade;
mod local;
mod pipeline;
mod prices;
mod providers;
mod router;
mod server;

pub use providers::base_url_override_var;
pub use router::bind_named;

use indexmap::IndexMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use triage_cloud::gateway::ProviderSettings;

use super::default_ledger_url;
use super::raw::{RawConfig, RawTask};
use super::types::{Config, LocalKind, LocalSpec, Problem, Strategy, Task};
use crate::redact::Redaction;

/// Validate `raw` (relative paths anchored at `base_dir`) into the runtime
/// config, with its warnings, or every problem found.
pub(super) fn validate(raw: RawConfig, base_dir: &Path) -> Result<Config, Vec<Problem>> {
    let mut v = Validator {
        problems: Vec::new(),
        warnings: Vec::new(),
        base_dir: base_dir.to_path_buf(),
    };
    let config = v.config(raw);
    if v.problems.is_empty()
        && let Some(mut config) = config
    {
        config.warnings = v.warnings;
        return Ok(config);
    }
    Err(v.problems)
}

struct Validator {
    problems: Vec<Problem>,
    warnings: Vec<String>,
    base_dir: PathBuf,
}

fn band_ok(x: f64) -> bool {
    (0.0..=1.0).contains(&x)
}
impl Validator {
    fn problem(
        &mut self,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let prices = self.prices(&raw);
        let retry = self.retry(&raw.retry);
        let local = self.locals(&raw.local);
        let providers = self.providers(&raw.providers);
        let mut tasks = IndexMap::new();
        for (name, task) in &raw.tasks {
            if let Some(t) = self.task(name, task, &local, &providers) {
                tasks.insert(name.clone(), t);
            }
        }
        let server = self.server(&raw.server, &tasks);
        let ledger_url = if raw.ledger.disabled {
            None
        } else {
            Some(match &raw.ledger.url {
                Some(url) => self.database_url("ledger.url", url),
                None => default_ledger_url(),
            })
        };
        let ledger = self.ledger_options(&raw.ledger);
        let raw_store_text = raw.ledger.store_text;
        let raw_max_text_bytes = match raw.ledger.max_text_bytes {
            Some(0) => {
                self.problem(
                    "ledger.max_text_bytes",
                    "0 would keep no text",
                    "give at least 1, or set store_text = false",
                );
                0
            }
            Some(n) => n,
            None => crate::ledger::DEFAULT_MAX_TEXT_BYTES,
        };
        let budgets = self.budgets(&raw.budgets, &tasks, &server);
        if let Some(p) = &prices {
            self.budgeted_prices(&budgets, &tasks, p, raw.prices_file.as_deref());
        }
        Some(Config {
            budgets,
            path: None,
            server,
            ledger_url,
            ledger,
            store_text: raw_store_text,
            max_text_bytes: raw_max_text_bytes,
            retry,
            prices: Arc::new(prices?),
            local,
            providers,
            tasks,
            warnings: Vec::new(),
        })
    }

    fn database_url(&mut self, key: &str, url: &str) -> String {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let (path, query) = path
                .split_once('?')
                .map_or((path, None), |(p, q)| (p, Some(q)));
            let abs = if Path::new(path).is_absolute() || path == ":memory:" {
                PathBuf::from(path)
            } else {
                self.base_dir.join(path)
            };
            return match query {
                Some(q) => format!("sqlite://{}?{q}", abs.display()),
                None => format!("sqlite://{}", abs.display()),
            };
        }
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            self.problem(
                key,
                format!("`{url}` is not a sqlite:// or postgres:// URL"),
                "write sqlite://file.db or postgres://user@host/db",
            );
        }
        url.to_owned()
    }

    /// Every hosted model a budget covers has a price today: an unpriced
    /// call cannot be held against a budget.
    fn budgeted_prices(
        &mut self,
        budgets: &[crate::budget::BudgetSpec],
        tasks: &IndexMap<String, Task>,
        prices: &triage_cloud::prices::PriceTable,
        prices_file: Option<&Path>,
    ) {
        let today = triage_cloud::prices::PriceTable::today();
        let table = prices_file.map_or_else(
            || "the config's [[price]] entries (no prices_file)".to_owned(),
            |f| {
                format!(
                    "prices_file {} or the config's [[price]] entries",
                    f.display()
                )
            },
        );
        for (i, b) in budgets.iter().enumerate() {
            for (name, task) in tasks {
                if !b.applies(name, b.key.as_deref()) {
                    continue;
                }
                for t in crate::strategy::hosted_targets(task) {
                    if t.model.is_empty() {
                        self.problem(
                            format!("budgets[{i}] ({})", b.name),
                            format!("task `{name}` calls provider `{}` with whatever model the request names, which cannot be priced in advance", t.provider),
                            "name the model in the task's tier (model = \"...\") so that its calls can be held against the budget",
                        );
                    } else if prices.price(&t.provider, &t.model, &today).is_none() {
                        self.problem(
                            format!("budgets[{i}] ({})", b.name),
                            format!("task `{name}` calls {}/{}, which has no price in {table}: its calls could not be counted against the budget", t.provider, t.model),
                            format!("add a [[price]] entry with provider = \"{}\" and model = \"{}\"", t.provider, t.model),
                        );
                    }
                }
            }
        }
    }

    fn budgets(
        &mut self,
        raw: &[super::raw::RawBudget],
        tasks: &IndexMap<String, Task>,
        server: &super::types::ServerConfig,
    ) -> Vec<crate::budget::BudgetSpec> {
        use crate::budget::{BudgetSpec, Period};
        let mut out = Vec::new();
        for (i, b) in raw.iter().enumerate() {
            let key = format!("budgets[{i}] ({})", b.name);
            let period = match b.period.as_str() {
                "day" => Period::Day,
                "month" => Period::Month,
                other => {
                    self.problem(
                        format!("{key}.period"),
                        format!("`{other}` is not a period"),
                        "write period = \"day\" or \"month\"",
                    );
                    continue;
                }
            };
            if !(b.usd.is_finite() && b.usd > 0.0) {
                self.problem(
                    format!("{key}.usd"),
                    format!("{} is not a dollar amount above zero", b.usd),
                    "give an amount above 0 (to stop all hosted calls, remove the hosted tiers)",
                );
                continue;
            }
            if let Some(k) = &b.key
                && !server.keys.iter().any(|c| &c.name == k)
                && !env_key_names().iter().any(|n| n == k)
            {
                self.problem(
                    format!("{key}.key"),
                    format!("no API key is named `{k}`"),
                    "name a key of [[server.keys]] or of TRIAGE_API_KEYS (name:key:...)",
                );
                continue;
            }
            if let Some(t) = &b.task
                && !tasks.contains_key(t)
            {
                self.problem(
                    format!("{key}.task"),
                    format!("no task `{t}`"),
                    "name a task of this config, or leave `task` out for all tasks",
                );
                continue;
            }
            if out.iter().any(|o: &BudgetSpec| o.name == b.name) {
                self.problem(
                    format!("{key}.name"),
                    "two budgets have this name",
                    "give each budget its own name: a refusal names it",
                );
                continue;
            }
            out.push(BudgetSpec {
                name: b.name.clone(),
                period,
                usd: b.usd,
                task: b.task.clone(),
                key: b.key.clone(),
            });
        }
        out
    }

    fn ledger_options(&mut self, raw: &super::raw::RawLedger) -> crate::ledger::LedgerOptions {
        let mut o = crate::ledger::LedgerOptions::default();
        if let Some(n) = raw.max_pending {
            if n == 0 {
                self.problem(
                    "ledger.max_pending",
                    "0 would refuse every request",
                    "give at least 1 (default 1024)",
                );
            }
            o.max_pending = n.max(1);
        }
        if let Some(ms) = raw.admit_wait_ms {
            o.admit_wait = std::time::Duration::from_millis(ms);
        }
        if let Some(ms) = raw.commit_interval_ms {
            if ms > 100 {
                self.problem(
                    "ledger.commit_interval_ms",
                    format!("{ms} ms would leave rows uncommitted for longer than 100 ms"),
                    "give 0..=100 (default 20)",
                );
            }
            o.commit_interval = std::time::Duration::from_millis(ms.min(100));
        }
        o
    }

    fn task(
        &mut self,
        name: &str,
        raw: &RawTask,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Task> {
        let key = format!("tasks.{name}");
        let (description, redact_spec) = match raw {
            RawTask::Cascade(c) => (c.description.clone(), &c.redact),
            RawTask::Router(r) => (r.description.clone(), &r.redact),
            RawTask::Pipeline(p) => (p.description.clone(), &p.redact),
        };
        let redaction = match Redaction::parse(redact_spec) {
            Ok(mut r) => {
                if let Some(ner) = r.ner_specialist.clone()
                    && !self.specialist(&format!("{key}.redact"), &ner, LocalKind::Tagger, local)
                {
                    r.ner_specialist = None;
                }
                r
            }
            Err(e) => {
                self.problem(
                    format!("{key}.redact"),
                    e,
                    "use email, phone, card, iban, national_id, ip, or ner:SPECIALIST:TYPE (e.g. ner:ner:PER)",
                );
                Redaction::default()
            }
        };
        let strategy = match raw {
            RawTask::Cascade(c) => Strategy::Cascade(self.cascade(&key, c, local, providers)?),
            RawTask::Router(r) => Strategy::Router(self.router(&key, r, local, providers)?),
            RawTask::Pipeline(p) => Strategy::Pipeline(self.pipeline(&key, p, local, providers)?),
        };
        Some(Task {
            name: name.to_owned(),
            description,
            redaction,
            strategy,
        })
    }
}

/// The key names `TRIAGE_API_KEYS` gives (`name:key:...` entries; a bare
/// key is named `key{i}`), as `triage serve` reads them.
fn env_key_names() -> Vec<String> {
    std::env::var("TRIAGE_API_KEYS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .enumerate()
        .filter(|(_, e)| !e.is_empty())
        .map(|(i, e)| env_key_name(i, e))
        .collect()
}

/// The name of entry `i` of `TRIAGE_API_KEYS`: its first field, or `key{i}`
/// for a bare key.
pub fn env_key_name(i: usize, entry: &str) -> String {
    match entry.split_once(':') {
        Some((name, _)) => name.to_owned(),
        None => format!("key{i}"),
    }
}
