//! Specialists stored as a delta over a pinned base encoder: the trained
//! tensors only (in f16), the config, calibration and a manifest
//! (`triage.json`) that names the base and the checksums of both. This keeps a
//! fine-tuned MiniLM specialist to a few MB in the repository while the base
//! weights come from the hub or a registry package.

use crate::error::{LocalError, Result};
use crate::weights::Checkpoint;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "triage.json";

/// `triage.json` of a delta folder (or of an ordinary folder, for
/// `positive_labels` alone).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeltaManifest {
    /// Base model reference (`org/name@revision`); absent for full folders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// SHA-256 of the base's `model.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha256: Option<String>,
    /// The delta weights file, relative to the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_sha256: Option<String>,
    /// Model labels that mean "positive" (toxic) for binary evaluation and moderation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positive_labels: Option<Vec<String>>,
}

impl DeltaManifest {
    /// Read `dir/triage.json`, if present.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| LocalError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LocalError::BadConfig {
                path,
                why: e.to_string(),
            })
    }
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn verify(path: &Path, want: Option<&str>) -> Result<()> {
    if let Some(want) = want {
        let got = sha256_file(path)?;
        if got != want {
            return Err(LocalError::Weights {
                path: path.to_path_buf(),
                source: candle_core::Error::Msg(format!(
                    "checksum {got} does not match the manifest's {want}"
                )),
            });
        }
    }
    Ok(())
}

/// The weights file of a model folder.
fn weights_file(dir: &Path) -> PathBuf {
    let st = dir.join("model.safetensors");
    if st.is_file() {
        st
    } else {
        dir.join("pytorch_model.bin")
    }
}

/// Load the base checkpoint and lay the delta's tensors over it.
pub fn load_checkpoint(
    dir: &Path,
    manifest: &DeltaManifest,
    base_dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Checkpoint> {
    verify(&weights_file(base_dir), manifest.base_sha256.as_deref())?;
    let mut checkpoint = Checkpoint::load_dir(base_dir, dtype, device)?;
    let delta = dir.join(manifest.delta.as_deref().unwrap_or("delta.safetensors"));
    verify(&delta, manifest.delta_sha256.as_deref())?;
    checkpoint.overlay(Checkpoint::load_file(&delta, dtype, device)?);
    Ok(checkpoint)
}

/// Write `dir` as a delta of `model_dir` over `base_dir`: every tensor of the
/// trained model that differs from the base (renamed to the base's naming),
/// stored in f16, plus config, calibration and tokenizer config.
pub fn pack(
    model_dir: &Path,
    base_dir: &Path,
    base_ref: &str,
    out: &Path,
    positive_labels: Option<Vec<String>>,
) -> Result<DeltaManifest> {
    let io = |path: PathBuf| move |source| LocalError::Io { path, source };
    std::fs::create_dir_all(out).map_err(io(out.to_path_buf()))?;
    let cpu = Device::Cpu;
    let model = Checkpoint::load_dir(model_dir, DType::F32, &cpu)?;
    let base = Checkpoint::load_dir(base_dir, DType::F32, &cpu)?;
    let mut delta: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in model.tensors() {
        // Trained folders carry `bert.`/`distilbert.` prefixes; bases may not.
        let base_name = [
            name.as_str(),
            name.trim_start_matches("bert."),
            name.trim_start_matches("distilbert."),
        ]
        .into_iter()
        .find(|n| base.contains(n))
        .map(str::to_owned);
        let changed = match base_name.as_deref().and_then(|n| base.get(n)) {
            Some(b) => {
                b.dims() != t.dims()
                    || b.sub(t)
                        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
                        .map_err(LocalError::Compute)?
                        > 0.0
            }
            None => true,
        };
        if changed {
            let f16 = t.to_dtype(DType::F16).map_err(LocalError::Compute)?;
            delta.insert(base_name.unwrap_or_else(|| name.clone()), f16);
        }
    }
    let delta_path = out.join("delta.safetensors");
    candle_core::safetensors::save(&delta, &delta_path).map_err(|source| LocalError::Weights {
        path: delta_path.clone(),
        source,
    })?;
    for f in ["config.json", "calibration.json", "tokenizer_config.json"] {
        let src = model_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out.join(f)).map_err(io(out.join(f)))?;
        }
    }
    let manifest = DeltaManifest {
        base: Some(base_ref.to_owned()),
        base_sha256: Some(sha256_file(&weights_file(base_dir))?),
        delta: Some("delta.safetensors".into()),
        delta_sha256: Some(sha256_file(&delta_path)?),
        positive_labels,
    };
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    std::fs::write(out.join(MANIFEST), json).map_err(io(out.join(MANIFEST)))?;
    Ok(manifest)
}
