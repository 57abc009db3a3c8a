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
