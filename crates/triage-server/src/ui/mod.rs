//! The web UI at `/ui/`: a page of plain ES modules, CSS and SVG embedded
//! in the binary (no third-party JavaScript, nothing fetched from another
//! origin, works offline), and the JSON API it reads under `/ui/api/`.
//!
//! Access: the page itself holds no data and is served to anyone; every
//! `/ui/api/` route is data. On the unix socket it is open to whoever may
//! use the socket; on TCP only admin keys pass (checked in `auth`). The page
//! takes the key from the URL fragment (`/ui/#key=KEY`: browsers never send
//! a fragment, so it is in no request line or log) or a login box, keeps it
//! in `sessionStorage` and sends it as a bearer header; no cookies, so no
//! cross-site request can ride on a session. A content security policy
//! allows scripts, styles and connections to this origin only, and no
//! inline script.

pub mod dashboard;
pub mod designer;
pub mod explorer;
pub mod graph;

use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

/// The page's files, embedded at build time from `crates/triage-server/ui/`.
pub const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "designer.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/designer.js"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/dashboard.js"),
    ),
    (
        "explorer.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/explorer.js"),
    ),
    (
        "audit.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/audit.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/app.css"),
    ),
];

/// The policy every `/ui/` response carries.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Paths that serve a file of the page (no data): open on TCP without a key.
pub fn is_public_asset(path: &str) -> bool {
    path == "/ui"
        || path == "/ui/"
        || path
            .strip_prefix("/ui/")
            .is_some_and(|f| ASSETS.iter().any(|(name, _, _)| *name == f))
}

/// Whether `path` is UI data, which on TCP only an admin key may use.
pub fn is_admin_path(path: &str) -> bool {
    path.starts_with("/ui/api/") || path == "/ui/api"
}

/// The largest body the web UI's API takes (a designer save, a rollback);
/// a 413 names this limit.
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;

/// The `/ui` routes.
pub fn routes() -> Router<Shared> {
    use axum::extract::DefaultBodyLimit;
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { asset("index.html") }))
        .route("/ui/{file}", get(file))
        .route("/ui/api/config", get(config))
        .route("/ui/api/dashboard", get(dashboard::dashboard))
        .route("/ui/api/requests", get(explorer::requests))
        .route("/ui/api/requests/{id}", get(explorer::request))
        .route(
            "/ui/api/config/edit",
            post(designer::edit_config).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .route(
            "/ui/api/config/rollback",
            post(designer::rollback).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .route("/ui/api/history", get(designer::history))
        .route("/ui/api/history/{number}", get(designer::history_version))
}

async fn file(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    asset(&name)
}

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, bytes)) => {
            let mut r = (*bytes).into_response();
            if let Ok(v) = HeaderValue::from_str(mime) {
                r.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        None => ApiError::NotFound(format!("no UI file `{name}`")).into_response(),
    }
}

/// The security headers of every `/ui` response, data or page.
pub fn harden(path: &str, response: &mut Response) {
    if path != "/ui" && !path.starts_with("/ui/") {
        return;
    }
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if is_admin_path(path) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

/// `GET /ui/api/config`: every task as a graph, with live traffic.
async fn config(State(state): State<Shared>) -> Json<graph::ConfigView> {
    let engine = state.engine.current();
    let counts = state.metrics.task_counts();
    let c = &engine.config;
    Json(graph::ConfigView {
        path: c.path.as_ref().map(|p| p.display().to_string()),
        version: c
            .path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| triage_engine::config::edit::version_of(&b)),
        editable: c.server.ui_edit && c.path.is_some(),
        warnings: c.warnings.clone(),
        tasks: graph::tasks(c.tasks.values(), &counts),
    })
}
