//! Hosted models behind one call shape: OpenAI, Anthropic, Google Gemini, any
//! OpenAI-compatible server and Perspective, each in its own file under
//! [`providers`]; one retry/fallback policy, per-provider circuit breakers and
//! client-side rate limits in [`gateway`]; dollars from [`prices`].

pub mod breaker;
pub mod error;
pub mod gateway;
pub mod prices;
pub mod provider;
pub mod providers;
pub mod ratelimit;
pub mod retry;
pub mod secret;
pub mod spend;

pub use breaker::BreakerConfig;
pub use error::{ErrorKind, ProviderError};
pub use gateway::{
    AllFailed, Attempt, AttemptOutcome, AttemptSink, CallContext, Gateway, Outcome,
    ProviderSettings, Target,
};
pub use prices::{Price, PriceError, PriceTable};
pub use provider::{ChunkStream, Provider, ProviderConfig, ProviderKind};
pub use ratelimit::RateLimits;
pub use retry::RetryPolicy;
pub use secret::SecretString;
pub use spend::{Charge, SpendGate, SpendHold};
