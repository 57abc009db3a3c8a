//! Prometheus metrics through `prometheus-client` (label values escaped by
//! its encoder): requests by route and status, latency histograms per route
//! and per task, answers by tier, escalations by tier and reason, dollars by
//! task and tier, and requests in flight.
//!
//! Label sets are bounded: routes outside the known list count as `other`,
//! tasks a config does not declare as [`UNKNOWN_TASK`], so a client cannot
//! create a series per name it sends.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use triage_core::trace::{Decision, TierTrace, Trace};
use triage_engine::specialists::CacheStats;

/// The label every request for a task the config does not have counts under.
pub const UNKNOWN_TASK: &str = "unknown";

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskOutcome {
    task: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskTier {
    task: String,
    tier: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Escalation {
    task: String,
    tier: String,
    reason: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// Why a tier passed a request on, from its trace line.
fn reason_class(t: &TierTrace) -> Option<&'static str> {
    match t.decision {
        Decision::Escalated => Some("uncertain"),
        Decision::Failed if t.reason.contains("timed out") => Some("timeout"),
        Decision::Failed => Some("error"),
        _ => None,
    }
}

/// One tier's counts since the server started, the same numbers `/metrics`
/// exposes, for the web UI's dashboard and graph edges.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TierCounts {
    pub answered: u64,
    /// Passed on because it was not sure (`reason="uncertain"`).
    pub uncertain: u64,
    pub error: u64,
    pub timeout: u64,
    pub cost_usd: f64,
}

/// One task's counts since the server started.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct TaskCounts {
    /// `triage_task_requests_total{outcome="ok"}`.
    pub ok: u64,
    pub error: u64,
    pub latency_sum_s: f64,
    pub tiers: std::collections::BTreeMap<String, TierCounts>,
}

/// All metrics of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Histograms<RouteLabel>,
    answers: Family<TaskTier, Counter>,
    dollars: Family<TaskTier, Counter<f64, AtomicU64>>,
    task_requests: Family<TaskOutcome, Counter>,
    task_latency: Histograms<TaskLabel>,
    escalations: Family<Escalation, Counter>,
    in_flight: Gauge,
    /// The task counters again in plain maps: `prometheus-client` families
    /// cannot be read back, and the dashboard must show the same numbers.
    counts: std::sync::Mutex<std::collections::BTreeMap<String, TaskCounts>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        let latency: Histograms<RouteLabel> = Family::new_with_constructor(histogram);
        let answers = Family::<TaskTier, Counter>::default();
        let dollars = Family::<TaskTier, Counter<f64, AtomicU64>>::default();
        let task_requests = Family::<TaskOutcome, Counter>::default();
        let task_latency: Histograms<TaskLabel> = Family::new_with_constructor(histogram);
        let escalations = Family::<Escalation, Counter>::default();
        let in_flight = Gauge::default();
        registry.register(
            "triage_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "triage_request_duration_seconds",
            "Request latency",
            latency.clone(),
        );
        registry.register(
            "triage_task_requests",
            "Engine requests by task and outcome",
            task_requests.clone(),
        );
        registry.register(
            "triage_task_duration_seconds",
            "Engine request latency by task",
            task_latency.clone(),
        );
        registry.register(
            "triage_answers",
            "Answers by task and the tier that gave them",
            answers.clone(),
        );
        registry.register(
            "triage_escalations",
            "Requests a tier passed on, by task, tier and reason (uncertain, error, timeout)",
            escalations.clone(),
        );
        registry.register(
            "triage_cost_usd",
            "Dollars spent, by task and tier",
            dollars.clone(),
        );
        registry.register(
            "triage_in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            answers,
            dollars,
            task_requests,
            task_latency,
            escalations,
            in_flight,
            counts: Default::default(),
        }
    }
}

