//! `triage serve`: a config's tasks through the strategies engine behind
//! OpenAI-compatible routes on a unix socket and TCP. Without `--config` it
//! serves the embedded default config (`triage config default`), adjusted by
//! the flags below; both run the same engine path.

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use toml::{Table, Value};
use triage_engine::{Config, default_config};
use triage_local::DeviceSpec;
use triage_server::{ApiKey, AppState, Limits};

/// The Whisper model served by default.
pub const DEFAULT_WHISPER: &str = "ggerganov/whisper.cpp#ggml-tiny.en.bin";

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Task configuration (TOML): serve its tasks through the strategies
    /// engine; SIGHUP reloads it. Default: the embedded default config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket path (interface used by acceptance checks); overrides `server.socket`.
    #[arg(long, env = "TRIAGE_SOCKET")]
    socket: Option<PathBuf>,
    /// Also listen on TCP, HOST:PORT; needs API keys (TRIAGE_API_KEYS or the
    /// config's `server.keys`); overrides `server.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Without --config: the moderation model (default: the toxicity specialist).
    #[arg(long, conflicts_with = "config")]
    moderation_model: Option<String>,
    /// Without --config: the Whisper model, a ggml file, a folder, or org/name[@rev]#file.bin.
    #[arg(long, env = "TRIAGE_WHISPER_MODEL", conflicts_with = "config")]
    whisper_model: Option<String>,
    /// Without --config: specialist label → OpenAI moderation category
    /// (default: offensive=harassment).
    #[arg(long, value_delimiter = ',', conflicts_with = "config")]
    category_map: Vec<String>,
    /// Without --config: the score at which a label is flagged (default 0.5).
    #[arg(long, conflicts_with = "config")]
    flag_threshold: Option<f64>,
    /// Without --config: dollars per CPU-hour, to price local answers (default 0.04).
    #[arg(long, conflicts_with = "config")]
    cpu_hour_usd: Option<f64>,
    /// Without --config: the longest text the moderation model accepts, in
    /// tokens (default 32768); longer is a 413 naming the limit.
    #[arg(long, conflicts_with = "config")]
    max_input_tokens: Option<usize>,
    /// Longest audio accepted, in seconds (a config's `server.max_audio_seconds` wins).
    #[arg(long, default_value_t = 4.0 * 3600.0)]
    max_audio_s: f64,
    /// Largest audio upload in bytes, spooled to disk as it arrives (a
    /// config's `server.max_upload_bytes` wins); over it is a 413 naming it.
    #[arg(long, default_value_t = 2u64 << 30)]
    max_upload_bytes: u64,
    /// Where audio uploads are spooled (default: the system's temporary folder).
    #[arg(long, env = "TRIAGE_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// After SIGTERM, seconds that requests in flight and the ledger's last
    /// commits may take before the process exits anyway.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    drain_timeout: f64,
}

fn default_socket() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join("triage").join("triage.sock")
}

