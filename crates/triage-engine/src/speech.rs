//! Transcription as the server and CLI use it outside a task's pipeline
//! (`/v1/audio/transcriptions`, transcription jobs): the configured Whisper
//! specialist behind a small typed surface, so callers need not know the
//! local crate. Every call here blocks: run it on a blocking thread.

use crate::config::{StageKind, Strategy};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::specialists::Specialist;
use std::sync::Arc;
use std::time::{Duration, Instant};
use triage_core::Transcript;
use triage_local::speech::WhisperEngine;

pub use triage_local::speech::TranscribeOptions;
pub use triage_local::speech::format;

/// Audio decoded to 16 kHz mono, ready to transcribe.
#[derive(Debug)]
pub struct Audio(triage_local::speech::Pcm);

impl Audio {
    pub fn duration_s(&self) -> f64 {
        self.0.duration_s()
    }
}

/// The Whisper specialist that answers plain transcription requests.
#[derive(Clone)]
pub struct Transcriber {
    /// The specialist's name in the config.
    pub specialist: String,
    engine: Arc<WhisperEngine>,
    gpu: bool,
    prices: Arc<triage_cloud::prices::PriceTable>,
}

impl std::fmt::Debug for Transcriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcriber")
            .field("specialist", &self.specialist)
            .finish_non_exhaustive()
    }
}

impl Transcriber {
    /// Decode `bytes` (`extension` helps the probe); longer than `limit_s` is
    /// an error found while decoding.
    pub fn decode(
        bytes: Vec<u8>,
        extension: Option<&str>,
        limit_s: Option<f64>,
    ) -> Result<Audio, EngineError> {
        Ok(Audio(triage_local::speech::decode(
            bytes, extension, limit_s,
        )?))
    }

    /// Transcribe decoded audio; `progress` receives percentages.
    pub fn transcribe(
        &self,
        audio: &Audio,
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, EngineError> {
        Ok(self.engine.transcribe(&audio.0.samples, opts, progress)?)
    }

    /// Dollars for `elapsed` of this specialist's compute.
    pub fn compute_cost(&self, elapsed: Duration) -> f64 {
        self.prices.compute_cost(elapsed, self.gpu)
    }

    /// Decode and transcribe in one call; returns the transcript and the
    /// dollars its compute cost.
    pub fn run(
        &self,
        bytes: Vec<u8>,
        extension: Option<&str>,
        limit_s: Option<f64>,
        opts: &TranscribeOptions,
    ) -> Result<(Transcript, f64), EngineError> {
        let started = Instant::now();
        let audio = Self::decode(bytes, extension, limit_s)?;
        let transcript = self.transcribe(&audio, opts, None)?;
        Ok((transcript, self.compute_cost(started.elapsed())))
    }
}

impl Engine {
    /// The Whisper model of the configured transcription task (its first
    /// transcribe stage), else the first Whisper specialist; `None` when the
    /// config has none.
    pub fn transcriber(&self) -> Option<Transcriber> {
        let of_task = self
            .config
            .server
            .transcription_task
            .as_deref()
            .and_then(|t| self.config.tasks.get(t))
            .and_then(|t| match &t.strategy {
                Strategy::Pipeline(p) => p.stages.iter().find_map(|s| match &s.kind {
                    StageKind::Transcribe { specialist } => Some(specialist.clone()),
                    _ => None,
                }),
                _ => None,
            });
        let whisper = |(name, s): (&String, &Specialist)| match s {
            Specialist::Whisper { engine, gpu } => Some((name.clone(), engine.clone(), *gpu)),
            _ => None,
        };
        let (specialist, engine, gpu) = of_task
            .and_then(|name| self.specialists.map.get_key_value(&name).and_then(whisper))
            .or_else(|| self.specialists.map.iter().find_map(whisper))?;
        Some(Transcriber {
            specialist,
            engine,
            gpu,
            prices: self.config.prices.clone(),
        })
    }
}
