//! Domain types shared by every triage crate: what a local or hosted tier
//! answers (label scores, entity spans, embeddings) and the errors that describe
//! bad input. Nothing here knows about candle, HTTP or configuration files.

pub mod answer;
pub mod error_class;
pub mod llm;
pub mod trace;

pub use answer::TaskAnswer;
pub use error_class::ErrorClass;

use serde::{Deserialize, Serialize};

/// Scores for every label of a sequence classifier, in the model's label order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    /// `(label, probability)` for every label the model knows, in `id2label` order.
    pub scores: Vec<LabelScore>,
    /// True when the input was longer than the model's window and was cut.
    pub truncated: bool,
    /// How many windows were scored (1 unless overlapping windows were asked for).
    pub windows: usize,
}

impl Classification {
    /// The probability of `label`, if the model has that label.
    pub fn score(&self, label: &str) -> Option<f32> {
        self.scores
            .iter()
            .find(|s| s.label == label)
            .map(|s| s.score)
    }

    /// The label with the highest probability.
    pub fn top(&self) -> Option<&LabelScore> {
        self.scores
            .iter()
            .max_by(|a, b| a.score.total_cmp(&b.score))
    }
}

/// One label with its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// A named-entity span found by a token classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    /// The entity type without its `B-`/`I-` prefix (`PER`, `ORG`, ...).
    pub label: String,
    /// The original text between `start` and `end`.
    pub text: String,
    /// Start offset in Unicode scalar values (Python `str` indices) into the input.
    pub start: usize,
    /// End offset (exclusive), same unit as `start`.
    pub end: usize,
    pub score: f32,
}

/// The result of tagging one text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tagging {
    pub entities: Vec<Entity>,
    pub truncated: bool,
}

/// A sentence embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    pub vector: Vec<f32>,
    pub truncated: bool,
}

/// One timed piece of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptSegment {
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    pub text: String,
    /// Mean log-probability of the segment's text tokens.
    pub avg_logprob: f32,
    /// The model's probability that the segment holds no speech.
    pub no_speech_prob: f32,
    /// Text tokens with their probabilities, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<TokenProb>>,
    /// The segment's words with their times, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words: Option<Vec<Word>>,
    /// Who speaks (`Speaker 1`), when the speakers are known (one per channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speaker: Option<String>,
}

/// One spoken word, timed, in OpenAI's `words` shape plus its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Word {
    pub word: String,
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    /// Mean probability of the word's tokens.
    pub probability: f32,
}

/// A decoded token and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenProb {
    pub text: String,
    pub p: f32,
}

/// What speech-to-text returns for one audio file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    pub text: String,
    pub language: String,
    pub duration_s: f64,
    /// Mean probability of the text tokens, in [0, 1]; 0 when there is no speech.
    pub confidence: f32,
    /// True when no speech was found (silence, or every segment judged non-speech).
    pub no_speech: bool,
    pub segments: Vec<TranscriptSegment>,
}

/// How sub-word predictions are merged into words, as in the `transformers`
/// token-classification pipeline's `aggregation_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// Every token on its own, then adjacent tokens of the same type grouped.
    #[default]
    Simple,
    /// A word takes the label of its first sub-word.
    First,
    /// A word takes the label of its most confident sub-word.
    Max,
}

impl std::str::FromStr for Aggregation {
    type Err = UnknownAggregation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "simple" => Ok(Self::Simple),
            "first" => Ok(Self::First),
            "max" => Ok(Self::Max),
            other => Err(UnknownAggregation(other.to_owned())),
        }
    }
}

/// An aggregation strategy name that is not `simple`, `first` or `max`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown aggregation strategy `{0}`: use simple, first or max")]
pub struct UnknownAggregation(pub String);

/// What kind of head a local model carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LocalTask {
    SequenceClassification,
    TokenClassification,
    /// A bare encoder, mean-pooled into sentence embeddings.
    Embedding,
}

impl std::fmt::Display for LocalTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SequenceClassification => "sequence-classification",
            Self::TokenClassification => "token-classification",
            Self::Embedding => "embedding",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregation_names_round_trip() {
        for (name, agg) in [
            ("simple", Aggregation::Simple),
            ("first", Aggregation::First),
            ("max", Aggregation::Max),
        ] {
            assert_eq!(name.parse::<Aggregation>(), Ok(agg));
        }
        assert!("average".parse::<Aggregation>().is_err());
    }

    #[test]
    fn top_and_score_pick_the_right_label() {
        let c = Classification {
            scores: vec![
                LabelScore {
                    label: "a".into(),
                    score: 0.2,
                },
                LabelScore {
                    label: "b".into(),
                    score: 0.7,
                },
            ],
            truncated: false,
            windows: 1,
        };
        assert_eq!(c.top().map(|s| s.label.as_str()), Some("b"));
        assert_eq!(c.score("a"), Some(0.2));
        assert_eq!(c.score("zzz"), None);
    }
}
