//! Hosted models behind one call shape: OpenAI, Anthropic, Google Gemini, any
//! OpenAI-compatible server and Perspective, each in its own file under
//! [`providers`]; one retry/fallback policy, per-provider circuit breakers and
//! client-side rate limits in [`gateway`]; dollars from [`prices`].

pub mod error;
pub mod provider;
pub mod providers;
pub mod secret;

pub use error::{ErrorKind, ProviderError};
pub use provider::{ChunkStream, Provider, ProviderConfig, ProviderKind};
pub use secret::SecretString;
