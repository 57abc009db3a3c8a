//! `triage transcribe`: audio files in, transcripts out (interface used by
//! acceptance checks: `--format json` prints one JSON object per file).

use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use triage_speech::{self as speech, TranscribeOptions, WhisperEngine};

#[derive(Debug, clap::Args)]
pub struct TranscribeArgs {
    /// Whisper model: a ggml file, a folder holding one, or org/name[@rev]#file.bin on the hub.
    #[arg(long, env = "TRIAGE_WHISPER_MODEL")]
    model: String,
    /// Audio files (WAV, FLAC, MP3, Ogg/Vorbis, AAC/M4A, WebM).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[arg(long, default_value = "json")]
    format: Format,
    /// Language code; default: detect (multilingual models) or English.
    #[arg(long)]
    language: Option<String>,
    /// Longest audio accepted, in seconds.
    #[arg(long, default_value_t = 4.0 * 3600.0)]
    max_duration: f64,
    /// Files decoded at the same time, each on its own decoding state with
    /// `--threads / N` threads (at least one).
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Silero VAD model (ggml) that skips silence and cuts long audio at
    /// pauses; default: `TRIAGE_VAD_MODEL`, else scripts/fetch-silero-vad's cache.
    #[arg(long)]
    vad_model: Option<String>,
    /// Decode everything, silence included (no VAD).
    #[arg(long, conflicts_with = "vad_model")]
    no_vad: bool,
    /// A file's VAD chunks decoded at once, each on its own decoding state
    /// with `--threads / N` threads (with a VAD model only).
    #[arg(long, default_value_t = 1)]
    parallel_chunks: usize,
    /// Decode each VAD chunk on its own, without the text before it as the
    /// decoder's prompt (openai-whisper's `--condition_on_previous_text False`).
    #[arg(long)]
    no_previous_text: bool,
    /// Label who speaks in mono recordings (`Speaker 1:` …) with a speaker
    /// encoder: `--speaker-model`, else `TRIAGE_SPEAKER_MODEL`, else
    /// scripts/fetch-speaker-model's cache. Needs VAD. (Stereo files with one
    /// speaker per channel are labelled without it.)
    #[arg(long, conflicts_with = "no_vad")]
    speakers: bool,
    /// The speaker encoder file (scripts/fetch-speaker-model's safetensors); implies `--speakers`.
    #[arg(long, conflicts_with = "no_vad")]
    speaker_model: Option<String>,
    /// Words with start, end and probability in each segment (always on for
    /// verbose_json, which also lists them at the top as `words`).
    #[arg(long)]
    word_timestamps: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Json,
    #[value(name = "verbose_json")]
    VerboseJson,
    Srt,
    Vtt,
    Txt,
}

fn error_line(file: &str, kind: &str, message: String) -> Value {
    json!({"file": file, "error": {"kind": kind, "message": message}})
}

pub async fn run(
    args: TranscribeArgs,
    threads: usize,
    device: triage_local::DeviceSpec,
) -> Result<ExitCode> {
    let path = triage_local::resolve::resolve_whisper(&args.model)
        .await
        .with_context(|| format!("cannot resolve Whisper model `{}`", args.model))?;
    let vad = if args.no_vad {
        None
    } else {
        triage_local::resolve::resolve_vad(args.vad_model.as_deref())
            .context("cannot find the VAD model")?
    };
    let parallel_chunks = args.parallel_chunks;
    let previous_text = !args.no_previous_text;
    let speakers = if args.speakers || args.speaker_model.is_some() {
        if vad.is_none() {
            anyhow::bail!(
                "--speakers needs a VAD model: pass --vad-model, set TRIAGE_VAD_MODEL or run scripts/fetch-silero-vad"
            );
        }
        Some(
            triage_local::resolve::resolve_speaker_model(args.speaker_model.as_deref())
                .context("cannot find the speaker model")?,
        )
    } else {
        None
    };
    // The cores are shared by the files decoded at once.
    let threads = (threads / args.parallel.max(1)).max(1);
    let engine = Arc::new(
        tokio::task::spawn_blocking(move || {
            let engine =
                WhisperEngine::load(&path, threads, device)?.with_previous_text(previous_text);
            match vad {
                Some(vad) => {
                    let engine = engine.with_vad(&vad)?.with_parallel_chunks(parallel_chunks);
                    match speakers {
                        Some(model) => engine.with_speakers(&model),
                        None => Ok(engine),
                    }
                }
                None => Ok(engine),
            }
        })
        .await??,
    );
    let verbose = args.format == Format::VerboseJson;
    let opts = TranscribeOptions {
        language: args.language.clone(),
        token_probs: verbose,
        word_timestamps: verbose || args.word_timestamps,
        cancel: None,
    };
    let bars = indicatif::MultiProgress::new();
    let limit = Arc::new(tokio::sync::Semaphore::new(args.parallel.max(1)));
    let mut tasks = Vec::new();
    for file in args.files.clone() {
        let (engine, opts, limit) = (engine.clone(), opts.clone(), limit.clone());
        let bar =
            bars.add(indicatif::ProgressBar::new(100).with_message(file.display().to_string()));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let max = args.max_duration;
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            let name = file.display().to_string();
            let ext = file
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            let result = tokio::task::spawn_blocking(move || {
                if !file.is_file() {
                    return Err(("io", format!("{}: no such file", file.display())));
                }
                // Stereo channels are kept apart: one speaker per channel gets labels.
                let pcm = speech::decode_file(
                    &file,
                    ext.as_deref(),
                    speech::DecodeOptions {
                        limit_s: Some(max),
                        keep_channels: true,
                    },
                )
                .map_err(|e| ("audio", e.to_string()))?;
                let progress_bar = bar.clone();
                let cb: Box<dyn FnMut(i32) + Send> =
                    Box::new(move |p| progress_bar.set_position(p.clamp(0, 100) as u64));
                let t = engine
                    .transcribe_pcm(&pcm, &opts, Some(cb))
                    .map_err(|e| ("model", e.to_string()))?;
                bar.finish_and_clear();
                Ok::<_, (&str, String)>(t)
            })
            .await;
            (name, result)
        }));
    }
    let stdout = std::io::stdout();
    let mut failed = false;
    let many = args.files.len() > 1;
    for task in tasks {
        let (name, joined) = task.await?;
        let result = joined
            .map_err(|e| ("internal", e.to_string()))
            .and_then(|r| r);
        let mut out = stdout.lock();
        match (result, args.format) {
            (Ok(t), Format::Json | Format::VerboseJson) => {
                let mut v = serde_json::to_value(&t)?;
                if let Value::Object(map) = &mut v {
                    map.insert("file".into(), json!(name));
                    if args.format == Format::VerboseJson {
                        map.insert("words".into(), json!(speech::format::words(&t)));
                    }
                }
                writeln!(out, "{v}")?;
            }
            (Ok(t), other) => {
                if many {
                    writeln!(out, "# {name}")?;
                }
                let body = match other {
                    Format::Srt => speech::format::srt(&t),
                    Format::Vtt => speech::format::vtt(&t),
                    _ => speech::format::txt(&t),
                };
                out.write_all(body.as_bytes())?;
            }
            (Err((kind, message)), Format::Json | Format::VerboseJson) => {
                failed = true;
                writeln!(out, "{}", error_line(&name, kind, message))?;
            }
            (Err((kind, message)), _) => {
                failed = true;
                eprintln!("error: {name}: {kind}: {message}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
