//! One error type for every route, answered in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`). [`ApiError::status`]
//! and [`ApiError::kind`] are the one place that maps an error to an HTTP
//! status and an OpenAI error code; engine errors arrive with their
//! [`ErrorClass`] and keep their cause. Internal errors are logged in full
//! and answered opaquely.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use triage_engine::{EngineError, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
        code: &'static str,
    },
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("this key may not use {0}")]
    Forbidden(String),
    #[error("the model `{0}` does not exist or is not served here")]
    UnknownModel(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error(
        "the audio upload is over the limit of {limit} bytes (`--max-upload-bytes`, or `server.max_upload_bytes` in the config)"
    )]
    UploadTooLarge { limit: u64 },
    #[error("unsupported media: {0}")]
    UnsupportedMedia(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the server is overloaded; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    #[error("{0} is not ready")]
    NotReady(String),
    /// The request body stopped arriving (`server.body_idle_timeout_s`).
    #[error("the request body sent nothing for {seconds} s (server.body_idle_timeout_s)")]
    BodyIdle { seconds: f64 },
    /// The request was not answered within `server.request_timeout_s`.
    #[error("the request was not answered within {seconds} s (server.request_timeout_s)")]
    Deadline { seconds: f64 },
    /// A request the engine could not answer; its class decides the status.
    #[error("{message}")]
    Engine {
        class: ErrorClass,
        /// The error and its causes on one line.
        message: String,
        #[source]
        source: Box<EngineError>,
    },
    /// A blocking task of the server's own stopped (a panic).
    #[error("internal error")]
    Task(#[source] tokio::task::JoinError),
    #[error("internal error")]
    Internal(&'static str),
}

impl From<EngineError> for ApiError {
    fn from(source: EngineError) -> Self {
        Self::Engine {
            class: source.class(),
            message: triage_engine::error::chain(&source),
            source: Box::new(source),
        }
    }
}

impl ApiError {
    /// Transcription asked of a build without the `speech` feature.
    #[cfg(not(feature = "speech"))]
    pub(crate) fn no_speech() -> Self {
        Self::NotReady("transcription (this triage was built without the `speech` feature)".into())
    }

    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
            code: "invalid_request",
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnknownModel(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge { .. } | Self::UploadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyIdle { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Engine { class, .. } => match class {
                ErrorClass::NotFound => StatusCode::NOT_FOUND,
                ErrorClass::BadInput => StatusCode::BAD_REQUEST,
                ErrorClass::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                ErrorClass::Overloaded { .. } | ErrorClass::BudgetExceeded => {
                    StatusCode::TOO_MANY_REQUESTS
                }
                ErrorClass::Unavailable { .. }
                | ErrorClass::NotConfigured
                | ErrorClass::Saturated { .. } => StatusCode::SERVICE_UNAVAILABLE,
                ErrorClass::BadGateway => StatusCode::BAD_GATEWAY,
                ErrorClass::Timeout => StatusCode::GATEWAY_TIMEOUT,
                ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Task(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type` and `code`.
    pub fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest { code, .. } => ("invalid_request_error", code),
            Self::Unauthorized => ("invalid_request_error", "invalid_api_key"),
            Self::Forbidden(_) => ("invalid_request_error", "forbidden"),
            Self::UnknownModel(_) => ("invalid_request_error", "model_not_found"),
            Self::NotFound(_) => ("invalid_request_error", "not_found"),
            Self::TooLarge { .. } | Self::UploadTooLarge { .. } => {
                ("invalid_request_error", "request_too_large")
            }
            Self::UnsupportedMedia(_) => ("invalid_request_error", "unsupported_media"),
            Self::Unprocessable(_) => ("invalid_request_error", "unprocessable"),
            Self::Conflict(_) => ("invalid_request_error", "conflict"),
            Self::Overloaded { .. } => ("rate_limit_error", "overloaded"),
            Self::NotReady(_) => ("server_error", "not_ready"),
            Self::BodyIdle { .. } => ("invalid_request_error", "body_timeout"),
            Self::Deadline { .. } => ("server_error", "timeout"),
            Self::Engine { class, .. } => match class {
                ErrorClass::NotFound => ("invalid_request_error", "not_found"),
                ErrorClass::BadInput => ("invalid_request_error", "invalid_request"),
                ErrorClass::TooLarge => ("invalid_request_error", "request_too_large"),
                ErrorClass::Overloaded { .. } => ("rate_limit_error", "overloaded"),
                ErrorClass::BudgetExceeded => ("insufficient_quota", "budget_exceeded"),
                ErrorClass::Unavailable { .. } => ("server_error", "provider_unavailable"),
                ErrorClass::NotConfigured => ("server_error", "provider_not_configured"),
                ErrorClass::Saturated { .. } => ("server_error", "ledger_backlog"),
                ErrorClass::BadGateway => ("server_error", "provider_error"),
                ErrorClass::Timeout => ("server_error", "timeout"),
                ErrorClass::Internal => ("server_error", "internal_error"),
            },
            Self::Task(_) | Self::Internal(_) => ("server_error", "internal_error"),
        }
    }

    /// Seconds a client should wait before retrying, where waiting helps.
    fn retry_after_s(&self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after_s } => Some(*retry_after_s),
            Self::NotReady(_) => Some(1),
            Self::Engine {
                class:
                    ErrorClass::Overloaded { retry_after }
                    | ErrorClass::Unavailable { retry_after }
                    | ErrorClass::Saturated { retry_after },
                ..
            } => Some(retry_after.as_secs().max(1)),
            _ => None,
        }
    }

    /// The message a client sees: internal details stay in the log.
    fn public_message(&self) -> String {
        match self {
            Self::Engine {
                class: ErrorClass::Internal,
                ..
            } => "internal error".to_owned(),
            other => other.to_string(),
        }
    }
}

/// Marks a response whose message tells of a hosted provider's failure (its
/// error text, the variable a key should be in): a remote (TCP) client gets
/// a generic message with the request id instead, and the detail stays in
/// the log and the ledger.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProviderFailure {
    pub kind: &'static str,
    pub code: &'static str,
}

/// The generic answer to a TCP client for a provider failure.
pub(crate) fn generic_provider_failure(
    mut response: Response,
    failure: ProviderFailure,
    request_id: &str,
) -> Response {
    let message = format!(
        "a hosted provider could not answer this request (request id {request_id}); the detail is in the server's log and ledger"
    );
    let body = json!({"error": {"message": message, "type": failure.kind, "param": null, "code": failure.code}});
    let status = response.status();
    let headers = std::mem::take(response.headers_mut());
    let mut out = (status, axum::Json(body)).into_response();
    for (name, value) in headers.iter() {
        if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let internal = self.status() == StatusCode::INTERNAL_SERVER_ERROR;
        if internal {
            tracing::error!(error = %triage_engine::error::chain(&self), "internal error");
        }
        let (kind, code) = self.kind();
        let param = match &self {
            Self::BadRequest { param, .. } => *param,
            _ => None,
        };
        let body = json!({"error": {"message": self.public_message(), "type": kind, "param": param, "code": code}});
        let provider_failure = matches!(
            &self,
            Self::Engine {
                class: ErrorClass::BadGateway
                    | ErrorClass::Unavailable { .. }
                    | ErrorClass::NotConfigured
                    | ErrorClass::Timeout,
                ..
            }
        );
        if provider_failure {
            tracing::warn!(error = %self, "a hosted provider failed");
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        if provider_failure {
            response
                .extensions_mut()
                .insert(ProviderFailure { kind, code });
        }
        if let Some(secs) = self.retry_after_s()
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}
