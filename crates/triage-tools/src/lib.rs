//! Converters and offline tools: code the `triage` CLI runs once, ahead of
//! serving, not runtime code. The runtime crates (`triage-local`,
//! `triage-engine`) hold inference and training only, so a reader who opens
//! them to understand inference reads inference.
//!
//! - [`whisper_import`]: CTranslate2 (faster-whisper) Whisper checkpoints to
//!   whisper.cpp's ggml file, with a Hugging Face `config.json`, tokenizer
//!   and, on request, `model.safetensors`.
//! - [`whisper_quantize`]: a ggml Whisper model to `q8_0` or `q5_1`.

pub mod whisper_import;
pub mod whisper_quantize;
