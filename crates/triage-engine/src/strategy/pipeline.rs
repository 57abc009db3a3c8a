//! Pipeline: ordered stages with typed inputs and outputs. Audio →
//! transcript (Whisper) → summary (a small cascade: the cheap model first,
//! or straight to the stronger one when the transcript is not confident) →
//! people and organisations (NER) → action items.

use super::{Called, chat, push_hosted};
use crate::config::{Pipeline, StageKind};
use crate::engine::{Answered, Input, Run};
use crate::error::EngineError;
use crate::specialists::Specialist;
use regex::Regex;
use std::sync::LazyLock;
use std::time::Instant;
use triage_core::TaskAnswer;
use triage_core::answer::{ActionItem, PipelineAnswer};
use triage_core::llm::{Answer, ChatRequest, Message, Role};
use triage_core::trace::Decision;
use triage_local::speech::TranscribeOptions;

pub async fn run(run: &mut Run<'_>, p: &Pipeline, input: Input) -> Result<Answered, EngineError> {
    let mut text = String::new();
    let mut confidence: Option<f64> = None;
    let mut audio_seconds = 0.0;
    let mut out = PipelineAnswer::default();
    let mut output_tokens = 0u64;
    let mut people: Vec<String> = Vec::new();
    let mut input = Some(input);
    for stage in &p.stages {
        match &stage.kind {
            StageKind::Transcribe { specialist } => {
                let Some(Input::Audio { bytes, file_name }) = input.take() else {
                    return Err(EngineError::WrongInput {
                        task: run.task.name.clone(),
                        expected: "audio",
                        got: "text",
                    });
                };
                let s = run.engine.specialists.get(specialist)?.clone();
                let Specialist::Whisper { engine, .. } = &s else {
                    return Err(EngineError::UnknownSpecialist(specialist.clone()));
                };
                let started = Instant::now();
                let ext = file_name
                    .as_deref()
                    .and_then(|n| n.rsplit_once('.'))
                    .map(|(_, e)| e.to_ascii_lowercase());
                let limit = run.engine.config.server.max_audio_seconds;
                let engine = engine.clone();
                let transcript = tokio::task::spawn_blocking(move || {
                    let pcm = triage_local::speech::decode(bytes, ext.as_deref(), limit)?;
                    engine
                        .transcribe(&pcm.samples, &TranscribeOptions::default(), None)
                        .map_err(EngineError::from)
                })
                .await
                .map_err(|source| EngineError::Task {
                    what: "transcription",
                    source,
                })??;
                audio_seconds = transcript.duration_s;
                confidence = Some(f64::from(transcript.confidence));
                text = transcript.text.trim().to_owned();
                run.local_step(
                    &stage.name,
                    &format!("local/{specialist}"),
                    "transcribe",
                    &s,
                    started.elapsed(),
                    Decision::Ran,
                    format!(
                        "{:.1} s of audio, confidence {:.3}",
                        transcript.duration_s, transcript.confidence
                    ),
                    Some(f64::from(transcript.confidence)),
                    None,
                );
                out.transcript = Some(text.clone());
                out.transcript_confidence = Some(transcript.confidence);
                out.duration_s = Some(transcript.duration_s);
            }
            StageKind::Summarize {
                targets,
                min_transcript_confidence,
                system_prompt,
                max_tokens,
            } => {
                if let Some(i) = input.take() {
                    text = text_of(i, &run.task.name)?;
                }
                // Low transcript confidence skips the cheap model.
                let skip = match (min_transcript_confidence, confidence) {
                    (Some(min), Some(c)) if c < *min && targets.len() > 1 => 1,
                    _ => 0,
                };
                let (redacted, restorer) = run.redact(&text).await?;
                let req = ChatRequest {
                    messages: vec![
                        Message::system(system_prompt.clone().unwrap_or_else(|| {
                            "Summarise this meeting transcript in 2-4 sentences. Mention decisions and who will do what.".into()
                        })),
                        Message::user(redacted),
                    ],
                    max_tokens: max_tokens.or(Some(200)),
                    temperature: Some(0.2),
                    ..ChatRequest::default()
                };
                let reason = if skip > 0 {
                    format!(
                        "transcript confidence {:.3} < {:.3}: stronger model",
                        confidence.unwrap_or(0.0),
                        min_transcript_confidence.unwrap_or(0.0)
                    )
                } else {
                    "summary".to_owned()
                };
                let Called {
                    result,
                    cost_usd,
                    elapsed,
                } = chat(run, &stage.name, &targets[skip..], &req, None).await;
                let first_model = targets
                    .get(skip)
                    .map(|t| format!("{}/{}", t.provider, t.model))
                    .unwrap_or_default();
                let resp = match result {
                    Ok(r) => r,
                    Err(e) => {
                        push_hosted(
                            run,
                            &stage.name,
                            first_model,
                            Decision::Failed,
                            format!("error: {}", crate::error::chain(&e)),
                            None,
                            elapsed,
                            cost_usd,
                        );
                        return Err(e);
                    }
                };
                let summary = match &resp.answer {
                    Answer::Text { text } => restorer.restore(text.trim()),
                    Answer::Refusal { reason } => {
                        out.summary_refusal = Some(reason.clone());
                        String::new()
                    }
                };
                output_tokens += resp.usage.output_tokens;
                push_hosted(
                    run,
                    &stage.name,
                    format!("{}/{}", resp.provider, resp.model),
                    Decision::Accepted,
                    reason,
                    confidence,
                    elapsed,
                    cost_usd,
                );
                out.summary = Some(summary);
            }
            StageKind::Entities { specialist, types } => {
                if let Some(i) = input.take() {
                    text = text_of(i, &run.task.name)?;
                }
                let s = run.engine.specialists.get(specialist)?.clone();
                let Specialist::Tagger { handle, .. } = &s else {
                    return Err(EngineError::UnknownSpecialist(specialist.clone()));
                };
                let started = Instant::now();
                let tagged = handle
                    .tag(&text, triage_core::Aggregation::Simple)
                    .await
                    .map_err(|source| EngineError::Local {
                        name: specialist.clone(),
                        source,
                    })?;
                let mut by_type: Vec<(String, Vec<String>)> = Vec::new();
                for ty in types {
                    let mut seen: Vec<String> = Vec::new();
                    for e in tagged.entities.iter().filter(|e| &e.label == ty) {
                        let name = e.text.trim().to_owned();
                        if !name.is_empty() && !seen.contains(&name) {
                            seen.push(name);
                        }
                    }
                    if ty == "PER" {
                        people = seen.clone();
                    }
                    by_type.push((type_key(ty), seen));
                }
                let n = tagged.entities.len();
                run.local_step(
                    &stage.name,
                    &format!("local/{specialist}"),
                    "tag",
                    &s,
                    started.elapsed(),
                    Decision::Ran,
                    format!("{n} entities"),
                    None,
                    None,
                );
                out.entities.extend(by_type);
            }
            StageKind::ActionItems => {
                if let Some(i) = input.take() {
                    text = text_of(i, &run.task.name)?;
                }
                let started = Instant::now();
                let items = action_items(&text, &people);
                run.trace.push(triage_core::trace::TierTrace {
                    tier: stage.name.clone(),
                    model: "rules".into(),
                    decision: Decision::Ran,
                    reason: format!("{} action item(s)", items.len()),
                    score: None,
                    latency_ms: crate::engine::ms(started.elapsed()),
                    cost_usd: 0.0,
                    queue_ms: None,
                    compute_ms: None,
                });
                out.action_items = Some(items);
            }
        }
    }
    // The pipeline's answer is the whole record; the tier that "answered" is
    // the last model stage.
    if run.trace.answered_by().is_none()
        && let Some(t) = run
            .trace
            .tiers
            .iter_mut()
            .rev()
            .find(|t| t.decision == Decision::Ran)
    {
        t.decision = Decision::Accepted;
    }
    Ok(Answered {
        input_chars: text.chars().count() + 200,
        output_tokens: output_tokens.max(150),
        audio_seconds,
        value: TaskAnswer::Pipeline(out),
    })
}

