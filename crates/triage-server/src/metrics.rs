//! Prometheus metrics, kept in atomics: requests by route and status,
//! latency histograms, local-tier answers, dollars, queue depth.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

/// All counters of one server.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    answers: Mutex<BTreeMap<(String, String), u64>>,
    dollars_micro: AtomicI64,
    pub in_flight: AtomicI64,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route.to_owned(), status)).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            let h = l.entry(route.to_owned()).or_insert_with(|| Histogram {
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

    /// A request answered by `tier` for `task`, costing `usd`.
    pub fn answered(&self, task: &str, tier: &str, usd: f64) {
        if let Ok(mut a) = self.answers.lock() {
            *a.entry((task.to_owned(), tier.to_owned())).or_default() += 1;
        }
        self.dollars_micro
            .fetch_add((usd * 1e6).round() as i64, Ordering::Relaxed);
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
        if let Ok(l) = self.latency.lock() {
            for (route, h) in l.iter() {
                for (b, c) in BUCKETS.iter().zip(&h.counts) {
                    let _ = writeln!(
                        out,
                        "triage_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {c}"
                    );
                }
                let _ = writeln!(
                    out,
                    "triage_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                    h.n
                );
                let _ = writeln!(
                    out,
                    "triage_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                    h.sum
                );
                let _ = writeln!(
                    out,
                    "triage_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    h.n
                );
            }
        }
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
            "# HELP triage_escalations_total Escalations by tier and reason (none without cloud tiers).\n# TYPE triage_escalations_total counter"
        );
        let _ = writeln!(
            out,
            "# HELP triage_cost_usd_total Dollars spent on answers.\n# TYPE triage_cost_usd_total counter"
        );
        let _ = writeln!(
            out,
            "triage_cost_usd_total {}",
            self.dollars_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
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
