//! Router: an intent step chooses a route, extractors fill fields, an
//! optional SQL lookup adds rows to the context, and the route's handler
//! answers: a template (plain logic, no model) or a hosted model.

use super::{Called, HostedStep, chat, push_hosted};
use crate::config::{Extractor, Handler, Intent, Retrieve, Router};
use crate::engine::{Answered, Input, LocalStep, Run, StepOutcome};
use crate::error::EngineError;
use crate::specialists::Specialist;
use indexmap::IndexMap;
use serde_json::json;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AssertSqlSafe, Column, Row};
use std::time::Instant;
use triage_core::TaskAnswer;
use triage_core::answer::{RouteAnswer, RouteHandler};
use triage_core::llm::{Answer, ChatRequest, JsonSchema, Message, Role};
use triage_core::trace::{Decision, TierTrace};

/// How a local intent step's trace reason names the classifier's top label:
/// `route=LABEL: classifier`, or `route=DEFAULT: classifier unsure (LABEL
/// SCORE)` below `min_score`. [`classifier_label`] reads it back.
const CLASSIFIER: &str = ": classifier";
const UNSURE: &str = ": classifier unsure (";

/// The classifier's top label in a local intent step's trace reason, so
/// that `triage audit` can re-score the router at another `min_score`.
pub fn classifier_label(reason: &str) -> Option<&str> {
    if let Some((_, rest)) = reason.split_once(UNSURE) {
        return rest
            .strip_suffix(')')
            .and_then(|r| r.rsplit_once(' '))
            .map(|(label, _)| label);
    }
    reason.strip_prefix("route=")?.strip_suffix(CLASSIFIER)
}

