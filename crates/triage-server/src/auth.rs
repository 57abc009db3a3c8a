//! The middleware every request passes: a request id and one tracing span,
//! bearer-key auth and rate limits for TCP peers (the unix socket is open to
//! whoever may use it; peer credentials are logged), metrics, and OpenAI's
//! error shape for rejections that axum produces itself (body too large,
//! bad JSON).

use crate::error::ApiError;
use crate::state::{ApiKey, Peer, Shared};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Instant;
use tracing::Instrument;

/// The key a TCP caller authenticated with; `None` on the unix socket, where
/// the peer's credentials are logged instead.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<ApiKey>);

impl Caller {
    /// The key's name over TCP; `None` on the unix socket.
    pub fn key_name(&self) -> Option<&str> {
        self.0.as_ref().map(|k| k.name.as_str())
    }

    /// 403 unless this caller's key may use `task`.
    pub fn authorize(&self, task: &str) -> Result<(), ApiError> {
        match &self.0 {
            Some(key) if !key.tasks.is_empty() && !key.tasks.iter().any(|t| t == task) => {
                Err(ApiError::Forbidden(format!("task `{task}`")))
            }
            _ => Ok(()),
        }
    }
}

impl Caller {
    /// The request's overrides, with the caller's key name for budgets. A TCP
    /// key may send an override that can spend hosted dollars
    /// ([`triage_engine::Overrides::SPENDING`]) only with `allow_overrides`;
    /// the unix socket is trusted like the machine's own users.
    pub fn overrides(
        &self,
        mut o: triage_engine::Overrides,
    ) -> Result<triage_engine::Overrides, ApiError> {
        if let Some(key) = &self.0 {
            let spending = o.spending();
            if !spending.is_empty() && !key.allow_overrides {
                return Err(ApiError::Forbidden(format!(
                    "override {} (key `{}` lacks allow_overrides)",
                    spending.join(", "),
                    key.name
                )));
            }
            o.key = Some(key.name.clone());
        }
        Ok(o)
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme in any
/// case, as RFC 9110 has it).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Failed key checks per peer address: past [`Failures::LIMIT`] in
/// [`Failures::WINDOW`], the peer is answered 429 until the window ends,
/// without its key being looked at.
#[derive(Debug, Default)]
pub struct Failures {
    by_peer: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, Instant)>>,
}

impl Failures {
    pub const LIMIT: u32 = 10;
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
    /// Peers remembered at most (older entries are forgotten first).
    const MAX_PEERS: usize = 10_000;

