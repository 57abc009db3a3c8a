//! triage's server: OpenAI-compatible routes (`/v1/moderations`,
//! `/v1/audio/transcriptions`, `/v1/chat/completions`, `/v1/models`) and the
//! native `/v1/execute` and `/v1/jobs`, all answered by one strategies engine
//! (a config's tasks, or the embedded default config), on a unix socket (mode
//! 0660, peer credentials logged) and optionally on TCP with bearer keys, plus
//! `/health`, `/ready` and Prometheus `/metrics`. SIGTERM and Ctrl-C drain
//! in-flight requests before exit; SIGHUP reloads the config.

pub mod auth;
pub mod edge;
pub mod error;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod reload;
pub mod routes;
pub mod state;
pub mod ui;

pub use auth::Caller;
pub use error::ApiError;
pub use limits::Limits;
pub use reload::{EngineSlot, ReloadError, Reloaded};
pub use routes::router;
pub use state::{ApiKey, AppState, Peer};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The peer's credentials on the unix socket.
fn unix_peer(io: &tokio::net::UnixStream) -> Peer {
    match io.peer_cred() {
        Ok(c) => Peer::Unix {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(_) => Peer::Unix {
            pid: None,
            uid: u32::MAX,
            gid: u32::MAX,
        },
    }
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        unix_peer(stream.io())
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer::Tcp(*stream.remote_addr())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another server is already listening on {0}")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it; choose another --socket path")]
    NotASocket(PathBuf),
    #[error("cannot listen on {what}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TCP needs at least one API key (set TRIAGE_API_KEYS or keys in the config): refusing to serve without auth"
    )]
    NoKeys,
    #[error("nothing to listen on: give a socket path or a TCP address")]
    NoListener,
}

/// Bind the unix socket: a stale socket file (no server behind it) is
/// replaced, a live one is an error, and anything else at the path (a
/// regular file, a folder, a symlink, which is never followed) is refused
/// and left as it is. Folders triage creates for it are 0700; the socket
/// gets mode 0660.
pub async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let bind_err = |source| ServeError::Bind {
        what: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ServeError::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(bind_err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(listener)
}

/// Resolves when SIGTERM or Ctrl-C arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
}

/// Serve until a shutdown signal; in-flight requests finish first.
pub async fn serve(
    state: Arc<AppState>,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
) -> Result<(), ServeError> {
    serve_until(state, socket, listen, shutdown_signal()).await
}

/// Serve until `shutdown` resolves; in-flight requests finish first.
pub async fn serve_until(
    state: Arc<AppState>,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    if socket.is_none() && listen.is_none() {
        return Err(ServeError::NoListener);
    }
    if listen.is_some() && !state.has_keys() {
        return Err(ServeError::NoKeys);
    }
    let hangup_state = state.clone();
    let edge_limits = state.limits.edge;
    let app = router(state);
    let (tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = Vec::new();
    if let Some(path) = socket.clone() {
        let listener = bind_unix(&path).await?;
        tracing::info!(socket = %path.display(), "listening on the unix socket");
        let listener = Arc::new(listener);
        let accept = move || {
            let listener = listener.clone();
            async move {
                let (io, _) = listener.accept().await?;
                let peer = unix_peer(&io);
                Ok((io, peer))
            }
        };
        tasks.push(tokio::spawn(edge::serve(
            accept,
            app.clone(),
            edge_limits,
            edge_limits.max_connections_socket,
            hangup_state.edge.socket.clone(),
            tx.subscribe(),
        )));
    }
    if let Some(addr) = listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                what: addr.to_string(),
                source,
            })?;
        tracing::info!(%addr, "listening on TCP");
        let listener = Arc::new(listener);
        let accept = move || {
            let listener = listener.clone();
            async move {
                let (io, addr) = listener.accept().await?;
                let _ = io.set_nodelay(true);
                Ok((io, Peer::Tcp(addr)))
            }
        };
        tasks.push(tokio::spawn(edge::serve(
            accept,
            app.clone(),
            edge_limits,
            edge_limits.max_connections_tcp,
            hangup_state.edge.tcp.clone(),
            tx.subscribe(),
        )));
    }
    let hangup = hangup_state
        .config_path()
        .map(|path| tokio::spawn(reload::reload_on_hangup(hangup_state.clone(), path)));
    shutdown.await;
    if let Some(h) = hangup {
        h.abort();
    }
    drain(&hangup_state, tx, tasks).await;
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// After the shutdown signal: stop accepting, let requests in flight and
/// shadow calls finish, then commit every ledger (the current config's and any a reload
/// replaced), all within `limits.drain_timeout`. The ledgers keep a share of
/// it (a third, at most 5 s) even when requests use the rest.
async fn drain(
    state: &AppState,
    stop: tokio::sync::broadcast::Sender<()>,
    listeners: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
) {
    let total = state.limits.drain_timeout;
    let started = tokio::time::Instant::now();
    let deadline = started + total;
    let ledger_share = (total / 3).min(std::time::Duration::from_secs(5));
    let _ = stop.send(());
    let aborts: Vec<_> = listeners.iter().map(|t| t.abort_handle()).collect();
    let requests = async {
        for t in listeners {
            let _ = t.await;
        }
    };
    if tokio::time::timeout_at(deadline - ledger_share, requests)
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = state.metrics.in_flight_now(),
            "drain timeout: closing connections with requests still in flight"
        );
        for a in aborts {
            a.abort();
        }
    }
    // Shadow calls already sent to a hosted tier finish and are recorded.
    let background = state.engine.current().background.clone();
    if tokio::time::timeout_at(deadline - ledger_share, background.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            running = background.running(),
            "drain timeout: shadow calls still running are cut off (recorded as cancelled)"
        );
        background.abort_all();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), background.idle()).await;
    }
    let ledgers = state.ledgers();
    let flush_all = async {
        for ledger in &ledgers {
            if let Err(e) = ledger.flush().await {
                tracing::error!(error = %triage_engine::error::chain(&e), ledger = ledger.url(), "flushing a ledger at shutdown failed");
            }
        }
    };
    if tokio::time::timeout_at(
        deadline.max(tokio::time::Instant::now() + ledger_share),
        flush_all,
    )
    .await
    .is_err()
    {
        let pending: usize = ledgers.iter().map(|l| l.health().pending).sum();
        tracing::error!(pending, "drain timeout: ledger rows not committed");
    }
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "drained");
}
