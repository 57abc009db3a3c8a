//! Whisper on whisper.cpp (whisper-rs): one loaded model shared by a pool of
//! decoding states, so a short clip is not stuck behind a long file (the
//! whisper.cpp server serialises everything; whisper.cpp#1803).
//!
//! With a Silero VAD model the audio is first cut into speech spans; spans
//! are packed into chunks of at most [`MAX_CHUNK_S`] (joined by a short gap
//! of silence, as whisper.cpp's own VAD path does) so that long audio is cut
//! at pauses and silence never reaches the decoder. whisper.cpp applies its
//! VAD only in `whisper_full` on the context's default state, not in
//! `whisper_full_with_state`, which the state pool uses; hence it is done
//! here with the standalone VAD context.

use crate::audio::SAMPLE_RATE;
use crate::speaker::{self, Embedded, SpeakerEncoder};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use triage_core::{TokenProb, Transcript, TranscriptSegment, Word};
use triage_local::DeviceSpec;
use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
    WhisperVadContext, WhisperVadContextParams, WhisperVadParams,
};

/// Segments above this no-speech probability are dropped (whisper.cpp's own default).
const NO_SPEECH_THRESHOLD: f32 = 0.6;
/// Audio whose peak stays below this is digital silence: no model run needed.
const SILENCE_PEAK: f32 = 1e-3;
/// Longest chunk handed to the decoder: inside Whisper's 30 s window, so a
/// chunk is decoded in one window and never cut at a fixed boundary.
pub const MAX_CHUNK_S: f32 = 28.0;
/// Silence put between two speech spans packed into one chunk.
const GAP_SAMPLES: usize = SAMPLE_RATE as usize / 10;
/// Silence between a segment's edge and its first or last word longer than
/// this means the segment spans a gap VAD cut out (its pauses are 0.3 s).
const GAP_S: f64 = 1.0;
/// Most audio a streamed transcription holds at once (5 minutes: 19 MB).
pub const WINDOW_S: f32 = 300.0;
/// The end of a window that waits for the next one unless a pause comes
/// before it: long enough for any span (spans are at most [`MAX_CHUNK_S`]).
const WINDOW_TAIL_S: f32 = 30.0;

/// A transcription in progress: its decoding state, parameters and what it
/// has found so far.
struct Run<'p> {
    params: FullParams<'p, 'p>,
    position: Arc<Mutex<(usize, usize)>>,
    progress: Option<Arc<Mutex<Progress>>>,
    /// Samples in the recording, when known (scales progress).
    total: Option<usize>,
    state: Option<WhisperState>,
    /// `state` holds this recording's text so far (whisper.cpp's prompt
    /// history), so the next chunk may be conditioned on it.
    state_has_text: bool,
    /// Embedded pieces of speech, when speakers are told apart.
    pieces: Option<Vec<Embedded>>,
    segments: Vec<TranscriptSegment>,
    p_sum: f64,
    p_n: usize,
    language: Option<String>,
}

type Progress = Box<dyn FnMut(i32) + Send>;

/// Where [`WhisperEngine::collect`] puts a chunk's segments, and the sums
/// its confidence is the mean of.
struct Sink<'a> {
    segments: &'a mut Vec<TranscriptSegment>,
    p_sum: &'a mut f64,
    p_n: &'a mut usize,
}

/// What one chunk decoded on its own state gave.
#[derive(Default)]
struct Decoded {
    segments: Vec<TranscriptSegment>,
    p_sum: f64,
    p_n: usize,
    language: Option<String>,
}

/// Why a streamed transcription stopped: its source or the model.
#[derive(Debug, thiserror::Error)]
pub enum StreamError<E> {
    #[error(transparent)]
    Source(E),
    #[error(transparent)]
    Speech(SpeechError),
}

/// Where to cut audio without a VAD model: the start of the quietest
/// 100 ms between `from` and `to`.
fn quietest(samples: &[f32], from: usize, to: usize) -> usize {
    let frame = SAMPLE_RATE as usize / 10;
    let to = to.min(samples.len());
    let mut best = (f32::MAX, to);
    let mut at = from;
    while at + frame <= to {
        let energy: f32 = samples[at..at + frame].iter().map(|x| x * x).sum();
        if energy < best.0 {
            best = (energy, at);
        }
        at += frame / 2;
    }
    best.1.max(1)
}

