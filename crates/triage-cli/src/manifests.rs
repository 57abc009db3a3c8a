//! The default specialists' manifests (`models/*.toml`, compiled into the
//! binary) and the `triage models` commands.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::io::Write;
use std::process::ExitCode;
use triage_local::{LocalError, ModelRef};

const MANIFESTS: &[(&str, &str)] = &[
    ("toxicity", include_str!("../../../models/toxicity.toml")),
    ("ner", include_str!("../../../models/ner.toml")),
    ("embedding", include_str!("../../../models/embedding.toml")),
];

/// One default specialist: what it does and where its weights come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub task: triage_core::LocalTask,
    pub description: String,
    /// Delta folder under `models/` (trained by `scripts/train-defaults`), if any.
    pub local: Option<String>,
    /// The base encoder the delta applies to.
    pub base: Option<String>,
    /// A hub checkpoint that does the same job: the drop-in alternative.
    pub hub: String,
    pub revision: String,
    pub labels: Vec<String>,
    pub positive_labels: Option<Vec<String>>,
    pub pypi: Option<String>,
    pub pypi_path: Option<String>,
}

impl Manifest {
    /// The pinned hub reference.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.hub, self.revision)
    }

    /// What `--model` defaults to: the committed specialist when this build
    /// has it, else the hub checkpoint.
    pub fn default_reference(&self) -> String {
        match &self.local {
            Some(local)
                if triage_local::resolve::specialists_dir()
                    .join(local)
                    .join("config.json")
                    .is_file() =>
            {
                local.clone()
            }
            _ => self.reference(),
        }
    }

    /// What must be downloaded for the default to work.
    pub fn download_reference(&self) -> String {
        match (&self.local, &self.base) {
            (Some(_), Some(base)) => base.clone(),
            _ => self.reference(),
        }
    }
}

pub fn all() -> Result<Vec<Manifest>> {
    MANIFESTS
        .iter()
        .map(|(name, text)| {
            toml::from_str(text).with_context(|| format!("built-in manifest models/{name}.toml"))
        })
        .collect()
}

/// `triage models list`: one JSON object per default specialist.
pub async fn list() -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for m in all()? {
        let reference = m.default_reference();
        let model_ref = ModelRef::parse(&m.download_reference())?;
        // Look in the cache only: listing never downloads.
        let status = match triage_local::resolve::resolve_cached(&model_ref).await {
            Ok(dir) => serde_json::json!({"available": true, "path": dir}),
            Err(LocalError::NotCachedOffline { .. }) => serde_json::json!({"available": false}),
            Err(e) => serde_json::json!({"available": false, "error": e.to_string()}),
        };
        let line = serde_json::json!({
            "name": m.name,
            "task": m.task,
            "source": reference,
            "labels": m.labels,
            "positive_labels": m.positive_labels,
            "description": m.description,
            "offline_source": m.pypi.as_ref().map(|p| serde_json::json!({"pypi": p, "path": m.pypi_path})),
            "status": status,
        });
        writeln!(out, "{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `triage models pull [REF...]`: download into the Hugging Face cache.
pub async fn pull(references: Vec<String>) -> Result<ExitCode> {
    let references = if references.is_empty() {
        let mut refs: Vec<String> = all()?.iter().map(Manifest::download_reference).collect();
        refs.dedup();
        refs
    } else {
        references
    };
    let bar = indicatif::ProgressBar::new(references.len() as u64);
    let stdout = std::io::stdout();
    let mut failed = 0usize;
    for reference in &references {
        bar.set_message(reference.clone());
        let model_ref = ModelRef::parse(reference)?;
        match triage_local::resolve(&model_ref).await {
            Ok(dir) => {
                bar.suspend(|| {
                    writeln!(
                        stdout.lock(),
                        "{}",
                        serde_json::json!({"model": reference, "path": dir})
                    )
                })?;
            }
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("error: {reference}: {e}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if failed > 0 {
        bail!(
            "{failed} of {} models could not be pulled",
            references.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `triage models pack`: write a delta folder and print its manifest.
pub async fn pack(
    model: std::path::PathBuf,
    base: String,
    out: std::path::PathBuf,
    positive_labels: Option<Vec<String>>,
) -> Result<ExitCode> {
    let base_dir = triage_local::resolve(&ModelRef::parse(&base)?)
        .await
        .with_context(|| format!("cannot resolve base `{base}`"))?;
    let manifest = tokio::task::spawn_blocking(move || {
        triage_local::delta::pack(&model, &base_dir, &base, &out, positive_labels)
    })
    .await??;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string(&manifest)?
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_manifests_parse_and_are_pinned_hub_references() -> Result<()> {
        let all = all()?;
        assert_eq!(all.len(), MANIFESTS.len());
        for m in &all {
            assert!(
                matches!(ModelRef::parse(&m.reference())?, ModelRef::Hub { .. }),
                "{}",
                m.name
            );
            // What the default actually loads is pinned: the base of a local
            // delta, or the hub checkpoint itself.
            let pinned = match (&m.local, &m.base) {
                (Some(_), Some(base)) => base.clone(),
                (Some(_), None) => panic!("{}: a local specialist needs a base", m.name),
                (None, _) => m.reference(),
            };
            let rev = pinned.rsplit_once('@').map(|(_, r)| r).unwrap_or_default();
            assert!(
                rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()),
                "{}: {pinned} is not pinned",
                m.name
            );
            if m.task != triage_core::LocalTask::Embedding {
                assert!(!m.labels.is_empty(), "{} lists no labels", m.name);
            }
        }
        Ok(())
    }
}