/// Counts one request in flight until dropped, so a request whose client
/// went away (its future dropped mid-way) does not leave the gauge high.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// One HTTP request on `route` (already reduced to a known label).
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status: status.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    /// A request starts; it counts as in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Requests in flight now.
    pub fn in_flight_now(&self) -> i64 {
        self.in_flight.get()
    }

    /// The per-task counters (requests, answers, escalations, dollars) as
    /// `/metrics` has them now.
    pub fn task_counts(&self) -> std::collections::BTreeMap<String, TaskCounts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn count(&self, task: &str, f: impl FnOnce(&mut TaskCounts)) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(counts.entry(task.to_owned()).or_default());
    }

    fn add_dollars(&self, task: &str, tier: &str, usd: f64) {
        self.count(task, |c| {
            c.tiers.entry(tier.to_owned()).or_default().cost_usd += usd;
        });
        self.dollars
            .get_or_create(&TaskTier {
                task: task.to_owned(),
                tier: tier.to_owned(),
            })
            .inc_by(usd);
    }

    /// One engine request for `task` (a configured task's name, or
    /// [`UNKNOWN_TASK`]): its outcome and latency, the tier that answered,
    /// every tier that escalated or failed, and each tier's dollars.
    pub fn executed(&self, task: &str, trace: Option<&Trace>, ok: bool, seconds: f64) {
        self.task_requests
            .get_or_create(&TaskOutcome {
                task: task.to_owned(),
                outcome: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.task_latency
            .get_or_create(&TaskLabel {
                task: task.to_owned(),
            })
            .observe(seconds);
        self.count(task, |c| {
            if ok {
                c.ok += 1;
            } else {
                c.error += 1;
            }
            c.latency_sum_s += seconds;
        });
        let Some(trace) = trace else { return };
        for t in &trace.tiers {
            if let Some(reason) = reason_class(t) {
                self.count(task, |c| {
                    let tc = c.tiers.entry(t.tier.clone()).or_default();
                    match reason {
                        "uncertain" => tc.uncertain += 1,
                        "timeout" => tc.timeout += 1,
                        _ => tc.error += 1,
                    }
                });
                self.escalations
                    .get_or_create(&Escalation {
                        task: task.to_owned(),
                        tier: t.tier.clone(),
                        reason: reason.to_owned(),
                    })
                    .inc();
            }
            if t.cost_usd > 0.0 {
                self.add_dollars(task, &t.tier, t.cost_usd);
            }
        }
        if ok && let Some(t) = trace.answered_by() {
            self.answered(task, &t.tier, 0.0);
        }
    }

    /// A request answered by `tier` for `task`, costing `usd` (for answers
    /// that do not run a task, such as plain transcriptions).
    pub fn answered(&self, task: &str, tier: &str, usd: f64) {
        self.count(task, |c| {
            c.tiers.entry(tier.to_owned()).or_default().answered += 1;
        });
        self.answers
            .get_or_create(&TaskTier {
                task: task.to_owned(),
                tier: tier.to_owned(),
            })
            .inc();
        if usd > 0.0 {
            self.add_dollars(task, tier, usd);
        }
    }

    /// [`Metrics::render`] plus the ledger's queue and write counts and the
    /// classifiers' answer-cache counters (read from their owners when asked
    /// rather than copied into counters).
    pub fn render_with(
        &self,
        ledger: Option<&triage_engine::ledger::LedgerHealth>,
        caches: &[(String, CacheStats)],
        budgets: &triage_engine::budget::Budgets,
    ) -> String {
        let mut out = self.render();
        let body = out
            .strip_suffix("# EOF\n")
            .map(str::len)
            .unwrap_or(out.len());
        let mut extra = String::new();
        if !caches.is_empty() {
            let hits: Vec<u64> = caches.iter().map(|(_, c)| c.hits).collect();
            let misses: Vec<u64> = caches.iter().map(|(_, c)| c.misses).collect();
            for (name, help, values) in [
                (
                    "triage_local_cache_hits",
                    "Classifications answered from the answer cache, by specialist.",
                    hits,
                ),
                (
                    "triage_local_cache_misses",
                    "Classifications the answer cache did not hold, by specialist.",
                    misses,
                ),
            ] {
                extra.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
                for ((specialist, _), value) in caches.iter().zip(values) {
                    extra.push_str(&format!(
                        "{name}_total{{specialist=\"{}\"}} {value}\n",
                        escape(specialist)
                    ));
                }
            }
        }
        extra.push_str(&budget_metrics(budgets));
        let Some(l) = ledger else {
            out.insert_str(body, &extra);
            return out;
        };
        let mut metric = |name: &str, kind: &str, help: &str, suffix: &str, value: String| {
            extra.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{suffix} {value}\n"
            ));
        };
        metric(
            "triage_ledger_pending_rows",
            "gauge",
            "Ledger rows queued and not yet committed.",
            "",
            l.pending.to_string(),
        );
        metric(
            "triage_ledger_max_pending_rows",
            "gauge",
            "The ledger queue's bound.",
            "",
            l.max_pending.to_string(),
        );
        metric(
            "triage_ledger_written_rows",
            "counter",
            "Ledger rows committed.",
            "_total",
            l.written.to_string(),
        );
        metric(
            "triage_ledger_rejected_rows",
            "counter",
            "Ledger rows the database refused (dropped).",
            "_total",
            l.rejected.to_string(),
        );
        metric(
            "triage_ledger_refused_requests",
            "counter",
            "Requests refused because the ledger queue stayed full.",
            "_total",
            l.refused_requests.to_string(),
        );
        metric(
            "triage_ledger_failing",
            "gauge",
            "1 while the ledger's database refuses commits.",
            "",
            u8::from(l.failing.is_some()).to_string(),
        );
        out.insert_str(body, &extra);
        out
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// A label value as OpenMetrics text writes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per budget: spent, held by calls in flight and left in its current
/// window; and the dollars providers billed past their calls' ceilings.
fn budget_metrics(budgets: &triage_engine::budget::Budgets) -> String {
    let status = budgets.status();
    let mut out = String::new();
    if !status.is_empty() {
        for (name, help, value) in [
            (
                "triage_budget_spent_usd",
                "Dollars settled against a budget in its current window.",
                (|s: &triage_engine::budget::BudgetStatus| s.spent_usd) as fn(&_) -> f64,
            ),
            (
                "triage_budget_reserved_usd",
                "Dollars held against a budget by hosted calls in flight.",
                |s| s.reserved_usd,
            ),
            (
                "triage_budget_left_usd",
                "Dollars a budget has left in its current window.",
                |s| s.left_usd,
            ),
            (
                "triage_budget_limit_usd",
                "A budget's limit per window.",
                |s| s.usd,
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for s in &status {
                out.push_str(&format!(
                    "{name}{{budget=\"{}\",period=\"{}\"}} {}\n",
                    escape(&s.name),
                    s.period,
                    value(s)
                ));
            }
        }
    }
    out.push_str(&format!(
        "# HELP triage_budget_overrun_usd Dollars providers billed beyond the ceiling held for their calls.\n# TYPE triage_budget_overrun_usd counter\ntriage_budget_overrun_usd_total {}\n",
        budgets.overrun_usd()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_counters_named_as_before() {
        let m = Metrics::default();
        m.answered("mod\"eration\nx", "local", 0.5);
        m.observe("/v1/moderations", 200, 0.01);
        let text = m.render();
        assert!(
            text.contains(r#"triage_answers_total{task="mod\"eration\nx",tier="local"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"triage_requests_total{route="/v1/moderations",status="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"triage_cost_usd_total{task="mod\"eration\nx",tier="local"} 0.5"#),
            "{text}"
        );
    }

    #[test]
    fn cache_counters_render_per_specialist_before_the_end_marker() {
        let m = Metrics::default();
        let stats = CacheStats {
            hits: 7,
            misses: 3,
            entries: 3,
        };
        let none = triage_engine::budget::Budgets::new(Vec::new());
        let text = m.render_with(None, &[("toxicity".into(), stats)], &none);
        assert!(
            text.contains("# TYPE triage_local_cache_hits counter\ntriage_local_cache_hits_total{specialist=\"toxicity\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("triage_local_cache_misses_total{specialist=\"toxicity\"} 3\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(!m.render_with(None, &[], &none).contains("cache"));
    }

    #[test]
    fn the_in_flight_gauge_falls_when_a_request_is_dropped() {
        let m = Metrics::default();
        let a = m.in_flight();
        let b = m.in_flight();
        assert_eq!(m.in_flight_now(), 2);
        drop(a);
        drop(b);
        assert_eq!(m.in_flight_now(), 0);
        assert!(m.render().contains("triage_in_flight_requests 0"));
    }
}
