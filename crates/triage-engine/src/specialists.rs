//! The local specialists a config declares, loaded once and shared by every
//! task: classifiers and taggers on their worker threads, Whisper with its
//! pool of decoding states.

use crate::config::{LocalKind, LocalSpec};
use crate::error::EngineError;
use indexmap::IndexMap;
use std::sync::Arc;
pub use triage_local::CacheStats;
use triage_local::{ModelHandle, ModelRef};
#[cfg(feature = "speech")]
use triage_speech::WhisperEngine;

#[derive(Debug, Clone)]
pub enum Specialist {
    Classifier {
        handle: ModelHandle,
        /// Labels that mean "positive" (toxic) when the tier has no `map`.
        positive_labels: Vec<String>,
        gpu: bool,
    },
    Tagger {
        handle: ModelHandle,
        gpu: bool,
    },
    #[cfg(feature = "speech")]
    Whisper {
        engine: Arc<WhisperEngine>,
        gpu: bool,
    },
}

impl Specialist {
    /// Whether the specialist can still answer (a classifier's or tagger's
    /// worker thread is running; Whisper has no thread of its own).
    pub fn is_alive(&self) -> bool {
        match self {
            Specialist::Classifier { handle, .. } | Specialist::Tagger { handle, .. } => {
                handle.is_alive()
            }
            #[cfg(feature = "speech")]
            Specialist::Whisper { .. } => true,
        }
    }

    pub fn on_gpu(&self) -> bool {
        match self {
            Specialist::Classifier { gpu, .. } | Specialist::Tagger { gpu, .. } => *gpu,
            #[cfg(feature = "speech")]
            Specialist::Whisper { gpu, .. } => *gpu,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Specialists {
    pub map: IndexMap<String, Specialist>,
}

impl Specialists {
    /// Load every declared specialist (hub, hub mirror or local folder).
    pub async fn load(local: &IndexMap<String, LocalSpec>) -> Result<Self, EngineError> {
        let mut map = IndexMap::new();
        // The CPU encoders and whisper.cpp share the compute cores: while a
        // transcription decodes, the encoders' passes use what it leaves.
        let share = triage_local::CoreShare::new(triage_local::compute_threads());
        for (name, spec) in local {
            let err = |source: triage_local::LocalError| EngineError::LoadSpecialist {
                name: name.clone(),
                model: spec.model.clone(),
                source: source.into(),
            };
            let gpu = !matches!(spec.device, triage_local::DeviceSpec::Cpu);
            let specialist = match spec.kind {
                LocalKind::Classifier | LocalKind::Tagger => {
                    let device = spec.device.open().map_err(err)?;
                    let handle = triage_local::start_model_shared(
                        &spec.model,
                        &device,
                        spec.batch,
                        Some(share.clone()),
                    )
                    .await
                    .map_err(err)?;
                    if spec.kind == LocalKind::Classifier {
                        let positive_labels = match &spec.positive_labels {
                            Some(p) => p.clone(),
                            None => positive_labels_of(&spec.model, &handle.info().labels).await,
                        };
                        Specialist::Classifier {
                            handle,
                            positive_labels,
                            gpu,
                        }
                    } else {
                        Specialist::Tagger { handle, gpu }
                    }
                }
                LocalKind::Whisper => load_whisper(name, spec, &share, gpu).await?,
            };
            map.insert(name.clone(), specialist);
        }
        Ok(Self { map })
    }

    /// The specialists whose worker has stopped.
    pub fn stopped(&self) -> Vec<String> {
        self.map
            .iter()
            .filter(|(_, s)| !s.is_alive())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Each classifier's answer-cache counters, for those whose cache is on.
    pub fn cache_stats(&self) -> Vec<(String, CacheStats)> {
        self.map
            .iter()
            .filter_map(|(name, s)| match s {
                Specialist::Classifier { handle, .. } => {
                    handle.cache_stats().map(|c| (name.clone(), c))
                }
                _ => None,
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<&Specialist, EngineError> {
        self.map
            .get(name)
            .ok_or_else(|| EngineError::UnknownSpecialist(name.to_owned()))
    }
}

/// The model's own `positive_labels` (from its `triage.json`), else, for a
/// two-label model, the second label (the Hugging Face convention
/// `LABEL_1` = positive), else every label.
async fn positive_labels_of(model: &str, labels: &[String]) -> Vec<String> {
    if let Ok(reference) = ModelRef::parse(model)
        && let Ok(dir) = triage_local::resolve::resolve_cached(&reference).await
        && let Ok(Some(m)) = triage_local::delta::DeltaManifest::read(&dir)
        && let Some(p) = m.positive_labels
    {
        return p;
    }
    if labels.len() == 2 {
        return vec![labels[1].clone()];
    }
    labels.to_vec()
}

/// Resolve and load a Whisper specialist, its CPU passes sharing `share`.
#[cfg(feature = "speech")]
async fn load_whisper(
    name: &str,
    spec: &LocalSpec,
    share: &Arc<triage_local::CoreShare>,
    gpu: bool,
) -> Result<Specialist, EngineError> {
    let fail = |source: crate::error::LoadError| EngineError::LoadSpecialist {
        name: name.to_owned(),
        model: spec.model.clone(),
        source,
    };
    let err = |source: triage_local::LocalError| fail(source.into());
    let path = triage_local::resolve::resolve_whisper(&spec.model)
        .await
        .map_err(err)?;
    // Unset: its share of the machine's thread budget.
    let threads = spec.threads.unwrap_or_else(|| {
        triage_local::ThreadBudget::split(triage_local::ThreadBudget::available_cores(), true)
            .whisper
    });
    let vad = triage_local::resolve::resolve_vad(spec.vad_model.as_deref()).map_err(err)?;
    let speakers = spec
        .speaker_model
        .as_deref()
        .map(|m| triage_local::resolve::resolve_speaker_model(Some(m)))
        .transpose()
        .map_err(err)?;
    let device = spec.device;
    let share = (device == triage_local::DeviceSpec::Cpu).then(|| share.clone());
    let engine = tokio::task::spawn_blocking(move || {
        let engine = WhisperEngine::load(&path, threads, device)?;
        let engine = match share {
            Some(share) => engine.with_core_share(share),
            None => engine,
        };
        let engine = match vad {
            Some(vad) => engine.with_vad(&vad)?,
            None => engine,
        };
        match speakers {
            Some(model) => engine.with_speakers(&model),
            None => Ok(engine),
        }
    })
    .await
    .map_err(|e| fail(e.into()))?
    .map_err(|e| fail(e.into()))?;
    Ok(Specialist::Whisper {
        engine: Arc::new(engine),
        gpu,
    })
}

/// A build without speech refuses a Whisper specialist by name.
#[cfg(not(feature = "speech"))]
async fn load_whisper(
    name: &str,
    spec: &LocalSpec,
    _share: &Arc<triage_local::CoreShare>,
    _gpu: bool,
) -> Result<Specialist, EngineError> {
    Err(EngineError::LoadSpecialist {
        name: name.to_owned(),
        model: spec.model.clone(),
        source: crate::error::LoadError::NoSpeech,
    })
}
