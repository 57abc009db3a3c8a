//! Running a text command over one text or a JSONL file, keeping output in
//! input order while many requests are in flight to the model's worker.

use crate::input::{self, Item, LineError};
use crate::{InputArgs, Job};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::io::Write;
use std::process::ExitCode;
use triage_core::LocalTask;
use triage_local::{BatchConfig, ModelHandle};

/// Requests kept in flight: enough to fill batches, bounded by the queue.
const IN_FLIGHT: usize = 64;

pub async fn texts(io: InputArgs, job: Job, device: &candle_core::Device) -> Result<ExitCode> {
    let items: Vec<Result<Item, LineError>> = match (&io.text, &io.file) {
        (Some(text), _) => vec![Ok(Item {
            line: 1,
            text: text.clone(),
            extra: Map::new(),
        })],
        (None, Some(path)) => {
            let bytes = input::read_source(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            input::parse_jsonl(&bytes)
        }
        (None, None) => bail!("give a TEXT or --file FILE.jsonl"),
    };
    if !io.keep_going
        && let Some(Err(first)) = items.iter().find(|r| r.is_err())
    {
        bail!("{first} (use --keep-going to skip bad lines)");
    }

    let wanted = match job {
        Job::Moderate { .. } => LocalTask::SequenceClassification,
        Job::Entities(_) => LocalTask::TokenClassification,
        Job::Embed { .. } => LocalTask::Embedding,
    };
    let batching = BatchConfig {
        queue_capacity: IN_FLIGHT * 2,
        max_input_tokens: io.max_input_tokens.max(1),
        int8: io.int8 || (!io.f32 && triage_local::int8_by_default(&io.model, device.is_cpu())),
        ..BatchConfig::for_device(!device.is_cpu())
    };
    let handle = triage_local::start_model(&io.model, device, batching)
        .await
        .with_context(|| format!("cannot load model `{}`", io.model))?;
    if handle.info().task != wanted {
        bail!(
            "model `{}` does {}, but this command needs {wanted}",
            io.model,
            handle.info().task
        );
    }

    let progress = if io.file.is_some() {
        let bar = indicatif::ProgressBar::new(items.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut in_flight: VecDeque<tokio::task::JoinHandle<Value>> = VecDeque::new();
    let mut failed = false;
    for item in items {
        if in_flight.len() >= IN_FLIGHT
            && let Some(h) = in_flight.pop_front()
        {
            failed |= emit(&mut out, h.await?, &progress)?;
        }
        let handle = handle.clone();
        in_flight.push_back(tokio::spawn(
            async move { answer(&handle, job, item).await },
        ));
    }
    while let Some(h) = in_flight.pop_front() {
        failed |= emit(&mut out, h.await?, &progress)?;
    }
    out.flush()?;
    progress.finish_and_clear();
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Write one output line; returns true when it reports an error.
fn emit(out: &mut impl Write, value: Value, progress: &indicatif::ProgressBar) -> Result<bool> {
    let is_error = value.get("error").is_some();
    serde_json::to_writer(&mut *out, &value)?;
    out.write_all(b"\n")?;
    progress.inc(1);
    Ok(is_error)
}

fn error_value(line: usize, kind: &str, message: String) -> Value {
    json!({"line": line, "error": {"kind": kind, "message": message}})
}

async fn answer(handle: &ModelHandle, job: Job, item: Result<Item, LineError>) -> Value {
    let item = match item {
        Ok(item) => item,
        Err(e) => return error_value(e.line(), e.kind(), e.to_string()),
    };
    let mut obj = Map::new();
    obj.insert("text".into(), Value::String(item.text.clone()));
    let result: Result<(), triage_local::LocalError> = async {
        match job {
            Job::Moderate { windows } => {
                let c = handle.classify(&item.text, windows).await?;
                let scores: Map<String, Value> = c
                    .scores
                    .iter()
                    .map(|s| (s.label.clone(), json!(s.score)))
                    .collect();
                if let Some(top) = c.top() {
                    obj.insert("label".into(), json!(top.label));
                }
                obj.insert("scores".into(), Value::Object(scores));
                obj.insert("truncated".into(), json!(c.truncated));
                if windows {
                    obj.insert("windows".into(), json!(c.windows));
                }
            }
            Job::Entities(strategy) => {
                let t = handle.tag(&item.text, strategy).await?;
                obj.insert("entities".into(), json!(t.entities));
                obj.insert("truncated".into(), json!(t.truncated));
            }
            Job::Embed { normalize } => {
                let mut e = handle.embed(&item.text).await?;
                if normalize {
                    let norm = e
                        .vector
                        .iter()
                        .map(|v| v * v)
                        .sum::<f32>()
                        .sqrt()
                        .max(1e-12);
                    e.vector.iter_mut().for_each(|v| *v /= norm);
                }
                obj.insert("embedding".into(), json!(e.vector));
                obj.insert("truncated".into(), json!(e.truncated));
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let kind = if e.is_retryable() {
            "overloaded"
        } else {
            "model_error"
        };
        return error_value(item.line, kind, e.to_string());
    }
    for (k, v) in item.extra {
        obj.entry(k).or_insert(v);
    }
    Value::Object(obj)
}
