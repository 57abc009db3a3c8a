//! The designer's API: check and save edits to the config file (the same
//! validator as `triage config check`), its history with diffs, rollback,
//! and the reload a save triggers. Saves are serialised in the process and
//! carry the version token of the file they were made against, so a second
//! browser, or a hand edit, is detected instead of overwritten. A save that
//! fails validation, or whose engine cannot start, leaves the file and the
//! engine as they were.

use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;
use triage_engine::ConfigError;
use triage_engine::config::edit::{self, Edit, EditError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// The version token the edits were made against.
    pub version: String,
    pub edits: Vec<Edit>,
    /// Write the file and reload; otherwise only check.
    #[serde(default)]
    pub save: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub version: String,
    pub number: u32,
}

#[derive(Debug, Serialize)]
struct DiffLine {
    op: char,
    line: String,
}

fn diff_lines(old: &str, new: &str) -> Vec<DiffLine> {
    edit::diff(old, new)
        .into_iter()
        .map(|(op, line)| DiffLine { op, line })
        .collect()
}

/// The config file, when editing is on.
fn editable(
    state: &Shared,
    peer: Option<&axum::extract::ConnectInfo<crate::state::Peer>>,
) -> Result<PathBuf, ApiError> {
    let engine = state.engine.current();
    let on_socket = matches!(peer.map(|p| &p.0), Some(crate::state::Peer::Unix { .. }));
    if on_socket && !engine.config.server.ui_socket_edit {
        return Err(ApiError::Forbidden(
            "editing over the unix socket (off: [server.ui] socket_edit = false; save with an admin key over TCP)"
                .into(),
        ));
    }
    let path = engine
        .config
        .path
        .clone()
        .ok_or_else(|| ApiError::Forbidden("editing: the server runs no config file".into()))?;
    if !engine.config.server.ui_edit {
        return Err(ApiError::Forbidden(
            "editing (off: set [server.ui] edit = true in the config)".into(),
        ));
    }
    Ok(path)
}

fn config_path(state: &Shared) -> Result<PathBuf, ApiError> {
    state
        .config_path()
        .ok_or_else(|| ApiError::NotFound("the server runs no config file: no history".into()))
}

/// An edit error as an answer: problems with their keys for the page to
/// show beside the nodes they name.
fn refused(e: EditError) -> Response {
    let (status, code, problems) = match &e {
        EditError::Conflict { .. } => (StatusCode::CONFLICT, "config_changed", Vec::new()),
        EditError::Invalid(ConfigError::Invalid { problems, .. }) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            problems
                .iter()
                .map(|p| json!({"key": p.key, "message": p.message, "fix": p.fix}))
                .collect(),
        ),
        EditError::Invalid(_) | EditError::Parse(..) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            Vec::new(),
        ),
        EditError::Target { key, message } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_edit",
            vec![json!({"key": key, "message": message, "fix": ""})],
        ),
        EditError::NoVersion(_) => (StatusCode::NOT_FOUND, "not_found", Vec::new()),
        EditError::Read { .. } | EditError::Write { .. } => {
            tracing::error!(error = %triage_engine::error::chain(&e), "the designer cannot read or write the config");
            (StatusCode::INTERNAL_SERVER_ERROR, "config_io", Vec::new())
        }
    };
    let current = match &e {
        EditError::Conflict { current } => Some(current.clone()),
        _ => None,
    };
    (
        status,
        Json(json!({
            "error": {
                "message": triage_engine::error::chain(&e),
                "type": "invalid_request_error",
                "param": null,
                "code": code,
            },
            "problems": problems,
            "current_version": current,
        })),
    )
        .into_response()
}

/// Who asked for a change, for the audit trail: (who, from).
type Who = (String, String);

