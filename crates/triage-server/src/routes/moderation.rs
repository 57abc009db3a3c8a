//! `POST /v1/moderations`: the moderation task (or the task the request's
//! `model` names) once per input; each task label maps to an OpenAI category
//! through `server.categories`.

use super::info::MODERATION_MODELS;
use super::{run, tier_and_cost};
use crate::auth::{Caller, request_id, tagged};
use crate::error::ApiError;
use crate::state::Shared;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use triage_engine::{Input, Overrides, TaskAnswer};

/// OpenAI's moderation categories, in their order.
pub const OPENAI_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

#[derive(Debug, Deserialize)]
struct ModerationRequest {
    input: Value,
    #[serde(default)]
    model: Option<String>,
}

pub(crate) async fn moderations(
    State(state): State<Shared>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: ModerationRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            format!("the body is not a valid moderation request: {e}"),
            None,
        )
    })?;
    let engine = state.engine.current();
    let server = &engine.config.server;
    let task = match req.model.as_deref() {
        Some(m) if engine.config.tasks.contains_key(m) => m.to_owned(),
        None => server
            .moderation_task
            .clone()
            .ok_or_else(|| ApiError::UnknownModel("omni-moderation-latest".into()))?,
        Some(m) if MODERATION_MODELS.contains(&m) => server
            .moderation_task
            .clone()
            .ok_or_else(|| ApiError::UnknownModel(m.to_owned()))?,
        Some(m) => return Err(ApiError::UnknownModel(m.to_owned())),
    };
    caller.authorize(&task)?;
    let inputs = moderation_inputs(req.input, state.limits.max_inputs)?;
    let overrides = caller.overrides(Overrides::default())?;
    // Every input at once, so the local worker can batch them; answers keep input order.
    let runs = futures_util::future::join_all(
        inputs
            .into_iter()
            .map(|text| run(&state, &engine, &task, Input::Text(text), &overrides)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let applied: Map<String, Value> = OPENAI_CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), json!(["text"])))
        .collect();
    let results: Vec<Value> = runs
        .iter()
        .map(|e| {
            let mut scores: Map<String, Value> = OPENAI_CATEGORIES
                .iter()
                .map(|c| ((*c).to_owned(), json!(0.0)))
                .collect();
            let mut categories: Map<String, Value> = OPENAI_CATEGORIES
                .iter()
                .map(|c| ((*c).to_owned(), json!(false)))
                .collect();
            let empty = Default::default();
            let (labels, flagged_labels) = match &e.answer {
                TaskAnswer::Scores(s) => (&s.labels, s.flagged_labels.as_slice()),
                _ => (&empty, &[][..]),
            };
            for (label, score) in labels {
                let Some(category) = server.categories.get(label) else {
                    continue;
                };
                let prev = scores.get(category).and_then(Value::as_f64).unwrap_or(0.0);
                scores.insert(category.clone(), json!(prev.max(*score)));
                if flagged_labels.contains(label) {
                    categories.insert(category.clone(), json!(true));
                }
            }
            json!({
                "flagged": e.answer.flagged().unwrap_or(false),
                "categories": categories,
                "category_scores": scores,
                "category_applied_input_types": applied,
                "triage": {
                    "labels": labels,
                    "tier": e.trace.answered_by().map(|t| t.tier.clone()),
                    "request_id": e.request_id,
                    "refusal": e.answer.refusal(),
                },
            })
        })
        .collect();
    let (tier, usd) = tier_and_cost(&runs);
    let body = json!({
        "id": request_id("modr"),
        "model": req.model.unwrap_or_else(|| task.clone()),
        "results": results,
    });
    Ok(tagged(Json(body).into_response(), &tier, usd))
}

/// `input` as a string, an array of strings, or an array of text parts.
pub(crate) fn moderation_inputs(input: Value, max_inputs: usize) -> Result<Vec<String>, ApiError> {
    let inputs: Vec<String> = match input {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("text") => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("a text input needs `text`", Some("input"))),
                _ => Err(ApiError::bad(
                    "`input` must be a string or an array of strings (or text parts)",
                    Some("input"),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::bad(
                "`input` must be a string or an array of strings",
                Some("input"),
            ));
        }
    };
    if inputs.is_empty() {
        return Err(ApiError::bad("`input` is empty", Some("input")));
    }
    if inputs.len() > max_inputs {
        return Err(ApiError::bad(
            format!("at most {max_inputs} inputs per request"),
            Some("input"),
        ));
    }
    Ok(inputs)
}
