//! The strategies engine: one TOML config declares local specialists, hosted
//! providers, prices and named tasks; [`Engine::execute`] runs a task's
//! cascade, router or pipeline and returns the answer with a trace of every
//! tier and its cost. The ledger keeps one row per attempt.

// `EngineError` carries the local specialist's error by value: an error is
// built at most once per request, so its size costs nothing measurable.
#![allow(clippy::result_large_err)]

pub mod background;
pub mod budget;
pub mod config;
pub mod default_config;
pub mod engine;
pub mod error;
pub mod ledger;
pub mod redact;
pub mod specialists;
#[cfg(feature = "speech")]
pub mod speech;
pub mod strategy;

pub use config::{Config, ConfigError};
pub use engine::{Engine, Execution, Failure, Input, Overrides};
pub use error::{EngineError, LoadError};
pub use ledger::{GroupBy, Ledger};
#[cfg(feature = "speech")]
pub use speech::Transcriber;
pub use triage_core::{ErrorClass, TaskAnswer};
