//! Speech-to-text: audio decoding and resampling, the Whisper engine, and
//! transcript formats.

pub mod audio;
pub mod engine;
pub mod format;

pub use audio::{AudioError, Pcm, decode};
pub use engine::{SpeechError, TranscribeOptions, WhisperEngine};
