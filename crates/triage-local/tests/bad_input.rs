//! Broken model folders and references give typed errors, never panics.

use crate::common::model_dir;
use candle_core::Device;
use std::path::Path;
use triage_local::{LocalError, LocalModel, ModelRef};

fn copy_model(name: &str) -> anyhow::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for entry in std::fs::read_dir(model_dir(name))? {
        let entry = entry?;
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name()))?;
    }
    Ok(tmp)
}

fn load(dir: &Path) -> Result<LocalModel, LocalError> {
    LocalModel::load(dir, "broken", &Device::Cpu)
}

#[test]
fn truncated_weights_are_a_weights_error() -> anyhow::Result<()> {
    let tmp = copy_model("distilbert-seq-multilabel")?;
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let err = load(tmp.path()).err();
    assert!(matches!(err, Some(LocalError::Weights { .. })), "{err:?}");
    Ok(())
}

#[test]
fn garbage_weights_are_a_weights_error() -> anyhow::Result<()> {
    let tmp = copy_model("bert-seq-single")?;
    std::fs::write(
        tmp.path().join("pytorch_model.bin"),
        b"this is not a pickle",
    )?;
    let err = load(tmp.path()).err();
    assert!(matches!(err, Some(LocalError::Weights { .. })), "{err:?}");
    Ok(())
}

#[test]
fn labels_that_do_not_match_the_classifier_are_a_config_error() -> anyhow::Result<()> {
    let tmp = copy_model("bert-token")?;
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    cfg["id2label"] = serde_json::json!({"0": "O", "1": "B-PER"});
    std::fs::write(&path, cfg.to_string())?;
    let err = load(tmp.path()).err();
    let msg = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(matches!(err, Some(LocalError::BadConfig { .. })), "{err:?}");
    assert!(msg.contains("id2label"), "{msg}");
    Ok(())
}

#[test]
fn gapped_label_ids_are_a_config_error() -> anyhow::Result<()> {
    let tmp = copy_model("distilbert-seq-multilabel")?;
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    cfg["id2label"] = serde_json::json!({"0": "a", "1": "b", "2": "c", "7": "d"});
    std::fs::write(&path, cfg.to_string())?;
    assert!(matches!(
        load(tmp.path()).err(),
        Some(LocalError::BadConfig { .. })
    ));
    Ok(())
}

#[test]
fn unsupported_architecture_is_a_config_error() -> anyhow::Result<()> {
    let tmp = copy_model("bert-token")?;
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    cfg["model_type"] = serde_json::json!("gpt2");
    std::fs::write(&path, cfg.to_string())?;
    let err = load(tmp.path()).err();
    assert!(err.is_some_and(|e| e.to_string().contains("gpt2")));
    Ok(())
}

#[test]
fn missing_tokenizer_is_reported_by_name() -> anyhow::Result<()> {
    let tmp = copy_model("bert-token")?;
    std::fs::remove_file(tmp.path().join("tokenizer.json"))?;
    let err = load(tmp.path()).err();
    assert!(err.is_some_and(|e| e.to_string().contains("tokenizer")));
    Ok(())
}

#[tokio::test]
async fn unknown_references_fail_clearly() {
    assert!(matches!(
        ModelRef::parse("not a model"),
        Err(LocalError::BadReference { .. })
    ));
    let err = triage_local::start_model(
        "/no/such/folder",
        &Device::Cpu,
        triage_local::BatchConfig::default(),
    )
    .await
    .err();
    assert!(err.is_some_and(|e| e.to_string().contains("/no/such/folder")));
}

#[test]
fn empty_and_odd_text_is_scored_not_rejected() -> anyhow::Result<()> {
    let model = LocalModel::load(&model_dir("distilbert-seq-multilabel"), "m", &Device::Cpu)?;
    for text in ["", " ", "\u{0}", "\u{feff}", "🇧🇷🇧🇷", "\t\n"] {
        let enc = model.tokenizer.encode(text, false)?;
        let c = model.classify(&[&enc])?.remove(0);
        assert!(
            c.scores
                .iter()
                .all(|s| s.score.is_finite() && (0.0..=1.0).contains(&s.score))
        );
    }
    Ok(())
}