#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    #[error("cannot load the Whisper model {path}: {why}")]
    Load {
        path: String,
        why: &'static str,
        #[source]
        source: Option<whisper_rs::WhisperError>,
    },
    #[error(
        "cannot load the VAD model {path}: {why} (a ggml Silero VAD file; scripts/fetch-silero-vad makes one)"
    )]
    LoadVad {
        path: String,
        why: &'static str,
        #[source]
        source: Option<whisper_rs::WhisperError>,
    },
    #[error(
        "cannot load the speaker model {path}: {why} (Resemblyzer's encoder as safetensors; scripts/fetch-speaker-model makes it)"
    )]
    LoadSpeaker { path: String, why: String },
    #[error("speaker labels for mono audio need a VAD model (the speech is embedded span by span)")]
    SpeakersWithoutVad,
    #[error("speaker embedding failed: {0}")]
    Speaker(String),
    #[error("voice activity detection failed")]
    Vad(#[source] whisper_rs::WhisperError),
    #[error("Whisper decoding failed")]
    Decode(#[source] whisper_rs::WhisperError),
    #[error("the transcription was cancelled")]
    Cancelled,
    #[error("cannot run Whisper on the requested device")]
    Device(#[source] triage_local::LocalError),
}

/// Per-request options.
#[derive(Debug, Clone, Default)]
pub struct TranscribeOptions {
    /// ISO code (`en`); `None` detects (multilingual models) or uses English.
    pub language: Option<String>,
    /// Return text tokens with their probabilities.
    pub token_probs: bool,
    /// Return each segment's words with their times and probabilities.
    pub word_timestamps: bool,
    /// Set to stop decoding (the client went away, the job was cancelled):
    /// checked between chunks and by whisper.cpp's abort callback.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl TranscribeOptions {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// A loaded Whisper model and its pool of decoding states.
pub struct WhisperEngine {
    ctx: Arc<WhisperContext>,
    idle: Mutex<Vec<WhisperState>>,
    threads: usize,
    /// VAD chunks of one window decoded at once, each on its own state with
    /// a share of `threads` (1: one after another with all of them).
    chunk_states: usize,
    /// Condition each chunk on the text decoded before it (see
    /// [`Self::with_previous_text`]).
    previous_text: bool,
    multilingual: bool,
    eot: i32,
    vad: Option<Mutex<WhisperVadContext>>,
    /// Tells the speakers of a mono recording apart.
    speakers: Option<Arc<SpeakerEncoder>>,
    /// Cores shared with the encoders: held while decoding.
    share: Option<Arc<triage_local::CoreShare>>,
}

impl std::fmt::Debug for WhisperEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperEngine")
            .field("threads", &self.threads)
            .field("chunk_states", &self.chunk_states)
            .field("vad", &self.vad.is_some())
            .finish_non_exhaustive()
    }
}

static LOG_HOOKS: Once = Once::new();

/// A stretch of the input placed in a chunk: `len` samples from `source` in
/// the audio sit at `at` in the chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Piece {
    at: usize,
    source: usize,
    len: usize,
}

/// What one decoder call sees: pieces of the audio joined by short gaps.
#[derive(Debug, Clone, PartialEq)]
struct Chunk {
    pieces: Vec<Piece>,
    /// Where the window the pieces index into starts in the recording.
    base: usize,
}

impl Chunk {
    fn len(&self) -> usize {
        self.pieces.last().map_or(0, |p| p.at + p.len)
    }

    /// Seconds in the audio for centiseconds in the chunk; a time in a gap
    /// maps to the end of the piece before it.
    fn to_audio_s(&self, cs: i64) -> f64 {
        let at = (cs.max(0) as usize).saturating_mul(SAMPLE_RATE as usize / 100);
        let piece = self
            .pieces
            .iter()
            .rev()
            .find(|p| p.at <= at)
            .or(self.pieces.first());
        let sample = piece.map_or(at, |p| p.source + (at - p.at.min(at)).min(p.len));
        (self.base + sample) as f64 / f64::from(SAMPLE_RATE)
    }

