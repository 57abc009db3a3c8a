//! `triage serve`: the default specialists (moderation and transcription,
//! local tier), or with `--config` the config's tasks through the strategies
//! engine, behind OpenAI-compatible routes on a unix socket and TCP.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use triage_local::{BatchConfig, speech::WhisperEngine};
use triage_server::{ApiKey, AppState, Limits};

/// The Whisper model served by default.
pub const DEFAULT_WHISPER: &str = "ggerganov/whisper.cpp#ggml-tiny.en.bin";

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Task configuration (TOML): serve its tasks through the strategies
    /// engine; SIGHUP reloads it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket path (interface used by acceptance checks); overrides `server.socket`.
    #[arg(long, env = "TRIAGE_SOCKET")]
    socket: Option<PathBuf>,
    /// Also listen on TCP, HOST:PORT; needs API keys (TRIAGE_API_KEYS or the
    /// config's `server.keys`); overrides `server.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Moderation model (default: the toxicity specialist).
    #[arg(long, default_value = "toxicity")]
    moderation_model: String,
    /// Whisper model: a ggml file, a folder, or org/name[@rev]#file.bin.
    #[arg(long, env = "TRIAGE_WHISPER_MODEL", default_value = DEFAULT_WHISPER)]
    whisper_model: String,
    /// Specialist label → OpenAI moderation category.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "offensive=harassment,toxic=harassment,hate=hate"
    )]
    category_map: Vec<String>,
    /// Category score at which a result is flagged.
    #[arg(long, default_value_t = 0.5)]
    flag_threshold: f32,
    /// Dollars per CPU-hour, to price local answers in x-triage-cost-usd.
    #[arg(long, default_value_t = 0.04)]
    cpu_hour_usd: f64,
    /// Longest audio accepted, in seconds.
    #[arg(long, default_value_t = 4.0 * 3600.0)]
    max_audio_s: f64,
}

fn default_socket() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join("triage").join("triage.sock")
}

/// `TRIAGE_API_KEYS`: comma-separated `key`, `name:key`, `name:key:task+task`
/// or `name:key:task+task:rpm` (an empty task list allows every task).
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
        let (name, key) = match parts.as_slice() {
            [key] => (format!("key{i}"), *key),
            [name, key, ..] => ((*name).to_owned(), *key),
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
        let rpm = parts
            .get(3)
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
        });
    }
    Ok(keys)
}

pub async fn run(
    args: ServeArgs,
    device: &candle_core::Device,
    threads: Option<usize>,
    gpu: bool,
) -> Result<ExitCode> {
    if let Some(config) = args.config.clone() {
        return run_config(args, &config).await;
    }
    let category_map: BTreeMap<String, String> = args
        .category_map
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
                .with_context(|| format!("--category-map entry `{pair}` is not label=category"))
        })
        .collect::<Result<_>>()?;
    for category in category_map.values() {
        if !triage_server::app::OPENAI_CATEGORIES.contains(&category.as_str()) {
            bail!("--category-map: `{category}` is not an OpenAI moderation category");
        }
    }
    let moderation =
        triage_local::start_model(&args.moderation_model, device, BatchConfig::default())
            .await
            .with_context(|| {
                format!(
                    "cannot load the moderation model `{}`",
                    args.moderation_model
                )
            })?;
    let whisper = match triage_local::resolve::resolve_whisper(&args.whisper_model).await {
        Ok(path) => {
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            });
            Some(Arc::new(
                tokio::task::spawn_blocking(move || WhisperEngine::load(&path, threads, gpu))
                    .await??,
            ))
        }
        Err(e) if args.whisper_model == DEFAULT_WHISPER => {
            tracing::warn!(error = %e, "no Whisper model: serving moderation only (scripts/serve installs one)");
            eprintln!("warning: transcription disabled: {e}");
            None
        }
        Err(e) => return Err(e).context("cannot load the Whisper model"),
    };
    let limits = Limits {
        max_audio_s: args.max_audio_s,
        ..Limits::default()
    };
    let state = Arc::new(AppState {
        moderation: Some(moderation),
        category_map,
        flag_threshold: args.flag_threshold,
        whisper,
        whisper_slots: Arc::new(tokio::sync::Semaphore::new(limits.audio_parallel)),
        limits,
        keys: keys_from_env()?,
        metrics: Default::default(),
        jobs: Default::default(),
        audio_waiting: Default::default(),
        rate_limits: Default::default(),
        cpu_hour_usd: args.cpu_hour_usd,
        engine: Default::default(),
    });
    let socket = args.socket.or_else(|| Some(default_socket()));
    if let Some(s) = &socket {
        eprintln!("triage: serving on unix socket {}", s.display());
    }
    if let Some(a) = &args.listen {
        eprintln!("triage: serving on http://{a} (bearer keys required)");
    }
    triage_server::serve(state, socket, args.listen).await?;
    Ok(ExitCode::SUCCESS)
}

/// `triage serve --config FILE`: the config's tasks through the engine.
async fn run_config(args: ServeArgs, path: &std::path::Path) -> Result<ExitCode> {
    let config = triage_engine::Config::load(path)?;
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
        ..Limits::default()
    };
    let cpu_hour_usd = config.prices.compute().cpu_hour_usd;
    let engine = triage_engine::Engine::new(config)
        .await
        .with_context(|| format!("cannot start the engine for {}", path.display()))?;
    let state = Arc::new(AppState {
        moderation: None,
        category_map: BTreeMap::new(),
        flag_threshold: args.flag_threshold,
        whisper: None,
        whisper_slots: Arc::new(tokio::sync::Semaphore::new(limits.audio_parallel)),
        limits,
        keys: keys_from_env()?,
        metrics: Default::default(),
        jobs: Default::default(),
        audio_waiting: Default::default(),
        rate_limits: Default::default(),
        cpu_hour_usd,
        engine: triage_server::EngineSlot::new(engine),
    });
    if let Some(s) = &socket {
        eprintln!(
            "triage: serving {} on unix socket {}",
            path.display(),
            s.display()
        );
    }
    if let Some(a) = &listen {
        eprintln!("triage: serving on http://{a} (bearer keys required)");
    }
    triage_server::serve(state.clone(), socket, listen).await?;
    // Requests have drained; write what the ledger still holds before exiting.
    if let Some(ledger) = state.engine.current().and_then(|e| e.ledger.clone()) {
        ledger.flush().await?;
    }
    Ok(ExitCode::SUCCESS)
}
