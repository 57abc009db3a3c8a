//! The engine's one error type. Each variant says what a caller can do about
//! it; the server maps them to HTTP statuses.

use std::time::Duration;
use triage_cloud::gateway::AllFailed;
use triage_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown task `{name}`; configured tasks: {known}")]
    UnknownTask { name: String, known: String },
    #[error("task `{task}` takes {expected} input, not {got}")]
    WrongInput {
        task: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("unknown local specialist `{0}`")]
    UnknownSpecialist(String),
    #[error("cannot load local specialist `{name}` ({model})")]
    LoadSpecialist {
        name: String,
        model: String,
        #[source]
        source: LoadError,
    },
    #[error("local specialist `{name}` failed")]
    Local {
        name: String,
        #[source]
        source: triage_local::LocalError,
    },
    #[error("the audio could not be read")]
    Audio(#[from] triage_local::speech::AudioError),
    #[error("transcription failed")]
    Speech(#[from] triage_local::speech::SpeechError),
    #[error("every hosted model for tier `{tier}` failed")]
    Cloud {
        tier: String,
        #[source]
        source: AllFailed,
    },
    #[error("tier `{tier}` timed out after {ms} ms")]
    Timeout { tier: String, ms: u64 },
    #[error("tier `{tier}` answered something unusable: {why}")]
    BadAnswer { tier: String, why: String },
    #[error("retrieval query failed")]
    Retrieval(#[source] sqlx::Error),
    #[error("route `{route}` cannot answer: {why}")]
    Route { route: String, why: String },
    #[error("invalid override: {0}")]
    Override(String),
    #[error("ledger")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// A blocking task (model load, decoding, transcription) panicked or was cancelled.
    #[error("{what} stopped before it finished")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Why a specialist could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Local(#[from] triage_local::LocalError),
    #[error(transparent)]
    Speech(#[from] triage_local::speech::SpeechError),
    #[error("the loading thread stopped")]
    Join(#[from] tokio::task::JoinError),
}

impl EngineError {
    /// Whether the caller's input (not the engine or a provider) is at fault.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::UnknownTask { .. }
                | EngineError::WrongInput { .. }
                | EngineError::Audio(_)
                | EngineError::Override(_)
        ) || matches!(self, EngineError::Local { source, .. } if matches!(source, triage_local::LocalError::Tokenize(_) | triage_local::LocalError::InputTooLong { .. }))
    }

    /// Whether the engine is overloaded (answer 429/503 with Retry-After).
    pub fn is_overloaded(&self) -> bool {
        matches!(
            self,
            EngineError::Local {
                source: triage_local::LocalError::Overloaded { .. },
                ..
            }
        )
    }
}

impl EngineError {
    /// What a caller can do about this error; the server turns it into one
    /// HTTP status and OpenAI error code.
    pub fn class(&self) -> ErrorClass {
        use triage_cloud::ErrorKind as K;
        match self {
            EngineError::UnknownTask { .. } => ErrorClass::NotFound,
            EngineError::Local {
                source: triage_local::LocalError::InputTooLong { .. },
                ..
            } => ErrorClass::TooLarge,
            _ if self.is_overloaded() => ErrorClass::Overloaded {
                retry_after: Duration::from_secs(1),
            },
            _ if self.is_client_error() => ErrorClass::BadInput,
            EngineError::Timeout { .. } => ErrorClass::Timeout,
            EngineError::Cloud { source, .. } => {
                let last = source.last();
                match last.map(|l| l.kind) {
                    Some(
                        K::RateLimited
                        | K::LocalRateLimit
                        | K::CircuitOpen
                        | K::Overloaded
                        | K::Unavailable,
                    ) => ErrorClass::Unavailable {
                        retry_after: last
                            .and_then(|l| l.retry_after)
                            .map_or(Duration::from_secs(5), |d| d.max(Duration::from_secs(1))),
                    },
                    Some(K::Timeout | K::GatewayTimeout | K::Deadline) => ErrorClass::Timeout,
                    Some(K::MissingKey) => ErrorClass::NotConfigured,
                    _ => ErrorClass::BadGateway,
                }
            }
            EngineError::BadAnswer { .. } => ErrorClass::BadGateway,
            _ => ErrorClass::Internal,
        }
    }
}

/// The error and its causes on one line (`a: b: c`), for logs, traces and
/// API error messages.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}
