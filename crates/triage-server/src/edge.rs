//! The HTTP edge: one accept loop per listener (the unix socket, TCP) over
//! hyper, with the bounds a slow or hostile client meets before any route
//! runs:
//!
//! - **header read**: a request head (the first, or the next on a kept-alive
//!   connection) must arrive within `header_read` or the connection is
//!   closed (hyper's timer);
//! - **body idle**: a request body that sends nothing for `body_idle` fails
//!   the request (408) and the connection closes;
//! - **keep-alive idle**: a connection with no request in flight and no
//!   bytes for `keep_alive_idle` is closed;
//! - **open connections**: at most `max_connections` per listener; past it a
//!   new connection is answered 503 with `Retry-After` and closed.
//!
//! The total time of a non-audio request is bounded by a middleware
//! ([`request_deadline`]). Open and refused connections are counted for
//! `/metrics`.

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use http_body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::state::Peer;

/// The edge's bounds (`[server]` in the config; defaults in brackets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EdgeLimits {
    /// A request head must arrive within this (10 s).
    pub header_read: Duration,
    /// A request body may send nothing for this long (30 s).
    pub body_idle: Duration,
    /// A non-audio request must be answered within this (120 s).
    pub request_total: Duration,
    /// A connection with nothing in flight is closed after this (60 s).
    pub keep_alive_idle: Duration,
    /// Open connections on TCP (1024).
    pub max_connections_tcp: usize,
    /// Open connections on the unix socket (1024).
    pub max_connections_socket: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            body_idle: Duration::from_secs(30),
            request_total: Duration::from_secs(120),
            keep_alive_idle: Duration::from_secs(60),
            max_connections_tcp: 1024,
            max_connections_socket: 1024,
        }
    }
}

/// Connection counts of one listener, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    /// Closed for a head that did not arrive in time or an idle keep-alive.
    pub timed_out: AtomicU64,
}

/// Both listeners' counts.
#[derive(Debug, Default)]
pub struct EdgeCounts {
    pub tcp: Arc<ConnectionCounts>,
    pub socket: Arc<ConnectionCounts>,
    /// Requests refused for a missing or wrong key.
    pub auth_failures: AtomicU64,
}

/// One listener's accept loop: each connection is served on its own task
/// under the limits, until `stop` fires; then connections finish the
/// requests they are on (graceful) and the loop returns.
pub(crate) async fn serve<I, F, Fut>(
    mut accept: F,
    app: Router,
    limits: EdgeLimits,
    max_connections: usize,
    counts: Arc<ConnectionCounts>,
    mut stop: tokio::sync::broadcast::Receiver<()>,
) -> std::io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(I, Peer)>>,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // One builder for every connection of this listener.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.keep_alive_idle))
        .keep_alive_timeout(limits.header_read);
    loop {
        let (io, peer) = tokio::select! {
            _ = stop.recv() => break,
            accepted = accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            counts.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?peer, max_connections, "connection refused: too many open");
            tokio::spawn(refuse(io));
            continue;
        };
        counts.open.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::default());
        let svc = {
            let app = app.clone();
            let activity = activity.clone();
            let peer = peer.clone();
            tower::service_fn(move |req: Request<hyper::body::Incoming>| {
                let activity = activity.clone();
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo(peer.clone()));
                let body = Body::new(IdleBody::new(body, limits.body_idle));
                let req = Request::from_parts(parts, body);
                let guard = activity.begin();
                let app = app.clone();
                async move {
                    let response = tower::ServiceExt::oneshot(app, req).await?;
                    // In flight until the response's body has been sent.
                    Ok::<_, std::convert::Infallible>(response.map(|b| {
                        Body::new(Tracked {
                            inner: b,
                            _guard: guard,
                        })
                    }))
                }
            })
        };
        let io = TokioIo::new(Watched {
            inner: io,
            activity: activity.clone(),
        });
        let conn = builder
            .serve_connection_with_upgrades(io, hyper_util::service::TowerToHyperService::new(svc))
            .into_owned();
        let conn = graceful.watch(conn);
        let counts = counts.clone();
        let idle_limit = limits.keep_alive_idle;
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(conn);
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    () = tokio::time::sleep(idle_limit / 4) => {
                        if activity.idle_for() >= idle_limit {
                            counts.timed_out.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(?peer, "closing an idle connection");
                            break Ok(());
                        }
                    }
                }
            };
            if let Err(e) = result {
                let timed_out = e
                    .downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout);
                if timed_out {
                    counts.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        ?peer,
                        "closing a connection whose request head did not arrive in time"
                    );
                } else {
                    tracing::debug!(?peer, error = %e, "connection ended with an error");
                }
            }
            counts.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // Requests in flight finish; idle connections close now.
    graceful.shutdown().await;
    Ok(())
}