    fn map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, (u32, Instant)>>
    {
        self.by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Err(seconds)` while `peer` is past the limit.
    pub fn allowed(&self, peer: std::net::IpAddr) -> Result<(), u64> {
        let map = self.map();
        match map.get(&peer) {
            Some((n, since)) if *n >= Self::LIMIT && since.elapsed() < Self::WINDOW => {
                Err((Self::WINDOW - since.elapsed()).as_secs() + 1)
            }
            _ => Ok(()),
        }
    }

    /// Count a failure; the peer's failures in the current window.
    pub fn failed(&self, peer: std::net::IpAddr) -> u32 {
        let mut map = self.map();
        if map.len() >= Self::MAX_PEERS {
            map.retain(|_, (_, since)| since.elapsed() < Self::WINDOW);
            if map.len() >= Self::MAX_PEERS {
                map.clear();
            }
        }
        let entry = map.entry(peer).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= Self::WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        entry.0
    }
}

/// A new request id: a UUID v7 (time-ordered, 74 random bits) after `prefix`.
pub fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Routes counted under their own label; anything else counts as `other`.
const KNOWN_ROUTES: &[&str] = &[
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/moderations",
    "/v1/audio/transcriptions",
    "/v1/chat/completions",
    "/v1/execute",
    "/v1/jobs",
];

/// The middleware: see the module doc.
pub async fn observe(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let id = request_id("req");
    let route = req.uri().path().to_owned();
    let span = tracing::info_span!("request", id = %id, method = %req.method(), route = %route);
    let started = Instant::now();
    let remote = matches!(
        req.extensions()
            .get::<axum::extract::ConnectInfo<Peer>>()
            .map(|c| &c.0),
        Some(Peer::Tcp(_))
    );
    let mut response = authorized(&state, &route, req, next)
        .instrument(span.clone())
        .await;
    if remote
        && let Some(failure) = response
            .extensions()
            .get::<crate::error::ProviderFailure>()
            .copied()
    {
        response = crate::error::generic_provider_failure(response, failure, &id);
    }
    let label = if KNOWN_ROUTES.contains(&route.as_str()) {
        route.as_str()
    } else {
        "other"
    };
    state.metrics.observe(
        label,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    span.in_scope(|| tracing::debug!(status = response.status().as_u16(), "answered"));
    let mut response = finish(response, &id);
    crate::ui::harden(&route, &mut response);
    response
}

async fn authorized(state: &Shared, route: &str, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map(|c| c.0.clone());
    let mut caller = Caller(None);
    match &peer {
        Some(Peer::Tcp(addr))
            if !matches!(route, "/health" | "/ready") && !crate::ui::is_public_asset(route) =>
        {
            // A peer that failed too often lately waits, whatever it sends.
            if let Err(retry_after_s) = state.auth_failures.allowed(addr.ip()) {
                return ApiError::Overloaded { retry_after_s }.into_response();
            }
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            let Some(key) = given.and_then(|g| state.find_key(g)) else {
                let failures = state.auth_failures.failed(addr.ip());
                state
                    .edge
                    .auth_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%addr, route, failures, given = given.is_some(), "rejected: no valid key");
                return ApiError::Unauthorized.into_response();
            };
            if let Some(rpm) = key.rpm
                && let Err(retry_after_s) = state.rate_limits.take(&key.name, rpm)
            {
                return ApiError::Overloaded { retry_after_s }.into_response();
            }
            if crate::ui::is_admin_path(route) && !key.admin {
                tracing::info!(%addr, key = %key.name, "rejected: the web UI needs an admin key");
                return ApiError::Forbidden(
                    "the web UI's data (an admin key is needed: see docs/serving.md)".into(),
                )
                .into_response();
            }
            tracing::debug!(%addr, key = %key.name, "request");
            caller = Caller(Some(key));
        }
        Some(Peer::Unix { pid, uid, gid }) => {
            // Who changed something is kept in the log (the socket has no
            // keys): every request that is not a read, at info.
            if matches!(
                *req.method(),
                axum::http::Method::GET | axum::http::Method::HEAD
            ) {
                tracing::debug!(?pid, uid, gid, "request on the unix socket");
            } else {
                tracing::info!(?pid, uid, gid, method = %req.method(), route, "request on the unix socket");
            }
        }
        _ => {}
    }
    req.extensions_mut().insert(caller);
    let _in_flight = state.metrics.in_flight();
    let response = next.run(req).await;
    shape_rejection(state, route, response).await
}

/// axum's own rejections (plain text) in OpenAI's error shape.
async fn shape_rejection(state: &Shared, route: &str, response: Response) -> Response {
    if is_json(&response) {
        return response;
    }
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            if route.contains("audio") || route.starts_with("/v1/jobs") || route == "/v1/execute" {
                ApiError::UploadTooLarge {
                    limit: state.limits.audio_upload_bytes,
                }
                .into_response()
            } else if route.starts_with("/ui/") {
                ApiError::TooLarge {
                    limit: crate::ui::MAX_BODY_BYTES,
                }
                .into_response()
            } else {
                ApiError::TooLarge {
                    limit: state.limits.moderation_body_bytes,
                }
                .into_response()
            }
        }
        s @ (StatusCode::BAD_REQUEST
        | StatusCode::UNPROCESSABLE_ENTITY
        | StatusCode::UNSUPPORTED_MEDIA_TYPE) => {
            let body = axum::body::to_bytes(response.into_body(), 64 << 10)
                .await
                .unwrap_or_default();
            let message = String::from_utf8_lossy(&body).into_owned();
            match s {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMedia(message),
                StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(message),
                _ => ApiError::bad(message, None),
            }
            .into_response()
        }
        _ => response,
    }
}

fn is_json(r: &Response) -> bool {
    r.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Every response names its request, the tier that answered and its cost.
fn finish(mut response: Response, id: &str) -> Response {
    let headers = response.headers_mut();
    if !headers.contains_key("x-request-id")
        && let Ok(v) = HeaderValue::from_str(id)
    {
        headers.insert("x-request-id", v);
    }
    if !headers.contains_key("x-triage-tier") {
        headers.insert("x-triage-tier", HeaderValue::from_static("none"));
    }
    if !headers.contains_key("x-triage-cost-usd") {
        headers.insert("x-triage-cost-usd", HeaderValue::from_static("0"));
    }
    response
}

/// `response` tagged with the tier that answered and what it cost.
pub(crate) fn tagged(mut response: Response, tier: &str, usd: f64) -> Response {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(tier) {
        h.insert("x-triage-tier", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{usd:.9}")) {
        h.insert("x-triage-cost-usd", v);
    }
    response
}
