//! The crate's integration tests, built as one test binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod train;
