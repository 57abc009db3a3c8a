//! Dispatch over the providers. Adding a provider means adding a variant here,
//! and the compiler then points at every `match` that must learn about it.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use triage_core::llm::{
    ChatChunk, ChatRequest, ChatResponse, ModerationRequest, ModerationResponse,
    TranscriptionRequest, TranscriptionResponse,
};

use crate::error::ProviderError;
use crate::providers::{anthropic, gemini, openai, perspective};
use crate::secret::SecretString;

/// A streamed answer. Items after the first may still fail (a truncated
/// stream); the resilience layer fails over only before the first item.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, ProviderError>> + Send>>;

/// Which wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// api.openai.com: chat completions, moderations, audio transcriptions.
    Openai,
    /// api.anthropic.com: messages.
    Anthropic,
    /// generativelanguage.googleapis.com: generateContent.
    Gemini,
    /// Any server that speaks OpenAI's chat completions (vLLM, llama.cpp
    /// `llama-server`, Ollama) at a configured `base_url`.
    OpenaiCompatible,
    /// Perspective comments:analyze (optional; the public service is being retired).
    Perspective,
}

impl ProviderKind {
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::Openai => Some(openai::DEFAULT_BASE_URL),
            ProviderKind::Anthropic => Some(anthropic::DEFAULT_BASE_URL),
            ProviderKind::Gemini => Some(gemini::DEFAULT_BASE_URL),
            ProviderKind::Perspective => Some(perspective::DEFAULT_BASE_URL),
            ProviderKind::OpenaiCompatible => None,
        }
    }
}

/// Everything needed to build one provider client.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The name the config gives it (`openai`, `local-llama`, ...).
    pub name: String,
    pub kind: ProviderKind,
    /// Without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// `None` when the key's variable is unset: calls then fail with
    /// `ErrorKind::MissingKey` (servers such as llama-server need no key).
    pub api_key: Option<SecretString>,
    /// The environment variable the key comes from, for error messages.
    pub api_key_env: Option<String>,
    /// Whole-request timeout (non-streaming) and time-to-first-byte (streaming).
    pub timeout: Duration,
}

/// One configured provider client.
#[derive(Debug, Clone)]
pub enum Provider {
    Openai(openai::OpenAi),
    Anthropic(anthropic::Anthropic),
    Gemini(gemini::Gemini),
    Perspective(perspective::Perspective),
}

impl Provider {
    /// Build the client for a configuration (shares one connection pool).
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        match config.kind {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
                Provider::Openai(openai::OpenAi::new(config, http))
            }
            ProviderKind::Anthropic => Provider::Anthropic(anthropic::Anthropic::new(config, http)),
            ProviderKind::Gemini => Provider::Gemini(gemini::Gemini::new(config, http)),
            ProviderKind::Perspective => {
                Provider::Perspective(perspective::Perspective::new(config, http))
            }
        }
    }

    pub fn config(&self) -> &ProviderConfig {
        match self {
            Provider::Openai(p) => &p.config,
            Provider::Anthropic(p) => &p.config,
            Provider::Gemini(p) => &p.config,
            Provider::Perspective(p) => &p.config,
        }
    }

    pub fn name(&self) -> &str {
        &self.config().name
    }

    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let result = match self {
            Provider::Openai(p) => p.chat(req).await,
            Provider::Anthropic(p) => p.chat(req).await,
            Provider::Gemini(p) => p.chat(req).await,
            Provider::Perspective(_) => Err(self.unsupported("chat")),
        };
        result.map_err(|e| scrub(e, self.config()))
    }

    /// Start a streamed chat. Returns once the response headers arrived and
    /// the status was a success; chunks follow on the stream.
    pub async fn chat_stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let result = match self {
            Provider::Openai(p) => p.chat_stream(req).await,
            Provider::Anthropic(p) => p.chat_stream(req).await,
            Provider::Gemini(p) => p.chat_stream(req).await,
            Provider::Perspective(_) => Err(self.unsupported("streaming chat")),
        };
        let config = self.config().clone();
        match result {
            Ok(stream) => {
                use futures_util::StreamExt;
                Ok(Box::pin(
                    stream.map(move |item| item.map_err(|e| scrub(e, &config))),
                ))
            }
            Err(e) => Err(scrub(e, &config)),
        }
    }

    pub async fn moderate(
        &self,
        req: &ModerationRequest,
    ) -> Result<ModerationResponse, ProviderError> {
        let result = match self {
            Provider::Openai(p) => p.moderate(req).await,
            Provider::Perspective(p) => p.moderate(req).await,
            Provider::Anthropic(_) | Provider::Gemini(_) => Err(self.unsupported("moderation")),
        };
        result.map_err(|e| scrub(e, self.config()))
    }

    pub async fn transcribe(
        &self,
        req: &TranscriptionRequest,
    ) -> Result<TranscriptionResponse, ProviderError> {
        let result = match self {
            Provider::Openai(p) => p.transcribe(req).await,
            _ => Err(self.unsupported("audio transcription")),
        };
        result.map_err(|e| scrub(e, self.config()))
    }

    fn unsupported(&self, what: &str) -> ProviderError {
        ProviderError::new(
            self.name(),
            crate::error::ErrorKind::Unsupported,
            format!("{:?} providers do not offer {what}", self.config().kind),
        )
    }
}

/// Remove the provider's key from an error's message: some servers and
/// proxies echo the credentials they were sent, and the message ends up in
/// logs, traces and API answers.
fn scrub(mut e: ProviderError, config: &ProviderConfig) -> ProviderError {
    if let Some(key) = &config.api_key {
        let key = key.expose();
        if key.len() >= 4 && e.message.contains(key) {
            e.message = e.message.replace(key, "[redacted]");
        }
    }
    e
}
