//! The typed runtime config: what the engine, the server and the CLI read
//! once `validate` has accepted a file. Every value here has been
//! checked; references between tables (a tier's specialist, a route's
//! provider) name entries that exist.

use indexmap::IndexMap;
use regex::Regex;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use triage_cloud::SecretString;
use triage_cloud::gateway::{ProviderSettings, Target};
use triage_cloud::prices::PriceTable;
use triage_cloud::retry::RetryPolicy;

use crate::redact::Redaction;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The TOML key, e.g. `tasks.moderation.tiers[1].provider`.
    pub key: String,
    pub message: String,
    /// How to fix it.
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {} ({})", self.key, self.message, self.fix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid triage config")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

/// What a local specialist does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalKind {
    Classifier,
    Tagger,
    Whisper,
}

#[derive(Debug, Clone)]
pub struct LocalSpec {
    pub model: String,
    pub kind: LocalKind,
    pub device: triage_local::DeviceSpec,
    pub positive_labels: Option<Vec<String>>,
    pub threads: Option<usize>,
    /// Whisper's VAD model file, when the config names one.
    pub vad_model: Option<String>,
    /// Whisper's speaker encoder (`default` or a file), when the config names one.
    pub speaker_model: Option<String>,
    /// Queue and batch limits of a classifier's or tagger's worker.
    pub batch: triage_local::BatchConfig,
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub key_env: String,
    pub key: Option<SecretString>,
    pub tasks: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub allow_overrides: bool,
    pub admin: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub keys: Vec<KeyConfig>,
    pub moderation_task: Option<String>,
    pub transcription_task: Option<String>,
    pub chat_task: Option<String>,
    pub categories: IndexMap<String, String>,
    pub max_audio_seconds: Option<f64>,
    /// `[server.ui] edit`: the web UI's designer may save the config file.
    pub ui_edit: bool,
    /// `[server.ui] socket_edit`: the socket may save (default true).
    pub ui_socket_edit: bool,
    pub max_upload_bytes: Option<u64>,
    /// The HTTP edge's timeouts and connection caps (`None`: the server's
    /// defaults).
    pub edge: EdgeConfig,
}

/// `[server]` timeouts (seconds) and connection caps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EdgeConfig {
    pub header_read_timeout_s: Option<f64>,
    pub body_idle_timeout_s: Option<f64>,
    pub request_timeout_s: Option<f64>,
    pub keep_alive_idle_s: Option<f64>,
    pub max_connections_tcp: Option<usize>,
    pub max_connections_socket: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CascadeKind {
    Moderation,
    Chat,
}

#[derive(Debug, Clone)]
pub enum TierKind {
    Local { specialist: String },
    Moderation { targets: Vec<Target> },
    Llm { targets: Vec<Target> },
}

#[derive(Debug, Clone)]
pub struct Tier {
    pub name: String,
    pub kind: TierKind,
    /// `None` for the last tier: it always answers.
    pub band: Option<(f64, f64)>,
    /// Moderation: bands of single task labels (`bands`), overriding `band`
    /// for those labels. Empty on the last tier.
    pub label_bands: IndexMap<String, (f64, f64)>,
    /// What calibration promised for the band (`calibrated_accuracy`).
    pub calibrated_accuracy: Option<f64>,
    pub map: IndexMap<String, String>,
    pub timeout: Option<Duration>,
    pub max_tokens: Option<u32>,
}

impl Tier {
    /// The band that decides `label`: its own, else the tier's. `None` for
    /// the last tier.
    pub fn band_for(&self, label: &str) -> Option<(f64, f64)> {
        self.band
            .map(|b| self.label_bands.get(label).copied().unwrap_or(b))
    }

    pub fn model_name(&self) -> String {
        match &self.kind {
            TierKind::Local { specialist } => format!("local/{specialist}"),
            TierKind::Moderation { targets } | TierKind::Llm { targets } => targets
                .first()
                .map(|t| format!("{}/{}", t.provider, t.model))
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Cascade {
    pub kind: CascadeKind,
    pub labels: Vec<String>,
    pub label_descriptions: IndexMap<String, String>,
    pub threshold: f64,
    pub shadow: f64,
    pub system_prompt: Option<String>,
    pub tiers: Vec<Tier>,
}

#[derive(Debug, Clone)]
pub enum Intent {
    Rules {
        rules: Vec<(String, Regex)>,
        default: String,
    },
    Local {
        specialist: String,
        default: String,
        min_score: f64,
    },
    Llm {
        targets: Vec<Target>,
        default: String,
    },
}

#[derive(Debug, Clone)]
pub enum Extractor {
    Regex {
        field: String,
        regex: Regex,
    },
    Ner {
        field: String,
        specialist: String,
        entity: String,
    },
}

#[derive(Debug, Clone)]
pub struct Retrieve {
    /// A database URL with any relative sqlite path made absolute.
    pub database: String,
    /// The query with `:field` replaced by `$1..$n`.
    pub query: String,
    /// The fields bound to `$1..$n`, in order.
    pub params: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Handler {
    Template {
        template: String,
        requires: Vec<String>,
    },
    Model {
        targets: Vec<Target>,
        system_prompt: Option<String>,
        max_tokens: Option<u32>,
    },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub handler: Handler,
    /// Route that answers when a template's required field is missing.
    pub otherwise: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Router {
    pub intent: Intent,
    pub extract: Vec<Extractor>,
    pub retrieve: Option<Retrieve>,
    pub routes: IndexMap<String, Route>,
}

#[derive(Debug, Clone)]
pub enum StageKind {
    Transcribe {
        specialist: String,
    },
    Summarize {
        targets: Vec<Target>,
        min_transcript_confidence: Option<f64>,
        system_prompt: Option<String>,
        max_tokens: Option<u32>,
    },
    Entities {
        specialist: String,
        types: Vec<String>,
    },
    ActionItems,
}

/// What flows between pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    Audio,
    Text,
    Transcript,
}

#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub kind: StageKind,
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub input: Value,
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone)]
pub enum Strategy {
    Cascade(Cascade),
    Router(Router),
    Pipeline(Pipeline),
}

#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub description: Option<String>,
    pub redaction: Redaction,
    pub strategy: Strategy,
}

impl Task {
    /// Whether the task takes audio (a pipeline that starts by transcribing).
    pub fn takes_audio(&self) -> bool {
        matches!(&self.strategy, Strategy::Pipeline(p) if p.input == Value::Audio)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for reload), if any.
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    /// `None`: no ledger.
    pub ledger_url: Option<String>,
    /// The ledger's queue bound and group commit (`[ledger]`).
    pub ledger: crate::ledger::LedgerOptions,
    /// `[ledger] store_text`: keep request texts in the ledger.
    pub store_text: bool,
    /// `[ledger] max_text_bytes`: the most of a text one row keeps.
    pub max_text_bytes: usize,
    /// Dollar budgets enforced before hosted calls (`[[budgets]]`).
    pub budgets: Vec<crate::budget::BudgetSpec>,
    pub retry: RetryPolicy,
    pub prices: Arc<PriceTable>,
    pub local: IndexMap<String, LocalSpec>,
    pub providers: IndexMap<String, ProviderSettings>,
    pub tasks: IndexMap<String, Task>,
    /// Things that work but deserve attention (a provider key not set).
    pub warnings: Vec<String>,
}

impl Config {
    pub fn task(&self, name: &str) -> Option<&Task> {
        self.tasks.get(name)
    }
}
