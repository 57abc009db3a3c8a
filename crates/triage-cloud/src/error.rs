//! One error type for every provider. Each provider maps its documented HTTP
//! statuses into [`ErrorKind`]; the kind knows whether a retry can help.

use std::time::Duration;

/// What went wrong, independent of the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 400: the request is malformed; retrying the same request cannot help.
    BadRequest,
    /// 401: the key is missing or wrong.
    Unauthorized,
    /// 403: the key may not use this model/region/feature.
    Forbidden,
    /// 404: unknown model or route.
    NotFound,
    /// 408: the provider timed out reading the request.
    RequestTimeout,
    /// 409: a conflicting concurrent request (OpenAI documents retrying these).
    Conflict,
    /// 413: the request is too large.
    PayloadTooLarge,
    /// 422: well-formed but semantically invalid.
    Unprocessable,
    /// 429: rate limited (or quota exhausted) at the provider.
    RateLimited,
    /// 500.
    Server,
    /// 502.
    BadGateway,
    /// 503.
    Unavailable,
    /// 504.
    GatewayTimeout,
    /// Anthropic 529: the API is overloaded.
    Overloaded,
    /// Any other status the provider did not document.
    UnexpectedStatus,
    /// TCP connect, TLS or reset before a response.
    Connect,
    /// No response (or no first byte) within the configured timeout.
    Timeout,
    /// A 2xx body that is not what the provider documents.
    Malformed,
    /// A stream that ended without its terminator.
    StreamTruncated,
    /// The API key's environment variable is not set.
    MissingKey,
    /// The circuit breaker for this provider is open.
    CircuitOpen,
    /// The client-side rate limit for this provider is exhausted.
    LocalRateLimit,
    /// The overall deadline passed before another attempt could start.
    Deadline,
    /// The provider cannot do this operation (e.g. Anthropic moderations).
    Unsupported,
    /// Our side stopped waiting (a tier timeout, the caller went away) after
    /// the request was sent: it may have been answered and billed.
    Cancelled,
    /// The caller's spending gate (a budget) refused the attempt's ceiling:
    /// nothing was sent.
    BudgetExceeded,
}

impl ErrorKind {
    /// Whether the same request may succeed if sent again (to the same
    /// provider after a pause, or to the next one in a fallback list).
    pub fn is_retryable(self) -> bool {
        use ErrorKind::*;
        matches!(
            self,
            RequestTimeout
                | Conflict
                | RateLimited
                | Server
                | BadGateway
                | Unavailable
                | GatewayTimeout
                | Overloaded
                | Connect
                | Timeout
                | Malformed
                | StreamTruncated
        )
    }

    /// Whether another provider may succeed where this one failed, even
    /// though retrying this one cannot (its key, its model list, its breaker).
    pub fn may_fall_back(self) -> bool {
        use ErrorKind::*;
        self.is_retryable()
            || matches!(
                self,
                Unauthorized
                    | Forbidden
                    | NotFound
                    | MissingKey
                    | CircuitOpen
                    | LocalRateLimit
                    | Unsupported
                    | UnexpectedStatus
            )
    }

    /// The HTTP status this kind comes from, where there is one.
    pub fn from_status(status: u16) -> Self {
        use ErrorKind::*;
        match status {
            400 => BadRequest,
            401 => Unauthorized,
            403 => Forbidden,
            404 => NotFound,
            408 => RequestTimeout,
            409 => Conflict,
            413 => PayloadTooLarge,
            422 => Unprocessable,
            429 => RateLimited,
            500 => Server,
            502 => BadGateway,
            503 => Unavailable,
            504 => GatewayTimeout,
            529 => Overloaded,
            _ => UnexpectedStatus,
        }
    }
}

/// A failed call to one provider.
#[derive(Debug, thiserror::Error)]
#[error("{provider}: {kind:?}{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct ProviderError {
    /// The provider's configured name.
    pub provider: String,
    pub kind: ErrorKind,
    pub status: Option<u16>,
    /// From `Retry-After` / `retry-after-ms` or a provider's own reset header.
    pub retry_after: Option<Duration>,
    /// The provider's own message (never contains the API key).
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProviderError {
    /// The message is scrubbed of anything that looks like a key
    /// ([`crate::secret::scrub_secrets`]): providers echo keys in errors.
    pub fn new(provider: impl Into<String>, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            kind,
            status: None,
            retry_after: None,
            message: crate::secret::scrub_secrets(&message.into()),
            source: None,
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

/// Parse `Retry-After` (delta-seconds; an HTTP date is treated as "unknown")
/// and OpenAI's `retry-after-ms`, preferring the millisecond header.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let secs = get("retry-after").and_then(|v| v.parse::<f64>().ok())?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retryable_statuses_are_the_transient_ones() {
        for s in [408, 409, 429, 500, 502, 503, 504, 529] {
            assert!(ErrorKind::from_status(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(!ErrorKind::from_status(s).is_retryable(), "{s}");
        }
        assert!(ErrorKind::from_status(401).may_fall_back());
        assert!(!ErrorKind::from_status(400).may_fall_back());
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut d = HeaderMap::new();
        d.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&d), None);
    }
}
