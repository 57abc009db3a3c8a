//! The crate's integration tests, built as one test binary: Whisper with the
//! real tiny.en weights, audio formats, broken input, VAD, speakers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod speech;
