//! Local specialists on candle: BERT and DistilBERT encoders (from
//! candle-transformers) with sequence- and token-classification heads and
//! mean pooling, loaded from Hugging Face folders or the hub, each owned by a
//! worker thread with a batching queue.

pub mod aggregation;
pub mod device;
pub mod error;
pub mod metrics;
pub mod model;
pub mod resolve;
pub mod tokenize;
pub mod train;
pub mod weights;
pub mod worker;

pub use device::DeviceSpec;
pub use error::{LocalError, Result};
pub use model::{Activation, LocalModel, ModelInfo};
pub use resolve::{HubSettings, ModelRef, resolve, resolve_with};
pub use worker::{BatchConfig, ModelHandle};

/// Resolve `reference`, load it on `device` and start its worker.
pub async fn start_model(
    reference: &str,
    device: &candle_core::Device,
    batching: BatchConfig,
) -> Result<ModelHandle> {
    let model_ref = ModelRef::parse(reference)?;
    let dir = resolve(&model_ref).await?;
    let device = device.clone();
    let name = reference.to_owned();
    let model = tokio::task::spawn_blocking(move || LocalModel::load(&dir, &name, &device))
        .await
        .map_err(|e| {
            LocalError::Compute(candle_core::Error::Msg(format!("loader panicked: {e}")))
        })??;
    ModelHandle::spawn(model, batching)
}
