//! The multipart form that `/v1/audio/transcriptions`, `/v1/jobs` and
//! `/v1/execute` share: the file spooled to disk as it arrives, the other
//! fields bounded, and the checks that refuse an oversized body early.

use crate::error::ApiError;
use crate::state::Shared;
use axum::extract::Multipart;
use axum::http::{HeaderMap, header};
use std::time::Duration;

/// How long an admitted transcription waits for a decoding slot.
pub(crate) const SLOT_WAIT: Duration = Duration::from_secs(120);
/// Room for the form's other fields and the multipart framing on top of the
/// upload limit.
const FORM_OVERHEAD: u64 = 1 << 20;

/// An uploaded file, spooled to disk as it arrived; the file is removed
/// when this is dropped.
#[derive(Debug)]
pub(crate) struct Upload {
    pub name: Option<String>,
    pub path: tempfile::TempPath,
}

impl Upload {
    /// The file name's extension, lower case (helps the audio probe).
    #[cfg(feature = "speech")]
    pub(crate) fn extension(&self) -> Option<String> {
        self.name
            .as_deref()
            .and_then(|n| n.rsplit_once('.'))
            .map(|(_, e)| e.to_ascii_lowercase())
    }
}

/// The fields of an audio upload (`/v1/audio/transcriptions`, `/v1/jobs`).
#[derive(Debug, Default)]
pub(crate) struct AudioForm {
    pub file: Option<Upload>,
    pub model: Option<String>,
    pub format: Option<String>,
    pub language: Option<String>,
    pub task: Option<String>,
    /// `timestamp_granularities[]`: `word`, `segment`.
    pub granularities: Vec<String>,
    /// `/v1/execute`: the overrides as JSON text.
    pub overrides: Option<String>,
}

impl AudioForm {
    /// The upload, or 400 when the form has none.
    pub(crate) fn required_file(file: Option<Upload>) -> Result<Upload, ApiError> {
        file.ok_or_else(|| ApiError::bad("`file` is required", Some("file")))
    }
}

/// Refuse a body whose declared length is over the upload limit before
/// reading any of it.
pub(crate) fn check_length(state: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let limit = state.limits.audio_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit.saturating_add(FORM_OVERHEAD) => {
            Err(ApiError::UploadTooLarge { limit })
        }
        _ => Ok(()),
    }
}

/// The most a form's text field (`model`, `task`, `overrides`, ...) may
/// hold: it is read in chunks and refused (413) as soon as it passes this.
pub(crate) const MAX_FIELD_BYTES: usize = 64 << 10;

/// What the route decides when the `file` part begins, from the fields
/// before it (the `task` named so far, `None` when none was): authorise the
/// caller, take an admission slot, and the byte limit for the file (`None`:
/// the audio upload limit). An `Err` refuses the request before the file is
/// read.
pub(crate) type FileGate<'a> = dyn FnMut(Option<&str>) -> Result<Option<u64>, ApiError> + Send + 'a;

/// Read the form, writing `file` to a temporary file chunk by chunk (memory
/// stays at one chunk whatever the upload's size); over the upload limit is
/// a 413 that names it. Text fields are read in chunks up to
/// [`MAX_FIELD_BYTES`]; `gate` runs when the file part begins, so a caller
/// the route refuses never has its file read, and a `task` field after the
/// file is refused (the task decides who may upload and how much).
pub(crate) async fn read_audio_form(
    state: &Shared,
    form: &mut Multipart,
    gate: &mut FileGate<'_>,
) -> Result<AudioForm, ApiError> {
    use tokio::io::AsyncWriteExt;
    let mut limit = state.limits.audio_upload_bytes;
    let mut out = AudioForm::default();
    let too_large = |e: &axum::extract::multipart::MultipartError| {
        e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE
    };
    while let Some(mut field) = form.next_field().await.map_err(|e| {
        if too_large(&e) {
            ApiError::UploadTooLarge { limit }
        } else {
            crate::edge::body_error(&e, || {
                ApiError::bad(format!("malformed multipart body: {e}"), None)
            })
        }
    })? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            if out.file.is_some() {
                return Err(ApiError::bad("the form has two `file` parts", Some("file")));
            }
            if let Some(own) = gate(out.task.as_deref())? {
                limit = own;
            }
            let file_name = field.file_name().map(str::to_owned);
            let spool = match &state.limits.spool_dir {
                Some(dir) => tempfile::Builder::new()
                    .prefix("triage-upload-")
                    .tempfile_in(dir),
                None => tempfile::Builder::new().prefix("triage-upload-").tempfile(),
            }
            .map_err(|e| {
                tracing::error!(error = %e, "cannot create a spool file for an upload");
                ApiError::Internal("cannot spool the upload")
            })?;
            let (file, path) = spool.into_parts();
            let mut file = tokio::fs::File::from_std(file);
            let mut bytes = 0u64;
            while let Some(chunk) = field.chunk().await.map_err(|e| {
                if too_large(&e) {
                    ApiError::UploadTooLarge { limit }
                } else {
                    crate::edge::body_error(&e, || {
                        ApiError::bad(format!("cannot read `file`: {e}"), Some("file"))
                    })
                }
            })? {
                bytes += chunk.len() as u64;
                if bytes > limit {
                    return Err(if limit == state.limits.audio_upload_bytes {
                        ApiError::UploadTooLarge { limit }
                    } else {
                        ApiError::TooLarge {
                            limit: usize::try_from(limit).unwrap_or(usize::MAX),
                        }
                    });
                }
                file.write_all(&chunk).await.map_err(|e| {
                    tracing::error!(error = %e, "cannot write an upload to its spool file");
                    ApiError::Internal("cannot spool the upload")
                })?;
            }
            file.flush().await.map_err(|e| {
                tracing::error!(error = %e, "cannot write an upload to its spool file");
                ApiError::Internal("cannot spool the upload")
            })?;
            tracing::debug!(bytes, "upload spooled");
            out.file = Some(Upload {
                name: file_name,
                path,
            });
            continue;
        }
        // Text fields are small: read in chunks, refused past the cap
        // without reading the rest.
        let mut bytes = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(|e| {
            crate::edge::body_error(&e, || {
                ApiError::bad(format!("cannot read the form field `{name}`: {e}"), None)
            })
        })? {
            if bytes.len() + chunk.len() > MAX_FIELD_BYTES {
                return Err(ApiError::TooLarge {
                    limit: MAX_FIELD_BYTES,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| ApiError::bad(format!("the form field `{name}` is not UTF-8"), None))?;
        if name == "task" && out.file.is_some() {
            return Err(ApiError::bad(
                "`task` must come before `file` in the form: it decides who may upload",
                Some("task"),
            ));
        }
        let text = Some(text).filter(|t| !t.is_empty());
        match name.as_str() {
            "model" => out.model = text,
            "response_format" => out.format = text,
            "language" => out.language = text,
            "task" => out.task = text,
            "overrides" => out.overrides = text,
            "timestamp_granularities[]" | "timestamp_granularities" => {
                out.granularities.extend(text)
            }
            _ => {}
        }
    }
    Ok(out)
}
