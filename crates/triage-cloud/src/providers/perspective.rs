//! Perspective `comments:analyze` as a moderation provider.
//!
//! One request per input, one after another: the service analyses one
//! comment per call, and its default quota is one query per second (the
//! client-side rate limiter paces them). A text is flagged when its TOXICITY
//! summary score is at least [`FLAG_THRESHOLD`], the cut-off Perspective's
//! own documentation uses for "likely to be perceived as toxic"; every
//! requested attribute's score is returned so callers can apply their own.
//!
//! The key travels in the query string (`?key=`), so no URL ever goes into
//! an error: transport errors are stripped of theirs, and the key is
//! redacted from any message the service sends back.

use std::collections::BTreeMap;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use triage_core::llm::{ModerationRequest, ModerationResponse, ModerationVerdict};

use super::{endpoint, read_json, require_key, send};
use crate::error::{ErrorKind, ProviderError};
use crate::provider::ProviderConfig;

pub const PROVIDER_TYPE: &str = "perspective";
pub const DEFAULT_BASE_URL: &str = "https://commentanalyzer.googleapis.com/v1alpha1";
/// The attributes asked for, in Perspective's names.
pub const ATTRIBUTES: [&str; 6] = [
    "TOXICITY",
    "SEVERE_TOXICITY",
    "INSULT",
    "THREAT",
    "PROFANITY",
    "IDENTITY_ATTACK",
];
pub const FLAG_THRESHOLD: f32 = 0.5;

#[derive(Debug, Clone)]
pub struct Perspective {
    pub config: ProviderConfig,
    http: reqwest::Client,
}

impl Perspective {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }

    fn name(&self) -> &str {
        &self.config.name
    }

    pub async fn moderate(
        &self,
        req: &ModerationRequest,
    ) -> Result<ModerationResponse, ProviderError> {
        let key = require_key(&self.config)?;
        let mut url =
            reqwest::Url::parse(&endpoint(&self.config, "/comments:analyze")).map_err(|e| {
                ProviderError::new(
                    self.name(),
                    ErrorKind::BadRequest,
                    format!("invalid base_url: {e}"),
                )
            })?;
        url.query_pairs_mut().append_pair("key", key.expose());
        let mut results = Vec::with_capacity(req.input.len());
        for text in &req.input {
            let verdict = self.analyze(url.clone(), text).await.map_err(|mut e| {
                e.message = e.message.replace(key.expose(), "[redacted]");
                e
            })?;
            results.push(verdict);
        }
        let model = if req.model.is_empty() {
            PROVIDER_TYPE.to_owned()
        } else {
            req.model.clone()
        };
        Ok(ModerationResponse {
            provider: self.name().to_owned(),
            model,
            results,
        })
    }

    async fn analyze(
        &self,
        url: reqwest::Url,
        text: &str,
    ) -> Result<ModerationVerdict, ProviderError> {
        let request = self.http.post(url).json(&AnalyzeBody::new(text));
        let response = send(self.name(), request, self.config.timeout, map_error).await?;
        let wire: WireAnalyze = read_json(self.name(), response).await?;
        Ok(wire.into_verdict())
    }
}

// ---------------------------------------------------------------- request

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AnalyzeBody<'a> {
    comment: Comment<'a>,
    requested_attributes: BTreeMap<&'static str, Empty>,
    languages: [&'static str; 1],
    /// Ask the service not to keep the text: callers moderate user content.
    do_not_store: bool,
}

#[derive(Debug, Serialize)]
struct Comment<'a> {
    text: &'a str,
}

#[derive(Debug, Serialize)]
struct Empty {}

impl<'a> AnalyzeBody<'a> {
    fn new(text: &'a str) -> Self {
        AnalyzeBody {
            comment: Comment { text },
            requested_attributes: ATTRIBUTES.iter().map(|&a| (a, Empty {})).collect(),
            languages: ["en"],
            do_not_store: true,
        }
    }
}

