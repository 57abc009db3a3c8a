//! Speech-to-text on whisper.cpp (whisper-rs): audio decoding and
//! resampling (symphonia, rubato), voice activity detection, word timings,
//! speaker labels, and transcript formats. Devices and thread budgets come
//! from `triage-local`, so Whisper and the encoders share one machine's cores.

pub mod audio;
pub mod engine;
pub mod format;
pub mod speaker;

pub use audio::{AudioError, AudioStream, DecodeOptions, Pcm, decode, decode_file, probe_file};
pub use engine::{SpeechError, StreamError, TranscribeOptions, WhisperEngine, channels_apart};
pub use speaker::SpeakerEncoder;
