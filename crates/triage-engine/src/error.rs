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
    #[cfg(feature = "speech")]
    #[error("the audio could not be read")]
    Audio(#[from] triage_speech::AudioError),
    #[cfg(feature = "speech")]
    #[error("transcription failed")]
    Speech(#[from] triage_speech::SpeechError),
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
    /// `database` is the configured URL without its password (for SQLite,
    /// the file's path); `fix` says what to do.
    #[error("cannot open the retrieval database {database}: {fix}")]
    RetrievalDatabase {
        database: String,
        fix: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("route `{route}` cannot answer: {why}")]
    Route { route: String, why: String },
    #[error("invalid override: {0}")]
    Override(String),
    #[error("ledger")]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("tier `{tier}` was not called")]
    Budget {
        tier: String,
        #[source]
        source: crate::budget::BudgetError,
    },
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
    #[cfg(feature = "speech")]
    #[error(transparent)]
    Speech(#[from] triage_speech::SpeechError),
    /// A Whisper specialist in a build without the `speech` feature.
    #[error(
        "this triage was built without speech (the `speech` cargo feature); build it with default features to load Whisper"
    )]
    NoSpeech,
    #[error("the loading thread stopped")]
    Join(#[from] tokio::task::JoinError),
}

impl EngineError {
    /// The retrieval database at `url` could not be opened: name it and
    /// say how to make it exist (a missing SQLite file is the usual cause,
    /// and sqlx's own message does not name the file).
    pub(crate) fn retrieval_database(url: &str, source: sqlx::Error) -> Self {
        let (database, fix) = match url.strip_prefix("sqlite://") {
            Some(rest) => {
                let path = rest.split('?').next().unwrap_or(rest);
                let fix = if std::path::Path::new(path).exists() {
                    "check that it is an SQLite file this user may read"
                } else {
                    "no such file; create it (for the shipped examples/support-router.toml, \
                     run scripts/make-example-db) or point the task's [retrieve] database at it"
                };
                (path.to_owned(), fix)
            }
            None => (
                without_password(url),
                "check that the server is running and the task's [retrieve] database URL",
            ),
        };
        EngineError::RetrievalDatabase {
            database,
            fix,
            source,
        }
    }

    /// Whether the caller's input (not the engine or a provider) is at fault.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::UnknownTask { .. }
                | EngineError::WrongInput { .. }
                | EngineError::Override(_)
        ) || self.is_bad_audio()
            || matches!(self, EngineError::Local { source, .. } if matches!(source, triage_local::LocalError::Tokenize(_) | triage_local::LocalError::InputTooLong { .. }))
    }

    /// Whether the caller's audio could not be decoded.
    pub fn is_bad_audio(&self) -> bool {
        #[cfg(feature = "speech")]
        return matches!(self, EngineError::Audio(_));
        #[cfg(not(feature = "speech"))]
        false
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
            EngineError::Budget {
                source: crate::budget::BudgetError::Exceeded(_),
                ..
            } => ErrorClass::BudgetExceeded,
            // The shared budget store is unreachable: nothing was sent.
            EngineError::Budget {
                source: crate::budget::BudgetError::Store(_),
                ..
            } => ErrorClass::Saturated {
                retry_after: Duration::from_secs(1),
            },
            EngineError::Ledger(crate::ledger::LedgerError::Full { retry_after, .. }) => {
                ErrorClass::Saturated {
                    retry_after: *retry_after,
                }
            }
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

/// `scheme://user:secret@host/db` as `scheme://user@host/db`: error
/// messages reach logs and API answers.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_sqlite_database_is_named_with_the_fix() {
        let e = EngineError::retrieval_database(
            "sqlite:///nonexistent/examples/orders.db?mode=ro",
            sqlx::Error::PoolClosed,
        );
        let msg = e.to_string();
        assert!(
            msg.contains("/nonexistent/examples/orders.db: no such file")
                && msg.contains("scripts/make-example-db"),
            "{msg}"
        );
        assert!(std::error::Error::source(&e).is_some(), "sqlx's error kept");
    }

    #[test]
    fn a_server_url_is_named_without_its_password() {
        let e = EngineError::retrieval_database(
            "postgres://shop:hunter2@db.internal:5432/orders",
            sqlx::Error::PoolClosed,
        );
        let msg = e.to_string();
        assert!(
            msg.contains("postgres://shop@db.internal:5432/orders") && !msg.contains("hunter2"),
            "{msg}"
        );
        assert_eq!(without_password("sqlite://a.db"), "sqlite://a.db");
    }
}
