//! Jobs for long audio and pipelines: submit, then poll, stream progress
//! (server-sent events) and fetch the result. Without a `task` field a job
//! transcribes; with one (and a config) it runs that engine task, and its
//! result is `{"answer", "trace"}`. A job runs in its own task, so it finishes
//! even when the client that submitted it has gone. Finished jobs are kept
//! for an hour; the store is bounded.

use crate::error::ApiError;
#[cfg(feature = "speech")]
use crate::routes::audio::{audio_error, transcriber};
use crate::routes::transcription_task;
use crate::routes::upload::{AudioForm, Upload, check_length, read_audio_form};
use crate::state::Shared;
use axum::Json;
use axum::extract::{Multipart, Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
#[cfg(feature = "speech")]
use triage_engine::Transcriber;
#[cfg(feature = "speech")]
use triage_engine::speech::TranscribeOptions;

const KEEP_FINISHED: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
enum Status {
    Queued,
    Running,
    Succeeded(Value),
    Failed(String),
}

#[derive(Debug)]
struct Job {
    task: String,
    /// The key (by name) that submitted it; `None` on the unix socket. A
    /// TCP key sees only its own jobs (another's is 404).
    owner: Option<String>,
    status: Mutex<Status>,
    progress: AtomicU8,
    created_at: u64,
    finished: Mutex<Option<Instant>>,
    changed: tokio::sync::watch::Sender<u8>,
    /// Set by `POST /v1/jobs/{id}/cancel`.
    cancel: Arc<AtomicBool>,
}

impl Job {
    fn view(&self, id: &str) -> Value {
        let status = self
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or(Status::Failed("poisoned".into()));
        let (name, result, error) = match status {
            Status::Queued => ("queued", None, None),
            Status::Running => ("running", None, None),
            Status::Succeeded(v) => ("succeeded", Some(v), None),
            Status::Failed(e) => ("failed", None, Some(e)),
        };
        json!({
            "id": id, "object": "job", "task": self.task, "status": name,
            "progress": self.progress.load(Ordering::Relaxed), "created_at": self.created_at,
            "result": result, "error": error,
        })
    }

    fn is_done(&self) -> bool {
        matches!(
            self.status.lock().map(|s| s.clone()),
            Ok(Status::Succeeded(_) | Status::Failed(_))
        )
    }
}

/// The jobs of one server.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
}

impl Jobs {
    /// Job `id` as `caller` may see it: a TCP key sees its own jobs only
    /// (another key's is answered like one that does not exist); the unix
    /// socket sees every job.
    fn get(&self, id: &str, caller: &crate::auth::Caller) -> Result<Arc<Job>, ApiError> {
        self.jobs
            .lock()
            .ok()
            .and_then(|j| j.get(id).cloned())
            .filter(|job| match &caller.0 {
                Some(key) => job.owner.as_deref() == Some(key.name.as_str()),
                None => true,
            })
            .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))
    }

    /// Drop finished jobs past their retention; refuse when still full.
    fn insert(&self, id: String, job: Arc<Job>, capacity: usize) -> Result<(), ApiError> {
        let mut jobs = self
            .jobs
            .lock()
            .map_err(|_| ApiError::Internal("job store poisoned"))?;
        jobs.retain(|_, j| {
            j.finished
                .lock()
                .ok()
                .and_then(|f| *f)
                .is_none_or(|t| t.elapsed() < KEEP_FINISHED)
        });
        if jobs.len() >= capacity {
            return Err(ApiError::Overloaded { retry_after_s: 30 });
        }
        jobs.insert(id, job);
        Ok(())
    }
}

