//! Transcription as the server and CLI use it outside a task's pipeline
//! (`/v1/audio/transcriptions`, transcription jobs): the configured Whisper
//! specialist behind a small typed surface, so callers need not know the
//! local crate. Every call here blocks: run it on a blocking thread.

use crate::config::{StageKind, Strategy};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::specialists::Specialist;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use triage_core::Transcript;
use triage_speech::WhisperEngine;

pub use triage_speech::TranscribeOptions;
pub use triage_speech::format;

/// Audio decoded to 16 kHz mono, ready to transcribe.
#[derive(Debug)]
pub struct Audio(triage_speech::Pcm);

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
        Ok(Audio(triage_speech::decode(bytes, extension, limit_s)?))
    }

    /// Decode a file as it is read, to 16 kHz (a stereo file's channels
    /// kept apart when they hold different speakers).
    pub fn decode_file(
        path: &Path,
        extension: Option<&str>,
        limit_s: Option<f64>,
    ) -> Result<Audio, EngineError> {
        let mut pcm = triage_speech::decode_file(
            path,
            extension,
            triage_speech::DecodeOptions {
                limit_s,
                keep_channels: true,
            },
        )?;
        if pcm
            .channels
            .as_ref()
            .is_some_and(|c| !triage_speech::channels_apart(c))
        {
            pcm.channels = None;
        }
        Ok(Audio(pcm))
    }

    /// Refuse a file that is not audio this build decodes, from its header alone.
    pub fn probe_file(path: &Path, extension: Option<&str>) -> Result<(), EngineError> {
        Ok(triage_speech::probe_file(path, extension)?)
    }

    /// Transcribe decoded audio; `progress` receives percentages.
    pub fn transcribe(
        &self,
        audio: &Audio,
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, EngineError> {
        Ok(self.engine.transcribe_pcm(&audio.0, opts, progress)?)
    }

    /// Transcribe a file as it is decoded: a mono file streams through
    /// Whisper in windows (memory does not grow with its length); a stereo
    /// file is decoded whole, so that one speaker per channel can be told
    /// apart (three 16 kHz copies: 3.8 MB a minute).
    pub fn transcribe_file(
        &self,
        path: &Path,
        extension: Option<&str>,
        limit_s: Option<f64>,
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, EngineError> {
        transcribe_file_with(&self.engine, path, extension, limit_s, opts, progress)
    }

    /// Decode a file and transcribe it in one call; returns the transcript
    /// and the dollars its compute cost.
    pub fn run_file(
        &self,
        path: &Path,
        extension: Option<&str>,
        limit_s: Option<f64>,
        opts: &TranscribeOptions,
    ) -> Result<(Transcript, f64), EngineError> {
        let started = Instant::now();
        let transcript = self.transcribe_file(path, extension, limit_s, opts, None)?;
        Ok((transcript, self.compute_cost(started.elapsed())))
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

/// [`Transcriber::transcribe_file`] on any Whisper engine (pipelines use it too).
pub(crate) fn transcribe_file_with(
    engine: &WhisperEngine,
    path: &Path,
    extension: Option<&str>,
    limit_s: Option<f64>,
    opts: &TranscribeOptions,
    progress: Option<Box<dyn FnMut(i32) + Send>>,
) -> Result<Transcript, EngineError> {
    let decode = triage_speech::DecodeOptions {
        limit_s,
        keep_channels: false,
    };
    let mut stream = triage_speech::AudioStream::open_file(path, extension, decode)?;
    if stream.declared_channels() == Some(2) {
        drop(stream);
        let audio = Transcriber::decode_file(path, extension, limit_s)?;
        return Ok(engine.transcribe_pcm(&audio.0, opts, progress)?);
    }
    let total = stream
        .duration_hint_s()
        .map(|s| (s * f64::from(triage_speech::audio::SAMPLE_RATE)) as usize);
    let mut next = |min: usize| stream.next_block(min);
    engine
        .transcribe_stream(&mut next, total, opts, progress)
        .map_err(|e| match e {
            triage_speech::StreamError::Source(a) => EngineError::from(a),
            triage_speech::StreamError::Speech(s) => EngineError::from(s),
        })
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

/// Run a pipeline's transcribe stage: `source` is the audio's bytes, or
/// the file it was spooled to.
pub(crate) async fn transcribe_stage(
    specialist: &Specialist,
    name: &str,
    source: Result<Vec<u8>, std::path::PathBuf>,
    extension: Option<String>,
    limit_s: Option<f64>,
) -> Result<Transcript, EngineError> {
    let Specialist::Whisper { engine, .. } = specialist else {
        return Err(EngineError::UnknownSpecialist(name.to_owned()));
    };
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || match source {
        Ok(bytes) => {
            let pcm = triage_speech::decode(bytes, extension.as_deref(), limit_s)?;
            engine
                .transcribe(&pcm.samples, &TranscribeOptions::default(), None)
                .map_err(EngineError::from)
        }
        Err(path) => transcribe_file_with(
            &engine,
            &path,
            extension.as_deref(),
            limit_s,
            &TranscribeOptions::default(),
            None,
        ),
    })
    .await
    .map_err(|source| EngineError::Task {
        what: "transcription",
        source,
    })?
}

/// The transcript as later stages read it: who said what when the
/// speakers are known, else the plain text.
pub(crate) fn transcript_text(transcript: &Transcript) -> String {
    if transcript.segments.iter().any(|s| s.speaker.is_some()) {
        triage_speech::format::txt(transcript).trim().to_owned()
    } else {
        transcript.text.trim().to_owned()
    }
}
