//! The TOML file as written: serde structs with `deny_unknown_fields`, no
//! validation. `super::validate` turns them into the typed runtime config.

use indexmap::IndexMap;
use serde::Deserialize;
use std::path::PathBuf;
use triage_cloud::ProviderKind;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub ledger: RawLedger,
    /// Dollar budgets (`[[budgets]]`).
    #[serde(default)]
    pub budgets: Vec<RawBudget>,
    #[serde(default)]
    pub retry: RawRetry,
    /// Price entries, as in a price-table file (`[[price]]`).
    #[serde(default)]
    pub price: Vec<toml::Table>,
    /// `$ per CPU-hour / GPU-hour` for local tiers.
    #[serde(default)]
    pub compute: Option<toml::Table>,
    /// A price-table file to load as well (relative to this config file).
    #[serde(default)]
    pub prices_file: Option<PathBuf>,
    #[serde(default)]
    pub local: IndexMap<String, RawLocal>,
    #[serde(default)]
    pub providers: IndexMap<String, RawProvider>,
    #[serde(default)]
    pub tasks: IndexMap<String, RawTask>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    /// Which task answers `/v1/moderations`, `/v1/audio/transcriptions` and
    /// `/v1/chat/completions` (and OpenAI's model names for them).
    pub moderation_task: Option<String>,
    pub transcription_task: Option<String>,
    pub chat_task: Option<String>,
    /// Specialist label → OpenAI moderation category (`offensive = "harassment"`).
    #[serde(default)]
    pub categories: IndexMap<String, String>,
    pub max_audio_seconds: Option<f64>,
    /// Largest audio upload in bytes (spooled to disk; over it: 413).
    pub max_upload_bytes: Option<u64>,
    /// The web UI at `/ui/` (`[server.ui]`).
    #[serde(default)]
    pub ui: RawUi,
    /// Seconds a request head may take to arrive (default 10).
    pub header_read_timeout_s: Option<f64>,
    /// Seconds a request body may send nothing (default 30).
    pub body_idle_timeout_s: Option<f64>,
    /// Seconds a non-audio request may take to be answered (default 120).
    pub request_timeout_s: Option<f64>,
    /// Seconds an idle kept-alive connection stays open (default 60).
    pub keep_alive_idle_s: Option<f64>,
    /// Open TCP connections at most (default 1024).
    pub max_connections_tcp: Option<usize>,
    /// Open unix-socket connections at most (default 1024).
    pub max_connections_socket: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUi {
    /// Whether the designer may save this file (off by default: the page
    /// is read-only).
    #[serde(default)]
    pub edit: bool,
    /// Whether the unix socket (trusted, no key) may save and roll back
    /// (default true; false leaves saving to admin keys over TCP, whose
    /// changes the audit trail names).
    pub socket_edit: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: String,
    /// Environment variable that holds the key.
    pub key_env: String,
    #[serde(default)]
    pub tasks: Vec<String>,
    pub requests_per_minute: Option<u32>,
    /// May send overrides that can spend hosted dollars
    /// (`Overrides::SPENDING`: `start_tier`, `tiers`, `lo`, `hi`, `shadow`,
    /// `route`).
    #[serde(default)]
    pub allow_overrides: bool,
    /// May use the web UI's data and designer over TCP (`/ui/`).
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub name: String,
    /// `day` or `month` (UTC).
    pub period: String,
    pub usd: f64,
    pub task: Option<String>,
    /// An API key's name (`[[server.keys]]` or `TRIAGE_API_KEYS`).
    pub key: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    /// `sqlite://path.db` (default: the data directory) or `postgres://...`.
    pub url: Option<String>,
    /// Turn the ledger off entirely.
    #[serde(default)]
    pub disabled: bool,
    /// Rows queued and not yet committed before new requests wait, then get
    /// a 503 (default 1024).
    pub max_pending: Option<usize>,
    /// How long a request waits for room in a full queue (default 1000).
    pub admit_wait_ms: Option<u64>,
    /// How long the writer gathers rows into one commit (default 20, at most 100).
    pub commit_interval_ms: Option<u64>,
    /// Keep each request's text in the ledger for the web UI's request
    /// explorer (default false: only traces, costs and timings are kept).
    #[serde(default)]
    pub store_text: bool,
    /// The most of a request's text a ledger row keeps (default 65536 bytes;
    /// the rest is cut, and the cut is marked).
    pub max_text_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<u32>,
    pub base_delay_ms: Option<u64>,
    pub max_delay_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocal {
    /// A default specialist name (`toxicity`, `ner`), `org/name[@rev]` on the
    /// hub, or a local folder; for Whisper, a ggml file or `org/name#file.bin`.
    pub model: String,
    /// `classifier`, `tagger` or `whisper` (default: from the model).
    pub kind: Option<String>,
    /// `cpu` (default), `cuda`, `cuda:N`, `metal`.
    pub device: Option<String>,
    /// Model labels that mean "positive" for moderation.
    pub positive_labels: Option<Vec<String>>,
    /// Whisper decoding threads.
    pub threads: Option<usize>,
    /// Whisper: a Silero VAD model in whisper.cpp's ggml form (default:
    /// `TRIAGE_VAD_MODEL`, else the one `scripts/fetch-silero-vad` caches).
    pub vad_model: Option<String>,
    /// Whisper: label who speaks in mono recordings with this speaker
    /// encoder (Resemblyzer's, as safetensors; `"default"`: the one
    /// `scripts/fetch-speaker-model` caches, or `TRIAGE_SPEAKER_MODEL`).
    /// Needs a VAD model.
    pub speaker_model: Option<String>,
    /// Requests waiting for the model beyond this are refused (429).
    pub queue_capacity: Option<usize>,
    /// Most texts in one forward pass.
    pub max_batch_size: Option<usize>,
    /// Most padded tokens in one batch.
    pub max_batch_tokens: Option<usize>,
    /// Most padded tokens in one forward pass (a bigger batch runs in several).
    pub max_pass_tokens: Option<usize>,
    /// How long the first request of a batch may wait for company.
    pub max_wait_ms: Option<u64>,
    /// Longest input accepted, in tokens (default 32,768); longer is a 413.
    pub max_input_tokens: Option<usize>,
    /// Classifiers: recent answers kept for repeat texts (default 0: off).
    pub cache_entries: Option<usize>,
    /// Classifiers and taggers on the CPU: run the dense layers in int8.
    pub int8: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: ProviderKind,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub timeout_ms: Option<u64>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub breaker_failures: Option<u32>,
    pub breaker_open_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawTask {
    Cascade(RawCascade),
    Router(RawRouter),
    Pipeline(RawPipeline),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCascade {
    pub description: Option<String>,
    /// `moderation` (labels with scores) or `chat` (free text).
    pub kind: String,
    /// Moderation labels the task answers (e.g. `["toxic"]`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Label → a sentence the LLM tiers are shown.
    #[serde(default)]
    pub label_descriptions: IndexMap<String, String>,
    /// A label is flagged at or above this probability.
    pub threshold: Option<f64>,
    #[serde(default)]
    pub redact: Vec<String>,
    /// Fraction of accepted items also sent to the next tier to measure agreement.
    pub shadow: Option<f64>,
    pub system_prompt: Option<String>,
    pub tiers: Vec<RawTier>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub name: String,
    /// A `[local.NAME]` specialist.
    pub local: Option<String>,
    /// A `[providers.NAME]` entry and its model.
    pub provider: Option<String>,
    pub model: Option<String>,
    /// For provider tiers: `moderation` (hosted moderation endpoint) or
    /// `chat` (an LLM; default).
    pub operation: Option<String>,
    /// Accept when every label's probability is ≥ hi or ≤ lo.
    pub hi: Option<f64>,
    pub lo: Option<f64>,
    /// Per task label bands of a multi-label moderation tier
    /// (`bands = { toxic = { lo = 0.1, hi = 0.9 } }`); a label not named
    /// here uses the tier's `lo`/`hi`.
    #[serde(default)]
    pub bands: IndexMap<String, RawBand>,
    /// The local accuracy `triage calibrate --write` measured for this band;
    /// `triage audit --from-ledger` warns when shadow agreement falls below it.
    pub calibrated_accuracy: Option<f64>,
    /// Tier label/category → task label (`harassment = "toxic"`).
    #[serde(default)]
    pub map: IndexMap<String, String>,
    pub timeout_ms: Option<u64>,
    pub max_tokens: Option<u32>,
    /// Further targets tried by the gateway if this tier's provider fails.
    #[serde(default)]
    pub fallback: Vec<RawTarget>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RawBand {
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub provider: String,
    pub model: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouter {
    pub description: Option<String>,
    #[serde(default)]
    pub redact: Vec<String>,
    pub intent: RawIntent,
    #[serde(default)]
    pub extract: Vec<RawExtract>,
    pub retrieve: Option<RawRetrieve>,
    pub routes: IndexMap<String, RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntent {
    /// `rules`, `local` (a classifier whose labels are routes) or `llm`.
    pub kind: String,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    pub local: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Route used when no rule matches (or the classifier is unsure).
    pub default: String,
    /// `local`: below this probability the default route is used.
    pub min_score: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub route: String,
    /// Any of these words/phrases (case-insensitive).
    #[serde(default)]
    pub any: Vec<String>,
    /// Or a regular expression.
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExtract {
    pub field: String,
    /// A regex; the first capture group (or the whole match) is the value.
    pub regex: Option<String>,
    /// Or a `[local.NAME]` NER tagger and the entity type to collect.
    pub ner: Option<String>,
    pub entity: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetrieve {
    /// `sqlite://path` (relative to the config file) or `postgres://...`.
    pub database: String,
    /// SQL with `:field` parameters, bound from extracted fields.
    pub query: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// `template` (plain logic, no model) or `model`.
    pub handler: String,
    pub template: Option<String>,
    /// Fields the template needs; when one is missing, `otherwise` answers.
    #[serde(default)]
    pub requires: Vec<String>,
    pub otherwise: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub fallback: Vec<RawTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub description: Option<String>,
    #[serde(default)]
    pub redact: Vec<String>,
    pub stages: Vec<RawStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    pub name: String,
    /// `transcribe`, `summarize`, `entities`, `action_items`.
    pub kind: String,
    pub local: Option<String>,
    /// `summarize`: tiers tried in order (a cascade).
    #[serde(default)]
    pub tiers: Vec<RawTarget>,
    /// `summarize`: use the first tier only when the transcript's confidence
    /// is at least this; otherwise start at the second.
    pub min_transcript_confidence: Option<f64>,
    pub system_prompt: Option<String>,
    pub max_tokens: Option<u32>,
    /// `entities`: the entity types kept (default PER, ORG).
    #[serde(default)]
    pub entities: Vec<String>,
}
