//! `triage audit` and `triage calibrate`: thin fronts over the engine's
//! replay, audit and calibration (`triage_audit::audit`, `::calibrate`).
//! Bad input (unknown labels, empty files, unknown tiers, a config that
//! cannot be rewritten) is refused before any model loads. Rendering the
//! reports (HTML, PNG) lives in `report.rs`.

use anyhow::{Context, Result, bail};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use triage_audit::audit::{self, AuditOptions, Labelled, Mode, Replay};
use triage_audit::calibrate::{self, CalibrateOptions, Target};
use triage_audit::drift;
use triage_audit::render::report;
use triage_audit::task_audit::{self, Shape};
use triage_engine::config::Task;
use triage_engine::{Config, Engine, Ledger};

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The TOML config that declares the task.
    #[arg(long)]
    config: PathBuf,
    /// The task's name (`[tasks.NAME]`): a moderation cascade whose first tier is local, a router,
    /// or a pipeline that transcribes or tags entities.
    #[arg(long)]
    task: String,
    /// Labelled JSONL: {"text", "label"} for moderation (a task label, a list of them, or 0/1 for a
    /// single-label task), {"text", "route"} for routers, {"text", "entities"} for NER pipelines,
    /// {"audio", "text"} for transcription (audio paths relative to this file).
    #[arg(long, required_unless_present = "from_ledger")]
    data: Option<PathBuf>,
    /// Call no hosted provider: escalated items are priced from the price table (default).
    #[arg(long, conflicts_with = "live")]
    offline: bool,
    /// Send escalated items to the hosted tiers (answers cached on disk).
    #[arg(long, requires = "max_cost_usd")]
    live: bool,
    /// With --live: never start a call that could take this run's spend past this many dollars.
    #[arg(long)]
    max_cost_usd: Option<f64>,
    /// With --live: where answers are cached [default: $TRIAGE_DATA_DIR/audit-cache, else the data dir].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Accuracy assumed for escalated items that were not sent to a provider.
    #[arg(long, default_value_t = 0.95)]
    hosted_accuracy: f64,
    /// Audit a random sample of N items (seeded).
    #[arg(long)]
    sample: Option<usize>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the JSON object on one line (it is pretty-printed otherwise).
    #[arg(long)]
    json: bool,
    /// Also write the report: .html (self-contained, with the frontier plot), .png or .json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Estimate local accuracy on live traffic from the ledger's shadow checks instead.
    #[arg(long, conflicts_with_all = ["data", "live", "sample", "out"])]
    from_ledger: bool,
    /// With --from-ledger: only records since a duration (30m, 24h, 7d) or a date (YYYY-MM-DD).
    #[arg(long, requires = "from_ledger")]
    since: Option<String>,
    /// With --from-ledger: read this ledger URL instead of the config's.
    #[arg(long, requires = "from_ledger")]
    ledger: Option<String>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
pub struct CalibrateArgs {
    /// The TOML config that declares the task.
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    task: String,
    /// The tier whose band (lo, hi; per label for a multi-label task) is chosen. A tier after
    /// the first is calibrated on the items the local tiers before it escalate (replayed with
    /// their configured bands). A hosted tier with a band (hosted moderation or a cheap LLM
    /// before the strong one) is asked for its scores: it needs --live --max-cost-usd X.
    #[arg(long)]
    tier: String,
    /// Labelled JSONL, as for `triage audit`.
    #[arg(long)]
    data: PathBuf,
    /// The band with the largest local share whose local accuracy is at least this.
    #[arg(long, group = "target")]
    target_accuracy: Option<f64>,
    /// The most accurate band whose local share is at least this.
    #[arg(long, group = "target")]
    target_local_share: Option<f64>,
    /// The most accurate band whose estimated cost per 100k requests is at most this.
    #[arg(long, group = "target")]
    max_cost_per_100k: Option<f64>,
    /// With --target-accuracy: ask for accuracy on the data ≥ target + MARGIN
    /// instead of the default rule (the band's one-sided 95% lower bound of
    /// local accuracy ≥ target, which guards against a band that is merely
    /// lucky on this data).
    #[arg(long)]
    margin: Option<f64>,
    /// Write lo, hi and calibrated_accuracy into the config (a .bak is kept).
    #[arg(long)]
    write: bool,
    /// A hosted --tier: send the items that reach it to its provider (answers cached on disk).
    #[arg(long, requires = "max_cost_usd")]
    live: bool,
    /// With --live: never start a call that could take this run's spend past this many dollars.
    #[arg(long)]
    max_cost_usd: Option<f64>,
    /// With --live: where answers are cached [default: $TRIAGE_DATA_DIR/audit-cache, else the data dir].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Calibrate on a random sample of N items (seeded).
    #[arg(long)]
    sample: Option<usize>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the JSON object on one line (it is pretty-printed otherwise).
    #[arg(long)]
    json: bool,
}

