//! Shared helpers: where the development data and the Whisper models are.

use std::path::PathBuf;

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