/// `POST /v1/jobs`: multipart like `/v1/audio/transcriptions`; answers 202.
/// The upload is spooled to disk and only its header is checked now; it is
/// decoded when the job runs, so a queued job holds a file, not samples.
pub async fn submit(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Result<Response, ApiError> {
    check_length(&state, &headers)?;
    let engine = state.engine.current();
    // When the file begins: the task named before it decides who may upload
    // (authorised now, before the file is read) and how much (a text task's
    // upload is bounded like `/v1/execute`'s body); then one line for every
    // audio request, kept until the job ends.
    let mut admitted = None;
    let mut gate = |task: Option<&str>| -> Result<Option<u64>, ApiError> {
        let limit = match task.filter(|t| *t != "transcription") {
            Some(name) if engine.config.tasks.contains_key(name) => {
                caller.authorize(name)?;
                let takes_audio = engine.task(name).is_ok_and(|t| t.takes_audio());
                (!takes_audio).then_some(state.limits.moderation_body_bytes as u64)
            }
            Some(other) => {
                return Err(ApiError::bad(
                    format!("task `{other}` is not served (transcription)"),
                    Some("task"),
                ));
            }
            None => {
                caller.authorize(&transcription_task(&state))?;
                None
            }
        };
        admitted = Some(state.audio.admit_as(caller.key_name())?);
        Ok(limit)
    };
    let form = read_audio_form(&state, &mut form, &mut gate).await?;
    // The gate ran (there is a file), so the task is served and the caller
    // may use it: a `task` after the file is refused by the form reader.
    let admitted = admitted.ok_or_else(|| ApiError::bad("`file` is required", Some("file")))?;
    if let Some(name) = form.task.as_deref()
        && name != "transcription"
    {
        // The job spends as its submitter: the key's budgets and its name
        // in the ledger, refused now if a budget is already spent.
        let overrides = caller.overrides(triage_engine::Overrides::default())?;
        if let Some(e) = engine.budgets.spent_for(name, overrides.key.as_deref()) {
            return Err(ApiError::from(triage_engine::EngineError::Budget {
                tier: "job".into(),
                source: e.into(),
            }));
        }
        return submit_task(&state, engine.clone(), name, form.file, admitted, overrides).await;
    }
    submit_transcription(state, &caller, form, admitted).await
}

/// A job without a task: transcribe the upload with the Whisper specialist.
#[cfg(feature = "speech")]
async fn submit_transcription(
    state: Shared,
    caller: &crate::auth::Caller,
    form: AudioForm,
    admitted: crate::limits::Admitted,
) -> Result<Response, ApiError> {
    let AudioForm {
        file,
        language,
        granularities,
        ..
    } = form;
    // Authorised by the form's gate before the file was read.
    let task = transcription_task(&state);
    let transcriber = transcriber(&state)?;
    let upload = AudioForm::required_file(file)?;
    // A file that is not audio is a 400 for the submitter, not a failed job.
    let ext = upload.extension();
    let probe_path = upload.path.to_path_buf();
    let probe_ext = ext.clone();
    tokio::task::spawn_blocking(move || {
        Transcriber::probe_file(&probe_path, probe_ext.as_deref()).map_err(audio_error)
    })
    .await
    .map_err(ApiError::Task)??;
    let max = state.max_audio_s();
    let words = granularities.iter().any(|g| g == "word");

    let (id, job) = new_job(&state, &task, caller.0.as_ref().map(|k| k.name.clone()))?;
    let metrics_state = state.clone();
    tokio::spawn(async move {
        let _admitted = admitted;
        let Some(permit) = metrics_state.audio.job_slot().await else {
            return;
        };
        if job.cancel.load(Ordering::Relaxed) {
            job.finish(Status::Failed("cancelled".into()));
            return;
        }
        if let Ok(mut s) = job.status.lock() {
            *s = Status::Running;
        }
        job.changed.send_replace(0);
        let progress_job = job.clone();
        let cancel = job.cancel.clone();
        let started = Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let cb: Box<dyn FnMut(i32) + Send> = Box::new(move |p| {
                let p = p.clamp(0, 100) as u8;
                progress_job.progress.store(p, Ordering::Relaxed);
                progress_job.changed.send_replace(p);
            });
            let transcript = transcriber.transcribe_file(
                &upload.path,
                ext.as_deref(),
                Some(max),
                &TranscribeOptions {
                    language,
                    token_probs: false,
                    word_timestamps: words,
                    cancel: Some(cancel),
                },
                Some(cb),
            );
            drop(upload);
            (transcript, transcriber.compute_cost(started.elapsed()))
        })
        .await;
        let status = match outcome {
            Ok((Ok(t), usd)) => {
                metrics_state.metrics.answered(&task, "local", usd);
                job.progress.store(100, Ordering::Relaxed);
                Status::Succeeded(serde_json::to_value(&t).unwrap_or(Value::Null))
            }
            Ok((Err(e), _)) => Status::Failed(triage_engine::error::chain(&e)),
            Err(e) => Status::Failed(format!("the job stopped: {e}")),
        };
        job.finish(status);
    });
    Ok(accepted(&id))
}

/// A build without speech has no Whisper specialist to transcribe with.
#[cfg(not(feature = "speech"))]
async fn submit_transcription(
    _state: Shared,
    _caller: &crate::auth::Caller,
    _form: AudioForm,
    _admitted: crate::limits::Admitted,
) -> Result<Response, ApiError> {
    Err(ApiError::no_speech())
}

/// `POST /v1/jobs/{id}/cancel`: a queued job never starts; a running
/// transcription stops at whisper.cpp's next abort check. Answers the job.
pub async fn cancel(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.jobs.get(&id, &caller)?;
    caller.authorize(&job.task)?;
    if !job.is_done() {
        job.cancel.store(true, Ordering::Relaxed);
    }
    Ok(Json(job.view(&id)))
}

impl Job {
    fn finish(&self, status: Status) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
        if let Ok(mut f) = self.finished.lock() {
            *f = Some(Instant::now());
        }
        self.changed.send_replace(100);
    }
}

fn accepted(id: &str) -> Response {
    (
        axum::http::StatusCode::ACCEPTED,
        Json(json!({"id": id, "object": "job", "status": "queued"})),
    )
        .into_response()
}