fn load_config(path: &Path) -> Result<Config> {
    let mut config = Config::load(path)?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // A replay is not traffic: it stays out of the cost ledger.
    config.ledger_url = None;
    Ok(config)
}

fn find_task<'a>(config: &'a Config, task: &str) -> Result<&'a Task> {
    config.task(task).with_context(|| {
        format!(
            "unknown task `{task}`; the config declares: {}",
            config.tasks.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })
}

fn read_data(config: &Config, task: &str, path: &Path) -> Result<Vec<Labelled>> {
    let cascade = audit::cascade_of(find_task(config, task)?)?;
    let bytes = crate::input::read_source(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(audit::parse_labelled(
        cascade,
        &bytes,
        &path.display().to_string(),
    )?)
}

fn progress_bar(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

async fn replay(
    config: Config,
    task: &str,
    tier: Option<&str>,
    items: Vec<Labelled>,
) -> Result<(Engine, Replay)> {
    let engine = Engine::new(config).await?;
    let bar = progress_bar(items.len(), "local");
    let tick = bar.clone();
    let replay = Replay::run(&engine, task, tier, items, &mut move || tick.inc(1)).await?;
    bar.finish_and_clear();
    Ok((engine, replay))
}

fn print_json(value: &impl serde::Serialize, compact: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if compact {
        serde_json::to_writer(&mut out, value)?;
    } else {
        serde_json::to_writer_pretty(&mut out, value)?;
    }
    writeln!(out)?;
    Ok(())
}

/// Where live answers are cached by default.
fn default_cache() -> PathBuf {
    let url = triage_engine::config::default_ledger_url();
    let db = PathBuf::from(url.trim_start_matches("sqlite://"));
    db.parent().unwrap_or(Path::new(".")).join("audit-cache")
}

pub async fn audit(args: AuditArgs) -> Result<ExitCode> {
    if args.from_ledger {
        return from_ledger(&args).await;
    }
    if !(0.0..=1.0).contains(&args.hosted_accuracy) {
        bail!(
            "--hosted-accuracy {} is not between 0 and 1",
            args.hosted_accuracy
        );
    }
    if let Some(x) = args.max_cost_usd
        && !(x.is_finite() && x >= 0.0)
    {
        bail!("--max-cost-usd {x} is not a dollar amount");
    }
    if let Some(out) = &args.out {
        report::check_out(out)?;
    }
    let Some(data) = &args.data else {
        bail!("give --data LABELLED.jsonl (or --from-ledger)");
    };
    let config = load_config(&args.config)?;
    let mode = if args.live {
        Mode::Live {
            max_cost_usd: args.max_cost_usd.unwrap_or(0.0),
            cache_dir: args.cache.clone().unwrap_or_else(default_cache),
        }
    } else {
        Mode::Offline
    };
    if args.sample == Some(0) {
        bail!("--sample must be at least 1");
    }
    if let Some(shape) = task_audit::shape_of(find_task(&config, &args.task)?)? {
        return audit_task(&args, config, data, &shape, mode).await;
    }
    let items = read_data(&config, &args.task, data)?;
    let task = config.task(&args.task).context("the task disappeared")?;
    audit::replay_tier(task, None)?;
    let items = match args.sample {
        Some(n) => audit::sample(items, n, args.seed),
        None => items,
    };
    let (engine, replay) = replay(config, &args.task, None, items).await?;
    let escalated = {
        let bands = replay.bands();
        replay
            .items
            .iter()
            .filter(|i| !i.accepted_bands(&bands))
            .count()
    };
    let bar = progress_bar(escalated, "hosted");
    let tick = bar.clone();
    let opts = AuditOptions {
        mode,
        hosted_accuracy: args.hosted_accuracy,
    };
    let report = audit::audit(&engine, &replay, &opts, &mut move || tick.inc(1)).await?;
    bar.finish_and_clear();
    if let Some(out) = &args.out {
        report::write(out, &report)?;
    }
    print_json(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// `triage audit` of a router or a pipeline: each item runs through the
/// engine once (offline: a copy of the task without its hosted parts).
async fn audit_task(
    args: &AuditArgs,
    config: Config,
    data: &Path,
    shape: &Shape,
    mode: Mode,
) -> Result<ExitCode> {
    if let Some(out) = &args.out
        && out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        && !task_audit::has_knob(find_task(&config, &args.task)?)
    {
        bail!(
            "--out {}: a PNG holds the frontier, and task `{}` has no setting to re-score (a router's local intent has min_score, a summarize stage min_transcript_confidence with two models); use .html or .json",
            out.display(),
            args.task
        );
    }
    let bytes = crate::input::read_source(data)
        .with_context(|| format!("cannot read {}", data.display()))?;
    let base = data
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (items, left_out) =
        task_audit::parse_task_data(shape, &bytes, &data.display().to_string(), base)?;
    let items = match args.sample {
        Some(n) => audit::sample(items, n, args.seed),
        None => items,
    };
    let task = find_task(&config, &args.task)?.clone();
    let engine_config = match mode {
        Mode::Offline => task_audit::offline_config(&config, &args.task)?,
        Mode::Live { .. } => config,
    };
    let engine = Engine::new(engine_config).await?;
    let bar = progress_bar(items.len(), "items");
    let tick = bar.clone();
    let opts = AuditOptions {
        mode,
        hosted_accuracy: args.hosted_accuracy,
    };
    let report = task_audit::audit_task(
        &engine,
        &task,
        shape,
        &items,
        left_out,
        &opts,
        &mut move || tick.inc(1),
    )
    .await?;
    bar.finish_and_clear();
    if let Some(out) = &args.out {
        report::write(out, &report)?;
    }
    print_json(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn calibrate(args: CalibrateArgs) -> Result<ExitCode> {
    let target = match (
        args.target_accuracy,
        args.target_local_share,
        args.max_cost_per_100k,
    ) {
        (Some(a), _, _) => Target::Accuracy(a),
        (_, Some(s), _) => Target::LocalShare(s),
        (_, _, Some(x)) => Target::MaxCostPer100k(x),
        _ => bail!("give one of --target-accuracy, --target-local-share, --max-cost-per-100k"),
    };
    if let Some(m) = args.margin
        && !(0.0..1.0).contains(&m)
    {
        bail!("--margin {m} is not between 0 and 1");
    }
    if let Some(x) = args.max_cost_usd
        && !(x.is_finite() && x >= 0.0)
    {
        bail!("--max-cost-usd {x} is not a dollar amount");
    }
    let config = load_config(&args.config)?;
    let items = read_data(&config, &args.task, &args.data)?;
    let task = config.task(&args.task).context("the task disappeared")?;
    let (_, _, hosted) = audit::calibration_tier(task, &args.tier)?;
    let live = match (hosted, args.live, args.max_cost_usd) {
        (true, true, Some(cap)) => Some((cap, args.cache.clone().unwrap_or_else(default_cache))),
        (true, _, _) => bail!(
            "tier `{}` of task `{}` is hosted: calibrating it asks its provider for the scores of the items that reach it; give --live --max-cost-usd X (answers are cached, so a rerun is free)",
            args.tier,
            args.task
        ),
        (false, _, _) => None,
    };
    if args.write {
        calibrate::check_writable(&args.config)?;
    }
    let items = match args.sample {
        Some(0) => bail!("--sample must be at least 1"),
        Some(n) => audit::sample(items, n, args.seed),
        None => items,
    };
    let (replay, live) = match live {
        None => (
            replay(config, &args.task, Some(&args.tier), items).await?.1,
            None,
        ),
        Some((cap, cache_dir)) => {
            let engine = Engine::new(config).await?;
            let bar = progress_bar(items.len(), "items");
            let tick = bar.clone();
            let (replay, stats) = Replay::run_hosted(
                &engine,
                &args.task,
                &args.tier,
                items,
                cap,
                &cache_dir,
                &mut move || tick.inc(1),
            )
            .await?;
            bar.finish_and_clear();
            if stats.skipped_over_budget + stats.failed > 0 {
                eprintln!(
                    "warning: {} item(s) reaching tier `{}` were left out ({} over --max-cost-usd {}, {} failed); the band is chosen on the {} it scored",
                    stats.skipped_over_budget + stats.failed,
                    args.tier,
                    stats.skipped_over_budget,
                    cap,
                    stats.failed,
                    replay.n()
                );
            }
            (replay, Some(stats))
        }
    };
    let opts = CalibrateOptions {
        margin: args.margin,
        seed: args.seed,
        ..CalibrateOptions::default()
    };
    let mut calibration = calibrate::calibrate(&replay, target, &opts)?;
    calibration.live = live;
    if args.write {
        let bands = calibration.bands(&replay.cascade.labels);
        let written = calibrate::Written::of(&calibration, &bands);
        let bak = calibrate::write_band(
            &args.config,
            &args.task,
            &args.tier,
            written,
            calibration.local_accuracy,
        )?;
        let shown = match written {
            calibrate::Written::One { lo, hi } => format!("lo = {lo}, hi = {hi}"),
            calibrate::Written::PerLabel(b) => format!(
                "bands {}",
                b.iter()
                    .map(|(l, lo, hi)| format!("{l} = {{ lo = {lo}, hi = {hi} }}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        eprintln!(
            "wrote {shown}, calibrated_accuracy = {:.4} to {} (previous version: {})",
            calibration.local_accuracy,
            args.config.display(),
            bak.display()
        );
    }
    print_json(&calibration, args.json)?;
    Ok(ExitCode::SUCCESS)
}

async fn from_ledger(args: &AuditArgs) -> Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let task = config.task(&args.task).with_context(|| {
        format!(
            "unknown task `{}`; the config declares: {}",
            args.task,
            config.tasks.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let cascade = audit::cascade_of(task)?;
    let url = match (&args.ledger, &config.ledger_url) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u.clone(),
        (None, None) => bail!(
            "{} disables the ledger; pass --ledger URL",
            args.config.display()
        ),
    };
    let since = match &args.since {
        Some(s) => crate::engine_cmds::since_ms(s)?,
        None => 0,
    };
    let ledger = Ledger::open(&url).await?;
    let rows = ledger.shadow_agreement(&args.task, since).await?;
    let lines = drift::shadow_lines(cascade, rows);
    let mut warned = false;
    for w in lines.iter().filter_map(|l| l.warning.as_deref()) {
        eprintln!("warning: {w}");
        warned = true;
    }
    if lines.is_empty() {
        eprintln!(
            "no shadow checks for task `{}` in the ledger{}; set the task's `shadow` fraction to collect them",
            args.task,
            if args.since.is_some() {
                " in that period"
            } else {
                ""
            }
        );
    }
    let out = serde_json::json!({
        "task": args.task,
        "since_ms": since,
        "tiers": lines,
        "drift": warned,
    });
    print_json(&out, args.json)?;
    Ok(ExitCode::SUCCESS)
}
