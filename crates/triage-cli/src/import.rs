//! `triage models import-ct2`: convert a CTranslate2 (faster-whisper) Whisper
//! checkpoint into whisper.cpp's ggml file, offline; `triage models
//! quantize`: quantise such a file to q8_0 or q5_1.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use triage_tools::whisper_import::{ImportOptions, import_ct2 as convert};
use triage_tools::whisper_quantize::{QuantType, default_output, quantize_ggml};

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

/// Quantise the ggml Whisper model `model` to `ty`, into `out` or beside it.
/// Prints one JSON object: the files, the type, tensors and sizes.
pub async fn quantize(model: PathBuf, ty: QuantType, out: Option<PathBuf>) -> Result<ExitCode> {
    let out = out.unwrap_or_else(|| default_output(&model, ty));
    let started = std::time::Instant::now();
    let report = tokio::task::spawn_blocking(move || quantize_ggml(&model, &out, ty))
        .await
        .context("the quantisation thread panicked")??;
    tracing::info!(elapsed = ?started.elapsed(), "whisper quantisation done");
    let line = serde_json::to_string(&report)?;
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(ExitCode::SUCCESS)
}
