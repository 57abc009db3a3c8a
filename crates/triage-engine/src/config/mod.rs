//! Configuration: parse the TOML into [`raw`] structs, then validate
//! (`validate/`, one module for the shared tables and one per strategy) into
//! the typed runtime structs (`types.rs`, re-exported here). Every validation
//! message names the TOML key and says how to fix it. Secrets are read from the environment variables the
//! file names; a missing key is a warning here and a typed error only when a
//! tier that needs it runs.

pub mod edit;
pub mod raw;
mod types;
mod validate;

pub use types::{
    Cascade, CascadeKind, Config, ConfigError, EdgeConfig, Extractor, Handler, Intent, KeyConfig,
    LocalKind, LocalSpec, Pipeline, Problem, Retrieve, Route, Router, ServerConfig, Stage,
    StageKind, Strategy, Task, Tier, TierKind, Value,
};
pub use validate::{base_url_override_var, bind_named, env_key_name};

use std::path::{Path, PathBuf};

use raw::RawConfig;

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut config = Self::from_toml(&text, &path.display().to_string(), &base)?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parse and validate `text`; `origin` names it in errors and `base_dir`
    /// anchors relative paths.
    pub fn from_toml(text: &str, origin: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source,
        })?;
        validate::validate(raw, base_dir).map_err(|problems| ConfigError::Invalid {
            path: origin.to_owned(),
            problems,
        })
    }
}

/// Where the ledger goes by default: `$TRIAGE_DATA_DIR/ledger.db`, else the
/// XDG data directory.
pub fn default_ledger_url() -> String {
    let dir = std::env::var_os("TRIAGE_DATA_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_DATA_HOME").map(|d| PathBuf::from(d).join("triage")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/triage")))
        .unwrap_or_else(|| PathBuf::from("."));
    format!("sqlite://{}", dir.join("ledger.db").display())
}
