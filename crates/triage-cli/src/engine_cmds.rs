//! `triage execute`, `triage config check` and `triage costs`: thin fronts
//! over the strategies engine and its ledger.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use triage_engine::{Config, Engine, GroupBy, Input, Ledger, Overrides};

#[derive(Debug, Args)]
pub struct ExecuteArgs {
    /// The TOML config that declares the task.
    #[arg(long)]
    config: PathBuf,
    /// The task's name (`[tasks.NAME]`).
    #[arg(long)]
    task: String,
    /// Text input.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// A file: audio for tasks that start by transcribing, UTF-8 text otherwise.
    #[arg(long)]
    file: Option<PathBuf>,
    /// JSON overrides, e.g. '{"start_tier": "llm"}' or '{"hi": 0.95, "lo": 0.05}'.
    #[arg(long)]
    overrides: Option<String>,
    /// Print a pipeline's notes as Markdown (its `markdown` field) instead of JSON.
    #[arg(long)]
    markdown: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and validate a config; print warnings (such as unset API keys).
    Check { file: PathBuf },
    /// Print the embedded default config (what `triage serve` runs without --config).
    Default,
}

#[derive(Debug, Args)]
pub struct CostsArgs {
    /// Read the ledger this config uses.
    #[arg(long, conflicts_with = "ledger")]
    config: Option<PathBuf>,
    /// Or a ledger URL (sqlite://file.db, postgres://...) [default: the default ledger].
    #[arg(long)]
    ledger: Option<String>,
    /// Only records since: a duration (30m, 24h, 7d) or a date (YYYY-MM-DD).
    #[arg(long)]
    since: Option<String>,
    /// Group by task, tier or model.
    #[arg(long, default_value = "task")]
    by: String,
    /// Print JSON rows instead of a table.
    #[arg(long)]
    json: bool,
    /// Print the config's budgets instead: per budget, its current window's
    /// limit, spent, reserved (calls in flight) and left, read from the
    /// ledger (with a PostgreSQL ledger, the totals every replica shares).
    #[arg(long, requires = "config")]
    budgets: bool,
}

pub async fn execute(args: ExecuteArgs) -> Result<ExitCode> {
    let config = Config::load(&args.config)?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let overrides: Overrides = match &args.overrides {
        Some(s) => {
            serde_json::from_str(s).context("--overrides is not a valid overrides object")?
        }
        None => Overrides::default(),
    };
    let task = config
        .task(&args.task)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown task `{}`; {} declares: {}",
                args.task,
                args.config.display(),
                config.tasks.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?
        .clone();
    let input = match (&args.text, &args.file) {
        (Some(t), _) => Input::Text(t.clone()),
        (None, Some(f)) if task.takes_audio() => {
            // Opened here so a missing or unreadable file is named with
            // its cause before any model loads.
            if let Err(e) = std::fs::File::open(f) {
                bail!("cannot read the audio file {} (--file): {e}", f.display());
            }
            // Read as it is decoded: a long recording is never in memory whole.
            Input::AudioFile {
                path: f.clone(),
                file_name: f.file_name().map(|n| n.to_string_lossy().into_owned()),
            }
        }
        (None, Some(f)) => Input::Text(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {} as UTF-8 text", f.display()))?,
        ),
        (None, None) => bail!("give --text or --file"),
    };
    let engine = Engine::new(config).await?;
    let result = engine.execute_traced(&args.task, input, &overrides).await;
    if let Some(ledger) = &engine.ledger {
        ledger.flush().await?;
    }
    let execution = match result {
        Ok(e) => e,
        Err(f) => {
            // What ran before the failure (tiers that escalated or failed,
            // their dollars) goes to stderr; stdout stays empty.
            if !f.trace.tiers.is_empty() {
                let mut stderr = std::io::stderr().lock();
                writeln!(stderr, "trace of the failed request:")?;
                serde_json::to_writer_pretty(&mut stderr, &f.trace)?;
                writeln!(stderr)?;
            }
            let fix = engine.hint(&f.error);
            let error = anyhow::Error::from(f.error);
            return Err(match fix {
                Some(fix) => error.context(fix),
                None => error,
            });
        }
    };
    if args.markdown {
        let triage_engine::TaskAnswer::Pipeline(p) = &execution.answer else {
            bail!("--markdown: task `{}` is not a pipeline", args.task);
        };
        let mut stdout = std::io::stdout().lock();
        write!(stdout, "{}", p.markdown.as_deref().unwrap_or_default())?;
        return Ok(ExitCode::SUCCESS);
    }
    let out = serde_json::json!({ "answer": execution.answer, "trace": execution.trace });
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(ExitCode::SUCCESS)
}

