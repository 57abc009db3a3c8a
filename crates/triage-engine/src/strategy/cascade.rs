//! Cascade: tiers from cheapest to strongest. A tier's answer is accepted when
//! every label's calibrated probability is outside its uncertain band
//! (≥ hi or ≤ lo); otherwise, or on error or timeout, the next tier runs. The
//! last tier always answers. LLM tiers answer moderation through a JSON schema
//! with the task's labels.

use super::{Called, HostedStep, call, chat, push_hosted};
use crate::config::{Cascade, CascadeKind, Tier, TierKind};
use crate::engine::{Answered, Input, LocalStep, Run, StepOutcome};
use crate::error::EngineError;
use crate::ledger::ShadowRecord;
use crate::specialists::Specialist;
use indexmap::IndexMap;
use serde_json::json;
use std::time::Instant;
use triage_core::TaskAnswer;
use triage_core::answer::{ChatAnswer, RefusalAnswer, ScoresAnswer};
use triage_core::llm::{
    Answer, ChatRequest, FinishReason, JsonSchema, Message, ModerationRequest, Role, Usage,
};
use triage_core::trace::Decision;

/// One tier's verdict before the band is applied.
#[derive(Debug, Clone)]
enum Verdict {
    Scores(IndexMap<String, f64>),
    Text {
        text: String,
        confidence: Option<f64>,
        /// The answering call's tokens (for `/v1/chat/completions` usage).
        usage: Usage,
        /// OpenAI's name for why generation stopped (`stop`, `length`, ...).
        finish_reason: String,
    },
    Refusal(String),
}