/// The caller as the audit trail names it: the key over TCP, the peer's
/// uid and pid on the unix socket.
fn who(
    caller: &crate::auth::Caller,
    peer: Option<&axum::extract::ConnectInfo<crate::state::Peer>>,
) -> Who {
    match (peer.map(|p| &p.0), &caller.0) {
        (Some(crate::state::Peer::Tcp(addr)), key) => (
            key.as_ref()
                .map_or("no key".to_owned(), |k| format!("key {}", k.name)),
            addr.to_string(),
        ),
        (Some(crate::state::Peer::Unix { pid, uid, .. }), _) => (
            match pid {
                Some(p) => format!("socket uid {uid} pid {p}"),
                None => format!("socket uid {uid}"),
            },
            "unix socket".to_owned(),
        ),
        (None, _) => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

/// Write `text` (made against `version`) and reload the engine; when the new
/// engine cannot start, the old file is put back and the old engine stays.
/// A change that took is kept in the audit trail and logged at info.
async fn save_and_reload(
    state: &Shared,
    path: &std::path::Path,
    version: &str,
    text: &str,
    (action, (who, from)): (&str, Who),
) -> Response {
    let saved = match edit::save(path, version, text) {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    match state.reload(path).await {
        Ok(r) => {
            let change = edit::Change {
                action,
                who: &who,
                from: &from,
                number: Some(saved.number),
            };
            let before = String::from_utf8_lossy(&saved.previous);
            crate::reload::audit(path, change, &before, text);
            Json(json!({
                "version": saved.version,
                "number": saved.number,
                "reused_specialists": r.reused_specialists,
            }))
            .into_response()
        }
        Err(e) => {
            if let Err(re) = edit::restore(path, &saved.previous) {
                tracing::error!(error = %triage_engine::error::chain(&re), "cannot put the previous config back");
            }
            ApiError::Unprocessable(triage_engine::error::chain(&e)).into_response()
        }
    }
}

/// `POST /ui/api/config/edit`: check `edits` against the file at `version`;
/// with `save`, write and reload.
pub(crate) async fn edit_config(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<crate::state::Peer>>>,
    Json(req): Json<EditRequest>,
) -> Response {
    let who = who(&caller, peer.as_ref().map(|p| &p.0));
    let path = match editable(&state, peer.as_ref().map(|p| &p.0)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let _one_at_a_time = state.designer.lock().await;
    let current = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(source) => {
            return refused(EditError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let current_version = edit::version_of(current.as_bytes());
    if current_version != req.version {
        return refused(EditError::Conflict {
            current: current_version,
        });
    }
    let text = match edit::apply(&current, &req.edits) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    if let Err(e) = edit::check(&path, &text) {
        return refused(e);
    }
    if !req.save {
        return Json(json!({"ok": true, "diff": diff_lines(&current, &text)})).into_response();
    }
    save_and_reload(&state, &path, &req.version, &text, ("save", who)).await
}

/// `GET /ui/api/history`: every kept version, and the file's version now.
pub(crate) async fn history(State(state): State<Shared>) -> Result<Response, ApiError> {
    let path = config_path(&state)?;
    let now = std::fs::read(&path)
        .map(|b| edit::version_of(&b))
        .map_err(|_| ApiError::Internal("cannot read the config file"))?;
    Ok(Json(json!({
        "path": path.display().to_string(),
        "version": now,
        "editable": state.engine.current().config.server.ui_edit,
        "versions": edit::history(&path),
        "changes": edit::audit_trail(&path),
    }))
    .into_response())
}

/// `GET /ui/api/history/{n}`: version `n` and its diff from version `n-1`
/// (from nothing for the first).
pub(crate) async fn history_version(
    State(state): State<Shared>,
    Path(number): Path<u32>,
) -> Result<Response, ApiError> {
    let path = config_path(&state)?;
    let text = match edit::version_text(&path, number) {
        Ok(t) => t,
        Err(e) => return Ok(refused(e)),
    };
    let before = number
        .checked_sub(1)
        .and_then(|p| edit::version_text(&path, p).ok())
        .unwrap_or_default();
    Ok(Json(json!({
        "number": number,
        "version": edit::version_of(text.as_bytes()),
        "diff": diff_lines(&before, &text),
        "text": text,
    }))
    .into_response())
}

/// `POST /ui/api/config/rollback`: make kept version `number` the file
/// again (a new version in the history), then reload.
pub(crate) async fn rollback(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<crate::state::Peer>>>,
    Json(req): Json<RollbackRequest>,
) -> Response {
    let who = who(&caller, peer.as_ref().map(|p| &p.0));
    let path = match editable(&state, peer.as_ref().map(|p| &p.0)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let _one_at_a_time = state.designer.lock().await;
    let text = match edit::version_text(&path, req.number) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    let action = format!("rollback to version {}", req.number);
    save_and_reload(&state, &path, &req.version, &text, (&action, who)).await
}
