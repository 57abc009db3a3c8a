//! What a task answers, typed: the engine hands these to the server and the
//! CLI, which serialise them at the edge. Each variant serialises to the JSON
//! object `triage execute` and `/v1/execute` print under `answer`.

use crate::llm::Usage;
use serde::Serialize;
use std::collections::BTreeMap;

/// The answer of one task run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TaskAnswer {
    /// A moderation or classification cascade: a score per task label.
    Scores(ScoresAnswer),
    /// A chat cascade's text.
    Chat(ChatAnswer),
    /// A hosted tier declined for content policy: an answer, not an error.
    Refusal(RefusalAnswer),
    /// A router's route, its fields and the handler's text.
    Route(RouteAnswer),
    /// A pipeline's record (transcription alone is a one-stage pipeline).
    Pipeline(PipelineAnswer),
}

impl TaskAnswer {
    /// The refusal's reason, when a hosted model declined (a cascade's
    /// refusal, a router's model route or a pipeline's summary).
    pub fn refusal(&self) -> Option<&str> {
        match self {
            TaskAnswer::Refusal(r) => Some(&r.refusal),
            TaskAnswer::Route(r) => r.refusal.as_deref(),
            TaskAnswer::Pipeline(p) => p.summary_refusal.as_deref(),
            TaskAnswer::Scores(_) | TaskAnswer::Chat(_) => None,
        }
    }

    /// Whether the answer flags the input (moderation); `None` where the
    /// answer says nothing about it.
    pub fn flagged(&self) -> Option<bool> {
        match self {
            TaskAnswer::Scores(s) => Some(s.flagged),
            TaskAnswer::Refusal(r) => Some(r.flagged),
            _ => None,
        }
    }

    /// The answer as the JSON object `triage execute` prints.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The answer as text: a chat's or a route's text; `None` for scores,
    /// refusals and pipeline records.
    pub fn text(&self) -> Option<&str> {
        match self {
            TaskAnswer::Chat(c) => Some(&c.text),
            TaskAnswer::Route(r) => Some(&r.text),
            _ => None,
        }
    }
}

/// Scores for every task label, and which of them reached the threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoresAnswer {
    pub flagged: bool,
    pub labels: BTreeMap<String, f64>,
    pub flagged_labels: Vec<String>,
}

/// Text from a chat cascade's accepted tier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatAnswer {
    pub text: String,
    /// The tier's confidence (from log-probabilities), when it had one.
    pub confidence: Option<f64>,
    pub usage: Usage,
    /// OpenAI's name for why generation stopped (`stop`, `length`, ...).
    pub finish_reason: String,
}

/// A content-policy refusal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusalAnswer {
    pub refusal: String,
    /// A moderation task counts a refusal as flagged.
    pub flagged: bool,
}

/// Which handler answered a router's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteHandler {
    /// Plain logic: a template over the fields, no model.
    Template,
    /// A model (local or hosted).
    Model,
}

/// A router's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteAnswer {
    pub route: String,
    /// Extracted and retrieved fields by name.
    pub fields: BTreeMap<String, String>,
    pub text: String,
    pub handler: RouteHandler,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// One action item found in a transcript.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionItem {
    pub text: String,
    /// The person it names, when the entity stage found one; else the
    /// speaker who said it in the first person (`Speaker 2`, or `speaker`
    /// when speakers are unknown).
    pub owner: Option<String>,
    /// When it is due, as said (`Friday`, `tomorrow`, `the end of the month`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
}

/// One timed stretch of the transcript and who said it, when known.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TranscriptTurn {
    pub start: f64,
    pub end: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
    pub text: String,
}

/// A pipeline's record: each stage fills its part.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PipelineAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcript_confidence: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary_refusal: Option<String>,
    /// Entity names by type key (`people`, `organizations`, ...).
    #[serde(flatten)]
    pub entities: BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_items: Option<Vec<ActionItem>>,
    /// The transcript by segment, speaker-labelled when the speakers are
    /// known (one per channel).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<TranscriptTurn>>,
    /// The whole record as Markdown notes (summary, action items, people,
    /// transcript).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub markdown: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_answer_serialises_to_its_documented_object() {
        let scores = TaskAnswer::Scores(ScoresAnswer {
            flagged: true,
            labels: BTreeMap::from([("toxic".into(), 0.9)]),
            flagged_labels: vec!["toxic".into()],
        });
        assert_eq!(
            serde_json::to_value(&scores).ok(),
            Some(json!({"flagged": true, "labels": {"toxic": 0.9}, "flagged_labels": ["toxic"]}))
        );
        let route = TaskAnswer::Route(RouteAnswer {
            route: "status".into(),
            fields: BTreeMap::from([("order_id".into(), "12345".into())]),
            text: "shipped".into(),
            handler: RouteHandler::Template,
            refusal: None,
        });
        assert_eq!(
            serde_json::to_value(&route).ok(),
            Some(
                json!({"route": "status", "fields": {"order_id": "12345"}, "text": "shipped", "handler": "template"})
            )
        );
        let pipeline = TaskAnswer::Pipeline(PipelineAnswer {
            transcript: Some("hi".into()),
            entities: BTreeMap::from([("people".into(), vec!["Ann".into()])]),
            action_items: Some(vec![ActionItem {
                text: "Ann will call".into(),
                owner: Some("Ann".into()),
                due: None,
            }]),
            ..PipelineAnswer::default()
        });
        assert_eq!(
            serde_json::to_value(&pipeline).ok(),
            Some(json!({
                "transcript": "hi", "people": ["Ann"],
                "action_items": [{"text": "Ann will call", "owner": "Ann"}],
            }))
        );
        let refusal = TaskAnswer::Refusal(RefusalAnswer {
            refusal: "no".into(),
            flagged: true,
        });
        assert_eq!(refusal.refusal(), Some("no"));
        assert_eq!(refusal.flagged(), Some(true));
        assert_eq!(route.text(), Some("shipped"));
        assert_eq!(pipeline.refusal(), None);
    }
}
