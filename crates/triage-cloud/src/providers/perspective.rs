//! Perspective comments:analyze (being written).
use crate::error::{ErrorKind, ProviderError};
use crate::provider::ProviderConfig;
use triage_core::llm::{ModerationRequest, ModerationResponse};

pub const DEFAULT_BASE_URL: &str = "https://commentanalyzer.googleapis.com/v1alpha1";

#[derive(Debug, Clone)]
pub struct Perspective {
    pub config: ProviderConfig,
    #[allow(dead_code)]
    http: reqwest::Client,
}

impl Perspective {
    pub fn new(config: ProviderConfig, http: reqwest::Client) -> Self {
        Self { config, http }
    }
    pub async fn moderate(
        &self,
        _req: &ModerationRequest,
    ) -> Result<ModerationResponse, ProviderError> {
        Err(ProviderError::new(
            &self.config.name,
            ErrorKind::Unsupported,
            "not yet",
        ))
    }
}