/// Past the connection cap: a 503 the client can read, then close.
async fn refuse<I: AsyncWrite + Unpin>(mut io: I) {
    let answer = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 112\r\nConnection: close\r\n\r\n{\"error\":{\"message\":\"too many open connections\",\"type\":\"server_error\",\"param\":null,\"code\":\"too_many_connections\"}}";
    let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(answer)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
}

/// When a connection last moved bytes, and how many requests it has in
/// flight (a request in flight is never idle, however long it computes).
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    start: std::time::Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            start: std::time::Instant::now(),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until it is sent.
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's socket, noting every read and write.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The request body stalled: nothing arrived within the body-idle limit.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}")]
pub struct BodyIdle(pub Duration);

/// The [`ApiError`](crate::ApiError) for a body that could not be read:
/// 408 when it stalled past the body-idle limit, else 400 with `what`.
pub(crate) fn body_error(
    e: &(dyn std::error::Error + 'static),
    what: impl FnOnce() -> crate::ApiError,
) -> crate::ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(idle) = c.downcast_ref::<BodyIdle>() {
            return crate::ApiError::BodyIdle {
                seconds: idle.0.as_secs_f64(),
            };
        }
        cause = c.source();
    }
    what()
}

/// A request body that fails with [`BodyIdle`] when no frame arrives
/// within its limit (reset by every frame).
struct IdleBody<B> {
    inner: B,
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> IdleBody<B> {
    fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            sleep: None,
        }
    }
}

impl<B> http_body::Body for IdleBody<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyIdle(limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: a request that is not an audio upload must be answered
/// within `request_total` (504 otherwise). Audio uploads, transcriptions
/// and job event streams are bounded by their own limits.
pub(crate) async fn request_deadline(
    axum::extract::State(state): axum::extract::State<crate::state::Shared>,
    req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req.uri().path();
    let multipart = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/"));
    let long = multipart
        || path == "/v1/audio/transcriptions"
        || (path.starts_with("/v1/jobs/") && path.ends_with("/events"));
    if long {
        return next.run(req).await;
    }
    let limit = state.limits.edge.request_total;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => crate::error::ApiError::Deadline {
            seconds: limit.as_secs_f64(),
        }
        .into_response(),
    }
}

/// The connection counts as OpenMetrics text (before `# EOF`).
pub(crate) fn metrics_text(counts: &EdgeCounts) -> String {
    let mut out = String::new();
    let listeners = [("tcp", &counts.tcp), ("socket", &counts.socket)];
    for (name, kind, help, value) in [
        (
            "triage_open_connections",
            "gauge",
            "Connections open now, by listener.",
            (|c: &ConnectionCounts| c.open.load(Ordering::Relaxed) as u64) as fn(&_) -> u64,
        ),
        (
            "triage_refused_connections",
            "counter",
            "Connections refused because the listener was at max_connections.",
            |c| c.refused.load(Ordering::Relaxed),
        ),
        (
            "triage_timed_out_connections",
            "counter",
            "Connections closed for a request head that did not arrive in time or an idle keep-alive.",
            |c| c.timed_out.load(Ordering::Relaxed),
        ),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        let suffix = if kind == "counter" { "_total" } else { "" };
        for (listener, c) in listeners {
            out.push_str(&format!(
                "{name}{suffix}{{listener=\"{listener}\"}} {}\n",
                value(c)
            ));
        }
    }
    out.push_str(&format!(
        "# HELP triage_auth_failures Requests refused for a missing or wrong key.\n# TYPE triage_auth_failures counter\ntriage_auth_failures_total {}\n",
        counts.auth_failures.load(Ordering::Relaxed)
    ));
    out
}
