//! `triage models import-ct2`: convert a CTranslate2 (faster-whisper) Whisper
//! checkpoint into whisper.cpp's ggml file, offline.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use triage_tools::whisper_import::{ImportOptions, import_ct2 as convert};

/// Convert `dir` into `out`; `assets` defaults to `dir/assets` (the flag and
/// `TRIAGE_WHISPER_ASSETS` are resolved by clap). Prints one JSON object:
/// the model's dimensions and the files written.
pub async fn import_ct2(
    dir: PathBuf,
    out: PathBuf,
    assets: Option<PathBuf>,
    safetensors: bool,
) -> Result<ExitCode> {
    let opts = ImportOptions {
        assets_dir: assets.unwrap_or_else(|| dir.join("assets")),
        model_dir: dir,
        out_dir: out,
        safetensors,
    };
    let started = std::time::Instant::now();
    let report = tokio::task::spawn_blocking(move || convert(&opts))
        .await
        .context("the import thread panicked")??;
    tracing::info!(elapsed = ?started.elapsed(), "whisper import done");
    let line = serde_json::to_string(&report)?;
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(ExitCode::SUCCESS)
}