/// A queued job for `task`, stored (or 429 when the store is full).
fn new_job(
    state: &Shared,
    task: &str,
    owner: Option<String>,
) -> Result<(String, Arc<Job>), ApiError> {
    // UUID v7: time for order, plus 74 random bits so that one client
    // cannot guess another's job.
    let id = crate::auth::request_id("job");
    let (changed, _) = tokio::sync::watch::channel(0u8);
    let job = Arc::new(Job {
        task: task.to_owned(),
        owner,
        status: Mutex::new(Status::Queued),
        progress: AtomicU8::new(0),
        created_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        finished: Mutex::new(None),
        changed,
        cancel: Arc::new(AtomicBool::new(false)),
    });
    state.jobs.insert(id.clone(), job.clone(), 1000)?;
    Ok((id, job))
}

/// A job that runs engine task `task` on the uploaded file: audio for tasks
/// that start by transcribing (read from the spooled file when the job
/// runs), UTF-8 text otherwise. It runs on the engine current at
/// submission, even if the config is reloaded meanwhile.
async fn submit_task(
    state: &Shared,
    engine: Arc<triage_engine::Engine>,
    task: &str,
    file: Option<Upload>,
    admitted: crate::limits::Admitted,
    overrides: triage_engine::Overrides,
) -> Result<Response, ApiError> {
    let upload = AudioForm::required_file(file)?;
    let takes_audio = engine.task(task).map(|t| t.takes_audio()).unwrap_or(false);
    let (input, keep) = if takes_audio {
        (
            triage_engine::Input::AudioFile {
                path: upload.path.to_path_buf(),
                file_name: upload.name.clone(),
            },
            Some(upload),
        )
    } else {
        // Text tasks bound their input themselves (max_input_tokens); the
        // upload limit bounds what is read here.
        let bytes = tokio::fs::read(&upload.path).await.map_err(|e| {
            tracing::error!(error = %e, "cannot read a spooled upload");
            ApiError::Internal("cannot read the upload")
        })?;
        let text = String::from_utf8(bytes).map_err(|_| {
            ApiError::bad(
                format!("task `{task}` takes text: `file` must be UTF-8"),
                Some("file"),
            )
        })?;
        (triage_engine::Input::Text(text), None)
    };
    let (id, job) = new_job(state, task, overrides.key.clone())?;
    let state = state.clone();
    let task = task.to_owned();
    tokio::spawn(async move {
        let _admitted = admitted;
        let _upload = keep;
        // Pipelines transcribe: they wait for a Whisper slot like other jobs.
        let _slot = if takes_audio {
            state.audio.job_slot().await
        } else {
            None
        };
        if job.cancel.load(Ordering::Relaxed) {
            job.finish(Status::Failed("cancelled".into()));
            return;
        }
        if let Ok(mut s) = job.status.lock() {
            *s = Status::Running;
        }
        job.changed.send_replace(0);
        let status = match crate::routes::execute::run_job(
            &state, &engine, &task, input, &overrides,
        )
        .await
        {
            Ok(v) => {
                job.progress.store(100, Ordering::Relaxed);
                Status::Succeeded(v)
            }
            Err(e) => Status::Failed(e),
        };
        job.finish(status);
    });
    Ok(accepted(&id))
}

/// `GET /v1/jobs/{id}`.
pub async fn status(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.jobs.get(&id, &caller)?;
    caller.authorize(&job.task)?;
    Ok(Json(job.view(&id)))
}

/// `GET /v1/jobs/{id}/result`: the transcript, or 409 while the job runs.
pub async fn result(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = state.jobs.get(&id, &caller)?;
    caller.authorize(&job.task)?;
    let status = job
        .status
        .lock()
        .map(|s| s.clone())
        .map_err(|_| ApiError::Internal("job state poisoned"))?;
    match status {
        Status::Succeeded(v) => Ok(Json(v)),
        Status::Failed(e) => Err(ApiError::Unprocessable(format!("job `{id}` failed: {e}"))),
        _ => Err(ApiError::Conflict(format!(
            "job `{id}` has not finished; poll /v1/jobs/{id} or stream /v1/jobs/{id}/events"
        ))),
    }
}

/// `GET /v1/jobs/{id}/events`: server-sent events with the job's state on
/// every change, ending after the final state.
pub async fn events(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state.jobs.get(&id, &caller)?;
    caller.authorize(&job.task)?;
    let rx = job.changed.subscribe();
    let stream = futures_util::stream::unfold(
        (job, rx, id, false),
        |(job, mut rx, id, sent_final)| async move {
            if sent_final {
                return None;
            }
            let done = job.is_done();
            let event = Event::default()
                .event(if done { "done" } else { "progress" })
                .json_data(job.view(&id))
                .ok()?;
            if !done {
                // Wait for the next change (or a timeout, to re-send state).
                let _ = tokio::time::timeout(Duration::from_secs(15), rx.changed()).await;
            }
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (job, rx, id, done),
            ))
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
