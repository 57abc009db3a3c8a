//! Whisper on whisper.cpp (whisper-rs): one loaded model shared by a pool of
//! decoding states, so a short clip is not stuck behind a long file (the
//! whisper.cpp server serialises everything; whisper.cpp#1803).

use super::audio::SAMPLE_RATE;
use crate::DeviceSpec;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};
use triage_core::{TokenProb, Transcript, TranscriptSegment};
use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

/// Segments above this no-speech probability are dropped (whisper.cpp's own default).
const NO_SPEECH_THRESHOLD: f32 = 0.6;
/// Audio whose peak stays below this is digital silence: no model run needed.
const SILENCE_PEAK: f32 = 1e-3;

#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    #[error("cannot load the Whisper model {path}: {why}")]
    Load {
        path: String,
        why: &'static str,
        #[source]
        source: Option<whisper_rs::WhisperError>,
    },
    #[error("Whisper decoding failed")]
    Decode(#[source] whisper_rs::WhisperError),
    #[error("cannot run Whisper on the requested device")]
    Device(#[source] crate::LocalError),
}

/// Per-request options.
#[derive(Debug, Clone, Default)]
pub struct TranscribeOptions {
    /// ISO code (`en`); `None` detects (multilingual models) or uses English.
    pub language: Option<String>,
    /// Return text tokens with their probabilities.
    pub token_probs: bool,
}

/// A loaded Whisper model and its pool of decoding states.
pub struct WhisperEngine {
    ctx: Arc<WhisperContext>,
    idle: Mutex<Vec<WhisperState>>,
    threads: usize,
    multilingual: bool,
    eot: i32,
}

impl std::fmt::Debug for WhisperEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperEngine")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

static LOG_HOOKS: Once = Once::new();

impl WhisperEngine {
    /// Load a ggml model file. `threads` is per decoding state. On
    /// `cuda:N` whisper.cpp runs on GPU N with flash attention (its CUDA
    /// kernels for it are compiled in; on the CPU it stays off, where it is
    /// not faster for Whisper's short sequences). A GPU device is opened
    /// first, so a missing driver or GPU is the same typed error as for the
    /// encoders, not a silent fall back to the CPU.
    pub fn load(path: &Path, threads: usize, device: DeviceSpec) -> Result<Self, SpeechError> {
        LOG_HOOKS.call_once(whisper_rs::install_logging_hooks);
        let err = |why: &'static str, source: Option<whisper_rs::WhisperError>| SpeechError::Load {
            path: path.display().to_string(),
            why,
            source,
        };
        if !path.is_file() {
            return Err(err("no such file", None));
        }
        if device != DeviceSpec::Cpu {
            device.open().map_err(SpeechError::Device)?;
        }
        let gpu_device = device.gpu_index().unwrap_or(0);
        let params = WhisperContextParameters {
            use_gpu: device != DeviceSpec::Cpu,
            flash_attn: matches!(device, DeviceSpec::Cuda(_)),
            gpu_device: i32::try_from(gpu_device)
                .map_err(|_| err("the GPU index is out of range", None))?,
            ..Default::default()
        };
        let path_str = path
            .to_str()
            .ok_or_else(|| err("the path is not UTF-8", None))?;
        let ctx = WhisperContext::new_with_params(path_str, params)
            .map_err(|e| err("not a ggml Whisper model?", Some(e)))?;
        let multilingual = ctx.is_multilingual();
        let eot = ctx.token_eot();
        Ok(Self {
            ctx: Arc::new(ctx),
            idle: Mutex::new(Vec::new()),
            threads: threads.max(1),
            multilingual,
            eot,
        })
    }

    fn take_state(&self) -> Result<WhisperState, SpeechError> {
        if let Some(state) = self.idle.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(state);
        }
        self.ctx.create_state().map_err(SpeechError::Decode)
    }

    fn put_state(&self, state: WhisperState) {
        if let Ok(mut v) = self.idle.lock() {
            v.push(state);
        }
    }

    /// Transcribe 16 kHz mono samples. Blocking: run it on a blocking thread.
    /// `progress` receives percentages as whisper.cpp works through the audio.
    pub fn transcribe(
        &self,
        samples: &[f32],
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, SpeechError> {
        let duration_s = samples.len() as f64 / f64::from(SAMPLE_RATE);
        let fallback_language = opts.language.clone().unwrap_or_else(|| "en".into());
        let peak = samples.iter().fold(0f32, |m, s| m.max(s.abs()));
        if samples.is_empty() || peak < SILENCE_PEAK {
            return Ok(Transcript {
                text: String::new(),
                language: fallback_language,
                duration_s,
                confidence: 0.0,
                no_speech: true,
                segments: Vec::new(),
            });
        }
        // whisper.cpp refuses less than 100 ms of audio; pad short clips with silence.
        let min = SAMPLE_RATE as usize / 10 + 1;
        let padded;
        let input = if samples.len() < min {
            padded = [samples, &vec![0.0; min - samples.len()]].concat();
            &padded[..]
        } else {
            samples
        };

        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_n_threads(self.threads as i32);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_special(false);
        params.set_print_timestamps(false);
        params.set_no_speech_thold(NO_SPEECH_THRESHOLD);
        let language = match (&opts.language, self.multilingual) {
            (Some(l), _) => Some(l.as_str()),
            (None, true) => Some("auto"),
            (None, false) => Some("en"),
        };
        params.set_language(language);
        if let Some(cb) = progress {
            params.set_progress_callback_safe(cb);
        }

        let mut state = self.take_state()?;
        let result = state.full(params, input);
        if let Err(e) = result {
            // A state that failed mid-way is not reused.
            return Err(SpeechError::Decode(e));
        }
        let language = if self.multilingual {
            whisper_rs::get_lang_str(state.full_lang_id_from_state())
                .unwrap_or("en")
                .to_owned()
        } else {
            fallback_language
        };
        let mut segments = Vec::new();
        let (mut p_sum, mut p_n) = (0f64, 0usize);
        for i in 0..state.full_n_segments() {
            let Some(seg) = state.get_segment(i) else {
                continue;
            };
            let text = seg
                .to_str_lossy()
                .map(|t| t.trim().to_owned())
                .unwrap_or_default();
            let mut logp = Vec::new();
            let mut tokens = Vec::new();
            for t in 0..seg.n_tokens() {
                let Some(tok) = seg.get_token(t) else {
                    continue;
                };
                let data = tok.token_data();
                if data.id >= self.eot {
                    continue; // timestamps and other special tokens
                }
                logp.push(data.plog);
                p_sum += f64::from(data.p);
                p_n += 1;
                if opts.token_probs {
                    tokens.push(TokenProb {
                        text: tok
                            .to_str_lossy()
                            .map(|s| s.into_owned())
                            .unwrap_or_default(),
                        p: data.p,
                    });
                }
            }
            let no_speech_prob = seg.no_speech_probability();
            segments.push(TranscriptSegment {
                start: seg.start_timestamp() as f64 / 100.0,
                end: (seg.end_timestamp() as f64 / 100.0).min(duration_s.max(0.0)),
                text,
                avg_logprob: if logp.is_empty() {
                    0.0
                } else {
                    logp.iter().sum::<f32>() / logp.len() as f32
                },
                no_speech_prob,
                tokens: opts.token_probs.then_some(tokens),
            });
        }
        self.put_state(state);
        segments.retain(|s| !s.text.is_empty());
        let text = segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let no_speech = segments.is_empty()
            || segments
                .iter()
                .all(|s| s.no_speech_prob > NO_SPEECH_THRESHOLD);
        Ok(Transcript {
            text,
            language,
            duration_s,
            confidence: if no_speech || p_n == 0 {
                0.0
            } else {
                (p_sum / p_n as f64) as f32
            },
            no_speech,
            segments,
        })
    }
}