pub async fn run(run: &mut Run<'_>, r: &Router, input: Input) -> Result<Answered, EngineError> {
    let text = match input {
        Input::Text(t) => t,
        Input::Chat(req) => req
            .messages
            .iter()
            .filter(|m| m.role == Role::User)
            .map(|m| m.content.clone())
            .collect::<Vec<_>>()
            .join("\n"),
        Input::Audio { .. } | Input::AudioFile { .. } => {
            return Err(EngineError::WrongInput {
                task: run.task.name.clone(),
                expected: "text",
                got: "audio",
            });
        }
    };
    let route_name = match &run.overrides.route {
        Some(forced) => {
            if !r.routes.contains_key(forced) {
                return Err(EngineError::Override(format!("unknown route `{forced}`")));
            }
            ran(
                run,
                "intent",
                "override",
                format!("route={forced} (override)"),
                None,
                0.0,
                0.0,
            );
            forced.clone()
        }
        None => intent(run, r, &text).await?,
    };
    let mut fields: IndexMap<String, String> = IndexMap::new();
    if !r.extract.is_empty() {
        extract(run, r, &text, &mut fields).await?;
    }
    if let Some(q) = &r.retrieve {
        retrieve(run, q, &mut fields).await?;
    }
    // Follow `otherwise` when a template lacks a field (at most once per route).
    let mut route_name = route_name;
    let mut visited = Vec::new();
    loop {
        visited.push(route_name.clone());
        let route = r
            .routes
            .get(&route_name)
            .ok_or_else(|| EngineError::Route {
                route: route_name.clone(),
                why: "no such route".into(),
            })?;
        match &route.handler {
            Handler::Template { template, requires } => {
                let missing: Vec<&String> = requires
                    .iter()
                    .filter(|f| !fields.contains_key(*f))
                    .collect();
                if missing.is_empty() {
                    let started = Instant::now();
                    let rendered = render(template, &fields);
                    run.trace.push(TierTrace {
                        tier: format!("route:{route_name}"),
                        model: "template".into(),
                        decision: Decision::Accepted,
                        reason: "template".into(),
                        score: None,
                        latency_ms: crate::engine::ms(started.elapsed()),
                        cost_usd: 0.0,
                        queue_ms: None,
                        compute_ms: None,
                    });
                    return Ok(Answered {
                        value: TaskAnswer::Route(RouteAnswer {
                            route: route_name.clone(),
                            fields: fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                            text: rendered.clone(),
                            handler: RouteHandler::Template,
                            refusal: None,
                        }),
                        input_chars: text.chars().count() + context_chars(&fields),
                        output_tokens: rendered.chars().count().div_ceil(super::CHARS_PER_TOKEN)
                            as u64,
                        audio_seconds: 0.0,
                    });
                }
                let why = format!(
                    "missing {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                match &route.otherwise {
                    Some(next) if !visited.contains(next) => {
                        ran(
                            run,
                            &format!("route:{route_name}"),
                            "template",
                            format!("{why}; otherwise → {next}"),
                            None,
                            0.0,
                            0.0,
                        );
                        if let Some(last) = run.trace.tiers.last_mut() {
                            last.decision = Decision::Escalated;
                        }
                        route_name = next.clone();
                        continue;
                    }
                    _ => {
                        return Err(EngineError::Route {
                            route: route_name,
                            why,
                        });
                    }
                }
            }
            Handler::Model {
                targets,
                system_prompt,
                max_tokens,
            } => {
                let mut raw_context = String::new();
                for (k, v) in &fields {
                    raw_context.push_str(&format!("{k}: {v}\n"));
                }
                // One pass over message and context: one NER run, and one
                // placeholder numbering, so a placeholder the model copies
                // from either is restored to the right original.
                let (joined, restorer) = run
                    .redact(&format!("{text}{CONTEXT_SEPARATOR}{raw_context}"))
                    .await?;
                let (redacted, context) = joined
                    .split_once(CONTEXT_SEPARATOR)
                    .map(|(t, c)| (t.to_owned(), c.to_owned()))
                    .unwrap_or((joined.clone(), String::new()));
                let mut system = system_prompt.clone().unwrap_or_else(|| {
                    "You are a helpful customer-support assistant. Answer briefly and use the context.".into()
                });
                if !context.is_empty() {
                    system.push_str("\n\nContext:\n");
                    system.push_str(&context);
                }
                let req = ChatRequest {
                    messages: vec![Message::system(system), Message::user(redacted)],
                    max_tokens: max_tokens.or(Some(256)),
                    ..ChatRequest::default()
                };
                let tier = format!("route:{route_name}");
                let Called {
                    result,
                    cost_usd,
                    elapsed,
                } = chat(run, &tier, targets, &req, None).await;
                let model = targets
                    .first()
                    .map(|t| format!("{}/{}", t.provider, t.model))
                    .unwrap_or_default();
                let resp = match result {
                    Ok(r) => r,
                    Err(e) => {
                        push_hosted(
                            run,
                            HostedStep {
                                tier: &tier,
                                model,
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
                let answered_model = format!("{}/{}", resp.provider, resp.model);
                let (value_text, refusal) = match &resp.answer {
                    Answer::Text { text } => (restorer.restore(text), None),
                    Answer::Refusal { reason } => (String::new(), Some(reason.clone())),
                };
                push_hosted(
                    run,
                    HostedStep {
                        tier: &tier,
                        model: answered_model,
                        elapsed,
                        cost_usd,
                    },
                    StepOutcome {
                        decision: Decision::Accepted,
                        reason: "model".into(),
                        score: None,
                    },
                );
                let value = TaskAnswer::Route(RouteAnswer {
                    route: route_name.clone(),
                    fields: fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    text: value_text,
                    handler: RouteHandler::Model,
                    refusal,
                });
                return Ok(Answered {
                    value,
                    input_chars: text.chars().count() + context.chars().count(),
                    output_tokens: resp.usage.output_tokens,
                    audio_seconds: 0.0,
                });
            }
        }
    }
}

/// Between the message and the context while they are redacted together: a
/// control character no redaction pattern or entity span includes.
const CONTEXT_SEPARATOR: &str = "\n\u{1e}\n";

fn context_chars(fields: &IndexMap<String, String>) -> usize {
    fields
        .iter()
        .map(|(k, v)| k.len() + v.chars().count() + 3)
        .sum()
}

/// `{field}` → its value; unknown fields are left as written.
pub fn render(template: &str, fields: &IndexMap<String, String>) -> String {
    let mut out = template.to_owned();
    for (k, v) in fields {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

fn ran(
    run: &mut Run<'_>,
    tier: &str,
    model: &str,
    reason: String,
    score: Option<f64>,
    latency_ms: f64,
    cost_usd: f64,
) {
    run.trace.push(TierTrace {
        tier: tier.into(),
        model: model.into(),
        decision: Decision::Ran,
        reason,
        score,
        latency_ms,
        cost_usd,
        queue_ms: None,
        compute_ms: None,
    });
}

async fn intent(run: &mut Run<'_>, r: &Router, text: &str) -> Result<String, EngineError> {
    let started = Instant::now();
    match &r.intent {
        Intent::Rules { rules, default } => {
            let hit = rules.iter().find(|(_, re)| re.is_match(text));
            let (route, reason) = match hit {
                Some((route, re)) => (
                    route.clone(),
                    format!("route={route}: rule /{}/ matched", re.as_str()),
                ),
                None => (default.clone(), format!("route={default}: no rule matched")),
            };
            ran(
                run,
                "intent",
                "rules",
                reason,
                None,
                crate::engine::ms(started.elapsed()),
                0.0,
            );
            Ok(route)
        }
        Intent::Local {
            specialist,
            default,
            min_score,
        } => {
            let s = run.engine.specialists.get(specialist)?.clone();
            let Specialist::Classifier { handle, .. } = &s else {
                return Err(EngineError::UnknownSpecialist(specialist.clone()));
            };
            let c = handle
                .classify(text, true)
                .await
                .map_err(|source| EngineError::Local {
                    name: specialist.clone(),
                    source,
                })?;
            let top = c.top().cloned();
            let (route, reason, score) = match top {
                Some(t) if f64::from(t.score) >= *min_score && r.routes.contains_key(&t.label) => (
                    t.label.clone(),
                    format!("route={}{CLASSIFIER}", t.label),
                    Some(f64::from(t.score)),
                ),
                Some(t) => (
                    default.clone(),
                    format!("route={default}{UNSURE}{} {:.3})", t.label, t.score),
                    Some(f64::from(t.score)),
                ),
                None => (default.clone(), format!("route={default}"), None),
            };
            run.local_step(
                LocalStep {
                    tier: "intent",
                    model: &format!("local/{specialist}"),
                    operation: "classify",
                    specialist: &s,
                    time: started.elapsed().into(),
                    error: None,
                },
                StepOutcome {
                    decision: Decision::Ran,
                    reason,
                    score,
                },
            );
            Ok(route)
        }
        Intent::Llm { targets, default } => {
            let routes: Vec<&String> = r.routes.keys().collect();
            let (redacted, _) = run.redact(text).await?;
            let req = ChatRequest {
                messages: vec![
                    Message::system(format!(
                        "Classify the user's message into one of these routes: {}. Answer only with the JSON object.",
                        routes
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    Message::user(redacted),
                ],
                temperature: Some(0.0),
                max_tokens: Some(32),
                json_schema: Some(JsonSchema {
                    name: "route".into(),
                    schema: json!({
                        "type": "object",
                        "properties": { "route": { "type": "string", "enum": routes } },
                        "required": ["route"],
                        "additionalProperties": false
                    }),
                    strict: true,
                }),
                ..ChatRequest::default()
            };
            let Called {
                result,
                cost_usd,
                elapsed,
            } = chat(run, "intent", targets, &req, None).await;
            let model = targets
                .first()
                .map(|t| format!("{}/{}", t.provider, t.model))
                .unwrap_or_default();
            let chosen = result
                .as_ref()
                .ok()
                .and_then(|resp| resp.answer.text())
                .and_then(super::json_object)
                .and_then(|v| v.get("route").and_then(|x| x.as_str()).map(str::to_owned));
            let route = match chosen {
                Some(r0) if r.routes.contains_key(&r0) => r0,
                _ => default.clone(),
            };
            let reason = match &result {
                Ok(_) => format!("route={route}: llm"),
                Err(e) => format!("route={route}: llm failed ({e})"),
            };
            push_hosted(
                run,
                HostedStep {
                    tier: "intent",
                    model,
                    elapsed,
                    cost_usd,
                },
                StepOutcome {
                    decision: Decision::Ran,
                    reason,
                    score: None,
                },
            );
            Ok(route)
        }
    }
}

async fn extract(
    run: &mut Run<'_>,
    r: &Router,
    text: &str,
    fields: &mut IndexMap<String, String>,
) -> Result<(), EngineError> {
    let started = Instant::now();
    let mut found = Vec::new();
    for e in &r.extract {
        match e {
            Extractor::Regex { field, regex } => {
                if let Some(caps) = regex.captures(text)
                    && let Some(m) = caps.get(1).or_else(|| caps.get(0))
                {
                    fields.insert(field.clone(), m.as_str().to_owned());
                    found.push(field.clone());
                }
            }
            Extractor::Ner {
                field,
                specialist,
                entity,
            } => {
                let s = run.engine.specialists.get(specialist)?.clone();
                let Specialist::Tagger { handle, .. } = &s else {
                    return Err(EngineError::UnknownSpecialist(specialist.clone()));
                };
                let t0 = Instant::now();
                let tagged = handle
                    .tag(text, triage_core::Aggregation::Simple)
                    .await
                    .map_err(|source| EngineError::Local {
                        name: specialist.clone(),
                        source,
                    })?;
                let values: Vec<String> = tagged
                    .entities
                    .iter()
                    .filter(|x| &x.label == entity)
                    .map(|x| x.text.clone())
                    .collect();
                run.local_step(
                    LocalStep {
                        tier: "extract:ner",
                        model: &format!("local/{specialist}"),
                        operation: "tag",
                        specialist: &s,
                        time: t0.elapsed().into(),
                        error: None,
                    },
                    StepOutcome {
                        decision: Decision::Ran,
                        reason: format!("{} {entity}", values.len()),
                        score: None,
                    },
                );
                if !values.is_empty() {
                    fields.insert(field.clone(), values.join(", "));
                    found.push(field.clone());
                }
            }
        }
    }
    ran(
        run,
        "extract",
        "regex",
        format!(
            "fields: {}",
            if found.is_empty() {
                "none".into()
            } else {
                found.join(", ")
            }
        ),
        None,
        crate::engine::ms(started.elapsed()),
        0.0,
    );
    Ok(())
}

async fn retrieve(
    run: &mut Run<'_>,
    q: &Retrieve,
    fields: &mut IndexMap<String, String>,
) -> Result<(), EngineError> {
    let started = Instant::now();
    if let Some(missing) = q.params.iter().find(|p| !fields.contains_key(*p)) {
        ran(
            run,
            "retrieve",
            "sql",
            format!("skipped: no {missing}"),
            None,
            0.0,
            0.0,
        );
        return Ok(());
    }
    install_default_drivers();
    let url = if q.database.starts_with("sqlite://") && !q.database.contains('?') {
        format!("{}?mode=ro", q.database)
    } else {
        q.database.clone()
    };
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .map_err(|e| EngineError::retrieval_database(&url, e))?;
    // The query text is the operator's own config; request values are only
    // ever bound as parameters.
    let mut query = sqlx::query(AssertSqlSafe(q.query.clone()));
    for p in &q.params {
        query = query.bind(fields.get(p).cloned().unwrap_or_default());
    }
    let rows = query
        .fetch_all(&pool)
        .await
        .map_err(EngineError::Retrieval)?;
    pool.close().await;
    if let Some(row) = rows.first() {
        for (i, col) in row.columns().iter().enumerate() {
            let value = row
                .try_get::<String, _>(i)
                .ok()
                .or_else(|| row.try_get::<i64, _>(i).ok().map(|v| v.to_string()))
                .or_else(|| row.try_get::<i32, _>(i).ok().map(|v| v.to_string()))
                .or_else(|| row.try_get::<f64, _>(i).ok().map(|v| v.to_string()))
                .or_else(|| row.try_get::<f32, _>(i).ok().map(|v| v.to_string()))
                .or_else(|| row.try_get::<bool, _>(i).ok().map(|v| v.to_string()));
            if let Some(v) = value {
                fields.insert(col.name().to_owned(), v);
            }
        }
    }
    ran(
        run,
        "retrieve",
        "sql",
        format!("{} row(s)", rows.len()),
        None,
        crate::engine::ms(started.elapsed()),
        0.0,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_intent_reason_gives_back_the_classifier_label() {
        let sure = format!("route={}{CLASSIFIER}", "refund");
        let unsure = format!("route=other{UNSURE}{} {:.3})", "not offensive", 0.4567);
        assert_eq!(classifier_label(&sure), Some("refund"));
        assert_eq!(classifier_label(&unsure), Some("not offensive"));
        assert_eq!(classifier_label("route=other"), None);
        assert_eq!(classifier_label("route=x: rule 2"), None);
    }
}
