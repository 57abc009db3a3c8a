//! Gemini generateContent (being written).
use crate::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, ProviderConfig};
use triage_core::llm::{ChatRequest, ChatResponse};

pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

#[derive(Debug, Clone)]
pub struct Gemini {
    pub config: ProviderConfig,
    #[allow(dead_code)]
    http: reqwest::Client,
}

impl Gemini {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }
    pub async fn chat(&self, _req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        Err(ProviderError::new(
            &self.config.name,
            ErrorKind::Unsupported,
            "not yet",
        ))
    }
    pub async fn chat_stream(&self, _req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        Err(ProviderError::new(
            &self.config.name,
            ErrorKind::Unsupported,
            "not yet",
        ))
    }
}