/// `TRIAGE_API_KEYS`: comma-separated `key`, `name:key`, `name:key:task+task`,
/// `name:key:task+task:rpm` or `name:key:task+task:rpm:overrides` (an empty
/// task list allows every task, an empty rpm no limit; `overrides` lets the
/// key skip or widen the local tier).
fn keys_from_env() -> Result<Vec<ApiKey>> {
    let mut keys = Vec::new();
    for (i, entry) in std::env::var("TRIAGE_API_KEYS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .enumerate()
    {
        if entry.is_empty() {
            continue;
        }
        let parts: Vec<&str> = entry.split(':').collect();
        let name = triage_engine::config::env_key_name(i, entry);
        let key = match parts.as_slice() {
            [key] | [_, key, ..] => *key,
            [] => continue,
        };
        let tasks = parts
            .get(2)
            .map(|t| {
                t.split('+')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let allow_overrides = match parts.get(4) {
            None | Some(&"") => false,
            Some(&"overrides") => true,
            Some(other) => bail!(
                "TRIAGE_API_KEYS entry {}: `{other}` is not `overrides`",
                i + 1
            ),
        };
        let rpm = parts
            .get(3)
            .filter(|r| !r.is_empty())
            .map(|r| {
                r.parse::<u32>().with_context(|| {
                    format!("TRIAGE_API_KEYS: `{r}` is not a requests-per-minute number")
                })
            })
            .transpose()?;
        if key.is_empty() {
            bail!("TRIAGE_API_KEYS entry {} has an empty key", i + 1);
        }
        keys.push(ApiKey {
            key: key.to_owned(),
            name,
            tasks,
            rpm,
            allow_overrides,
            admin: false,
        });
    }
    mark_admins(
        &mut keys,
        &std::env::var("TRIAGE_ADMIN_KEYS").unwrap_or_default(),
    )?;
    Ok(keys)
}

/// The line `triage serve --listen` prints about the web UI.
fn ui_banner(addr: SocketAddr, env_admin: bool) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let url = format!("http://{host}:{}/ui/", addr.port());
    if env_admin {
        format!("triage: web UI at {url} (open {url}#key=ADMIN_KEY, or sign in with an admin key)")
    } else {
        format!(
            "triage: web UI at {url} (needs an admin key: TRIAGE_ADMIN_KEYS=name or admin = true in [[server.keys]])"
        )
    }
}

/// `TRIAGE_ADMIN_KEYS`: comma-separated names of `TRIAGE_API_KEYS` entries
/// that may use the web UI over TCP. A name that matches no key is an error,
/// not a silently locked page.
fn mark_admins(keys: &mut [ApiKey], names: &str) -> Result<()> {
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let Some(key) = keys.iter_mut().find(|k| k.name == name) else {
            bail!(
                "TRIAGE_ADMIN_KEYS names `{name}`, which is not a key name in TRIAGE_API_KEYS (name:key)"
            );
        };
        key.admin = true;
    }
    Ok(())
}

fn table<'a>(t: &'a mut Table, path: &[&str]) -> Result<&'a mut Table> {
    let mut cur = t;
    for key in path {
        cur = cur
            .entry((*key).to_owned())
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .with_context(|| format!("the default config's `{key}` is not a table"))?;
    }
    Ok(cur)
}

/// The embedded default config with the flags applied: the same TOML a user
/// gets from `triage config default`, edited where a flag says so.
async fn default_with_flags(
    args: &ServeArgs,
    device: DeviceSpec,
    whisper_threads: usize,
) -> Result<Config> {
    let mut doc: Table =
        toml::from_str(default_config::TOML).context("the embedded default config is not TOML")?;
    for specialist in ["toxicity", "whisper"] {
        table(&mut doc, &["local", specialist])?.insert("device".into(), device.to_string().into());
    }
    let n = i64::try_from(whisper_threads).unwrap_or(i64::MAX);
    table(&mut doc, &["local", "whisper"])?.insert("threads".into(), n.into());
    if let Some(model) = &args.moderation_model {
        table(&mut doc, &["local", "toxicity"])?.insert("model".into(), model.clone().into());
        // Another model has other labels: the task scores each of them.
        let labels = triage_local::model_labels(model)
            .await
            .with_context(|| format!("cannot load the moderation model `{model}`"))?;
        let task = table(&mut doc, &["tasks", "moderation"])?;
        task.insert(
            "labels".into(),
            Value::Array(labels.iter().map(|l| l.clone().into()).collect()),
        );
        task.remove("label_descriptions");
        let tiers = task
            .get_mut("tiers")
            .and_then(Value::as_array_mut)
            .and_then(|t| t.first_mut())
            .and_then(Value::as_table_mut)
            .context("the default config's moderation task has no tier")?;
        tiers.insert(
            "map".into(),
            Value::Table(
                labels
                    .iter()
                    .map(|l| (l.clone(), l.clone().into()))
                    .collect(),
            ),
        );
    }
    if !args.category_map.is_empty() {
        let mut categories = Table::new();
        for pair in &args.category_map {
            let (label, category) = pair
                .split_once('=')
                .with_context(|| format!("--category-map entry `{pair}` is not label=category"))?;
            categories.insert(label.trim().to_owned(), category.trim().into());
        }
        table(&mut doc, &["server"])?.insert("categories".into(), Value::Table(categories));
    }
    if let Some(n) = args.max_input_tokens {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        table(&mut doc, &["local", "toxicity"])?.insert("max_input_tokens".into(), n.into());
    }
    if let Some(t) = args.flag_threshold {
        table(&mut doc, &["tasks", "moderation"])?.insert("threshold".into(), t.into());
    }
    if let Some(usd) = args.cpu_hour_usd {
        table(&mut doc, &["compute"])?.insert("cpu_hour_usd".into(), usd.into());
    }
    table(&mut doc, &["server"])?.insert("max_audio_seconds".into(), args.max_audio_s.into());
    let whisper = args
        .whisper_model
        .clone()
        .unwrap_or_else(|| DEFAULT_WHISPER.into());
    table(&mut doc, &["local", "whisper"])?.insert("model".into(), whisper.clone().into());
    // Without Whisper (a text-only build, or the default model not
    // installed) the same config is served without its Whisper parts.
    let no_whisper = if !cfg!(feature = "speech") {
        eprintln!("note: this triage was built without speech: serving moderation only");
        true
    } else if let Err(e) = triage_local::resolve::resolve_whisper(&whisper).await {
        if args.whisper_model.is_some() {
            return Err(e).context("cannot load the Whisper model");
        }
        tracing::warn!(error = %e, "no Whisper model: serving moderation only (scripts/serve installs one)");
        eprintln!("warning: transcription disabled: {e}");
        true
    } else {
        false
    };
    if no_whisper {
        table(&mut doc, &["local"])?.remove("whisper");
        table(&mut doc, &["tasks"])?.remove("transcription");
        table(&mut doc, &["server"])?.remove("transcription_task");
    }
    let text = toml::to_string(&doc).context("cannot write the default config")?;
    Ok(Config::from_toml(
        &text,
        default_config::ORIGIN,
        std::path::Path::new("."),
    )?)
}

