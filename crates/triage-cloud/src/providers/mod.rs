//! One file per provider: its wire structs, the translation to and from
//! [`triage_core::llm`], its error-status mapping and its unit tests. The few
//! lines of HTTP plumbing they all share (sending with the configured timeout,
//! turning transport failures into typed errors without the URL) live here.

pub mod anthropic;
pub mod gemini;
pub mod openai;
pub mod perspective;
pub(crate) mod sse;

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;

use crate::error::{ErrorKind, ProviderError};
use crate::provider::ProviderConfig;
use crate::secret::SecretString;

/// Every provider's status mapping has this shape: provider name, status,
/// response headers, response body.
pub(crate) type MapError = fn(&str, u16, &HeaderMap, &str) -> ProviderError;

/// A failure before (or while) reading a response. The URL is stripped first:
/// Perspective carries its key in the query string, and reqwest puts the URL
/// in both `Display` and `Debug`.
pub(crate) fn transport_error(provider: &str, err: reqwest::Error) -> ProviderError {
    let err = err.without_url();
    let kind = if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_decode() {
        ErrorKind::Malformed
    } else {
        // connect, TLS, reset, or a body cut off mid-read: all transient
        ErrorKind::Connect
    };
    ProviderError::new(provider, kind, err.to_string()).with_source(err)
}

pub(crate) fn timeout_error(provider: &str, timeout: Duration, what: &str) -> ProviderError {
    ProviderError::new(
        provider,
        ErrorKind::Timeout,
        format!("no {what} within {:.1}s", timeout.as_secs_f64()),
    )
}

/// The key, or `MissingKey` naming the variable it should come from.
pub(crate) fn require_key(config: &ProviderConfig) -> Result<&SecretString, ProviderError> {
    config.api_key.as_ref().ok_or_else(|| missing_key(config))
}

pub(crate) fn missing_key(config: &ProviderConfig) -> ProviderError {
    let message = match &config.api_key_env {
        Some(var) => format!("no API key: the environment variable {var} is not set"),
        None => "no API key configured (set api_key_env)".to_owned(),
    };
    ProviderError::new(&config.name, ErrorKind::MissingKey, message)
}

/// `base_url` joined with a path that starts with `/`.
pub(crate) fn endpoint(config: &ProviderConfig, path: &str) -> String {
    format!("{}{path}", config.base_url.trim_end_matches('/'))
}

/// Send a non-streaming request with the whole-request timeout and map a
/// non-2xx answer through the provider's `map_error`.
pub(crate) async fn send(
    provider: &str,
    request: reqwest::RequestBuilder,
    timeout: Duration,
    map_error: MapError,
) -> Result<reqwest::Response, ProviderError> {
    let response = request
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| transport_error(provider, e))?;
    check_status(provider, response, map_error).await
}

/// Send a streaming request: the timeout bounds the wait for the response
/// headers only (the stream then bounds the wait for its first event).
pub(crate) async fn send_streaming(
    provider: &str,
    request: reqwest::RequestBuilder,
    timeout: Duration,
    map_error: MapError,
) -> Result<reqwest::Response, ProviderError> {
    let response = tokio::time::timeout(timeout, request.send())
        .await
        .map_err(|_| timeout_error(provider, timeout, "response headers"))?
        .map_err(|e| transport_error(provider, e))?;
    if response.status().is_success() {
        return Ok(response);
    }
    tokio::time::timeout(timeout, check_status(provider, response, map_error))
        .await
        .map_err(|_| timeout_error(provider, timeout, "error body"))?
}

async fn check_status(
    provider: &str,
    response: reqwest::Response,
    map_error: MapError,
) -> Result<reqwest::Response, ProviderError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    // An unreadable error body still leaves the status to go on.
    let body = response.text().await.unwrap_or_default();
    Err(map_error(provider, status.as_u16(), &headers, &body))
}

/// Read a 2xx body; a connection lost while reading is a transport error.
pub(crate) async fn read_bytes(
    provider: &str,
    response: reqwest::Response,
) -> Result<bytes::Bytes, ProviderError> {
    response
        .bytes()
        .await
        .map_err(|e| transport_error(provider, e))
}

/// Read a 2xx body and decode it; anything undecodable is `Malformed`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    provider: &str,
    response: reqwest::Response,
) -> Result<T, ProviderError> {
    let bytes = read_bytes(provider, response).await?;
    decode(provider, &bytes)
}

pub(crate) fn decode<T: DeserializeOwned>(
    provider: &str,
    bytes: &[u8],
) -> Result<T, ProviderError> {
    serde_json::from_slice(bytes).map_err(|e| malformed(provider, bytes, e))
}

pub(crate) fn malformed(provider: &str, body: &[u8], err: serde_json::Error) -> ProviderError {
    let body = String::from_utf8_lossy(body);
    ProviderError::new(
        provider,
        ErrorKind::Malformed,
        format!("undecodable response ({err}): {}", excerpt(&body)),
    )
    .with_source(err)
}

/// At most 300 characters of a body, for error messages.
pub(crate) fn excerpt(body: &str) -> String {
    const MAX: usize = 300;
    let body = body.trim();
    match body.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &body[..i]),
        None => body.to_owned(),
    }
}

/// The error for a status, with `Retry-After` where the provider sent one.
pub(crate) fn status_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    message: String,
) -> ProviderError {
    ProviderError::new(provider, ErrorKind::from_status(status), message)
        .with_status(status)
        .with_retry_after(crate::error::retry_after(headers))
}
