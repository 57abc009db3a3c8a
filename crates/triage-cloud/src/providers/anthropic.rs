//! Anthropic messages (being written).
use crate::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, ProviderConfig};
use triage_core::llm::{ChatRequest, ChatResponse};

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com/v1";

#[derive(Debug, Clone)]
pub struct Anthropic {
    pub config: ProviderConfig,
    #[allow(dead_code)]
    http: reqwest::Client,
}

impl Anthropic {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }
    pub async fn chat(&self, _req: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        super::require_key(&self.config)?;
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