// ---------------------------------------------------------------- response

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAnalyze {
    #[serde(default)]
    attribute_scores: BTreeMap<String, WireAttributeScore>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAttributeScore {
    summary_score: WireScore,
}

#[derive(Debug, Deserialize)]
struct WireScore {
    value: f32,
}

impl WireAnalyze {
    fn into_verdict(self) -> ModerationVerdict {
        let scores: BTreeMap<String, f32> = self
            .attribute_scores
            .into_iter()
            .map(|(k, v)| (k, v.summary_score.value))
            .collect();
        let flagged = scores.get("TOXICITY").is_some_and(|&s| s >= FLAG_THRESHOLD);
        ModerationVerdict { flagged, scores }
    }
}

// ---------------------------------------------------------------- errors

/// Perspective answers with Google's error body, like Gemini: 400
/// INVALID_ARGUMENT (e.g. an unsupported language), 403 PERMISSION_DENIED
/// (key not enabled for the API), 429 RESOURCE_EXHAUSTED (quota), 500, 503.
pub(crate) fn map_error(
    provider: &str,
    status: u16,
    headers: &HeaderMap,
    body: &str,
) -> ProviderError {
    super::gemini::map_error(provider, status, headers, body)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn body_field_by_field() {
        let body = serde_json::to_value(AnalyzeBody::new("you are nice")).unwrap();
        assert_eq!(
            body,
            json!({
                "comment": {"text": "you are nice"},
                "requestedAttributes": {"TOXICITY": {}, "SEVERE_TOXICITY": {}, "INSULT": {}, "THREAT": {},
                    "PROFANITY": {}, "IDENTITY_ATTACK": {}},
                "languages": ["en"],
                "doNotStore": true
            })
        );
    }

    #[test]
    fn flags_at_the_toxicity_threshold() {
        let wire = |toxicity: f32| -> WireAnalyze {
            serde_json::from_value(json!({"attributeScores": {
                "TOXICITY": {"spanScores": [{"begin": 0, "end": 5, "score": {"value": toxicity, "type": "PROBABILITY"}}],
                    "summaryScore": {"value": toxicity, "type": "PROBABILITY"}},
                "INSULT": {"summaryScore": {"value": 0.25, "type": "PROBABILITY"}}},
                "languages": ["en"], "detectedLanguages": ["en"]}))
            .unwrap()
        };
        let v = wire(0.5).into_verdict();
        assert!(v.flagged);
        assert_eq!(v.scores["TOXICITY"], 0.5);
        assert_eq!(v.scores["INSULT"], 0.25);
        assert!(!wire(0.49).into_verdict().flagged);
        let empty: WireAnalyze = serde_json::from_value(json!({"languages": ["en"]})).unwrap();
        assert!(!empty.into_verdict().flagged);
    }

    #[test]
    fn maps_every_documented_status() {
        for (status, kind) in [
            (400, ErrorKind::BadRequest),
            (401, ErrorKind::Unauthorized),
            (403, ErrorKind::Forbidden),
            (404, ErrorKind::NotFound),
            (408, ErrorKind::RequestTimeout),
            (409, ErrorKind::Conflict),
            (413, ErrorKind::PayloadTooLarge),
            (422, ErrorKind::Unprocessable),
            (429, ErrorKind::RateLimited),
            (500, ErrorKind::Server),
            (502, ErrorKind::BadGateway),
            (503, ErrorKind::Unavailable),
            (504, ErrorKind::GatewayTimeout),
        ] {
            let body = json!({"error": {"code": status, "message": "Attribute X does not support request languages: de",
                "status": "INVALID_ARGUMENT"}});
            let e = map_error("perspective", status, &HeaderMap::new(), &body.to_string());
            assert_eq!((e.kind, e.status), (kind, Some(status)));
            assert!(e.message.starts_with("INVALID_ARGUMENT: Attribute X"));
        }
    }
}
