use std::path::PathBuf;

/// Everything that can go wrong while resolving, loading or running a local model.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("model reference `{reference}` is not valid: {why}")]
    BadReference { reference: String, why: String },

    #[error(
        "model `{reference}` is not available offline: it is neither a local folder nor in the \
         Hugging Face cache ({cache}). Fix: run `triage models pull {reference}` on a machine with \
         network access, or unset HF_HUB_OFFLINE, or pass a local folder"
    )]
    NotCachedOffline { reference: String, cache: PathBuf },

    #[error(
        "could not download model `{reference}` from the Hugging Face hub. Fix: check the name and \
         revision, your network and HF_TOKEN, or pass a local folder"
    )]
    Hub {
        reference: String,
        #[source]
        source: hf_hub::HFError,
    },

    #[error("model folder {dir} has no {what}")]
    MissingFile { dir: PathBuf, what: String },

    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a valid model config: {why}")]
    BadConfig { path: PathBuf, why: String },

    #[error(
        "cannot load weights from {path} (corrupt, truncated or not a BERT/DistilBERT checkpoint)"
    )]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    #[error("cannot load tokenizer {path}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },

    #[error("tokenization failed")]
    Tokenize(#[source] tokenizers::Error),

    #[error("device `{0}` is not valid: use cpu, cuda, cuda:N or metal")]
    BadDevice(String),

    #[error("device `{device}` needs triage built with the `{feature}` cargo feature")]
    DeviceNotCompiled {
        device: String,
        feature: &'static str,
    },

    #[error(
        "device `{device}`: no NVIDIA driver found (libcuda.so.1 could not be loaded). Fix: on a \
         machine with an NVIDIA GPU, install the NVIDIA driver for CUDA 13.4 or newer (or add \
         the folder that holds libcuda.so.1 to LD_LIBRARY_PATH); or run with --device cpu"
    )]
    CudaDriverMissing { device: String },

    #[error(
        "device `{device}`: the NVIDIA driver supports CUDA {found}, but this build's GPU code \
         needs CUDA {needed} or newer. Fix: upgrade the driver (`nvidia-smi` shows the CUDA \
         version it supports), or run with --device cpu"
    )]
    CudaDriverTooOld {
        device: String,
        found: String,
        needed: String,
    },

    #[cfg(feature = "cuda")]
    #[error(
        "device `{device}`: the NVIDIA driver is installed but CUDA cannot start (no GPU visible \
         to this process, or the driver and kernel module disagree). Fix: check `nvidia-smi` and \
         CUDA_VISIBLE_DEVICES, or run with --device cpu"
    )]
    CudaDriver {
        device: String,
        #[source]
        source: cudarc::driver::DriverError,
    },

    #[error(
        "device `{device}` does not exist: this machine has {count} CUDA GPU(s), numbered from 0. \
         Fix: pick one that `nvidia-smi -L` lists, or run with --device cpu"
    )]
    CudaNoSuchDevice { device: String, count: usize },

    #[error(
        "device `{device}` cannot be opened: the GPU may be busy, in exclusive mode or out of \
         memory. Fix: check `nvidia-smi`, or run with --device cpu"
    )]
    CudaUnavailable {
        device: String,
        #[source]
        source: candle_core::Error,
    },

    #[error("model `{model}` does {actual}, not {wanted}")]
    WrongTask {
        model: String,
        actual: triage_core::LocalTask,
        wanted: triage_core::LocalTask,
    },

    #[error("model computation failed")]
    Compute(#[source] candle_core::Error),

    #[error("model `{model}`: {what}")]
    Unsupported { model: String, what: String },

    #[error("model `{model}` is overloaded: its queue of {capacity} requests is full; retry later")]
    Overloaded { model: String, capacity: usize },

    #[error("model `{model}` worker has stopped")]
    WorkerGone { model: String },

    #[error(
        "the input is {tokens} tokens, over the limit of {limit} for model `{model}`; \
         raise `max_input_tokens` for this specialist to accept it"
    )]
    InputTooLong {
        model: String,
        tokens: usize,
        limit: usize,
    },

    #[error("model `{model}` panicked while computing this batch; the worker carries on")]
    Panicked { model: String },
}

impl LocalError {
    /// True when the caller may retry the same request later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Overloaded { .. })
    }
}

pub type Result<T, E = LocalError> = std::result::Result<T, E>;
