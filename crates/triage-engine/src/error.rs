//! The engine's one error type. Each variant says what a caller can do about
//! it; the server maps them to HTTP statuses.

use triage_cloud::gateway::AllFailed;

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
    #[error("cannot load local specialist `{name}` ({model}): {why}")]
    LoadSpecialist {
        name: String,
        model: String,
        why: String,
    },
    #[error("local specialist `{name}` failed: {source}")]
    Local {
        name: String,
        #[source]
        source: triage_local::LocalError,
    },
    #[error("the audio could not be read: {0}")]
    Audio(#[from] triage_local::speech::AudioError),
    #[error("transcription failed: {0}")]
    Speech(#[from] triage_local::speech::SpeechError),
    #[error("every hosted model for tier `{tier}` failed: {source}")]
    Cloud {
        tier: String,
        #[source]
        source: AllFailed,
    },
    #[error("tier `{tier}` timed out after {ms} ms")]
    Timeout { tier: String, ms: u64 },
    #[error("tier `{tier}` answered something unusable: {why}")]
    BadAnswer { tier: String, why: String },
    #[error("retrieval query failed: {0}")]
    Retrieval(#[source] sqlx::Error),
    #[error("route `{route}` cannot answer: {why}")]
    Route { route: String, why: String },
    #[error("invalid override: {0}")]
    Override(String),
    #[error("ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("internal error: {0}")]
    Internal(String),
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
        ) || matches!(self, EngineError::Local { source, .. } if matches!(source, triage_local::LocalError::Tokenize(_)))
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
