//! Training and evaluating triage's local specialists on candle: fine-tuning
//! an encoder with a classification head (`triage train`), temperature
//! calibration, and the metrics `triage eval` reports (macro-F1, entity F1,
//! calibration error, selective accuracy). The runtime never links it: a
//! server runs what this crate wrote as an ordinary model folder.

pub mod calibrate;
pub mod data;
pub mod fine_tune;
pub mod metrics;
pub mod net;

pub use fine_tune::{
    EpochReport, Progress, Silent, TrainConfig, TrainError, TrainReport, hf_name, train,
};