    /// What the decoder gets: the chunk's samples, padded with silence to
    /// the 100 ms whisper.cpp needs at least.
    fn input<'a>(&self, audio: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        let data = self.samples(audio);
        let min = SAMPLE_RATE as usize / 10 + 1;
        if data.len() < min {
            let mut padded = data.into_owned();
            padded.resize(min, 0.0);
            padded.into()
        } else {
            data
        }
    }

    /// The chunk's samples: borrowed when it is one piece, else copied with gaps.
    fn samples<'a>(&self, audio: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match self.pieces.as_slice() {
            [p] => std::borrow::Cow::Borrowed(&audio[p.source..p.source + p.len]),
            _ => {
                let mut out = vec![0f32; self.len()];
                for p in &self.pieces {
                    out[p.at..p.at + p.len].copy_from_slice(&audio[p.source..p.source + p.len]);
                }
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Pack speech spans (sample ranges, in order) into chunks of at most
/// `max` samples; a span longer than `max` is split.
fn pack(spans: &[(usize, usize)], max: usize) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut current = Chunk {
        pieces: Vec::new(),
        base: 0,
    };
    for &(start, end) in spans {
        let mut start = start;
        while start < end {
            let gap = if current.pieces.is_empty() {
                0
            } else {
                GAP_SAMPLES
            };
            let need = end - start;
            if !current.pieces.is_empty() && current.len() + gap + need > max {
                // A span is never cut to fill a chunk: it starts the next one.
                chunks.push(std::mem::replace(
                    &mut current,
                    Chunk {
                        pieces: Vec::new(),
                        base: 0,
                    },
                ));
                continue;
            }
            // Only a span longer than a whole chunk is cut.
            let len = need.min(max.saturating_sub(current.len() + gap).max(1));
            let at = current.len() + gap;
            current.pieces.push(Piece {
                at,
                source: start,
                len,
            });
            start += len;
        }
    }
    if !current.pieces.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Whether a word is whisper.cpp's marker for non-speech (`[BLANK_AUDIO]`,
/// `(music)`, `♪`) rather than something said. `depth` carries an open
/// bracket across words (`(upbeat music)` is two words).
fn is_marker(word: &str, depth: &mut i32) -> bool {
    let starts_inside = *depth > 0;
    let opens = word.starts_with(['[', '(']);
    for c in word.chars() {
        match c {
            '[' | '(' => *depth += 1,
            ']' | ')' => *depth = (*depth - 1).max(0),
            _ => {}
        }
    }
    let only_symbols = word
        .chars()
        .all(|c| matches!(c, '♪' | '♫' | '♬' | '*' | '-') || c.is_whitespace());
    starts_inside || opens || only_symbols
}

/// Encoder positions per second of audio (whisper.cpp's `audio_ctx` unit):
/// a mel frame every 10 ms, halved by the encoder's strided convolution.
const AUDIO_CTX_PER_S: usize = 50;
/// Positions kept after the audio's end, so the decoder still sees the
/// silence that lets it close the last segment.
const AUDIO_CTX_TAIL: usize = 150;
/// The shortest context given (15 s). Measured on the 13 development clips
/// with tiny.en (154 words): the clip plus 1.3 s alone makes the decoder
/// repeat phrases (WER 64%), at least 10 s makes 8 word errors where the
/// full window makes 6, at least 15 s makes the same 6.
const AUDIO_CTX_MIN: usize = 750;
/// The encoder's full context: 30 s.
const AUDIO_CTX_FULL: usize = 1500;
/// Contexts are a multiple of this. ggml's tiled CPU kernels (llamafile's
/// tinyBLAS) need the inner dimension of a product to be a multiple of 16;
/// in the encoder's attention, softmax(QK) times V has the context as that
/// dimension, so at 1500 (or any other length) it fell back to ggml's
/// row-by-row dot products (`ggml_vec_dot_f16`, which `perf` put at 39 % of
/// a 2.4-minute file, the decoder's one-token steps included). Aligned, a
/// 28 s cut's encoder pass went from 0.73-0.92 s to 0.54-0.72 s (whisper-cli
/// `-ac 1488` against the full 1500, same build, three pairs of runs).
const AUDIO_CTX_ALIGN: usize = 16;
/// The longest aligned context: 29.76 s.
const AUDIO_CTX_ALIGNED_MAX: usize = AUDIO_CTX_FULL / AUDIO_CTX_ALIGN * AUDIO_CTX_ALIGN;
/// Silence the aligned context must still leave after the audio (1 s), or
/// the input keeps the full context.
const AUDIO_CTX_MIN_TAIL: usize = AUDIO_CTX_PER_S;

/// The encoder context for an input of `samples`, or `None` for whisper.cpp's
/// full 30 s window: the audio plus a tail, at least [`AUDIO_CTX_MIN`],
/// rounded up to a multiple of [`AUDIO_CTX_ALIGN`]. whisper.cpp otherwise
/// encodes a full 30 s window whatever the input's length, and on the CPU
/// that encoder pass is most of the time a short clip or a short VAD chunk
/// costs (halving the context halved the time of the development clips).
/// A chunk of up to 28 s gets the longest aligned context (29.76 s). Inputs
/// longer than that keep the full context, and so does audio without VAD
/// longer than 30 s (whisper.cpp walks it window by window, 30 s at a time,
/// and must not skip the 0.24 s an aligned window leaves out).
fn audio_ctx_for(samples: usize) -> Option<usize> {
    let audio = samples.div_ceil(SAMPLE_RATE as usize / AUDIO_CTX_PER_S);
    if audio + AUDIO_CTX_MIN_TAIL > AUDIO_CTX_ALIGNED_MAX {
        return None;
    }
    let wanted = (audio + AUDIO_CTX_TAIL).max(AUDIO_CTX_MIN);
    Some((wanted.div_ceil(AUDIO_CTX_ALIGN) * AUDIO_CTX_ALIGN).min(AUDIO_CTX_ALIGNED_MAX))
}

/// `params` with the encoder's context set by [`audio_ctx_for`].
fn fit_audio_ctx<'a, 'b>(params: &FullParams<'a, 'b>, samples: usize) -> FullParams<'a, 'b> {
    let mut params = params.clone();
    if let Some(positions) = audio_ctx_for(samples) {
        params.set_audio_ctx(positions as i32);
    }
    params
}

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
            chunk_states: 1,
            previous_text: true,
            multilingual,
            eot,
            vad: None,
            speakers: None,
            share: None,
        })
    }

    /// Skip silence and cut long audio at pauses with a Silero VAD model in
    /// whisper.cpp's ggml format.
    pub fn with_vad(mut self, path: &Path) -> Result<Self, SpeechError> {
        let err = |why, source| SpeechError::LoadVad {
            path: path.display().to_string(),
            why,
            source,
        };
        if !path.is_file() {
            return Err(err("no such file", None));
        }
        let path_str = path
            .to_str()
            .ok_or_else(|| err("the path is not UTF-8", None))?;
        let mut params = WhisperVadContextParams::new();
        params.set_n_threads(self.threads.min(4) as i32);
        params.set_use_gpu(false);
        let vad = WhisperVadContext::new(path_str, params)
            .map_err(|e| err("not a ggml Silero VAD model?", Some(e)))?;
        self.vad = Some(Mutex::new(vad));
        Ok(self)
    }

    /// Take this engine's decoding threads out of `share` while it decodes,
    /// so the encoders beside it use only the cores left.
    pub fn with_core_share(mut self, share: Arc<triage_local::CoreShare>) -> Self {
        self.share = Some(share);
        self
    }

    /// Label the speakers of mono recordings with this speaker encoder
    /// (needs a VAD model: set [`Self::with_vad`] first).
    pub fn with_speakers(mut self, path: &Path) -> Result<Self, SpeechError> {
        if self.vad.is_none() {
            return Err(SpeechError::SpeakersWithoutVad);
        }
        self.speakers = Some(Arc::new(SpeakerEncoder::load(path)?));
        Ok(self)
    }

    /// Whether silence is found by a VAD model.
    pub fn has_vad(&self) -> bool {
        self.vad.is_some()
    }

    /// Decode up to `n` of a recording's VAD chunks at once, each on its own
    /// decoding state with `threads / n` threads (at least one). whisper.cpp
    /// splits each matrix product across its threads and waits for all of
    /// them after every one; Whisper's decoder runs many small products per
    /// token, so on few cores whole chunks side by side keep the cores
    /// busier than threads inside one chunk. Only with a VAD model (without
    /// one there are no chunks); the result is the same text.
    pub fn with_parallel_chunks(mut self, n: usize) -> Self {
        self.chunk_states = n.clamp(1, self.threads);
        self
    }

    /// Whether a chunk is decoded with the recording's text before it as
    /// the decoder's prompt, as openai-whisper's `condition_on_previous_text`
    /// (on by default there and here). Chunks decoded in parallel
    /// ([`Self::with_parallel_chunks`]) never are: the text before them is
    /// not known yet.
    pub fn with_previous_text(mut self, on: bool) -> Self {
        self.previous_text = on;
        self
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

    /// The speech in `samples` as sample ranges, or the whole audio without a VAD model.
    fn speech_spans(&self, samples: &[f32]) -> Result<Vec<(usize, usize)>, SpeechError> {
        let Some(vad) = &self.vad else {
            return Ok(vec![(0, samples.len())]);
        };
        let mut params = WhisperVadParams::new();
        params.set_threshold(0.5);
        params.set_min_speech_duration(250);
        // A pause this long ends a span: where long audio may be cut.
        params.set_min_silence_duration(300);
        params.set_max_speech_duration(MAX_CHUNK_S);
        params.set_speech_pad(200);
        let mut vad = vad
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let segments = vad
            .segments_from_samples(params, samples)
            .map_err(SpeechError::Vad)?;
        let per_cs = SAMPLE_RATE as usize / 100;
        Ok(segments
            .map(|s| {
                let start = (s.start.max(0.0) as usize * per_cs).min(samples.len());
                let end = (s.end.max(0.0) as usize * per_cs).min(samples.len());
                (start, end)
            })
            .filter(|(s, e)| e > s)
            .collect())
    }

    /// Transcribe 16 kHz mono samples. Blocking: run it on a blocking thread.
    /// `progress` receives percentages as whisper.cpp works through the audio.
    pub fn transcribe(
        &self,
        samples: &[f32],
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, SpeechError> {
        self.transcribe_one(samples, opts, progress, self.speakers.is_some())
    }

    /// [`Self::transcribe`], telling speakers apart only when `diarize`.
    fn transcribe_one(
        &self,
        samples: &[f32],
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
        diarize: bool,
    ) -> Result<Transcript, SpeechError> {
        let mut run = self.start(opts, progress, Some(samples.len()), diarize);
        let result = self.window(&mut run, samples, 0, true, opts);
        self.finish(run, result.map(|_| samples.len()), opts)
    }

    /// Transcribe audio pulled block by block from `next` (16 kHz mono; it
    /// is asked for at least the given number of samples and answers `None`
    /// at the end): at most [`WINDOW_S`] of samples are held at once, so
    /// memory does not grow with the recording's length. Each window is cut
    /// at a pause (VAD), or at its quietest moment without VAD; what follows
    /// the cut is carried into the next window. `total_hint` (samples) scales
    /// progress.
    pub fn transcribe_stream<E>(
        &self,
        next: &mut dyn FnMut(usize) -> Result<Option<Vec<f32>>, E>,
        total_hint: Option<usize>,
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, StreamError<E>> {
        let window = (WINDOW_S * SAMPLE_RATE as f32) as usize;
        let mut run = self.start(opts, progress, total_hint, self.speakers.is_some());
        let mut buf: Vec<f32> = Vec::with_capacity(window);
        let mut base = 0usize;
        let mut ended = false;
        loop {
            while !ended && buf.len() < window {
                match next(window - buf.len()).map_err(StreamError::Source)? {
                    Some(block) => buf.extend_from_slice(&block),
                    None => ended = true,
                }
            }
            if buf.is_empty() {
                break;
            }
            let consumed = match self.window(&mut run, &buf, base, ended, opts) {
                Ok(n) => n,
                Err(e) => {
                    return self.finish(run, Err(e), opts).map_err(StreamError::Speech);
                }
            };
            buf.drain(..consumed.min(buf.len()));
            base += consumed;
            if ended && buf.is_empty() {
                break;
            }
        }
        self.finish(run, Ok(base), opts)
            .map_err(StreamError::Speech)
    }

    fn start<'p>(
        &self,
        opts: &'p TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
        total: Option<usize>,
        diarize: bool,
    ) -> Run<'p> {
        let mut params = self.params(opts, self.threads);
        // Progress on the recording's clock: (chunk start, chunk span) in samples.
        let position = Arc::new(Mutex::new((0usize, 0usize)));
        let progress = progress.map(|cb| Arc::new(Mutex::new(cb)));
        if let (Some(cb), Some(total)) = (progress.clone(), total) {
            let position = position.clone();
            params.set_progress_callback_safe(move |p: i32| {
                let (start, span) = position.lock().map(|g| *g).unwrap_or((0, 0));
                let done = start as f64 + span as f64 * f64::from(p.clamp(0, 100)) / 100.0;
                if let Ok(mut cb) = cb.lock() {
                    cb((100.0 * done / total.max(1) as f64).round().min(100.0) as i32);
                }
            });
        }
        Run {
            params,
            position,
            progress,
            total,
            state: None,
            state_has_text: false,
            pieces: diarize.then(Vec::new),
            segments: Vec::new(),
            p_sum: 0.0,
            p_n: 0,
            language: None,
        }
    }

    /// Decoding parameters for `opts` with `threads` threads: greedy, token
    /// times on, the cancel flag as whisper.cpp's abort callback.
    fn params<'p>(&self, opts: &'p TranscribeOptions, threads: usize) -> FullParams<'p, 'p> {
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_n_threads(threads as i32);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_special(false);
        params.set_print_timestamps(false);
        params.set_no_speech_thold(NO_SPEECH_THRESHOLD);
        // Token times are a by-product of decoding: cheap, and words need them.
        params.set_token_timestamps(true);
        let language = match (&opts.language, self.multilingual) {
            (Some(l), _) => Some(l.as_str()),
            (None, true) => Some("auto"),
            (None, false) => Some("en"),
        };
        params.set_language(language);
        if let Some(cancel) = opts.cancel.clone() {
            // whisper-rs keeps this closure for the life of the process (its
            // params have no Drop): one small box per request.
            // whisper-rs 0.16's trampoline reads its user data as the
            // closure's own type `F`, but stores a `Box<dyn FnMut>` there:
            // only with `F` = `Box<dyn FnMut() -> bool>` do the two agree
            // (any other closure is read as garbage, which aborted every
            // decode with error -6).
            let check: Box<dyn FnMut() -> bool> = Box::new(move || cancel.load(Ordering::Relaxed));
            params.set_abort_callback_safe::<_, Box<dyn FnMut() -> bool>>(check);
        }
        params
    }

    /// Transcribe the speech in `samples` (which start `base` samples into
    /// the recording) into `run`; returns how many samples were used. Unless
    /// `last`, the tail after the last pause is left for the next window.
    fn window(
        &self,
        run: &mut Run<'_>,
        samples: &[f32],
        base: usize,
        last: bool,
        opts: &TranscribeOptions,
    ) -> Result<usize, SpeechError> {
        if opts.cancelled() {
            return Err(SpeechError::Cancelled);
        }
        let tail = (WINDOW_TAIL_S * SAMPLE_RATE as f32) as usize;
        let limit = if last {
            samples.len()
        } else {
            samples.len().saturating_sub(tail)
        };
        let peak = samples.iter().fold(0f32, |m, s| m.max(s.abs()));
        if samples.is_empty() || peak < SILENCE_PEAK {
            return Ok(limit.max(usize::from(last) * samples.len()));
        }
        let (spans, consumed) = if self.vad.is_some() {
            let spans = self.speech_spans(samples)?;
            // A span running past the limit waits for the next window.
            let consumed = spans
                .iter()
                .find(|(_, end)| *end > limit)
                .map_or(limit, |(start, _)| (*start).min(limit))
                .max(if last { samples.len() } else { 0 });
            // Spans are far shorter than a window, so one always ends before
            // the limit; should none, the window still moves on.
            let consumed = if consumed == 0 {
                limit.max(1)
            } else {
                consumed
            };
            let spans: Vec<(usize, usize)> = spans
                .into_iter()
                .filter(|(_, end)| *end <= consumed)
                .collect();
            (spans, consumed)
        } else {
            let cut = if last {
                samples.len()
            } else {
                quietest(samples, limit.saturating_sub(tail), limit)
            };
            (vec![(0, cut)], cut)
        };
        if let (Some(pieces), Some(encoder)) = (&mut run.pieces, &self.speakers) {
            pieces.extend(encoder.pieces(samples, base, &spans)?);
        }
        let max = if self.vad.is_some() {
            (MAX_CHUNK_S * SAMPLE_RATE as f32) as usize
        } else {
            // Without VAD whisper.cpp walks the audio itself, window by window.
            usize::MAX
        };
        let window_end_s = (base + samples.len()) as f64 / f64::from(SAMPLE_RATE);
        let mut chunks = pack(&spans, max);
        if self.chunk_states > 1 && chunks.len() > 1 {
            for chunk in &mut chunks {
                chunk.base = base;
            }
            self.decode_parallel(run, samples, &chunks, window_end_s, opts)?;
            return Ok(consumed);
        }
        for mut chunk in chunks {
            if opts.cancelled() {
                return Err(SpeechError::Cancelled);
            }
            chunk.base = base;
            let first = chunk.pieces.first().map_or(0, |p| p.source);
            let last_end = chunk.pieces.last().map_or(0, |p| p.source + p.len);
            if let Ok(mut g) = run.position.lock() {
                *g = (base + first, last_end - first);
            }
            let input = chunk.input(samples);
            let state = match &mut run.state {
                Some(s) => s,
                None => {
                    run.state_has_text = false;
                    run.state.insert(self.take_state()?)
                }
            };
            let mut params = fit_audio_ctx(&run.params, input.len());
            // A pooled state still holds the last recording's text: only this
            // recording's own text is carried over.
            params.set_no_context(!(self.previous_text && run.state_has_text));
            let hold = self.share.as_ref().map(|s| s.hold(self.threads));
            let decoded = state.full(params, &input);
            drop(hold);
            run.state_has_text = decoded.is_ok();
            if let Err(e) = decoded {
                // A state that failed mid-way is not reused.
                run.state = None;
                return Err(if opts.cancelled() {
                    SpeechError::Cancelled
                } else {
                    SpeechError::Decode(e)
                });
            }
            if self.multilingual && run.language.is_none() {
                run.language =
                    whisper_rs::get_lang_str(state.full_lang_id_from_state()).map(str::to_owned);
            }
            let state = &*state;
            self.collect(
                state,
                &chunk,
                window_end_s,
                opts,
                Sink {
                    segments: &mut run.segments,
                    p_sum: &mut run.p_sum,
                    p_n: &mut run.p_n,
                },
            );
        }
        Ok(consumed)
    }

    /// Decode a window's chunks [`Self::with_parallel_chunks`] at a time:
    /// each worker takes its own state and the next chunk not yet taken;
    /// the results are put in chunk order, so the transcript is the one the
    /// chunks give one after another.
    fn decode_parallel(
        &self,
        run: &mut Run<'_>,
        samples: &[f32],
        chunks: &[Chunk],
        window_end_s: f64,
        opts: &TranscribeOptions,
    ) -> Result<(), SpeechError> {
        let workers = self.chunk_states.min(chunks.len());
        let threads = (self.threads / workers).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done: Vec<Mutex<Option<Decoded>>> = chunks.iter().map(|_| Mutex::new(None)).collect();
        let progress = run.progress.clone();
        let total = run.total;
        let reached = Mutex::new(0usize);
        let worker = || -> Result<(), SpeechError> {
            let params = self.params(opts, threads);
            let mut state = self.take_state()?;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = chunks.get(index) else {
                    break;
                };
                if opts.cancelled() {
                    self.put_state(state);
                    return Err(SpeechError::Cancelled);
                }
                let input = chunk.input(samples);
                let hold = self.share.as_ref().map(|s| s.hold(threads));
                let decoded = state.full(fit_audio_ctx(&params, input.len()), &input);
                drop(hold);
                if let Err(e) = decoded {
                    // A state that failed mid-way is not reused.
                    return Err(if opts.cancelled() {
                        SpeechError::Cancelled
                    } else {
                        SpeechError::Decode(e)
                    });
                }
                let mut d = Decoded::default();
                self.collect(
                    &state,
                    chunk,
                    window_end_s,
                    opts,
                    Sink {
                        segments: &mut d.segments,
                        p_sum: &mut d.p_sum,
                        p_n: &mut d.p_n,
                    },
                );
                if self.multilingual {
                    d.language = whisper_rs::get_lang_str(state.full_lang_id_from_state())
                        .map(str::to_owned);
                }
                if let Ok(mut slot) = done[index].lock() {
                    *slot = Some(d);
                }
                if let (Some(cb), Some(total), Ok(mut reached)) = (&progress, total, reached.lock())
                {
                    let end = chunk.base + chunk.pieces.last().map_or(0, |p| p.source + p.len);
                    *reached = (*reached).max(end);
                    if let Ok(mut cb) = cb.lock() {
                        cb((100.0 * *reached as f64 / total.max(1) as f64)
                            .round()
                            .min(100.0) as i32);
                    }
                }
            }
            self.put_state(state);
            Ok(())
        };
        // Scoped threads: they borrow the window's samples and end before it
        // is dropped; whisper.cpp blocks them, so they are not the async
        // runtime's or the encoders' pool's.
        let results: Vec<Result<(), SpeechError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers).map(|_| s.spawn(worker)).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        for r in results {
            r?;
        }
        for slot in done {
            let d = slot
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unwrap_or_default();
            run.segments.extend(d.segments);
            run.p_sum += d.p_sum;
            run.p_n += d.p_n;
            if run.language.is_none() {
                run.language = d.language;
            }
        }
        Ok(())
    }

    /// The transcript of a run over `used` samples, its state back in the pool.
    fn finish(
        &self,
        run: Run<'_>,
        used: Result<usize, SpeechError>,
        opts: &TranscribeOptions,
    ) -> Result<Transcript, SpeechError> {
        let Run {
            state,
            pieces,
            mut segments,
            p_sum,
            p_n,
            language,
            ..
        } = run;
        if let Some(state) = state {
            self.put_state(state);
        }
        let used = used?;
        let duration_s = used as f64 / f64::from(SAMPLE_RATE);
        let language = language
            .or_else(|| opts.language.clone())
            .unwrap_or_else(|| "en".into());
        segments.retain(|s| !s.text.is_empty());
        if let Some(pieces) = pieces {
            let labels = speaker::cluster(&pieces, speaker::SAME_SPEAKER);
            if labels.iter().any(|&l| l > 0) {
                segments = speaker::label(segments, &pieces, &labels);
            }
        }
        if !opts.word_timestamps {
            for s in &mut segments {
                s.words = None;
            }
        }
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

    /// Transcribe decoded audio: per speaker when it kept two channels that
    /// hold different sources ([`channels_apart`]), else its mono mix.
    pub fn transcribe_pcm(
        &self,
        pcm: &crate::Pcm,
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, SpeechError> {
        match &pcm.channels {
            Some(ch) if channels_apart(ch) => self.transcribe_speakers(ch, opts, progress),
            _ => self.transcribe(&pcm.samples, opts, progress),
        }
    }

    /// Transcribe a recording with one speaker per channel: each channel on
    /// its own, segments labelled `Speaker 1` (left) and `Speaker 2` (right)
    /// and merged in time order. A segment heard in both channels (one
    /// microphone picking up the other speaker) is kept only from the
    /// channel where it is louder.
    pub fn transcribe_speakers(
        &self,
        channels: &[Vec<f32>; 2],
        opts: &TranscribeOptions,
        progress: Option<Box<dyn FnMut(i32) + Send>>,
    ) -> Result<Transcript, SpeechError> {
        let progress = progress.map(|p| Arc::new(Mutex::new(p)));
        let mut parts = Vec::new();
        for (i, samples) in channels.iter().enumerate() {
            let cb: Option<Box<dyn FnMut(i32) + Send>> = progress.clone().map(|p| {
                Box::new(move |pct: i32| {
                    if let Ok(mut f) = p.lock() {
                        f((i as i32 * 100 + pct) / 2);
                    }
                }) as Box<dyn FnMut(i32) + Send>
            });
            // The channels are the speakers: no need to tell them apart.
            parts.push(self.transcribe_one(samples, opts, cb, false)?);
        }
        let rms = |samples: &[f32], start: f64, end: f64| {
            let sr = f64::from(SAMPLE_RATE);
            let a = ((start * sr) as usize).min(samples.len());
            let b = ((end * sr) as usize).clamp(a, samples.len());
            let n = (b - a).max(1) as f64;
            (samples[a..b]
                .iter()
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
                / n)
                .sqrt()
        };
        let mut segments = Vec::new();
        let (mut conf_sum, mut conf_n) = (0f64, 0usize);
        let mut language = None;
        for (i, part) in parts.into_iter().enumerate() {
            let other = &channels[1 - i];
            let own = &channels[i];
            for mut seg in part.segments {
                if rms(own, seg.start, seg.end) < rms(other, seg.start, seg.end) {
                    continue;
                }
                seg.speaker = Some(format!("Speaker {}", i + 1));
                segments.push(seg);
            }
            if !part.no_speech {
                conf_sum += f64::from(part.confidence);
                conf_n += 1;
                language.get_or_insert(part.language);
            }
        }
        segments.sort_by(|a, b| a.start.total_cmp(&b.start));
        let text = segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let duration_s = channels[0].len() as f64 / f64::from(SAMPLE_RATE);
        Ok(Transcript {
            no_speech: segments.is_empty(),
            text,
            language: language
                .or_else(|| opts.language.clone())
                .unwrap_or_else(|| "en".into()),
            duration_s,
            confidence: if conf_n == 0 {
                0.0
            } else {
                (conf_sum / conf_n as f64) as f32
            },
            segments,
        })
    }

    /// Turn the state's segments for `chunk` into transcript segments on the
    /// audio's clock, words and all, without non-speech markers.
    fn collect(
        &self,
        state: &WhisperState,
        chunk: &Chunk,
        duration_s: f64,
        opts: &TranscribeOptions,
        sink: Sink<'_>,
    ) {
        let Sink {
            segments: out,
            p_sum,
            p_n,
        } = sink;
        for i in 0..state.full_n_segments() {
            let Some(seg) = state.get_segment(i) else {
                continue;
            };
            // Words from tokens: a token that starts with a space starts a word.
            struct Building {
                bytes: Vec<u8>,
                start: i64,
                end: i64,
                probs: Vec<f32>,
                logps: Vec<f32>,
                tokens: Vec<TokenProb>,
            }
            let mut words: Vec<Building> = Vec::new();
            for t in 0..seg.n_tokens() {
                let Some(tok) = seg.get_token(t) else {
                    continue;
                };
                let data = tok.token_data();
                if data.id >= self.eot {
                    continue; // timestamps and other special tokens
                }
                let bytes = tok.to_bytes().unwrap_or_default();
                let new_word = bytes.first() == Some(&b' ') || words.is_empty();
                if new_word {
                    words.push(Building {
                        bytes: Vec::new(),
                        start: data.t0,
                        end: data.t1,
                        probs: Vec::new(),
                        logps: Vec::new(),
                        tokens: Vec::new(),
                    });
                }
                if let Some(w) = words.last_mut() {
                    w.bytes.extend_from_slice(bytes);
                    w.end = w.end.max(data.t1);
                    w.probs.push(data.p);
                    w.logps.push(data.plog);
                    if opts.token_probs {
                        w.tokens.push(TokenProb {
                            text: String::from_utf8_lossy(bytes).into_owned(),
                            p: data.p,
                        });
                    }
                }
            }
            let mut depth = 0;
            let mut kept: Vec<(Word, Vec<f32>, Vec<TokenProb>)> = Vec::new();
            for w in words {
                let text = String::from_utf8_lossy(&w.bytes).trim().to_owned();
                if text.is_empty() || is_marker(&text, &mut depth) {
                    continue;
                }
                let probability = w.probs.iter().sum::<f32>() / w.probs.len().max(1) as f32;
                let start = chunk.to_audio_s(w.start).min(duration_s);
                let end = chunk.to_audio_s(w.end).min(duration_s).max(start);
                kept.push((
                    Word {
                        word: text,
                        start,
                        end,
                        probability,
                    },
                    w.logps,
                    w.tokens,
                ));
            }
            let seg_start = chunk.to_audio_s(seg.start_timestamp()).min(duration_s);
            let seg_end = chunk
                .to_audio_s(seg.end_timestamp())
                .min(duration_s)
                .max(seg_start);
            let mut logp = Vec::new();
            let mut tokens = Vec::new();
            let mut words_out = Vec::new();
            for (mut word, logps, toks) in kept {
                for &p in &logps {
                    *p_sum += f64::from(p.exp());
                    *p_n += 1;
                }
                logp.extend(logps);
                tokens.extend(toks);
                // Token times can stray a little past the segment's own: keep
                // words inside it and in order.
                word.start = word.start.clamp(seg_start, seg_end);
                word.end = word.end.clamp(word.start, seg_end);
                if let Some(prev) = words_out.last().map(|w: &Word| w.end)
                    && word.start < prev
                {
                    word.start = prev.min(seg_end);
                    word.end = word.end.max(word.start);
                }
                words_out.push(word);
            }
            let text = words_out
                .iter()
                .map(|w| w.word.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            // A segment whisper drew across the gap between two speech
            // spans of a chunk would start (or end) in the other span: when
            // its words are more than a pause away from its edge, they say
            // where its speech really is.
            let (seg_start, seg_end) = match (words_out.first(), words_out.last()) {
                (Some(first), Some(last)) => {
                    let start = if first.start - seg_start > GAP_S {
                        first.start
                    } else {
                        seg_start
                    };
                    let end = if seg_end - last.end > GAP_S {
                        last.end
                    } else {
                        seg_end
                    };
                    (start, end.max(start))
                }
                _ => (seg_start, seg_end),
            };
            out.push(TranscriptSegment {
                start: seg_start,
                end: seg_end,
                text,
                avg_logprob: if logp.is_empty() {
                    0.0
                } else {
                    logp.iter().sum::<f32>() / logp.len() as f32
                },
                no_speech_prob: seg.no_speech_probability(),
                tokens: opts.token_probs.then_some(tokens),
                // Speaker labels need the words' times even when they are
                // not asked for; `finish` drops them then.
                words: (opts.word_timestamps || self.speakers.is_some()).then_some(words_out),
                speaker: None,
            });
        }
    }
}

/// Whether a stereo recording holds two different sources (one speaker per
/// channel) rather than one source in both channels: the channels'
/// correlation is low. A centred voice correlates near 1 across channels.
pub fn channels_apart(channels: &[Vec<f32>; 2]) -> bool {
    let [l, r] = channels;
    let (mut lr, mut ll, mut rr) = (0f64, 0f64, 0f64);
    for (a, b) in l.iter().zip(r) {
        let (a, b) = (f64::from(*a), f64::from(*b));
        lr += a * b;
        ll += a * a;
        rr += b * b;
    }
    if ll < 1e-6 || rr < 1e-6 {
        // One silent channel: one speaker, nothing to separate.
        return false;
    }
    (lr / (ll.sqrt() * rr.sqrt())).abs() < 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stereo_with_a_different_source_per_channel_is_apart() {
        let tone = |f: f32| -> Vec<f32> {
            (0..16_000)
                .map(|i| (i as f32 * f * std::f32::consts::TAU / 16_000.0).sin())
                .collect()
        };
        assert!(channels_apart(&[tone(220.0), tone(330.0)]));
        let same = tone(220.0);
        let quieter: Vec<f32> = same.iter().map(|x| x * 0.3).collect();
        assert!(!channels_apart(&[same, quieter]));
        assert!(!channels_apart(&[tone(220.0), vec![0.0; 16_000]]));
    }

    #[test]
    fn encoder_contexts_are_aligned_and_leave_a_tail() {
        let s = |secs: f32| (secs * SAMPLE_RATE as f32) as usize;
        let positions = |secs: f32| (secs * AUDIO_CTX_PER_S as f32) as usize;
        // Short inputs: at least 15 s of context.
        assert_eq!(audio_ctx_for(s(2.0)), Some(752));
        // 20 s of audio plus its 3 s tail, rounded up to a multiple of 16.
        assert_eq!(audio_ctx_for(s(20.0)), Some(1152));
        // The longest chunk VAD makes fits the longest aligned context with
        // more than a second to spare.
        let chunk = audio_ctx_for(s(MAX_CHUNK_S)).unwrap();
        assert_eq!(chunk, 1488);
        assert!(chunk - positions(MAX_CHUNK_S) >= AUDIO_CTX_MIN_TAIL);
        for secs in [0.1, 1.0, 7.3, 14.9, 15.1, 25.0, 27.9] {
            let ctx = audio_ctx_for(s(secs)).unwrap();
            assert_eq!(ctx % AUDIO_CTX_ALIGN, 0, "{secs} s");
            assert!(ctx <= AUDIO_CTX_FULL);
            assert!(ctx >= positions(secs) + AUDIO_CTX_MIN_TAIL, "{secs} s");
        }
        // Without a second of tail inside 29.76 s, and for audio whisper.cpp
        // walks window by window: the full window.
        assert_eq!(audio_ctx_for(s(29.0)), None);
        assert_eq!(audio_ctx_for(s(600.0)), None);
    }

    #[test]
    fn markers_are_not_words() {
        let mut depth = 0;
        let words = ["[BLANK_AUDIO]", "Hello", "(upbeat", "music)", "there.", "♪"];
        let kept: Vec<&str> = words
            .into_iter()
            .filter(|w| !is_marker(w, &mut depth))
            .collect();
        assert_eq!(kept, ["Hello", "there."]);
    }

    #[test]
    fn spans_pack_into_chunks_within_the_limit_and_map_back() {
        let sr = SAMPLE_RATE as usize;
        // Three 10 s spans with pauses, and one 70 s span.
        let spans = [
            (0, 10 * sr),
            (12 * sr, 22 * sr),
            (40 * sr, 50 * sr),
            (60 * sr, 130 * sr),
        ];
        let max = 28 * sr;
        let chunks = pack(&spans, max);
        assert!(chunks.iter().all(|c| c.len() <= max), "{chunks:?}");
        // Every speech sample is in exactly one chunk.
        let covered: usize = chunks.iter().flat_map(|c| &c.pieces).map(|p| p.len).sum();
        assert_eq!(covered, 10 * sr * 3 + 70 * sr);
        // The first chunk holds the first two spans joined by a short gap.
        assert_eq!(chunks[0].pieces.len(), 2);
        assert_eq!(chunks[0].pieces[1].at, 10 * sr + GAP_SAMPLES);
        // 1 s into the second piece is 13 s into the audio.
        let cs = ((10 * sr + GAP_SAMPLES + sr) / (sr / 100)) as i64;
        assert!((chunks[0].to_audio_s(cs) - 13.0).abs() < 0.011);
        // A time in the gap maps to the end of the piece before it.
        let gap_cs = ((10 * sr + GAP_SAMPLES / 2) / (sr / 100)) as i64;
        assert!((chunks[0].to_audio_s(gap_cs) - 10.0).abs() < 0.011);
        // The copied samples put each piece where the mapping says.
        let audio: Vec<f32> = (0..130 * sr).map(|i| i as f32).collect();
        let data = chunks[0].samples(&audio);
        assert_eq!(data[10 * sr + GAP_SAMPLES], (12 * sr) as f32);
        assert_eq!(data[10 * sr + 1], 0.0);
    }

    #[test]
    fn one_span_is_one_borrowed_chunk_without_a_limit() {
        let chunks = pack(&[(0, 1000)], usize::MAX);
        assert_eq!(chunks.len(), 1);
        let audio = vec![0.5f32; 1000];
        assert!(matches!(
            chunks[0].samples(&audio),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