pub async fn run(run: &mut Run<'_>, c: &Cascade, input: Input) -> Result<Answered, EngineError> {
    let text = match (&input, c.kind) {
        (Input::Text(t), _) => t.clone(),
        (Input::Chat(req), _) => req
            .messages
            .iter()
            .filter(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        (Input::Audio { .. } | Input::AudioFile { .. }, _) => {
            return Err(EngineError::WrongInput {
                task: run.task.name.clone(),
                expected: "text",
                got: "audio",
            });
        }
    };
    let chat_request = match input {
        Input::Chat(req) => Some(req),
        _ => None,
    };
    let tiers = select_tiers(run, c)?;
    let last = tiers.len().saturating_sub(1);
    let mut last_error = None;
    for (i, tier) in tiers.iter().enumerate() {
        let band = if i == last {
            None
        } else {
            let (olo, ohi) = (run.overrides.lo, run.overrides.hi);
            tier.band.map(|(lo, hi)| Band {
                default: (olo.unwrap_or(lo), ohi.unwrap_or(hi)),
                labels: tier
                    .label_bands
                    .iter()
                    .map(|(l, (lo, hi))| (l.clone(), (olo.unwrap_or(*lo), ohi.unwrap_or(*hi))))
                    .collect(),
            })
        };
        let started = Instant::now();
        let mut timing = None;
        let (verdict, cost) =
            match tier_verdict(run, c, tier, &text, chat_request.as_ref(), &mut timing).await {
                Ok(v) => v,
                Err(e) => {
                    let reason = format!("error: {}", crate::error::chain(&e.0));
                    if !matches!(tier.kind, TierKind::Local { .. }) {
                        // Hosted attempts are in the ledger through the gateway;
                        // the trace still gets the tier.
                        push_hosted(
                            run,
                            HostedStep {
                                tier: &tier.name,
                                model: tier.model_name(),
                                elapsed: started.elapsed(),
                                cost_usd: e.1,
                            },
                            StepOutcome {
                                decision: Decision::Failed,
                                reason,
                                score: None,
                            },
                        );
                    }
                    // The caller's input is at fault (too long, not tokenizable):
                    // another tier would not fix it, and must not be paid to try.
                    if i == last || e.0.is_client_error() {
                        return Err(e.0);
                    }
                    last_error = Some(e.0);
                    continue;
                }
            };
        let (decision, reason, score) = decide(&verdict, band.as_ref());
        let local_specialist = match &tier.kind {
            TierKind::Local { specialist } => Some(specialist.clone()),
            _ => None,
        };
        match &local_specialist {
            Some(name) => {
                let specialist = run.engine.specialists.get(name)?.clone();
                let time = crate::engine::LocalTime {
                    elapsed: started.elapsed(),
                    timing,
                };
                run.local_step(
                    LocalStep {
                        tier: &tier.name,
                        model: &tier.model_name(),
                        operation: "classify",
                        specialist: &specialist,
                        time,
                        error: None,
                    },
                    StepOutcome {
                        decision,
                        reason,
                        score,
                    },
                );
            }
            None => push_hosted(
                run,
                HostedStep {
                    tier: &tier.name,
                    model: tier.model_name(),
                    elapsed: started.elapsed(),
                    cost_usd: cost,
                },
                StepOutcome {
                    decision,
                    reason,
                    score,
                },
            ),
        }
        if decision == Decision::Accepted {
            let shadow = run.overrides.shadow.unwrap_or(c.shadow);
            if i < last && shadow > 0.0 && rand::random::<f64>() < shadow {
                // Redacted here, with the task's full rules (NER included),
                // before anything leaves for the shadow tier.
                let (redacted, _) = run.redact(&text).await?;
                spawn_shadow(run, c, tier, tiers[i + 1].clone(), redacted, &verdict);
            }
            return Ok(answer(c, &verdict, &text));
        }
    }
    Err(last_error.unwrap_or_else(|| EngineError::Internal("the cascade has no tiers")))
}

fn select_tiers(run: &Run<'_>, c: &Cascade) -> Result<Vec<Tier>, EngineError> {
    let mut tiers: Vec<Tier> = c.tiers.clone();
    if let Some(only) = &run.overrides.tiers {
        for name in only {
            if !tiers.iter().any(|t| &t.name == name) {
                return Err(EngineError::Override(format!("unknown tier `{name}`")));
            }
        }
        tiers.retain(|t| only.contains(&t.name));
    }
    if let Some(start) = &run.overrides.start_tier {
        let Some(pos) = tiers.iter().position(|t| &t.name == start) else {
            return Err(EngineError::Override(format!("unknown tier `{start}`")));
        };
        tiers.drain(..pos);
    }
    if tiers.is_empty() {
        return Err(EngineError::Override(
            "the overrides leave no tier to run".into(),
        ));
    }
    Ok(tiers)
}

/// Run one tier. Errors carry the dollars already spent on them.
async fn tier_verdict(
    run: &mut Run<'_>,
    c: &Cascade,
    tier: &Tier,
    text: &str,
    chat_request: Option<&ChatRequest>,
    timing: &mut Option<triage_local::Timing>,
) -> Result<(Verdict, f64), (EngineError, f64)> {
    match &tier.kind {
        TierKind::Local { specialist } => {
            let name = specialist.clone();
            let specialist = run
                .engine
                .specialists
                .get(&name)
                .map_err(|e| (e, 0.0))?
                .clone();
            let Specialist::Classifier {
                handle,
                positive_labels,
                ..
            } = &specialist
            else {
                return Err((EngineError::UnknownSpecialist(name), 0.0));
            };
            let started = Instant::now();
            let fut = handle.classify_timed(text, true);
            let result = match tier.timeout {
                Some(t) => tokio::time::timeout(t, fut)
                    .await
                    .map_err(|_| EngineError::Timeout {
                        tier: tier.name.clone(),
                        ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
                    }),
                None => Ok(fut.await),
            };
            let result = result.and_then(|r| {
                r.map_err(|source| EngineError::Local {
                    name: name.clone(),
                    source,
                })
            });
            let classified = match result {
                Ok((c, t)) => {
                    *timing = Some(t);
                    c
                }
                Err(e) => {
                    run.local_step(
                        LocalStep {
                            tier: &tier.name,
                            model: &tier.model_name(),
                            operation: "classify",
                            specialist: &specialist,
                            time: started.elapsed().into(),
                            error: Some(e.to_string()),
                        },
                        StepOutcome {
                            decision: Decision::Failed,
                            reason: format!("error: {}", crate::error::chain(&e)),
                            score: None,
                        },
                    );
                    return Err((e, 0.0));
                }
            };
            if c.kind == CascadeKind::Chat {
                return Err((EngineError::Internal("local tiers cannot answer chat"), 0.0));
            }
            let scores = local_scores(c, tier, positive_labels, &classified);
            Ok((Verdict::Scores(scores), 0.0))
        }
        TierKind::Moderation { targets } => {
            let (redacted, _) = run.redact(text).await.map_err(|e| (e, 0.0))?;
            let req = ModerationRequest {
                model: String::new(),
                input: vec![redacted],
            };
            let ctx = run.ctx(&tier.name);
            let Called {
                result, cost_usd, ..
            } = call(
                run,
                &tier.name,
                tier.timeout,
                run.engine.gateway.moderate(&ctx, targets, &req),
            )
            .await;
            let resp = result.map_err(|e| (e, cost_usd))?;
            let verdict = resp.results.first().ok_or_else(|| {
                (
                    EngineError::BadAnswer {
                        tier: tier.name.clone(),
                        why: "no moderation result".into(),
                    },
                    cost_usd,
                )
            })?;
            let mut scores = IndexMap::new();
            for label in &c.labels {
                scores.insert(label.clone(), 0.0);
            }
            for (category, score) in &verdict.scores {
                let target = if tier.map.is_empty() {
                    c.labels.first().cloned()
                } else {
                    tier.map.get(category).cloned()
                };
                if let Some(t) = target {
                    let e = scores.entry(t).or_insert(0.0);
                    *e = f64::max(*e, f64::from(*score));
                }
            }
            Ok((Verdict::Scores(scores), cost_usd))
        }
        TierKind::Llm { targets } => {
            let (req, restorer) = match c.kind {
                CascadeKind::Moderation => {
                    let (redacted, restorer) = run.redact(text).await.map_err(|e| (e, 0.0))?;
                    (moderation_request(c, tier, &redacted), restorer)
                }
                CascadeKind::Chat => {
                    let mut req = chat_request.cloned().unwrap_or_else(|| ChatRequest {
                        messages: vec![Message::user(text)],
                        ..ChatRequest::default()
                    });
                    if let Some(sp) = &c.system_prompt
                        && !req.messages.iter().any(|m| m.role == Role::System)
                    {
                        req.messages.insert(0, Message::system(sp.clone()));
                    }
                    let mut restorer = crate::redact::Restorer::default();
                    for m in &mut req.messages {
                        let (r, rs) = run.redact(&m.content).await.map_err(|e| (e, 0.0))?;
                        m.content = r;
                        restorer.pairs.extend(rs.pairs);
                    }
                    if req.max_tokens.is_none() {
                        req.max_tokens = tier.max_tokens;
                    }
                    // Confidence for the band comes from token log-probabilities.
                    if tier.band.is_some() && req.top_logprobs.is_none() {
                        req.top_logprobs = Some(0);
                    }
                    req.stream = false;
                    (req, restorer)
                }
            };
            let Called {
                result, cost_usd, ..
            } = chat(run, &tier.name, targets, &req, tier.timeout).await;
            let resp = result.map_err(|e| (e, cost_usd))?;
            let text_answer = match &resp.answer {
                Answer::Refusal { reason } => {
                    return Ok((Verdict::Refusal(reason.clone()), cost_usd));
                }
                Answer::Text { text } => text.clone(),
            };
            match c.kind {
                CascadeKind::Moderation => {
                    let scores = parse_scores(c, &text_answer).ok_or_else(|| {
                        (
                            EngineError::BadAnswer {
                                tier: tier.name.clone(),
                                why: format!(
                                    "expected a JSON object with the labels {:?}, got {:?}",
                                    c.labels,
                                    truncate(&text_answer, 200)
                                ),
                            },
                            cost_usd,
                        )
                    })?;
                    Ok((Verdict::Scores(scores), cost_usd))
                }
                CascadeKind::Chat => {
                    let confidence = resp.logprobs.as_ref().filter(|l| !l.is_empty()).map(|l| {
                        let mean =
                            l.iter().map(|t| f64::from(t.logprob)).sum::<f64>() / l.len() as f64;
                        mean.exp()
                    });
                    let finish_reason = match &resp.finish_reason {
                        FinishReason::Stop => "stop".to_owned(),
                        FinishReason::Length => "length".to_owned(),
                        FinishReason::ContentFilter => "content_filter".to_owned(),
                        FinishReason::Other(o) => o.clone(),
                    };
                    Ok((
                        Verdict::Text {
                            text: restorer.restore(&text_answer),
                            confidence,
                            usage: resp.usage,
                            finish_reason,
                        },
                        cost_usd,
                    ))
                }
            }
        }
    }
}

/// A local classifier's output as the task's label scores: through the
/// tier's `map` (the highest of the model labels mapped onto a task label),
/// or, without one, the specialist's positive labels onto the first task
/// label. `triage audit` and `triage calibrate` score with this too, so
/// their scores are the ones the cascade decides on.
pub fn local_scores(
    c: &Cascade,
    tier: &Tier,
    positive_labels: &[String],
    classified: &triage_core::Classification,
) -> IndexMap<String, f64> {
    let mut scores = IndexMap::new();
    for label in &c.labels {
        scores.insert(label.clone(), 0.0);
    }
    for ls in &classified.scores {
        let target = if tier.map.is_empty() {
            positive_labels
                .contains(&ls.label)
                .then(|| c.labels.first().cloned())
                .flatten()
        } else {
            tier.map.get(&ls.label).cloned()
        };
        if let Some(t) = target {
            let e = scores.entry(t).or_insert(0.0);
            *e = f64::max(*e, f64::from(ls.score));
        }
    }
    scores
}

/// Whether a score is confident for the band: at or below `lo`, or at or
/// above `hi`. A tier is accepted when every label's score is.
pub fn outside_band(score: f64, lo: f64, hi: f64) -> bool {
    score <= lo || score >= hi
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The JSON-schema request an LLM tier answers moderation with.
fn moderation_request(c: &Cascade, tier: &Tier, text: &str) -> ChatRequest {
    let mut properties = serde_json::Map::new();
    let mut described = Vec::new();
    for label in &c.labels {
        properties.insert(
            label.clone(),
            json!({"type": "number", "minimum": 0, "maximum": 1}),
        );
        let d = c
            .label_descriptions
            .get(label)
            .map(String::as_str)
            .unwrap_or("");
        described.push(if d.is_empty() {
            format!("- {label}")
        } else {
            format!("- {label}: {d}")
        });
    }
    let system = c.system_prompt.clone().unwrap_or_else(|| {
        format!(
            "You are a content moderator. For the user's message, give the probability (0 to 1) \
             that it belongs to each label below. Answer only with the JSON object.\n{}",
            described.join("\n")
        )
    });
    ChatRequest {
        model: String::new(),
        messages: vec![Message::system(system), Message::user(text)],
        temperature: Some(0.0),
        max_tokens: Some(tier.max_tokens.unwrap_or(64)),
        json_schema: Some(JsonSchema {
            name: "moderation".into(),
            schema: json!({
                "type": "object",
                "properties": properties,
                "required": c.labels,
                "additionalProperties": false
            }),
            strict: true,
        }),
        top_logprobs: None,
        stream: false,
    }
}

fn parse_scores(c: &Cascade, text: &str) -> Option<IndexMap<String, f64>> {
    let v = super::json_object(text)?;
    let obj = v.as_object()?;
    let mut scores = IndexMap::new();
    for label in &c.labels {
        let x = match obj.get(label)? {
            serde_json::Value::Number(n) => n.as_f64()?,
            serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
            _ => return None,
        };
        scores.insert(label.clone(), x.clamp(0.0, 1.0));
    }
    Some(scores)
}

/// A tier's acceptance band: the tier's own, and any per-label ones.
#[derive(Debug, Clone)]
struct Band {
    default: (f64, f64),
    labels: IndexMap<String, (f64, f64)>,
}

impl Band {
    fn of(&self, label: &str) -> (f64, f64) {
        self.labels.get(label).copied().unwrap_or(self.default)
    }
}

/// Accept, or escalate with the reason; the score is the least certain label's.
fn decide(verdict: &Verdict, band: Option<&Band>) -> (Decision, String, Option<f64>) {
    match verdict {
        Verdict::Refusal(reason) => (Decision::Accepted, format!("refusal: {reason}"), None),
        Verdict::Scores(scores) => {
            // The label closest to the middle decides.
            let pivot = scores
                .iter()
                .min_by(|a, b| (a.1 - 0.5).abs().total_cmp(&(b.1 - 0.5).abs()))
                .map(|(l, s)| (l.clone(), *s));
            let score = pivot.as_ref().map(|p| p.1);
            match band {
                None => (Decision::Accepted, "last tier".into(), score),
                Some(band) => {
                    let (lo, hi) = band.default;
                    let uncertain: Vec<String> = scores
                        .iter()
                        .filter(|(l, s)| {
                            let (lo, hi) = band.of(l);
                            !outside_band(**s, lo, hi)
                        })
                        .map(|(l, s)| {
                            if !band.labels.is_empty() {
                                let (lo, hi) = band.of(l);
                                format!("{l}={s:.3} inside ({lo}, {hi})")
                            } else {
                                format!("{l}={s:.3}")
                            }
                        })
                        .collect();
                    let shown = if band.labels.is_empty() {
                        format!("({lo}, {hi})")
                    } else {
                        "their bands".to_owned()
                    };
                    if uncertain.is_empty() {
                        (
                            Decision::Accepted,
                            format!("confident: outside {shown}"),
                            score,
                        )
                    } else if band.labels.is_empty() {
                        (
                            Decision::Escalated,
                            format!("uncertain: {} inside ({lo}, {hi})", uncertain.join(", ")),
                            score,
                        )
                    } else {
                        (
                            Decision::Escalated,
                            format!("uncertain: {}", uncertain.join(", ")),
                            score,
                        )
                    }
                }
            }
        }
        Verdict::Text { confidence, .. } => match (band.map(|b| b.default), confidence) {
            (None, _) => (Decision::Accepted, "last tier".into(), *confidence),
            (Some((_, hi)), Some(p)) if *p >= hi => (
                Decision::Accepted,
                format!("confident: {p:.3} ≥ {hi}"),
                Some(*p),
            ),
            (Some((_, hi)), Some(p)) => (
                Decision::Escalated,
                format!("uncertain: {p:.3} < {hi}"),
                Some(*p),
            ),
            (Some(_), None) => (
                Decision::Escalated,
                "no log-probabilities to judge confidence".into(),
                None,
            ),
        },
    }
}

fn answer(c: &Cascade, verdict: &Verdict, text: &str) -> Answered {
    match verdict {
        Verdict::Scores(scores) => {
            let flagged_labels: Vec<String> = scores
                .iter()
                .filter(|(_, s)| **s >= c.threshold)
                .map(|(l, _)| l.clone())
                .collect();
            Answered {
                value: TaskAnswer::Scores(ScoresAnswer {
                    flagged: !flagged_labels.is_empty(),
                    labels: scores.iter().map(|(l, s)| (l.clone(), *s)).collect(),
                    flagged_labels,
                }),
                input_chars: text.chars().count() + 300,
                output_tokens: 8 * c.labels.len() as u64,
                audio_seconds: 0.0,
            }
        }
        Verdict::Refusal(reason) => Answered {
            value: TaskAnswer::Refusal(RefusalAnswer {
                refusal: reason.clone(),
                flagged: c.kind == CascadeKind::Moderation,
            }),
            input_chars: text.chars().count() + 300,
            output_tokens: 16,
            audio_seconds: 0.0,
        },
        Verdict::Text {
            text: answer_text,
            confidence,
            usage,
            finish_reason,
        } => Answered {
            value: TaskAnswer::Chat(ChatAnswer {
                text: answer_text.clone(),
                confidence: *confidence,
                usage: *usage,
                finish_reason: finish_reason.clone(),
            }),
            input_chars: text.chars().count(),
            output_tokens: usage.output_tokens,
            audio_seconds: 0.0,
        },
    }
}

fn flagged(c: &Cascade, v: &Verdict) -> Option<bool> {
    match v {
        Verdict::Scores(s) => Some(s.values().any(|x| *x >= c.threshold)),
        Verdict::Refusal(_) => Some(true),
        Verdict::Text { .. } => None,
    }
}

fn pivot_score(v: &Verdict) -> Option<f64> {
    match v {
        Verdict::Scores(s) => s.values().cloned().reduce(f64::max),
        Verdict::Text { confidence, .. } => *confidence,
        Verdict::Refusal(_) => None,
    }
}

/// Send an accepted item on to the next tier in the background and record
/// whether the two agree (data for recalibration and `triage train`). The
/// shadow call's attempts are in the ledger like any other.
fn spawn_shadow(
    run: &Run<'_>,
    c: &Cascade,
    tier: &Tier,
    next: Tier,
    redacted: String,
    verdict: &Verdict,
) {
    let Some(ledger) = run.engine.ledger.clone() else {
        return;
    };
    let gateway = run.engine.gateway.clone();
    let request_id = run.request_id.clone();
    let task = run.task.name.clone();
    let tier_name = tier.name.clone();
    let c = c.clone();
    let primary = flagged(&c, verdict);
    let primary_score = pivot_score(verdict);
    let gate = run.spend_gate();
    run.engine.background.spawn(async move {
        // The shadow call is paid for: it holds its ceiling against the
        // request's budgets like any other (refused, it is skipped).
        let ctx = triage_cloud::gateway::CallContext {
            request_id: request_id.clone(),
            task: task.clone(),
            tier: format!("{}(shadow)", next.name),
            gate,
        };
        let verdict = match &next.kind {
            TierKind::Llm { targets } => {
                let req = moderation_request(&c, &next, &redacted);
                gateway
                    .chat(&ctx, targets, &req)
                    .await
                    .result
                    .ok()
                    .and_then(|r| match r.answer {
                        Answer::Text { text } => parse_scores(&c, &text).map(Verdict::Scores),
                        Answer::Refusal { reason } => Some(Verdict::Refusal(reason)),
                    })
            }
            TierKind::Moderation { targets } => {
                let req = ModerationRequest {
                    model: String::new(),
                    input: vec![redacted],
                };
                gateway
                    .moderate(&ctx, targets, &req)
                    .await
                    .result
                    .ok()
                    .and_then(|r| {
                        r.results.first().map(|v| {
                            let s: IndexMap<String, f64> = c
                                .labels
                                .iter()
                                .map(|l| {
                                    let x = v
                                        .scores
                                        .iter()
                                        .filter(|(cat, _)| {
                                            next.map.is_empty() || next.map.get(*cat) == Some(l)
                                        })
                                        .map(|(_, x)| f64::from(*x))
                                        .fold(0.0, f64::max);
                                    (l.clone(), x)
                                })
                                .collect();
                            Verdict::Scores(s)
                        })
                    })
            }
            TierKind::Local { .. } => None,
        };
        if let Some(v) = verdict {
            ledger.record_shadow(ShadowRecord {
                request_id,
                task,
                tier: tier_name,
                shadow_tier: next.name.clone(),
                agree: primary == flagged(&c, &v),
                score: primary_score,
                shadow_score: pivot_score(&v),
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(pairs: &[(&str, f64)]) -> Verdict {
        Verdict::Scores(pairs.iter().map(|(l, s)| ((*l).to_owned(), *s)).collect())
    }

    #[test]
    fn a_label_with_its_own_band_is_judged_by_it() {
        let band = Band {
            default: (0.2, 0.8),
            labels: IndexMap::from([("insult".to_owned(), (0.4, 0.6))]),
        };
        // 0.35 is inside the default band but outside insult's own.
        let (d, reason, _) = decide(&scores(&[("toxic", 0.1), ("insult", 0.35)]), Some(&band));
        assert_eq!(d, Decision::Accepted, "{reason}");
        let (d, reason, _) = decide(&scores(&[("toxic", 0.35), ("insult", 0.1)]), Some(&band));
        assert_eq!(d, Decision::Escalated);
        assert_eq!(reason, "uncertain: toxic=0.350 inside (0.2, 0.8)");
        let (d, _, _) = decide(&scores(&[("toxic", 0.9), ("insult", 0.5)]), Some(&band));
        assert_eq!(d, Decision::Escalated);
        // Without per-label bands the reason reads as before.
        let plain = Band {
            default: (0.2, 0.8),
            labels: IndexMap::new(),
        };
        let (_, reason, _) = decide(&scores(&[("toxic", 0.9)]), Some(&plain));
        assert_eq!(reason, "confident: outside (0.2, 0.8)");
    }
}
