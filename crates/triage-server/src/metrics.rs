//! Prometheus metrics, kept in atomics and small maps: requests by route and
//! status, latency histograms (per route and per task), answers by tier,
//! escalations by tier and reason, dollars by task and tier, in-flight requests.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use triage_core::trace::{Decision, TierTrace, Trace};

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(map: &Mutex<BTreeMap<String, Histogram>>, key: &str, seconds: f64) {
        if let Ok(mut l) = map.lock() {
            let h = l.entry(key.to_owned()).or_insert_with(|| Histogram {
                counts: vec![0; BUCKETS.len()],
                ..Default::default()
            });
            for (i, b) in BUCKETS.iter().enumerate() {
                if seconds <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += seconds;
            h.n += 1;
        }
    }

    fn render(out: &mut String, name: &str, label: &str, map: &Mutex<BTreeMap<String, Histogram>>) {
        if let Ok(l) = map.lock() {
            for (key, h) in l.iter() {
                for (b, c) in BUCKETS.iter().zip(&h.counts) {
                    let _ = writeln!(out, "{name}_bucket{{{label}=\"{key}\",le=\"{b}\"}} {c}");
                }
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{label}=\"{key}\",le=\"+Inf\"}} {}",
                    h.n
                );
                let _ = writeln!(out, "{name}_sum{{{label}=\"{key}\"}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{{label}=\"{key}\"}} {}", h.n);
            }
        }
    }
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

/// All counters of one server.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    answers: Mutex<BTreeMap<(String, String), u64>>,
    /// Dollars by (task, tier).
    dollars: Mutex<BTreeMap<(String, String), f64>>,
    /// Engine requests by (task, outcome).
    task_requests: Mutex<BTreeMap<(String, &'static str), u64>>,
    task_latency: Mutex<BTreeMap<String, Histogram>>,
    /// (task, tier, reason) → count.
    escalations: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    pub in_flight: AtomicI64,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route.to_owned(), status)).or_default() += 1;
        }
        Histogram::observe(&self.latency, route, seconds);
    }

    fn add_dollars(&self, task: &str, tier: &str, usd: f64) {
        if let Ok(mut d) = self.dollars.lock() {
            *d.entry((task.to_owned(), tier.to_owned())).or_default() += usd;
        }
    }

    /// One engine request for `task`: its outcome and latency, the tier that
    /// answered, every tier that escalated or failed, and each tier's dollars.
    pub fn executed(&self, task: &str, trace: Option<&Trace>, ok: bool, seconds: f64) {
        if let Ok(mut r) = self.task_requests.lock() {
            *r.entry((task.to_owned(), if ok { "ok" } else { "error" }))
                .or_default() += 1;
        }
        Histogram::observe(&self.task_latency, task, seconds);
        let Some(trace) = trace else { return };
        for t in &trace.tiers {
            if let Some(reason) = reason_class(t)
                && let Ok(mut e) = self.escalations.lock()
            {
                *e.entry((task.to_owned(), t.tier.clone(), reason))
                    .or_default() += 1;
            }
            if t.cost_usd > 0.0 {
                self.add_dollars(task, &t.tier, t.cost_usd);
            }
        }
        if ok
            && let Some(t) = trace.answered_by()
            && let Ok(mut a) = self.answers.lock()
        {
            *a.entry((task.to_owned(), t.tier.clone())).or_default() += 1;
        }
    }

    /// A request answered by `tier` for `task`, costing `usd`.
    pub fn answered(&self, task: &str, tier: &str, usd: f64) {
        if let Ok(mut a) = self.answers.lock() {
            *a.entry((task.to_owned(), tier.to_owned())).or_default() += 1;
        }
        self.add_dollars(task, tier, usd);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP triage_requests_total HTTP requests by route and status.\n# TYPE triage_requests_total counter"
        );
        if let Ok(r) = self.requests.lock() {
            for ((route, status), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "triage_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP triage_request_duration_seconds Request latency.\n# TYPE triage_request_duration_seconds histogram"
        );
        Histogram::render(
            &mut out,
            "triage_request_duration_seconds",
            "route",
            &self.latency,
        );
        let _ = writeln!(
            out,
            "# HELP triage_task_requests_total Engine requests by task and outcome.\n# TYPE triage_task_requests_total counter"
        );
        if let Ok(r) = self.task_requests.lock() {
            for ((task, outcome), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "triage_task_requests_total{{task=\"{task}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP triage_task_duration_seconds Engine request latency by task.\n# TYPE triage_task_duration_seconds histogram"
        );
        Histogram::render(
            &mut out,
            "triage_task_duration_seconds",
            "task",
            &self.task_latency,
        );
        let _ = writeln!(
            out,
            "# HELP triage_answers_total Answers by task and the tier that gave them.\n# TYPE triage_answers_total counter"
        );
        if let Ok(a) = self.answers.lock() {
            for ((task, tier), n) in a.iter() {
                let _ = writeln!(
                    out,
                    "triage_answers_total{{task=\"{task}\",tier=\"{tier}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP triage_escalations_total Requests a tier passed on, by task, tier and reason (uncertain, error, timeout).\n# TYPE triage_escalations_total counter"
        );
        if let Ok(e) = self.escalations.lock() {
            for ((task, tier, reason), n) in e.iter() {
                let _ = writeln!(
                    out,
                    "triage_escalations_total{{task=\"{task}\",tier=\"{tier}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP triage_cost_usd_total Dollars spent, by task and tier.\n# TYPE triage_cost_usd_total counter"
        );
        if let Ok(d) = self.dollars.lock() {
            for ((task, tier), usd) in d.iter() {
                let _ = writeln!(
                    out,
                    "triage_cost_usd_total{{task=\"{task}\",tier=\"{tier}\"}} {usd}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP triage_in_flight_requests Requests being served.\n# TYPE triage_in_flight_requests gauge"
        );
        let _ = writeln!(
            out,
            "triage_in_flight_requests {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        out
    }
}
