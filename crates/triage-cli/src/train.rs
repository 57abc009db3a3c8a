//! `triage train`: fine-tune a base encoder into a specialist.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use triage_train::net::HeadKind;
use triage_train::{EpochReport, Progress, TrainConfig};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// sequence-classification or token-classification.
    #[arg(long)]
    task: TaskArg,
    /// Base model: a local folder, or org/name[@revision] on the hub.
    #[arg(long)]
    base: String,
    /// Training JSONL: {"text","label"} or {"tokens","tags"} (IOB2).
    #[arg(long)]
    train: PathBuf,
    /// Validation JSONL, same shape; evaluated after every epoch.
    #[arg(long)]
    val: PathBuf,
    /// Output folder (a Hugging Face model folder).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    max_length: usize,
    /// Train the top N encoder layers and the head (0: the head alone);
    /// `all` trains every layer and the embeddings.
    #[arg(long, default_value = "all")]
    unfreeze_layers: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Class weights in the loss: auto (inverse frequency) or none.
    #[arg(long)]
    class_weights: Option<ClassWeights>,
    /// Names of integer labels, in order (e.g. not-offensive,offensive).
    #[arg(long, value_delimiter = ',')]
    label_names: Option<Vec<String>>,
    /// Fraction of the steps used for learning-rate warm-up.
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    /// Dropout probability in the trained layers and the head (0 turns it off).
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TaskArg {
    SequenceClassification,
    TokenClassification,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ClassWeights {
    Auto,
    None,
}

struct Bars {
    bar: Mutex<ProgressBar>,
    stop: Arc<AtomicBool>,
}

impl Progress for Bars {
    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    fn phase(&self, what: &str, total: usize) {
        if let Ok(mut bar) = self.bar.lock() {
            bar.finish_and_clear();
            let b = ProgressBar::new(total as u64).with_message(what.to_owned());
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:32} {bar:30} {pos}/{len} {per_sec} eta {eta} {prefix}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            *bar = b;
        }
    }
    fn step(&self, loss: f32) {
        if let Ok(bar) = self.bar.lock() {
            if loss > 0.0 {
                bar.set_prefix(format!("loss {loss:.4}"));
            }
            bar.inc(1);
        }
    }
    fn epoch(&self, r: &EpochReport) {
        if let Ok(bar) = self.bar.lock() {
            bar.suspend(|| {
                eprintln!(
                    "epoch {}: train loss {:.4}, val metric {:.4}, val accuracy {:.4}, {:.0} s{}",
                    r.epoch,
                    r.train_loss,
                    r.val_metric,
                    r.val_accuracy,
                    r.seconds,
                    if r.best { " (best so far, saved)" } else { "" }
                )
            });
        }
    }
}

pub async fn run(args: TrainArgs) -> Result<ExitCode> {
    let model_ref = triage_local::ModelRef::parse(&args.base)?;
    let base_dir = triage_local::resolve(&model_ref)
        .await
        .with_context(|| format!("cannot resolve base model `{}`", args.base))?;
    let unfreeze_layers = match args.unfreeze_layers.as_str() {
        "all" => None,
        n => Some(
            n.parse::<usize>()
                .with_context(|| format!("--unfreeze-layers takes a number or `all`, not `{n}`"))?,
        ),
    };
    let task = match args.task {
        TaskArg::SequenceClassification => HeadKind::Sequence,
        TaskArg::TokenClassification => HeadKind::Token,
    };
    let cfg = TrainConfig {
        task,
        base_dir,
        train: args.train,
        val: args.val,
        out: args.out.clone(),
        epochs: args.epochs,
        lr: args.lr,
        batch: args.batch,
        max_length: args.max_length,
        unfreeze_layers,
        seed: args.seed,
        class_weights: match args.class_weights {
            Some(ClassWeights::Auto) => true,
            Some(ClassWeights::None) => false,
            None => task == HeadKind::Sequence,
        },
        label_names: args.label_names,
        warmup: args.warmup,
        dropout: args.dropout,
    };
    if !(0.0..1.0).contains(&cfg.dropout) {
        anyhow::bail!("--dropout must be in [0, 1), not {}", cfg.dropout);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(stop_on_signal(stop.clone()));
    let bars = Bars {
        bar: Mutex::new(ProgressBar::hidden()),
        stop,
    };
    let report = tokio::task::spawn_blocking(move || triage_train::train(&cfg, &bars)).await??;
    watcher.abort();
    let stdout = std::io::stdout();
    writeln!(stdout.lock(), "{}", serde_json::to_string(&report)?)?;
    if report.interrupted {
        eprintln!(
            "interrupted: {} keeps epoch {} (the best that finished)",
            args.out.display(),
            report.best_epoch
        );
        return Ok(ExitCode::from(130));
    }
    eprintln!("model written to {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

/// The first Ctrl-C (or SIGTERM) asks training to stop after the current
/// batch, so no checkpoint is cut half-written; a second one exits at once
/// (every file is still replaced atomically).
async fn stop_on_signal(stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        seen += 1;
        if seen > 1 {
            eprintln!("interrupted again: exiting now");
            std::process::exit(130);
        }
        stop.store(true, Ordering::Relaxed);
        eprintln!(
            "stopping after this batch; the best checkpoint so far is kept (Ctrl-C again to quit now)"
        );
    }
}
