//! The one request/response shape every hosted model is called with, whatever
//! its provider: chat messages in, an answer (text or a refusal) with its token
//! usage out. Providers translate to and from their own wire formats.

use serde::{Deserialize, Serialize};

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Constrain the answer to JSON that matches a schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchema {
    /// Short identifier some providers require (`[a-zA-Z0-9_-]`).
    pub name: String,
    pub schema: serde_json::Value,
    /// Ask the provider to enforce the schema strictly where it can.
    #[serde(default = "yes")]
    pub strict: bool,
}

fn yes() -> bool {
    true
}

/// A chat call, independent of the provider that will answer it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ChatRequest {
    /// The provider's model name; empty means the target's configured model.
    #[serde(default)]
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<JsonSchema>,
    /// Ask for log-probabilities of the chosen tokens and this many
    /// alternatives each (0 = the chosen token only); ignored where the
    /// provider has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u8>,
    #[serde(default)]
    pub stream: bool,
}

/// Token counts as the provider reported them. Cached and reasoning tokens are
/// zero where the provider does not report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ContentFilter,
    Other(String),
}

/// What a model said. A refusal on content-policy grounds is an answer, not an
/// error: fallback must never send the same request elsewhere to get around it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Answer {
    Text { text: String },
    Refusal { reason: String },
}

impl Answer {
    pub fn text(&self) -> Option<&str> {
        match self {
            Answer::Text { text } => Some(text),
            Answer::Refusal { .. } => None,
        }
    }
    pub fn is_refusal(&self) -> bool {
        matches!(self, Answer::Refusal { .. })
    }
}

/// The log-probability of one generated token, with alternatives if asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// Provider name as configured (e.g. `openai`, `local-llama`).
    pub provider: String,
    /// The model that answered, as the provider reported it.
    pub model: String,
    pub answer: Answer,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ChatChunk {
    pub delta: String,
    /// Set on the final chunk where the provider reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// A refusal delivered in a stream (OpenAI's `delta.refusal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// A hosted moderation call (OpenAI moderations, Perspective).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModerationRequest {
    #[serde(default)]
    pub model: String,
    pub input: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModerationVerdict {
    pub flagged: bool,
    /// Score per category, in the provider's category names.
    pub scores: std::collections::BTreeMap<String, f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModerationResponse {
    pub provider: String,
    pub model: String,
    pub results: Vec<ModerationVerdict>,
}

/// A hosted transcription call (OpenAI audio transcriptions).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TranscriptionRequest {
    pub model: String,
    pub file_name: String,
    pub audio: Vec<u8>,
    pub language: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptionResponse {
    pub provider: String,
    pub model: String,
    pub text: String,
    /// Audio length in seconds where reported; pricing is per minute.
    pub duration_s: Option<f64>,
}