pub fn config(command: ConfigCommand) -> Result<ExitCode> {
    match command {
        ConfigCommand::Check { file } => {
            let config = Config::load(&file)?;
            let mut stdout = std::io::stdout().lock();
            writeln!(
                stdout,
                "{}: ok ({} task(s): {}; {} specialist(s); {} provider(s))",
                file.display(),
                config.tasks.len(),
                config.tasks.keys().cloned().collect::<Vec<_>>().join(", "),
                config.local.len(),
                config.providers.len()
            )?;
            for w in &config.warnings {
                writeln!(stdout, "warning: {w}")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Default => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(triage_engine::default_config::TOML.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `30m`, `24h`, `7d`, `90s` before now, or a UTC date, as unix milliseconds.
pub(crate) fn since_ms(since: &str) -> Result<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = since.trim();
    if let Some((num, unit)) = s.char_indices().last().map(|(i, c)| (&s[..i], c))
        && let Ok(n) = num.parse::<i64>()
    {
        let secs = match unit {
            's' => Some(n),
            'm' => Some(n * 60),
            'h' => Some(n * 3600),
            'd' => Some(n * 86_400),
            _ => None,
        };
        if let Some(secs) = secs {
            return Ok(now - secs * 1000);
        }
    }
    let parts: Vec<&str> = s.split('-').collect();
    if let [y, m, d] = parts.as_slice()
        && let (Ok(y), Ok(m), Ok(d)) = (y.parse::<i16>(), m.parse::<i8>(), d.parse::<i8>())
        && let Ok(date) = jiff::civil::Date::new(y, m, d)
        && let Ok(midnight) = date.to_zoned_datetime(jiff::tz::TimeZone::UTC)
    {
        return Ok(midnight.timestamp().as_millisecond());
    }
    bail!("--since `{since}`: give a duration such as 30m, 24h or 7d, or a date YYYY-MM-DD")
}

/// `triage costs --budgets`.
async fn budgets_report(config: &Config, url: &str, json: bool) -> Result<ExitCode> {
    let ledger = Ledger::open(url).await?;
    let mut budgets = triage_engine::budget::Budgets::new(config.budgets.clone());
    budgets.attach(&ledger).await?;
    let status = budgets.stored_status().await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &status)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if status.is_empty() {
        writeln!(out, "no [[budgets]] in this config")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:<6} {:<10} {:>12} {:>12} {:>12} {:>12}",
        "budget", "period", "window", "limit $", "spent $", "reserved $", "left $"
    )?;
    for s in &status {
        writeln!(
            out,
            "{:<24} {:<6} {:<10} {:>12.6} {:>12.6} {:>12.6} {:>12.6}",
            s.name, s.period, s.window, s.usd, s.spent_usd, s.reserved_usd, s.left_usd
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn costs(args: CostsArgs) -> Result<ExitCode> {
    let by: GroupBy = args
        .by
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--by {e}"))?;
    let url = match (&args.config, &args.ledger) {
        (Some(c), _) => Config::load(c)?
            .ledger_url
            .ok_or_else(|| anyhow::anyhow!("{} disables the ledger", c.display()))?,
        (None, Some(u)) => u.clone(),
        (None, None) => triage_engine::config::default_ledger_url(),
    };
    if args.budgets {
        let path = args.config.as_ref().context("--budgets needs --config")?;
        let config = Config::load(path)?;
        return budgets_report(&config, &url, args.json).await;
    }
    let since = match &args.since {
        Some(s) => since_ms(s)?,
        None => 0,
    };
    let ledger = Ledger::open(&url).await?;
    let rows = ledger.summary(since, by).await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<28} {:>8} {:>8} {:>7} {:>10} {:>10} {:>12} {:>12} {:>8} {:>10}",
        args.by,
        "requests",
        "attempts",
        "failed",
        "in tok",
        "out tok",
        "cost $",
        "all-LLM $",
        "saved",
        "mean ms"
    )?;
    let (mut cost, mut all) = (0.0, 0.0);
    for r in &rows {
        cost += r.cost_usd;
        all += r.all_llm_cost_usd;
        let saved = if r.all_llm_cost_usd > 0.0 {
            format!("{:.0}%", 100.0 * (1.0 - r.cost_usd / r.all_llm_cost_usd))
        } else {
            "-".into()
        };
        writeln!(
            out,
            "{:<28} {:>8} {:>8} {:>7} {:>10} {:>10} {:>12.6} {:>12.6} {:>8} {:>10.1}",
            r.key,
            r.requests,
            r.attempts,
            r.failed_attempts,
            r.input_tokens,
            r.output_tokens,
            r.cost_usd,
            r.all_llm_cost_usd,
            saved,
            r.mean_latency_ms
        )?;
    }
    writeln!(
        out,
        "{:<28} {:>8} {:>8} {:>7} {:>10} {:>10} {:>12.6} {:>12.6}",
        "total", "", "", "", "", "", cost, all
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_durations_and_dates() {
        assert_eq!(since_ms("1970-01-01").unwrap(), 0);
        assert_eq!(since_ms("2026-11-28").unwrap(), 20_785 * 86_400_000);
        assert_eq!(since_ms("2024-03-01").unwrap(), 19_783 * 86_400_000);
        let h = since_ms("1h").unwrap();
        let d = since_ms("1d").unwrap();
        assert!((h - d - 23 * 3_600_000).abs() < 5_000);
        assert!(since_ms("yesterday").is_err());
        assert!(since_ms("2026-13-01").is_err());
        assert!(since_ms("2026-02-29").is_err());
    }
}
