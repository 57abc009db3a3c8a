//! The crate's integration tests, one module per area, built as one test
//! binary: each test binary links the whole model stack, so one binary
//! instead of one per file saves link time and gigabytes of disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod budgets;
mod config_check;
mod fuzz;
mod ledger_postgres;
mod llama_server;
mod long_input;
mod meeting_notes;
mod moderation_cascade;
mod router_intents;
mod secrets_in_logs;
mod support_router;
