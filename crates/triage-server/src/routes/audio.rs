//! `POST /v1/audio/transcriptions` in OpenAI's shape (json, text, srt, vtt,
//! verbose_json), answered by the configured Whisper specialist.

use super::info::TRANSCRIPTION_MODELS;
use super::transcription_task;
use super::upload::{AudioForm, SLOT_WAIT, check_length, read_audio_form};
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
use triage_engine::Transcriber;
use triage_engine::speech::{TranscribeOptions, format};

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
    if e.is_bad_audio() {
        ApiError::bad(
            format!(
                "the audio file cannot be used: {}",
                triage_engine::error::chain(&e)
            ),
            Some("file"),
        )
    } else {
        e.into()
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
    // (transcriptions, jobs, pipelines), refuse before reading the file; the
    // slot is taken once the caller is authorised and the file begins.
    let mut admitted = None;
    let mut gate = |_: Option<&str>| -> Result<Option<u64>, ApiError> {
        admitted = Some(state.audio.admit_as(caller.key_name())?);
        Ok(None)
    };
    let AudioForm {
        file,
        model,
        format,
        language,
        granularities,
        ..
    } = read_audio_form(&state, &mut form, &mut gate).await?;
    let _admitted = admitted;
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
