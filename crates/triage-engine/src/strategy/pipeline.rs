//! Pipeline: ordered stages with typed inputs and outputs. Audio →
//! transcript (Whisper) → summary (a small cascade: the cheap model first,
//! or straight to the stronger one when the transcript is not confident) →
//! people and organisations (NER) → action items.

use super::{Called, HostedStep, chat, push_hosted};
use crate::config::{Pipeline, StageKind};
use crate::engine::{Answered, Input, LocalStep, Run, StepOutcome};
use crate::error::EngineError;
use crate::specialists::Specialist;
#[cfg(feature = "speech")]
use crate::speech::{transcribe_stage, transcript_text};
use regex::Regex;
use std::sync::LazyLock;
use std::time::Instant;
use triage_core::TaskAnswer;
use triage_core::answer::{ActionItem, PipelineAnswer, TranscriptTurn};
use triage_core::llm::{Answer, ChatRequest, Message, Role};
use triage_core::trace::Decision;

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
                let (source, file_name) = match input.take() {
                    Some(Input::Audio { bytes, file_name }) => (Ok(bytes), file_name),
                    Some(Input::AudioFile { path, file_name }) => (Err(path), file_name),
                    _ => {
                        return Err(EngineError::WrongInput {
                            task: run.task.name.clone(),
                            expected: "audio",
                            got: "text",
                        });
                    }
                };
                let s = run.engine.specialists.get(specialist)?.clone();
                let started = Instant::now();
                let ext = file_name
                    .as_deref()
                    .and_then(|n| n.rsplit_once('.'))
                    .map(|(_, e)| e.to_ascii_lowercase());
                let limit = run.engine.config.server.max_audio_seconds;
                let transcript = transcribe_stage(&s, specialist, source, ext, limit).await?;
                audio_seconds = transcript.duration_s;
                confidence = Some(f64::from(transcript.confidence));
                // With speakers known, later stages read who said what.
                text = transcript_text(&transcript);
                out.segments = Some(
                    transcript
                        .segments
                        .iter()
                        .map(|s| TranscriptTurn {
                            start: s.start,
                            end: s.end,
                            speaker: s.speaker.clone(),
                            text: s.text.clone(),
                        })
                        .collect(),
                );
                run.local_step(
                    LocalStep {
                        tier: &stage.name,
                        model: &format!("local/{specialist}"),
                        operation: "transcribe",
                        specialist: &s,
                        time: started.elapsed().into(),
                        error: None,
                    },
                    StepOutcome {
                        decision: Decision::Ran,
                        reason: format!(
                            "{:.1} s of audio, confidence {:.3}",
                            transcript.duration_s, transcript.confidence
                        ),
                        score: Some(f64::from(transcript.confidence)),
                    },
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
                            HostedStep {
                                tier: &stage.name,
                                model: first_model,
                                elapsed,
                                cost_usd,
                            },
                            StepOutcome {
                                decision: Decision::Failed,
                                reason: format!("error: {}", crate::error::chain(&e)),
                                score: None,
                            },
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
                    HostedStep {
                        tier: &stage.name,
                        model: format!("{}/{}", resp.provider, resp.model),
                        elapsed,
                        cost_usd,
                    },
                    StepOutcome {
                        decision: Decision::Accepted,
                        reason,
                        score: confidence,
                    },
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
                    LocalStep {
                        tier: &stage.name,
                        model: &format!("local/{specialist}"),
                        operation: "tag",
                        specialist: &s,
                        time: started.elapsed().into(),
                        error: None,
                    },
                    StepOutcome {
                        decision: Decision::Ran,
                        reason: format!("{n} entities"),
                        score: None,
                    },
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
    if out.transcript.is_some() || out.summary.is_some() {
        out.markdown = Some(markdown(&out));
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
        Input::Audio { .. } | Input::AudioFile { .. } => Err(EngineError::WrongInput {
            task: task.to_owned(),
            expected: "text",
            got: "audio",
        }),
    }
}

/// The answer's key for an entity type (`PER` → `people`).
pub fn type_key(ty: &str) -> String {
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

static DUE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    let day = r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)";
    let month = r"(?:january|february|march|april|may|june|july|august|september|october|november|december)";
    Regex::new(&format!(
        r"(?i)\b(?:(?:by|before|on|until|due|no later than)\s+)?((?:next\s+|this\s+)?{day}(?:\s+(?:morning|afternoon|evening))?|tomorrow(?:\s+(?:morning|afternoon|evening))?|tonight|today|end of (?:the )?(?:day|week|month|quarter|year)|the end of (?:the )?(?:day|week|month|quarter|year)|next (?:week|month|quarter)|{month}\s+\d{{1,2}}(?:st|nd|rd|th)?|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{month}|\d{{1,2}}(?::\d{{2}})?\s*(?:am|pm)|eod|eow)\b"
    ))
    .ok()
});

/// When a sentence says something is due, as said.
fn due_date(sentence: &str) -> Option<String> {
    DUE.as_ref()?
        .captures(sentence)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().to_owned())
}

/// Sentences that commit someone to something, with the owner where a person
/// the NER stage found (or a first-person speaker) is named in the sentence,
/// and the due date where one is said. Lines `Speaker N: ...` (a transcript
/// with speakers) make that speaker the owner of what they promise in the
/// first person.
pub fn action_items(text: &str, people: &[String]) -> Vec<ActionItem> {
    let Some(re) = COMMITMENT.as_ref() else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for line in text.lines() {
        let (speaker, line) = match line.split_once(": ") {
            Some((who, rest)) if who.starts_with("Speaker ") && who.len() < 16 => (Some(who), rest),
            _ => (None, line),
        };
        for sentence in split_sentences(line) {
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
                    .then(|| speaker.unwrap_or("speaker").to_owned())
                });
            items.push(ActionItem {
                due: due_date(&sentence),
                text: sentence,
                owner,
            });
        }
    }
    items
}

fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// Meeting notes in Markdown: summary, action items (owner, due date),
/// people and organisations, and the transcript by speaker turn.
pub fn markdown(a: &PipelineAnswer) -> String {
    let mut md = String::from("# Meeting notes\n");
    if let Some(d) = a.duration_s {
        md.push_str(&format!("\nRecording: {}\n", clock(d)));
    }
    if let Some(s) = a.summary.as_deref().filter(|s| !s.is_empty()) {
        md.push_str(&format!("\n## Summary\n\n{s}\n"));
    }
    if let Some(items) = a.action_items.as_ref().filter(|i| !i.is_empty()) {
        md.push_str("\n## Action items\n\n");
        for item in items {
            md.push_str(&format!("- [ ] {}", item.text));
            let mut tags = Vec::new();
            if let Some(o) = &item.owner {
                tags.push(format!("owner: **{o}**"));
            }
            if let Some(d) = &item.due {
                tags.push(format!("due: {d}"));
            }
            if !tags.is_empty() {
                md.push_str(&format!(" ({})", tags.join(", ")));
            }
            md.push('\n');
        }
    }
    for (key, title) in [("people", "People"), ("organisations", "Organisations")] {
        if let Some(names) = a.entities.get(key).filter(|n| !n.is_empty()) {
            md.push_str(&format!("\n## {title}\n\n{}\n", names.join(", ")));
        }
    }
    match (&a.segments, &a.transcript) {
        (Some(turns), _) if !turns.is_empty() => {
            // Consecutive segments of one known speaker make one paragraph.
            let mut paragraphs: Vec<(Option<&str>, f64, String)> = Vec::new();
            for t in turns {
                let who = t.speaker.as_deref();
                match paragraphs.last_mut() {
                    Some((w, _, text)) if who.is_some() && *w == who => {
                        text.push(' ');
                        text.push_str(&t.text);
                    }
                    _ => paragraphs.push((who, t.start, t.text.clone())),
                }
            }
            let body: Vec<String> = paragraphs
                .into_iter()
                .map(|(who, start, text)| match who {
                    Some(w) => format!("**{w}** [{}]: {text}", clock(start)),
                    None => format!("[{}] {text}", clock(start)),
                })
                .collect();
            md.push_str(&format!("\n## Transcript\n\n{}\n", body.join("\n\n")));
        }
        (_, Some(t)) if !t.is_empty() => md.push_str(&format!("\n## Transcript\n\n{t}\n")),
        _ => {}
    }
    md
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
        assert_eq!(items[0].due.as_deref(), Some("Friday"));
        assert_eq!(items[1].due, None);
    }

    #[test]
    fn speakers_own_what_they_promise_and_due_dates_are_found() {
        let text = "Speaker 1: Can you look at the logs? I will write the report by the end of the month.\n\
                    Speaker 2: Sure. I'll fix the login bug tomorrow morning. Maria needs to sign it before March 3rd.";
        let items = action_items(text, &["Maria".to_owned()]);
        let got: Vec<(Option<&str>, Option<&str>)> = items
            .iter()
            .map(|i| (i.owner.as_deref(), i.due.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                (Some("Speaker 1"), Some("the end of the month")),
                (Some("Speaker 2"), Some("tomorrow morning")),
                (Some("Maria"), Some("March 3rd")),
            ],
            "{items:?}"
        );
        assert!(items[0].text.starts_with("I will write"));
    }

    #[test]
    fn markdown_notes_have_every_part() {
        let answer = PipelineAnswer {
            duration_s: Some(75.0),
            summary: Some("They agreed on the budget.".into()),
            action_items: Some(vec![ActionItem {
                text: "I'll send it by Friday.".into(),
                owner: Some("Speaker 2".into()),
                due: Some("Friday".into()),
            }]),
            entities: [("people".to_owned(), vec!["Maria".to_owned()])].into(),
            segments: Some(vec![
                TranscriptTurn {
                    start: 0.0,
                    end: 2.0,
                    speaker: Some("Speaker 1".into()),
                    text: "Budget?".into(),
                },
                TranscriptTurn {
                    start: 62.0,
                    end: 64.0,
                    speaker: Some("Speaker 2".into()),
                    text: "I'll send it by Friday.".into(),
                },
            ]),
            ..PipelineAnswer::default()
        };
        let md = markdown(&answer);
        for part in [
            "# Meeting notes",
            "Recording: 01:15",
            "## Summary\n\nThey agreed on the budget.",
            "- [ ] I'll send it by Friday. (owner: **Speaker 2**, due: Friday)",
            "## People\n\nMaria",
            "**Speaker 1** [00:00]: Budget?",
            "**Speaker 2** [01:02]: I'll send it by Friday.",
        ] {
            assert!(md.contains(part), "missing {part:?} in\n{md}");
        }
    }
}

/// A build without speech loads no Whisper specialist, so no transcribe
/// stage can run; these keep the pipeline's one path compiling.
#[cfg(not(feature = "speech"))]
async fn transcribe_stage(
    _specialist: &Specialist,
    name: &str,
    _source: Result<Vec<u8>, std::path::PathBuf>,
    _extension: Option<String>,
    _limit_s: Option<f64>,
) -> Result<triage_core::Transcript, EngineError> {
    Err(EngineError::UnknownSpecialist(name.to_owned()))
}

#[cfg(not(feature = "speech"))]
fn transcript_text(transcript: &triage_core::Transcript) -> String {
    transcript.text.trim().to_owned()
}
