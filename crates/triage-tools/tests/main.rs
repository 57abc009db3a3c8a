//! The crate's integration tests, one module per tool, built as one test
//! binary (the workspace's convention: each test binary links its whole
//! dependency tree, so one binary instead of one per file).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod whisper_import;
mod whisper_quantize;
