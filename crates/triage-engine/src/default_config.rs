//! The config `triage serve` runs without `--config`: the default
//! specialists as data, so the server has one path whatever it serves.

use crate::config::{Config, ConfigError};
use std::path::Path;

/// The embedded default config, as `triage config default` prints it.
pub const TOML: &str = include_str!("default.toml");

/// The name errors use for the embedded config.
pub const ORIGIN: &str = "<default config>";

/// The default config, validated.
pub fn load() -> Result<Config, ConfigError> {
    Config::from_toml(TOML, ORIGIN, Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_validates_and_serves_both_routes() -> Result<(), ConfigError> {
        let config = load()?;
        assert_eq!(config.server.moderation_task.as_deref(), Some("moderation"));
        assert_eq!(
            config.server.transcription_task.as_deref(),
            Some("transcription")
        );
        assert!(config.tasks.contains_key("moderation"));
        assert!(config.tasks["transcription"].takes_audio());
        assert_eq!(
            config
                .server
                .categories
                .get("offensive")
                .map(String::as_str),
            Some("harassment")
        );
        Ok(())
    }
}
