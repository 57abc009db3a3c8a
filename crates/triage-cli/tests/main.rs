//! The crate's integration tests, one module per area, built as one test
//! binary: each test binary links the whole model stack, so one binary
//! instead of one per file saves link time and gigabytes of disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod budgets;
mod cli;
mod edge;
mod eval;
mod examples;
mod ledger_crash;
mod serve;
mod system_deps;
mod train_signal;
