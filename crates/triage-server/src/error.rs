//! One error type for every route, answered in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`) with an explicit status.
//! Internal errors are logged in full and answered opaquely.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
    /// A hosted provider failed (every target of the tier that had to answer).
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    GatewayTimeout(String),
    /// The tier that had to answer has no usable provider on this server
    /// (its API key is not set): nothing was sent, and retrying won't help
    /// until an operator sets the key and reloads.
    #[error("{0}")]
    NotConfigured(String),
    /// Every hosted model that could answer is rate limited or shut off by
    /// its circuit breaker for now.
    #[error("{message}")]
    Unavailable { message: String, retry_after_s: u64 },
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
            code: "invalid_request",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnknownModel(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::NotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::BadRequest { code, .. } => ("invalid_request_error", code),
            Self::Unauthorized => ("invalid_request_error", "invalid_api_key"),
            Self::Forbidden(_) => ("invalid_request_error", "forbidden"),
            Self::UnknownModel(_) => ("invalid_request_error", "model_not_found"),
            Self::NotFound(_) => ("invalid_request_error", "not_found"),
            Self::TooLarge { .. } => ("invalid_request_error", "request_too_large"),
            Self::UnsupportedMedia(_) => ("invalid_request_error", "unsupported_media"),
            Self::Unprocessable(_) => ("invalid_request_error", "unprocessable"),
            Self::Conflict(_) => ("invalid_request_error", "conflict"),
            Self::Overloaded { .. } => ("rate_limit_error", "overloaded"),
            Self::NotReady(_) => ("server_error", "not_ready"),
            Self::BadGateway(_) => ("server_error", "provider_error"),
            Self::GatewayTimeout(_) => ("server_error", "timeout"),
            Self::NotConfigured(_) => ("server_error", "provider_not_configured"),
            Self::Unavailable { .. } => ("server_error", "provider_unavailable"),
            Self::Internal(_) => ("server_error", "internal_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let (kind, code) = self.kind();
        let param = match &self {
            Self::BadRequest { param, .. } => *param,
            _ => None,
        };
        let body = json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}});
        let mut response = (self.status(), axum::Json(body)).into_response();
        let retry_after = match &self {
            Self::Overloaded { retry_after_s } | Self::Unavailable { retry_after_s, .. } => {
                Some(*retry_after_s)
            }
            Self::NotReady(_) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

impl From<triage_local::LocalError> for ApiError {
    fn from(e: triage_local::LocalError) -> Self {
        match e {
            triage_local::LocalError::Overloaded { .. } => Self::Overloaded { retry_after_s: 1 },
            other => Self::Internal(other.to_string()),
        }
    }
}

/// Client errors are 400 (an unknown task 404), overload 429 with
/// Retry-After, hosted-provider failures 502, timeouts 504, a provider
/// without its API key 503 (no Retry-After: it needs an operator); anything else is
/// internal: logged in full, answered opaquely.
impl From<triage_engine::EngineError> for ApiError {
    fn from(e: triage_engine::EngineError) -> Self {
        use triage_engine::EngineError;
        let message = triage_engine::error::chain(&e);
        match &e {
            EngineError::UnknownTask { .. } => Self::NotFound(message),
            _ if e.is_overloaded() => Self::Overloaded { retry_after_s: 1 },
            _ if e.is_client_error() => Self::bad(message, None),
            EngineError::Timeout { .. } => Self::GatewayTimeout(message),
            EngineError::Cloud { source, .. } => {
                use triage_cloud::ErrorKind as K;
                let last = source.last();
                match last.map(|l| l.kind) {
                    Some(
                        K::RateLimited
                        | K::LocalRateLimit
                        | K::CircuitOpen
                        | K::Overloaded
                        | K::Unavailable,
                    ) => Self::Unavailable {
                        message,
                        retry_after_s: last
                            .and_then(|l| l.retry_after)
                            .map_or(5, |d| d.as_secs().max(1)),
                    },
                    Some(K::Timeout | K::GatewayTimeout | K::Deadline) => {
                        Self::GatewayTimeout(message)
                    }
                    Some(K::MissingKey) => Self::NotConfigured(message),
                    _ => Self::BadGateway(message),
                }
            }
            EngineError::BadAnswer { .. } => Self::BadGateway(message),
            _ => Self::Internal(message),
        }
    }
}