fn text_of(input: Input, task: &str) -> Result<String, EngineError> {
    match input {
        Input::Text(t) => Ok(t),
        Input::Chat(req) => Ok(req
            .messages
            .iter()
            .filter(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .collect::<Vec<_>>()
            .join("\n")),
        Input::Audio { .. } => Err(EngineError::WrongInput {
            task: task.to_owned(),
            expected: "text",
            got: "audio",
        }),
    }
}

/// The answer's key for an entity type (`PER` → `people`).
pub(crate) fn type_key(ty: &str) -> String {
    match ty {
        "PER" => "people".into(),
        "ORG" => "organisations".into(),
        "LOC" => "locations".into(),
        "MISC" => "misc".into(),
        other => other.to_ascii_lowercase(),
    }
}

static COMMITMENT: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(will|'ll|going to|need(?:s)? to|has to|have to|must|should|let's|let us|action item|follow up|follow-up|to-do|todo|make sure|take care of|by (?:monday|tuesday|wednesday|thursday|friday|tomorrow|next week|end of))\b",
    )
    .ok()
});

/// Sentences that commit someone to something, with the owner where a person
/// the NER stage found (or a first-person speaker) is named in the sentence.
pub fn action_items(text: &str, people: &[String]) -> Vec<ActionItem> {
    let Some(re) = COMMITMENT.as_ref() else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for sentence in split_sentences(text) {
        if !re.is_match(&sentence) {
            continue;
        }
        // Questions and hedged future statements about the world are not tasks.
        if sentence.ends_with('?') {
            continue;
        }
        let owner = people
            .iter()
            .find(|p| sentence.contains(p.as_str()))
            .cloned()
            .or_else(|| {
                let lower = sentence.to_lowercase();
                (lower.starts_with("i ")
                    || lower.starts_with("i'll")
                    || lower.starts_with("we ")
                    || lower.starts_with("we'll"))
                .then(|| "speaker".to_owned())
            });
        items.push(ActionItem {
            text: sentence,
            owner,
        });
    }
    items
}

fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if matches!(c, '.' | '!' | '?' | '\n') {
            let s = cur.trim().to_owned();
            if s.chars().any(char::is_alphabetic) {
                out.push(s);
            }
            cur.clear();
        }
    }
    let s = cur.trim().to_owned();
    if s.chars().any(char::is_alphabetic) {
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_commitments_and_their_owners() {
        let text = "Thanks everyone. Maria will send the budget to Acme by Friday. Is the demo ready? \
                    I'll book the room. The weather was nice.";
        let items = action_items(text, &["Maria".to_owned()]);
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!(items[0].owner.as_deref(), Some("Maria"));
        assert_eq!(
            items[0].text,
            "Maria will send the budget to Acme by Friday."
        );
        assert_eq!(items[1].owner.as_deref(), Some("speaker"));
    }
}
