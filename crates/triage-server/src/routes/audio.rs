//! `POST /v1/audio/transcriptions` in OpenAI's shape (json, text, srt, vtt,
//! verbose_json), answered by the configured Whisper specialist, and the
//! multipart form it shares with `/v1/jobs` and `/v1/execute`.

use super::info::TRANSCRIPTION_MODELS;
use crate::auth::{Caller, tagged};
use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::extract::{Multipart, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::time::Duration;
use triage_engine::Transcriber;
use triage_engine::speech::{TranscribeOptions, format};

/// How long an admitted transcription waits for a decoding slot.
const SLOT_WAIT: Duration = Duration::from_secs(120);

/// The fields of an audio upload (`/v1/audio/transcriptions`, `/v1/jobs`).
#[derive(Debug, Default)]
pub(crate) struct AudioForm {
    /// File name (for its extension) and bytes.
    pub file: Option<(Option<String>, Vec<u8>)>,
    pub model: Option<String>,
    pub format: Option<String>,
    pub language: Option<String>,
    pub task: Option<String>,
    /// `/v1/execute`: the overrides as JSON text.
    pub overrides: Option<String>,
}

impl AudioForm {
    /// The uploaded bytes and the file name's extension, lower case.
    pub(crate) fn required_file(
        file: Option<(Option<String>, Vec<u8>)>,
    ) -> Result<(Vec<u8>, Option<String>), ApiError> {
        let (name, bytes) =
            file.ok_or_else(|| ApiError::bad("`file` is required", Some("file")))?;
        let ext = name
            .as_deref()
            .and_then(|n| n.rsplit_once('.'))
            .map(|(_, e)| e.to_ascii_lowercase());
        Ok((bytes, ext))
    }
}

pub(crate) async fn read_audio_form(form: &mut Multipart) -> Result<AudioForm, ApiError> {
    let mut out = AudioForm::default();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad(format!("malformed multipart body: {e}"), None))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let file_name = field.file_name().map(str::to_owned);
            let bytes = field
                .bytes()
                .await
                .map_err(|e| ApiError::bad(format!("cannot read `file`: {e}"), Some("file")))?;
            out.file = Some((file_name, bytes.to_vec()));
            continue;
        }
        let text = field.text().await.unwrap_or_default();
        let text = Some(text).filter(|t| !t.is_empty());
        match name.as_str() {
            "model" => out.model = text,
            "response_format" => out.format = text,
            "language" => out.language = text,
            "task" => out.task = text,
            "overrides" => out.overrides = text,
            _ => {}
        }
    }
    Ok(out)
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
    mut form: Multipart,
) -> Result<Response, ApiError> {
    let task = transcription_task(&state);
    caller.authorize(&task)?;
    let transcriber = transcriber(&state)?;
    let AudioForm {
        file,
        model,
        format,
        language,
        ..
    } = read_audio_form(&mut form).await?;
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
    let (bytes, ext) = AudioForm::required_file(file)?;
    // Bounded waiting: past `audio_parallel + audio_queue` requests, refuse at
    // once rather than queue without end.
    let _admitted = state.audio.admit()?;
    let permit = state.audio.slot(SLOT_WAIT).await?;
    let max = state.max_audio_s();
    let verbose = format == "verbose_json";
    let (transcript, usd) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        transcriber
            .run(
                bytes,
                ext.as_deref(),
                Some(max),
                &TranscribeOptions {
                    language,
                    token_probs: verbose,
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
        "verbose_json" => {
            let segments: Vec<Value> = transcript
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    json!({
                        "id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                        "tokens": [], "temperature": 0.0, "avg_logprob": s.avg_logprob,
                        "compression_ratio": 0.0, "no_speech_prob": s.no_speech_prob,
                    })
                })
                .collect();
            Json(json!({
                "task": "transcribe", "language": transcript.language, "duration": transcript.duration_s,
                "text": transcript.text, "segments": segments,
                "triage": {"confidence": transcript.confidence, "no_speech": transcript.no_speech},
            }))
            .into_response()
        }
        _ => Json(json!({"text": transcript.text})).into_response(),
    };
    Ok(tagged(response, "local:whisper", usd))
}
