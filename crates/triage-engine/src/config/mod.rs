//! Configuration: parse the TOML into [`raw`] structs, then validate into the
//! typed runtime structs below. Every validation message names the TOML key
//! and says how to fix it. Secrets are read from the environment variables the
//! file names; a missing key is a warning here and a typed error only when a
//! tier that needs it runs.

pub mod raw;

use indexmap::IndexMap;
use regex::Regex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use triage_cloud::breaker::BreakerConfig;
use triage_cloud::gateway::{ProviderSettings, Target};
use triage_cloud::prices::PriceTable;
use triage_cloud::ratelimit::RateLimits;
use triage_cloud::retry::RetryPolicy;
use triage_cloud::{ProviderConfig, ProviderKind, SecretString};

use crate::redact::Redaction;
use raw::*;

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
    pub map: IndexMap<String, String>,
    pub timeout: Option<Duration>,
    pub max_tokens: Option<u32>,
}

impl Tier {
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
    pub retry: RetryPolicy,
    pub prices: Arc<PriceTable>,
    pub local: IndexMap<String, LocalSpec>,
    pub providers: IndexMap<String, ProviderSettings>,
    pub tasks: IndexMap<String, Task>,
    /// Things that work but deserve attention (a provider key not set).
    pub warnings: Vec<String>,
}

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
        let mut v = Validator {
            problems: Vec::new(),
            warnings: Vec::new(),
            base_dir: base_dir.to_path_buf(),
        };
        let config = v.config(raw);
        if v.problems.is_empty()
            && let Some(mut config) = config
        {
            config.warnings = v.warnings;
            return Ok(config);
        }
        Err(ConfigError::Invalid {
            path: origin.to_owned(),
            problems: v.problems,
        })
    }

    pub fn task(&self, name: &str) -> Option<&Task> {
        self.tasks.get(name)
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

/// The environment variable that overrides provider `name`'s `base_url`
/// (`TRIAGE_PROVIDER_OPENAI_BASE_URL` for `openai`), so a deployment or a test
/// can point a shipped config at a proxy or a local server.
pub fn base_url_override_var(name: &str) -> String {
    let up: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("TRIAGE_PROVIDER_{up}_BASE_URL")
}

struct Validator {
    problems: Vec<Problem>,
    warnings: Vec<String>,
    base_dir: PathBuf,
}

fn band_ok(x: f64) -> bool {
    (0.0..=1.0).contains(&x)
}

impl Validator {
    fn problem(
        &mut self,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let prices = self.prices(&raw);
        let retry = self.retry(&raw.retry);
        let local = self.locals(&raw.local);
        let providers = self.providers(&raw.providers);
        let mut tasks = IndexMap::new();
        for (name, task) in &raw.tasks {
            if let Some(t) = self.task(name, task, &local, &providers) {
                tasks.insert(name.clone(), t);
            }
        }
        let server = self.server(&raw.server, &tasks);
        let ledger_url = if raw.ledger.disabled {
            None
        } else {
            Some(match &raw.ledger.url {
                Some(url) => self.database_url("ledger.url", url),
                None => default_ledger_url(),
            })
        };
        Some(Config {
            path: None,
            server,
            ledger_url,
            retry,
            prices: Arc::new(prices?),
            local,
            providers,
            tasks,
            warnings: Vec::new(),
        })
    }

    fn prices(&mut self, raw: &RawConfig) -> Option<PriceTable> {
        let mut doc = toml::Table::new();
        let mut entries: Vec<toml::Value> = Vec::new();
        if let Some(file) = &raw.prices_file {
            let path = self.base_dir.join(file);
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
            {
                Ok(mut t) => {
                    if let Some(toml::Value::Array(a)) = t.remove("price") {
                        entries.extend(a);
                    }
                    if let Some(c) = t.remove("compute") {
                        doc.insert("compute".into(), c);
                    }
                }
                Err(e) => self.problem(
                    "prices_file",
                    format!("cannot read {}: {e}", path.display()),
                    "point prices_file at a price-table TOML file (relative to this config)",
                ),
            }
        }
        entries.extend(raw.price.iter().cloned().map(toml::Value::Table));
        if let Some(c) = &raw.compute {
            doc.insert("compute".into(), toml::Value::Table(c.clone()));
        }
        doc.insert("price".into(), toml::Value::Array(entries));
        let text = toml::to_string(&doc).unwrap_or_default();
        match PriceTable::from_toml_str(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(
                    "price",
                    e.to_string(),
                    "fix the [[price]] entry named above",
                );
                None
            }
        }
    }

    fn retry(&mut self, raw: &RawRetry) -> RetryPolicy {
        let mut p = RetryPolicy::default();
        if let Some(n) = raw.max_attempts {
            if n == 0 {
                self.problem(
                    "retry.max_attempts",
                    "must be at least 1",
                    "set it to 1 for no retries",
                );
            } else {
                p.max_attempts = n;
            }
        }
        if let Some(ms) = raw.base_delay_ms {
            p.base_delay = Duration::from_millis(ms);
        }
        if let Some(ms) = raw.max_delay_ms {
            p.max_delay = Duration::from_millis(ms);
        }
        if let Some(ms) = raw.deadline_ms {
            p.deadline = Duration::from_millis(ms);
        }
        p
    }

    fn locals(&mut self, raw: &IndexMap<String, RawLocal>) -> IndexMap<String, LocalSpec> {
        let mut out = IndexMap::new();
        for (name, l) in raw {
            let key = format!("local.{name}");
            let kind = match l.kind.as_deref() {
                Some("classifier") => LocalKind::Classifier,
                Some("tagger") => LocalKind::Tagger,
                Some("whisper") => LocalKind::Whisper,
                None => match l.model.as_str() {
                    "ner" => LocalKind::Tagger,
                    m if m.contains("whisper") || m.ends_with(".bin") => LocalKind::Whisper,
                    _ => LocalKind::Classifier,
                },
                Some(other) => {
                    self.problem(
                        format!("{key}.kind"),
                        format!("unknown kind `{other}`"),
                        "use classifier, tagger or whisper",
                    );
                    continue;
                }
            };
            let device = match l
                .device
                .as_deref()
                .unwrap_or("cpu")
                .parse::<triage_local::DeviceSpec>()
            {
                Ok(d) => d,
                Err(e) => {
                    self.problem(
                        format!("{key}.device"),
                        e.to_string(),
                        "use cpu, cuda, cuda:N or metal",
                    );
                    continue;
                }
            };
            if l.model.trim().is_empty() {
                self.problem(
                    format!("{key}.model"),
                    "is empty",
                    "name a specialist (toxicity, ner), an org/name hub id or a folder",
                );
            }
            // Relative folders are relative to the config file.
            let model = if l.model.starts_with("./") || l.model.starts_with("../") {
                self.base_dir.join(&l.model).display().to_string()
            } else {
                l.model.clone()
            };
            let defaults = triage_local::BatchConfig::default();
            let mut positive = |field: &str, v: Option<usize>, default: usize| match v {
                Some(0) => {
                    self.problem(format!("{key}.{field}"), "is 0", "use a positive number");
                    default
                }
                Some(n) => n,
                None => default,
            };
            let batch = triage_local::BatchConfig {
                queue_capacity: positive(
                    "queue_capacity",
                    l.queue_capacity,
                    defaults.queue_capacity,
                ),
                max_batch_size: positive(
                    "max_batch_size",
                    l.max_batch_size,
                    defaults.max_batch_size,
                ),
                max_batch_tokens: positive(
                    "max_batch_tokens",
                    l.max_batch_tokens,
                    defaults.max_batch_tokens,
                ),
                max_wait: l
                    .max_wait_ms
                    .map_or(defaults.max_wait, std::time::Duration::from_millis),
            };
            out.insert(
                name.clone(),
                LocalSpec {
                    model,
                    kind,
                    device,
                    positive_labels: l.positive_labels.clone(),
                    threads: l.threads,
                    batch,
                },
            );
        }
        out
    }

    fn providers(
        &mut self,
        raw: &IndexMap<String, RawProvider>,
    ) -> IndexMap<String, ProviderSettings> {
        let mut out = IndexMap::new();
        for (name, p) in raw {
            let key = format!("providers.{name}");
            let override_var = base_url_override_var(name);
            let base_url = std::env::var(&override_var)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| p.base_url.clone())
                .or_else(|| p.kind.default_base_url().map(str::to_owned));
            let Some(base_url) = base_url else {
                self.problem(
                    format!("{key}.base_url"),
                    "an openai_compatible provider needs a base_url",
                    format!("set base_url = \"http://host:port/v1\" (or the {override_var} environment variable)"),
                );
                continue;
            };
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                self.problem(
                    format!("{key}.base_url"),
                    format!("`{base_url}` is not an http(s) URL"),
                    "write it as https://host/v1",
                );
                continue;
            }
            let api_key = match &p.api_key_env {
                Some(var) => {
                    let key_value = SecretString::from_env(var);
                    if key_value.is_none() {
                        self.warnings.push(format!(
                            "{key}.api_key_env: {var} is not set; tiers that use `{name}` will fail with a missing-key error until it is"
                        ));
                    }
                    key_value
                }
                None => {
                    if matches!(
                        p.kind,
                        ProviderKind::Openai
                            | ProviderKind::Anthropic
                            | ProviderKind::Gemini
                            | ProviderKind::Perspective
                    ) {
                        self.problem(
                            format!("{key}.api_key_env"),
                            format!("{:?} needs an API key", p.kind),
                            "name the environment variable that holds it, e.g. api_key_env = \"OPENAI_API_KEY\"",
                        );
                        continue;
                    }
                    None
                }
            };
            let defaults = BreakerConfig::default();
            out.insert(
                name.clone(),
                ProviderSettings {
                    config: ProviderConfig {
                        name: name.clone(),
                        kind: p.kind,
                        base_url: base_url.trim_end_matches('/').to_owned(),
                        api_key,
                        api_key_env: p.api_key_env.clone(),
                        timeout: Duration::from_millis(p.timeout_ms.unwrap_or(60_000)),
                    },
                    limits: RateLimits {
                        requests_per_minute: p.requests_per_minute,
                        tokens_per_minute: p.tokens_per_minute,
                    },
                    breaker: BreakerConfig {
                        failure_threshold: p.breaker_failures.unwrap_or(defaults.failure_threshold),
                        open_for: p
                            .breaker_open_ms
                            .map(Duration::from_millis)
                            .unwrap_or(defaults.open_for),
                    },
                },
            );
        }
        out
    }

    fn database_url(&mut self, key: &str, url: &str) -> String {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let (path, query) = path
                .split_once('?')
                .map_or((path, None), |(p, q)| (p, Some(q)));
            let abs = if Path::new(path).is_absolute() || path == ":memory:" {
                PathBuf::from(path)
            } else {
                self.base_dir.join(path)
            };
            return match query {
                Some(q) => format!("sqlite://{}?{q}", abs.display()),
                None => format!("sqlite://{}", abs.display()),
            };
        }
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            self.problem(
                key,
                format!("`{url}` is not a sqlite:// or postgres:// URL"),
                "write sqlite://file.db or postgres://user@host/db",
            );
        }
        url.to_owned()
    }

    fn targets(
        &mut self,
        key: &str,
        provider: Option<&str>,
        model: Option<&str>,
        fallback: &[RawTarget],
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Vec<Target> {
        let mut out = Vec::new();
        let first = match (provider, model) {
            (Some(p), Some(m)) => Some(RawTarget {
                provider: p.into(),
                model: m.into(),
            }),
            (Some(_), None) => {
                self.problem(
                    format!("{key}.model"),
                    "a provider tier needs a model",
                    "add model = \"...\" (the provider's model name)",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    format!("{key}.provider"),
                    "a model needs its provider",
                    "add provider = \"NAME\" naming a [providers.NAME] table",
                );
                None
            }
            (None, None) => None,
        };
        for (i, t) in first.iter().chain(fallback.iter()).enumerate() {
            let k = if i == 0 {
                format!("{key}.provider")
            } else {
                format!("{key}.fallback[{}].provider", i - 1)
            };
            if !providers.contains_key(&t.provider) {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                self.problem(
                    k,
                    format!("unknown provider `{}`", t.provider),
                    format!(
                        "declare [providers.{}] or use one of: {}",
                        t.provider,
                        if known.is_empty() {
                            "(none declared)".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                continue;
            }
            out.push(Target {
                provider: t.provider.clone(),
                model: t.model.clone(),
            });
        }
        out
    }

    fn specialist(
        &mut self,
        key: &str,
        name: &str,
        want: LocalKind,
        local: &IndexMap<String, LocalSpec>,
    ) -> bool {
        match local.get(name) {
            None => {
                let known: Vec<&str> = local.keys().map(String::as_str).collect();
                self.problem(
                    key,
                    format!("unknown local specialist `{name}`"),
                    format!(
                        "declare [local.{name}] or use one of: {}",
                        if known.is_empty() {
                            "(none declared)".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                false
            }
            Some(spec) if spec.kind != want => {
                self.problem(
                    key,
                    format!("`{name}` is a {:?}, this step needs a {want:?}", spec.kind),
                    format!("set [local.{name}].kind or use another specialist"),
                );
                false
            }
            Some(_) => true,
        }
    }

    fn task(
        &mut self,
        name: &str,
        raw: &RawTask,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Task> {
        let key = format!("tasks.{name}");
        let (description, redact_spec) = match raw {
            RawTask::Cascade(c) => (c.description.clone(), &c.redact),
            RawTask::Router(r) => (r.description.clone(), &r.redact),
            RawTask::Pipeline(p) => (p.description.clone(), &p.redact),
        };
        let redaction = match Redaction::parse(redact_spec) {
            Ok(mut r) => {
                if let Some(ner) = r.ner_specialist.clone()
                    && !self.specialist(&format!("{key}.redact"), &ner, LocalKind::Tagger, local)
                {
                    r.ner_specialist = None;
                }
                r
            }
            Err(e) => {
                self.problem(
                    format!("{key}.redact"),
                    e,
                    "use email, phone, card, or ner:SPECIALIST:TYPE (e.g. ner:ner:PER)",
                );
                Redaction::default()
            }
        };
        let strategy = match raw {
            RawTask::Cascade(c) => Strategy::Cascade(self.cascade(&key, c, local, providers)?),
            RawTask::Router(r) => Strategy::Router(self.router(&key, r, local, providers)?),
            RawTask::Pipeline(p) => Strategy::Pipeline(self.pipeline(&key, p, local, providers)?),
        };
        Some(Task {
            name: name.to_owned(),
            description,
            redaction,
            strategy,
        })
    }

    fn cascade(
        &mut self,
        key: &str,
        c: &RawCascade,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Cascade> {
        let kind = match c.kind.as_str() {
            "moderation" => CascadeKind::Moderation,
            "chat" => CascadeKind::Chat,
            other => {
                self.problem(
                    format!("{key}.kind"),
                    format!("unknown cascade kind `{other}`"),
                    "use moderation or chat",
                );
                return None;
            }
        };
        if kind == CascadeKind::Moderation && c.labels.is_empty() {
            self.problem(
                format!("{key}.labels"),
                "a moderation cascade needs its labels",
                "add labels = [\"toxic\"]",
            );
        }
        if c.tiers.is_empty() {
            self.problem(
                format!("{key}.tiers"),
                "a cascade needs at least one tier",
                "add [[tasks.NAME.tiers]] tables, cheapest first",
            );
            return None;
        }
        let shadow = c.shadow.unwrap_or(0.0);
        if !band_ok(shadow) {
            self.problem(
                format!("{key}.shadow"),
                "must be a fraction between 0 and 1",
                "e.g. shadow = 0.05",
            );
        }
        let threshold = c.threshold.unwrap_or(0.5);
        let mut tiers = Vec::new();
        let last = c.tiers.len() - 1;
        for (i, t) in c.tiers.iter().enumerate() {
            let tk = format!("{key}.tiers[{i}]");
            let tier_kind = match (&t.local, &t.provider) {
                (Some(l), None) => {
                    if kind == CascadeKind::Chat {
                        self.problem(
                            format!("{tk}.local"),
                            "a chat cascade's tiers are LLMs",
                            "use provider = \"...\" and model = \"...\"",
                        );
                        continue;
                    }
                    if !self.specialist(&format!("{tk}.local"), l, LocalKind::Classifier, local) {
                        continue;
                    }
                    TierKind::Local {
                        specialist: l.clone(),
                    }
                }
                (None, Some(_)) => {
                    let targets = self.targets(
                        &tk,
                        t.provider.as_deref(),
                        t.model.as_deref(),
                        &t.fallback,
                        providers,
                    );
                    if targets.is_empty() {
                        continue;
                    }
                    match t.operation.as_deref().unwrap_or("chat") {
                        "chat" => TierKind::Llm { targets },
                        "moderation" if kind == CascadeKind::Moderation => {
                            TierKind::Moderation { targets }
                        }
                        other => {
                            self.problem(
                                format!("{tk}.operation"),
                                format!("`{other}` is not a tier operation here"),
                                "use chat, or moderation in a moderation cascade",
                            );
                            continue;
                        }
                    }
                }
                (Some(_), Some(_)) => {
                    self.problem(
                        &tk,
                        "a tier is either local or a provider, not both",
                        "split it into two tiers",
                    );
                    continue;
                }
                (None, None) => {
                    self.problem(
                        &tk,
                        "a tier needs local = \"NAME\" or provider = \"NAME\"",
                        "name a [local.NAME] specialist or a [providers.NAME] model",
                    );
                    continue;
                }
            };
            let band = match (t.hi, t.lo) {
                (None, None) if i == last => None,
                (None, None) if kind == CascadeKind::Chat => {
                    self.problem(
                        &tk,
                        "a chat tier before the last needs hi",
                        "add hi = 0.8 (accept when the answer's mean token probability is ≥ hi)",
                    );
                    None
                }
                (None, None) => {
                    self.problem(
                        &tk,
                        "a tier before the last needs an acceptance band",
                        "add hi = 0.9 and lo = 0.1 (accept when every label is ≥ hi or ≤ lo)",
                    );
                    None
                }
                (hi, lo) => {
                    let hi = hi.unwrap_or(1.0);
                    let lo = lo.unwrap_or(0.0);
                    if !band_ok(hi) || !band_ok(lo) || lo > hi {
                        self.problem(
                            &tk,
                            format!("band lo = {lo}, hi = {hi} is not 0 ≤ lo ≤ hi ≤ 1"),
                            "e.g. lo = 0.1, hi = 0.9",
                        );
                    }
                    if i == last {
                        self.warnings.push(format!(
                            "{tk}: the last tier always answers; its hi/lo are ignored"
                        ));
                        None
                    } else {
                        Some((lo, hi))
                    }
                }
            };
            for label in t.map.values() {
                if kind == CascadeKind::Moderation && !c.labels.contains(label) {
                    self.problem(
                        format!("{tk}.map"),
                        format!("maps onto `{label}`, which is not one of the task's labels"),
                        format!("use one of: {}", c.labels.join(", ")),
                    );
                }
            }
            tiers.push(Tier {
                name: t.name.clone(),
                kind: tier_kind,
                band,
                map: t.map.clone(),
                timeout: t.timeout_ms.map(Duration::from_millis),
                max_tokens: t.max_tokens,
            });
        }
        Some(Cascade {
            kind,
            labels: c.labels.clone(),
            label_descriptions: c.label_descriptions.clone(),
            threshold,
            shadow,
            system_prompt: c.system_prompt.clone(),
            tiers,
        })
    }

    fn router(
        &mut self,
        key: &str,
        r: &RawRouter,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Router> {
        let ik = format!("{key}.intent");
        if !r.routes.contains_key(&r.intent.default) {
            self.problem(
                format!("{ik}.default"),
                format!("`{}` is not a route", r.intent.default),
                "name one of the [tasks.NAME.routes.*] tables",
            );
        }
        let intent = match r.intent.kind.as_str() {
            "rules" => {
                let mut rules = Vec::new();
                for (i, rule) in r.intent.rules.iter().enumerate() {
                    let rk = format!("{ik}.rules[{i}]");
                    if !r.routes.contains_key(&rule.route) {
                        self.problem(
                            format!("{rk}.route"),
                            format!("`{}` is not a route", rule.route),
                            "name one of the routes",
                        );
                    }
                    let pattern = match (&rule.regex, rule.any.is_empty()) {
                        (Some(re), true) => re.clone(),
                        (None, false) => format!(
                            "(?i)\\b(?:{})\\b",
                            rule.any
                                .iter()
                                .map(|w| regex::escape(w))
                                .collect::<Vec<_>>()
                                .join("|")
                        ),
                        _ => {
                            self.problem(
                                &rk,
                                "a rule needs either any = [...] or regex = \"...\"",
                                "give one of them",
                            );
                            continue;
                        }
                    };
                    match Regex::new(&pattern) {
                        Ok(re) => rules.push((rule.route.clone(), re)),
                        Err(e) => self.problem(
                            format!("{rk}.regex"),
                            e.to_string(),
                            "fix the regular expression",
                        ),
                    }
                }
                Intent::Rules {
                    rules,
                    default: r.intent.default.clone(),
                }
            }
            "local" => {
                let Some(l) = &r.intent.local else {
                    self.problem(
                        format!("{ik}.local"),
                        "a local intent step needs its classifier",
                        "add local = \"NAME\"",
                    );
                    return None;
                };
                self.specialist(&format!("{ik}.local"), l, LocalKind::Classifier, local);
                Intent::Local {
                    specialist: l.clone(),
                    default: r.intent.default.clone(),
                    min_score: r.intent.min_score.unwrap_or(0.5),
                }
            }
            "llm" => {
                let targets = self.targets(
                    &ik,
                    r.intent.provider.as_deref(),
                    r.intent.model.as_deref(),
                    &[],
                    providers,
                );
                if targets.is_empty() {
                    self.problem(
                        &ik,
                        "an llm intent step needs provider and model",
                        "add provider = \"...\" and model = \"...\"",
                    );
                }
                Intent::Llm {
                    targets,
                    default: r.intent.default.clone(),
                }
            }
            other => {
                self.problem(
                    format!("{ik}.kind"),
                    format!("unknown intent kind `{other}`"),
                    "use rules, local or llm",
                );
                return None;
            }
        };
        let mut extract = Vec::new();
        for (i, e) in r.extract.iter().enumerate() {
            let ek = format!("{key}.extract[{i}]");
            match (&e.regex, &e.ner) {
                (Some(re), None) => match Regex::new(re) {
                    Ok(regex) => extract.push(Extractor::Regex {
                        field: e.field.clone(),
                        regex,
                    }),
                    Err(err) => self.problem(
                        format!("{ek}.regex"),
                        err.to_string(),
                        "fix the regular expression",
                    ),
                },
                (None, Some(n)) => {
                    if self.specialist(&format!("{ek}.ner"), n, LocalKind::Tagger, local) {
                        extract.push(Extractor::Ner {
                            field: e.field.clone(),
                            specialist: n.clone(),
                            entity: e.entity.clone().unwrap_or_else(|| "PER".into()),
                        });
                    }
                }
                _ => self.problem(
                    &ek,
                    "an extractor needs either regex or ner",
                    "give one of them",
                ),
            }
        }
        let retrieve = r.retrieve.as_ref().map(|q| {
            let database = self.database_url(&format!("{key}.retrieve.database"), &q.database);
            let (query, params) = bind_named(&q.query);
            for p in &params {
                if !extract.iter().any(|e| match e {
                    Extractor::Regex { field, .. } | Extractor::Ner { field, .. } => field == p,
                }) {
                    self.problem(
                        format!("{key}.retrieve.query"),
                        format!("parameter `:{p}` is not an extracted field"),
                        "add an [[extract]] with that field, or fix the name",
                    );
                }
            }
            Retrieve {
                database,
                query,
                params,
            }
        });
        let mut routes = IndexMap::new();
        for (name, route) in &r.routes {
            let rk = format!("{key}.routes.{name}");
            let handler = match route.handler.as_str() {
                "template" => {
                    let Some(template) = &route.template else {
                        self.problem(
                            format!("{rk}.template"),
                            "a template handler needs its template",
                            "add template = \"Order {order_id} is {status}.\"",
                        );
                        continue;
                    };
                    Handler::Template {
                        template: template.clone(),
                        requires: route.requires.clone(),
                    }
                }
                "model" => {
                    let targets = self.targets(
                        &rk,
                        route.provider.as_deref(),
                        route.model.as_deref(),
                        &route.fallback,
                        providers,
                    );
                    if targets.is_empty() {
                        self.problem(
                            &rk,
                            "a model handler needs provider and model",
                            "add provider = \"...\" and model = \"...\"",
                        );
                        continue;
                    }
                    Handler::Model {
                        targets,
                        system_prompt: route.system_prompt.clone(),
                        max_tokens: route.max_tokens,
                    }
                }
                other => {
                    self.problem(
                        format!("{rk}.handler"),
                        format!("unknown handler `{other}`"),
                        "use template or model",
                    );
                    continue;
                }
            };
            if let Some(o) = &route.otherwise
                && !r.routes.contains_key(o)
            {
                self.problem(
                    format!("{rk}.otherwise"),
                    format!("`{o}` is not a route"),
                    "name another route",
                );
            }
            routes.insert(
                name.clone(),
                Route {
                    handler,
                    otherwise: route.otherwise.clone(),
                },
            );
        }
        Some(Router {
            intent,
            extract,
            retrieve,
            routes,
        })
    }

    fn pipeline(
        &mut self,
        key: &str,
        p: &RawPipeline,
        local: &IndexMap<String, LocalSpec>,
        providers: &IndexMap<String, ProviderSettings>,
    ) -> Option<Pipeline> {
        let input = match p.stages.first().map(|s| s.kind.as_str()) {
            Some("transcribe") => Value::Audio,
            Some(_) => Value::Text,
            None => {
                self.problem(
                    format!("{key}.stages"),
                    "a pipeline needs stages",
                    "add [[tasks.NAME.stages]] tables",
                );
                return None;
            }
        };
        let mut stages = Vec::new();
        let mut have = input;
        for (i, s) in p.stages.iter().enumerate() {
            let sk = format!("{key}.stages[{i}]");
            let (kind, needs) = match s.kind.as_str() {
                "transcribe" => {
                    let Some(l) = &s.local else {
                        self.problem(
                            format!("{sk}.local"),
                            "a transcribe stage needs a Whisper specialist",
                            "add local = \"whisper\"",
                        );
                        continue;
                    };
                    self.specialist(&format!("{sk}.local"), l, LocalKind::Whisper, local);
                    (
                        StageKind::Transcribe {
                            specialist: l.clone(),
                        },
                        Value::Audio,
                    )
                }
                "summarize" => {
                    let mut targets = Vec::new();
                    for t in &s.tiers {
                        targets.extend(self.targets(
                            &format!("{sk}.tiers"),
                            Some(&t.provider),
                            Some(&t.model),
                            &[],
                            providers,
                        ));
                    }
                    if s.tiers.is_empty() {
                        self.problem(
                            format!("{sk}.tiers"),
                            "a summarize stage needs at least one model",
                            "add tiers = [{ provider = \"...\", model = \"...\" }], cheapest first",
                        );
                    }
                    (
                        StageKind::Summarize {
                            targets,
                            min_transcript_confidence: s.min_transcript_confidence,
                            system_prompt: s.system_prompt.clone(),
                            max_tokens: s.max_tokens,
                        },
                        Value::Text,
                    )
                }
                "entities" => {
                    let Some(l) = &s.local else {
                        self.problem(
                            format!("{sk}.local"),
                            "an entities stage needs a NER specialist",
                            "add local = \"ner\"",
                        );
                        continue;
                    };
                    self.specialist(&format!("{sk}.local"), l, LocalKind::Tagger, local);
                    let types = if s.entities.is_empty() {
                        vec!["PER".into(), "ORG".into()]
                    } else {
                        s.entities.clone()
                    };
                    (
                        StageKind::Entities {
                            specialist: l.clone(),
                            types,
                        },
                        Value::Text,
                    )
                }
                "action_items" => (StageKind::ActionItems, Value::Text),
                other => {
                    self.problem(
                        format!("{sk}.kind"),
                        format!("unknown stage kind `{other}`"),
                        "use transcribe, summarize, entities or action_items",
                    );
                    continue;
                }
            };
            // A transcript is text as well; audio is only good for transcribe.
            let fits = matches!(
                (needs, have),
                (Value::Audio, Value::Audio) | (Value::Text, Value::Text | Value::Transcript)
            );
            if !fits {
                self.problem(
                    &sk,
                    format!(
                        "`{}` needs {needs:?} input but the stage before gives {have:?}",
                        s.kind
                    ),
                    "put a transcribe stage first for audio, and nothing before it",
                );
            }
            if needs == Value::Audio {
                have = Value::Transcript;
            }
            stages.push(Stage {
                name: s.name.clone(),
                kind,
            });
        }
        Some(Pipeline { input, stages })
    }

    fn server(&mut self, raw: &RawServer, tasks: &IndexMap<String, Task>) -> ServerConfig {
        let mut keys = Vec::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let kk = format!("server.keys[{i}]");
            for t in &k.tasks {
                if !tasks.contains_key(t) {
                    self.problem(
                        format!("{kk}.tasks"),
                        format!("unknown task `{t}`"),
                        "name a [tasks.NAME] table",
                    );
                }
            }
            let key = SecretString::from_env(&k.key_env);
            if key.is_none() {
                self.warnings.push(format!(
                    "{kk}.key_env: {} is not set; key `{}` cannot be used",
                    k.key_env, k.name
                ));
            }
            keys.push(KeyConfig {
                name: k.name.clone(),
                key_env: k.key_env.clone(),
                key,
                tasks: k.tasks.clone(),
                requests_per_minute: k.requests_per_minute,
            });
        }
        for (field, value) in [
            ("moderation_task", &raw.moderation_task),
            ("transcription_task", &raw.transcription_task),
            ("chat_task", &raw.chat_task),
        ] {
            if let Some(t) = value
                && !tasks.contains_key(t)
            {
                self.problem(
                    format!("server.{field}"),
                    format!("unknown task `{t}`"),
                    "name a [tasks.NAME] table",
                );
            }
        }
        ServerConfig {
            socket: raw.socket.as_ref().map(|s| {
                if s.is_absolute() {
                    s.clone()
                } else {
                    self.base_dir.join(s)
                }
            }),
            listen: raw.listen.clone(),
            keys,
            moderation_task: raw.moderation_task.clone(),
            transcription_task: raw.transcription_task.clone(),
            chat_task: raw.chat_task.clone(),
            categories: raw.categories.clone(),
            max_audio_seconds: raw.max_audio_seconds,
        }
    }
}

/// Replace `:name` parameters by `$1..$n` (both SQLite and PostgreSQL accept
/// `$n`), returning the names in order. `::` (a PostgreSQL cast) is left alone.
pub fn bind_named(query: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(query.len());
    let mut names: Vec<String> = Vec::new();
    let chars: Vec<char> = query.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == ':' && i + 1 < chars.len() && chars[i + 1] == ':' {
            out.push_str("::");
            i += 2;
            continue;
        }
        if c == ':'
            && i + 1 < chars.len()
            && (chars[i + 1].is_ascii_alphabetic() || chars[i + 1] == '_')
        {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
                end += 1;
            }
            let name: String = chars[start..end].iter().collect();
            let n = match names.iter().position(|x| *x == name) {
                Some(p) => p + 1,
                None => {
                    names.push(name);
                    names.len()
                }
            };
            out.push_str(&format!("${n}"));
            i = end;
            continue;
        }
        out.push(c);
        i += 1;
    }
    (out, names)
}
