//! Local specialists on candle: BERT and DistilBERT encoders (from
//! candle-transformers) with sequence- and token-classification heads and
//! mean pooling, int8 kernels, device choice and thread budgets, loaded from
//! Hugging Face folders or the hub, each owned by a worker thread with a
//! batching queue. Speech lives in `triage-speech`, training and metrics in
//! `triage-train`; both build on this crate.

pub mod aggregation;
pub mod cache;
pub mod delta;
pub mod device;
mod encoder;
pub mod error;
mod matmul;
pub mod model;
mod qmatmul;
pub mod resolve;
pub mod threads;
pub mod tokenize;
pub mod weights;
pub mod worker;

pub use cache::CacheStats;
pub use device::{DeviceSpec, encoder_dtype};
pub use error::{LocalError, Result};
pub use model::{Activation, LocalModel, ModelInfo};
pub use resolve::{HubSettings, ModelRef, resolve, resolve_with};
pub use threads::{CoreShare, ThreadBudget};
pub use worker::{BatchConfig, DEFAULT_MAX_INPUT_TOKENS, ModelHandle, Timing};

/// Resolve `reference` (and the base of a delta folder) and load it on `device`.
pub async fn load_model(reference: &str, device: &candle_core::Device) -> Result<LocalModel> {
    let model_ref = ModelRef::parse(reference)?;
    let dir = resolve(&model_ref).await?;
    let base = match delta::DeltaManifest::read(&dir)?.and_then(|m| m.base) {
        Some(base) => Some(resolve(&ModelRef::parse(&base)?).await?),
        None => None,
    };
    let device = device.clone();
    let name = reference.to_owned();
    tokio::task::spawn_blocking(move || {
        LocalModel::load_with_base(&dir, base.as_deref(), &name, &device)
    })
    .await
    .map_err(|e| LocalError::Compute(candle_core::Error::Msg(format!("loader panicked: {e}"))))?
}

/// Whether `reference` runs in int8 unless told otherwise: the shipped
/// specialists (`toxicity`, `ner`) on the CPU, whose validation scores moved
/// by less than 0.5 point in int8 (docs/specialists.md). Any other model
/// stays in f32 until its owner has measured what int8 costs it. The server
/// config and the CLI both decide by this.
pub fn int8_by_default(reference: &str, cpu: bool) -> bool {
    cpu && matches!(reference, "toxicity" | "ner")
}

/// Threads in the encoders' compute pool (`RAYON_NUM_THREADS`, set from
/// the [`ThreadBudget`]).
pub fn compute_threads() -> usize {
    rayon::current_num_threads()
}

/// The labels of the model `reference` names, read from its config without
/// loading its weights.
pub async fn model_labels(reference: &str) -> Result<Vec<String>> {
    let dir = resolve(&ModelRef::parse(reference)?).await?;
    model::read_labels(&dir)
}

/// Resolve `reference`, load it on `device` and start its worker.
pub async fn start_model(
    reference: &str,
    device: &candle_core::Device,
    batching: BatchConfig,
) -> Result<ModelHandle> {
    start_model_shared(reference, device, batching, None).await
}

/// [`start_model`], its CPU passes sized by `share` (cores whisper.cpp is
/// not using), not by the whole compute pool.
pub async fn start_model_shared(
    reference: &str,
    device: &candle_core::Device,
    batching: BatchConfig,
    share: Option<std::sync::Arc<CoreShare>>,
) -> Result<ModelHandle> {
    let mut model = load_model(reference, device).await?;
    if let Some(share) = share {
        model.set_core_share(share);
    }
    ModelHandle::spawn(model, batching)
}