pub async fn run(args: ServeArgs, device: DeviceSpec, whisper_threads: usize) -> Result<ExitCode> {
    let (config, what) = match &args.config {
        Some(path) => {
            let mut config = Config::load(path)?;
            // A Whisper specialist without `threads` takes its share of the budget.
            for spec in config.local.values_mut() {
                if spec.kind == triage_engine::config::LocalKind::Whisper && spec.threads.is_none()
                {
                    spec.threads = Some(whisper_threads);
                }
            }
            (config, path.display().to_string())
        }
        None => (
            default_with_flags(&args, device, whisper_threads).await?,
            "the default specialists".to_owned(),
        ),
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
        eprintln!("warning: {w}");
    }
    let socket = args
        .socket
        .clone()
        .or_else(|| config.server.socket.clone())
        .or_else(|| Some(default_socket()));
    let listen = match (&args.listen, &config.server.listen) {
        (Some(a), _) => Some(*a),
        (None, Some(l)) => Some(
            l.parse::<SocketAddr>()
                .with_context(|| format!("server.listen `{l}` is not HOST:PORT"))?,
        ),
        (None, None) => None,
    };
    let limits = Limits {
        max_audio_s: config.server.max_audio_seconds.unwrap_or(args.max_audio_s),
        audio_upload_bytes: config
            .server
            .max_upload_bytes
            .unwrap_or(args.max_upload_bytes),
        spool_dir: args.spool_dir.clone(),
        drain_timeout: std::time::Duration::try_from_secs_f64(args.drain_timeout)
            .context("--drain-timeout must be a number of seconds, 0 or more")?,
        edge: edge_limits(&config.server.edge),
        ..Limits::default()
    };
    let engine = triage_engine::Engine::new(config)
        .await
        .with_context(|| format!("cannot start the engine for {what}"))?;
    let state = AppState::new(engine, limits, keys_from_env()?);
    if let Some(s) = &socket {
        eprintln!("triage: serving {what} on unix socket {}", s.display());
    }
    if let Some(a) = &listen {
        eprintln!("triage: serving on http://{a} (bearer keys required)");
        eprintln!("{}", ui_banner(*a, state.keys.iter().any(|k| k.admin)));
    }
    triage_server::serve(state, socket, listen).await?;
    Ok(ExitCode::SUCCESS)
}

/// `[server]`'s timeouts and caps over the edge's defaults (validated
/// positive by the config check).
fn edge_limits(c: &triage_engine::config::EdgeConfig) -> triage_server::edge::EdgeLimits {
    let d = triage_server::edge::EdgeLimits::default();
    let secs = |v: Option<f64>, default| {
        v.and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
            .unwrap_or(default)
    };
    triage_server::edge::EdgeLimits {
        header_read: secs(c.header_read_timeout_s, d.header_read),
        body_idle: secs(c.body_idle_timeout_s, d.body_idle),
        request_total: secs(c.request_timeout_s, d.request_total),
        keep_alive_idle: secs(c.keep_alive_idle_s, d.keep_alive_idle),
        max_connections_tcp: c.max_connections_tcp.unwrap_or(d.max_connections_tcp),
        max_connections_socket: c.max_connections_socket.unwrap_or(d.max_connections_socket),
    }
}
