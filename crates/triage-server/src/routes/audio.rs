//! `POST /v1/audio/transcriptions` in OpenAI's shape (json, text, srt, vtt,
//! verbose_json), answered by the configured Whisper specialist, and the
//! multipart form it shares with `/v1/jobs` and `/v1/execute`.

use super::info::TRANSCRIPTION_MODELS;
use crate::auth::{Caller, tagged};
use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use triage_engine::Transcriber;
use triage_engine::speech::{TranscribeOptions, format};

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

/// Read the form, writing `file` to a temporary file chunk by chunk (memory
/// stays at one chunk whatever the upload's size); over the upload limit is
/// a 413 that names it.
pub(crate) async fn read_audio_form(
    state: &Shared,
    form: &mut Multipart,
) -> Result<AudioForm, ApiError> {
    use tokio::io::AsyncWriteExt;
    let limit = state.limits.audio_upload_bytes;
    let mut out = AudioForm::default();
    let too_large = |e: &axum::extract::multipart::MultipartError| {
        e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE
    };
    while let Some(mut field) = form.next_field().await.map_err(|e| {
        if too_large(&e) {
            ApiError::UploadTooLarge { limit }
        } else {
            ApiError::bad(format!("malformed multipart body: {e}"), None)
        }
    })? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
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
                    ApiError::bad(format!("cannot read `file`: {e}"), Some("file"))
                }
            })? {
                bytes += chunk.len() as u64;
                if bytes > limit {
                    return Err(ApiError::UploadTooLarge { limit });
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
        // Text fields are small; a large one is a malformed request.
        let text = field.text().await.unwrap_or_default();
        if text.len() > 64 << 10 {
            return Err(ApiError::bad(
                format!("the form field `{name}` is over 64 KiB"),
                None,
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

/// Sets its flag when dropped: a handler future dropped because its client
/// went away stops the Whisper decoding it started.
pub(crate) struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A file that cannot be decoded is the caller's 400; other failures keep
/// their class.
pub(crate) fn audio_error(e: triage_engine::EngineError) -> ApiError {
    match e {
        audio @ triage_engine::EngineError::Audio(_) => ApiError::bad(
            format!(
                "the audio file cannot be used: {}",
                triage_engine::error::chain(&audio)
            ),
            Some("file"),
        ),
        other => other.into(),
    }
}

/// The Whisper specialist of the current engine, or 503 when it has none.
pub(crate) fn transcriber(state: &Shared) -> Result<Transcriber, ApiError> {
    state
        .engine
        .current()
        .transcriber()
        .ok_or_else(|| ApiError::NotReady("transcription".into()))
}

/// The task name transcriptions are authorised and counted under.
pub(crate) fn transcription_task(state: &Shared) -> String {
    state
        .engine
        .current()
        .config
        .server
        .transcription_task
        .clone()
        .unwrap_or_else(|| "transcription".to_owned())
}

pub(crate) async fn transcriptions(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let task = transcription_task(&state);
    caller.authorize(&task)?;
    let transcriber = transcriber(&state)?;
    check_length(&state, &headers)?;
    // Bounded waiting: past `audio_parallel + audio_queue` audio requests
    // (transcriptions, jobs, pipelines), refuse before reading the body.
    let _admitted = state.audio.admit()?;
    let AudioForm {
        file,
        model,
        format,
        language,
        granularities,
        ..
    } = read_audio_form(&state, &mut form).await?;
    let format = format.unwrap_or_else(|| "json".to_owned());
    let model = model.ok_or_else(|| ApiError::bad("`model` is required", Some("model")))?;
    if !TRANSCRIPTION_MODELS.contains(&model.as_str()) {
        return Err(ApiError::UnknownModel(model));
    }
    if !["json", "text", "srt", "verbose_json", "vtt"].contains(&format.as_str()) {
        return Err(ApiError::bad(
            format!("response_format `{format}` is not one of json, text, srt, verbose_json, vtt"),
            Some("response_format"),
        ));
    }
    if let Some(g) = granularities
        .iter()
        .find(|g| !["word", "segment"].contains(&g.as_str()))
    {
        return Err(ApiError::bad(
            format!("timestamp_granularities `{g}` is not one of word, segment"),
            Some("timestamp_granularities"),
        ));
    }
    let words = granularities.iter().any(|g| g == "word");
    if !granularities.is_empty() && format != "verbose_json" {
        return Err(ApiError::bad(
            "timestamp_granularities needs response_format `verbose_json`",
            Some("timestamp_granularities"),
        ));
    }
    let upload = AudioForm::required_file(file)?;
    let permit = state.audio.slot(SLOT_WAIT).await?;
    let max = state.max_audio_s();
    let verbose = format == "verbose_json";
    let cancel = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let (transcript, usd) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let ext = upload.extension();
        transcriber
            .run_file(
                &upload.path,
                ext.as_deref(),
                Some(max),
                &TranscribeOptions {
                    language,
                    token_probs: verbose,
                    word_timestamps: words,
                    cancel: Some(cancel),
                },
            )
            .map_err(audio_error)
    })
    .await
    .map_err(ApiError::Task)??;
    state.metrics.answered(&task, "local", usd);
    let response = match format.as_str() {
        "text" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format::txt(&transcript),
        )
            .into_response(),
        "srt" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format::srt(&transcript),
        )
            .into_response(),
        "vtt" => (
            [(header::CONTENT_TYPE, "text/vtt; charset=utf-8")],
            format::vtt(&transcript),
        )
            .into_response(),
        "verbose_json" => Json(verbose_json(&transcript, words)).into_response(),
        _ => Json(json!({"text": transcript.text})).into_response(),
    };
    Ok(tagged(response, "local:whisper", usd))
}

/// OpenAI's `verbose_json`: segments, and `words` (`word`, `start`, `end`,
/// plus `probability`) when word timestamps were asked for; a segment's
/// `speaker` when the speakers are known.
pub(crate) fn verbose_json(transcript: &triage_core::Transcript, words: bool) -> Value {
    let segments: Vec<Value> = transcript
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut v = json!({
                "id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                "tokens": [], "temperature": 0.0, "avg_logprob": s.avg_logprob,
                "compression_ratio": 0.0, "no_speech_prob": s.no_speech_prob,
            });
            if let (Some(who), Value::Object(map)) = (&s.speaker, &mut v) {
                map.insert("speaker".into(), json!(who));
            }
            v
        })
        .collect();
    let mut v = json!({
        "task": "transcribe", "language": transcript.language, "duration": transcript.duration_s,
        "text": transcript.text, "segments": segments,
        "triage": {"confidence": transcript.confidence, "no_speech": transcript.no_speech},
    });
    if words && let Value::Object(map) = &mut v {
        map.insert("words".into(), json!(format::words(transcript)));
    }
    v
}
