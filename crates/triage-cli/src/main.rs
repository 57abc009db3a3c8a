//! `triage`: the command-line front of the triage runtime.

mod audit;
mod engine_cmds;
mod eval;
mod import;
mod input;
mod manifests;
mod run;
mod serve;
mod train;
#[cfg(feature = "speech")]
mod transcribe;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use triage_core::Aggregation;
use triage_local::{DeviceSpec, ThreadBudget};

/// mimalloc instead of glibc's malloc: a request that needs no model is
/// mostly small allocations (headers, JSON, the trace, the ledger row), and
/// glibc's free and consolidation were 15% of the server's time on a rule
/// task under load (perf, 2026-12-08; docs/benchmarks.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "triage",
    version,
    about = "Local specialists first, hosted LLMs only when unsure"
)]
struct Cli {
    /// Device to run local models on: cpu, cuda, cuda:N or metal.
    #[arg(long, global = true, default_value = "cpu", env = "TRIAGE_DEVICE")]
    device: DeviceSpec,
    /// Cores to use (default: all). `serve` splits them between the async
    /// workers (a core per four, at least two threads), the encoders and Whisper; other
    /// commands compute on all of them (their one async worker only waits).
    #[arg(long, global = true, env = "TRIAGE_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Score text with a sequence classifier; one JSON object per input.
    Moderate {
        #[command(flatten)]
        io: InputArgs,
        /// Score long texts in overlapping windows and keep each label's maximum.
        #[arg(long)]
        windows: bool,
    },
    /// Find entity spans with a token classifier; one JSON object per input.
    Entities {
        #[command(flatten)]
        io: InputArgs,
        /// How sub-word predictions merge into words: simple, first or max.
        #[arg(long, default_value = "simple")]
        aggregation: Aggregation,
    },
    /// Mean-pooled sentence embeddings from a bare encoder; one JSON object per input.
    Embed {
        #[command(flatten)]
        io: InputArgs,
        /// L2-normalise the vectors (as sentence-transformers' Normalize does).
        #[arg(long)]
        normalize: bool,
    },
    /// Serve a config's tasks (default: the embedded default specialists) on
    /// a unix socket (and TCP with keys).
    Serve(serve::ServeArgs),
    /// Speech to text with Whisper: one JSON object per file (or srt, vtt, txt).
    #[cfg(feature = "speech")]
    Transcribe(transcribe::TranscribeArgs),
    /// Fine-tune a base encoder into a classifier (HF folder out, calibrated).
    Train(train::TrainArgs),
    /// Score a specialist on labelled JSONL data; prints one JSON object of metrics.
    Eval(eval::EvalArgs),
    /// Run a configured task on one input; prints {"answer", "trace"} as JSON.
    Execute(engine_cmds::ExecuteArgs),
    /// Validate a config file.
    Config {
        #[command(subcommand)]
        command: engine_cmds::ConfigCommand,
    },
    /// Summarise the cost ledger: dollars per task, tier or model, and savings.
    Costs(engine_cmds::CostsArgs),
    /// Replay labelled data through a cascade: share, accuracy and dollars
    /// per tier, savings against the all-LLM path, and the band frontier;
    /// or (--from-ledger) shadow agreement on live traffic.
    Audit(audit::AuditArgs),
    /// Choose a local tier's band (lo, hi) that meets a target on labelled
    /// data, with a bootstrap 95% interval; --write puts it in the config.
    Calibrate(audit::CalibrateArgs),
    /// Download and list models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Debug, Args)]
struct InputArgs {
    /// Model: a local folder, or org/name[@revision] on the Hugging Face hub.
    #[arg(long)]
    model: String,
    /// The text to process (or use --file).
    #[arg(conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// JSONL file of {"text": ...} objects (other fields are passed through); `-` for stdin.
    #[arg(long)]
    file: Option<PathBuf>,
    /// On a malformed line, print an error object for it and go on instead of stopping.
    #[arg(long)]
    keep_going: bool,
    /// Longest text accepted, in tokens; a longer one is an error for its line.
    #[arg(long, default_value_t = triage_local::DEFAULT_MAX_INPUT_TOKENS)]
    max_input_tokens: usize,
    /// Run the encoder's dense layers in int8 (CPU only; faster, see
    /// docs/specialists.md for the accuracy it costs). Default: on for the
    /// shipped `toxicity` and `ner`, as `triage serve` runs them.
    #[arg(long, conflicts_with = "f32")]
    int8: bool,
    /// Run in f32 even where int8 is the default.
    #[arg(long)]
    f32: bool,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Download a model (or every default specialist) into the Hugging Face cache.
    Pull {
        /// References to pull; none pulls the default specialists that come from the hub.
        references: Vec<String>,
    },
    /// List the default specialists and whether each is available offline.
    List,
    /// Store a trained model folder as a small f16 delta over its base encoder.
    Pack {
        /// The trained folder (written by `triage train`).
        #[arg(long)]
        model: std::path::PathBuf,
        /// The base it was trained from, as a pinned reference (org/name@revision).
        #[arg(long)]
        base: String,
        /// Where to write the delta folder.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Model labels that mean "positive" for moderation and evaluation.
        #[arg(long, value_delimiter = ',')]
        positive_labels: Option<Vec<String>>,
    },
    /// Convert a CTranslate2 (faster-whisper) Whisper model into whisper.cpp's
    /// ggml file (plus config.json, tokenizer.json), offline.
    #[command(name = "import-ct2")]
    ImportCt2 {
        /// The CTranslate2 model folder (model.bin, config.json, tokenizer.json).
        dir: PathBuf,
        /// Where to write ggml-model-f16.bin and the other files.
        #[arg(long)]
        out: PathBuf,
        /// Folder with openai-whisper's mel_filters.npz and gpt2.tiktoken [default: DIR/assets].
        #[arg(long, env = "TRIAGE_WHISPER_ASSETS")]
        assets: Option<PathBuf>,
        /// Also write Hugging Face model.safetensors.
        #[arg(long)]
        safetensors: bool,
    },
    /// Quantise a whisper.cpp (ggml) Whisper model to q8_0 or q5_1, offline.
    Quantize {
        /// The f16 or f32 ggml model, e.g. ggml-model-f16.bin.
        model: PathBuf,
        /// q8_0 (8.5 bits a weight) or q5_1 (6 bits a weight).
        #[arg(long = "type", default_value = "q8_0")]
        quant_type: triage_tools::whisper_quantize::QuantType,
        /// Where to write it [default: beside MODEL, `-f16` replaced by the type].
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// What the global flags give every command, parsed once.
#[derive(Debug, Clone, Copy)]
struct Globals {
    /// Where models run; opened only by the commands that run one, so a
    /// command that runs none (`config check`) works whatever it names.
    device: DeviceSpec,
    /// Cores for the async workers, the encoders and whisper.cpp.
    budget: ThreadBudget,
}

impl Globals {
    fn open_device(&self) -> Result<candle_core::Device> {
        Ok(self.device.open()?)
    }
}

#[derive(Debug, Clone, Copy)]
enum Job {
    Moderate { windows: bool },
    Entities(Aggregation),
    Embed { normalize: bool },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // One budget for every pool: the async workers, the encoders' compute
    // pool and whisper.cpp (which only `serve` runs beside the encoders).
    let cores = cli.threads.unwrap_or_else(ThreadBudget::available_cores);
    let budget = if matches!(cli.command, Command::Serve(_)) {
        ThreadBudget::split(cores, true)
    } else {
        // A one-shot command's async worker only waits on its computation.
        ThreadBudget::one_shot(cores)
    };
    let globals = Globals {
        device: cli.device,
        budget,
    };
    tracing::debug!(?budget, "thread budget");
    // The encoders' pool (rayon) sizes itself from RAYON_NUM_THREADS; no other thread exists yet.
    #[expect(unsafe_code, reason = "set before any thread is spawned")]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", budget.compute.to_string());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(budget.async_workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command, globals));
    // Blocking work still running (a job's transcription past the drain
    // deadline) must not hold the exit: `serve` has already committed the
    // ledgers by now.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, globals: Globals) -> Result<std::process::ExitCode> {
    match command {
        Command::Moderate { io, windows } => {
            run::texts(io, Job::Moderate { windows }, &globals.open_device()?).await
        }
        Command::Entities { io, aggregation } => {
            run::texts(io, Job::Entities(aggregation), &globals.open_device()?).await
        }
        Command::Train(args) => train::run(args).await,
        Command::Execute(args) => engine_cmds::execute(args).await,
        Command::Config { command } => engine_cmds::config(command),
        Command::Costs(args) => engine_cmds::costs(args).await,
        Command::Audit(args) => audit::audit(args).await,
        Command::Calibrate(args) => audit::calibrate(args).await,
        Command::Serve(args) => serve::run(args, globals.device, globals.budget.whisper).await,
        #[cfg(feature = "speech")]
        Command::Transcribe(args) => {
            // Transcription alone: whisper.cpp takes every core.
            transcribe::run(args, globals.budget.whisper, globals.device).await
        }
        Command::Embed { io, normalize } => {
            run::texts(io, Job::Embed { normalize }, &globals.open_device()?).await
        }
        Command::Eval(args) => eval::run(args, &globals.open_device()?).await,
        Command::Models {
            command:
                ModelsCommand::Pack {
                    model,
                    base,
                    out,
                    positive_labels,
                },
        } => manifests::pack(model, base, out, positive_labels).await,
        Command::Models {
            command: ModelsCommand::List,
        } => manifests::list().await,
        Command::Models {
            command: ModelsCommand::Pull { references },
        } => manifests::pull(references).await,
        Command::Models {
            command:
                ModelsCommand::ImportCt2 {
                    dir,
                    out,
                    assets,
                    safetensors,
                },
        } => import::import_ct2(dir, out, assets, safetensors).await,
        Command::Models {
            command:
                ModelsCommand::Quantize {
                    model,
                    quant_type,
                    out,
                },
        } => import::quantize(model, quant_type, out).await,
    }
}
