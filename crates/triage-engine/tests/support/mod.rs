//! Shared set-up for the end-to-end scenario tests: the shipped example
//! configs, pointed at local servers and a temporary ledger.
#![allow(dead_code)]

#[path = "../../../triage-cloud/tests/support/llama.rs"]
pub mod llama;
pub mod openai;

use std::path::PathBuf;
use triage_cloud::SecretString;
use triage_core::trace::Trace;
use triage_engine::Config;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn shared() -> PathBuf {
    std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"))
}

/// Load `examples/NAME`, with its ledger in `dir`.
pub fn example(name: &str, dir: &tempfile::TempDir) -> Config {
    let mut config = Config::load(&repo().join("examples").join(name)).unwrap();
    config.ledger_url = Some(format!(
        "sqlite://{}",
        dir.path().join("ledger.db").display()
    ));
    config
}

/// Point provider `name` at `base_url` with a test key.
pub fn point(config: &mut Config, name: &str, base_url: &str) {
    let p = config
        .providers
        .get_mut(name)
        .unwrap_or_else(|| panic!("no provider {name}"));
    p.config.base_url = base_url.trim_end_matches('/').to_owned();
    p.config.api_key = Some(SecretString::new("sk-test-not-a-real-key"));
}

/// The trace's total is the sum of its tiers.
pub fn assert_costs_add_up(trace: &Trace) {
    let sum: f64 = trace.tiers.iter().map(|t| t.cost_usd).sum();
    assert!(
        (trace.cost_usd - sum).abs() < 1e-12,
        "trace cost {} != sum of tiers {sum}",
        trace.cost_usd
    );
    assert!(
        trace
            .tiers
            .iter()
            .all(|t| t.cost_usd >= 0.0 && t.latency_ms >= 0.0)
    );
}

pub fn decisions(trace: &Trace) -> Vec<(String, String)> {
    trace
        .tiers
        .iter()
        .map(|t| {
            (
                t.tier.clone(),
                serde_json::to_value(t.decision)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect()
}
