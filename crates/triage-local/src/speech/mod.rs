//! Speech-to-text: audio decoding and resampling, the Whisper engine, and
//! transcript formats.

pub mod audio;
pub mod engine;
pub mod format;
pub mod speaker;

pub use audio::{AudioError, AudioStream, DecodeOptions, Pcm, decode, decode_file, probe_file};
pub use engine::{SpeechError, StreamError, TranscribeOptions, WhisperEngine, channels_apart};
pub use speaker::SpeakerEncoder;
