//! Texts per second of one model at several batch sizes, in the same shape
//! as scripts/bench/pytorch_bench.py so the two can be compared in one run.
//!
//! `cargo run --release -p triage-local --example bench_encoder -- DIR SENTENCES [SECONDS] [BATCHES]`
//!
//! SENTENCES is a text file, one sentence a line (scripts/bench/sentences.txt);
//! batches take consecutive sentences, cycling, as the PyTorch script does.
//! TRIAGE_BENCH_DEVICE=cuda:0 runs it on a GPU (in F16, as `triage` does);
//! TRIAGE_BENCH_INT8=1 runs the dense layers in int8 (`int8 = true`), and
//! reports `"impl": "triage-int8"`.
#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::time::{Duration, Instant};
use triage_core::LocalTask;
use triage_local::LocalModel;
use triage_local::tokenize::EncodedText;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || anyhow::anyhow!("usage: bench_encoder DIR SENTENCES [SECONDS] [BATCHES]");
    let dir = args.next().ok_or_else(usage)?;
    let sentences_file = args.next().ok_or_else(usage)?;
    let sentences: Vec<String> = std::fs::read_to_string(&sentences_file)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(!sentences.is_empty(), "{sentences_file} has no sentences");
    let seconds: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5.0);
    let batches: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,8,32".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let device_name = std::env::var("TRIAGE_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = device_name.parse::<triage_local::DeviceSpec>()?.open()?;
    let mut model = LocalModel::load(std::path::Path::new(&dir), &dir, &device)?;
    let int8 = std::env::var("TRIAGE_BENCH_INT8").is_ok_and(|v| v == "1");
    if int8 {
        model.quantize_int8()?;
    }
    let impl_name = if int8 { "triage-int8" } else { "triage" };
    let set = std::path::Path::new(&sentences_file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    for &batch in &batches {
        let mut pos = 0usize;
        let mut run = || -> anyhow::Result<()> {
            let texts: Vec<&str> = (0..batch)
                .map(|i| sentences[(pos + i) % sentences.len()].as_str())
                .collect();
            pos += batch;
            // Tokenization is part of the measured work, as in the PyTorch script.
            let enc: Vec<EncodedText> = texts
                .iter()
                .map(|t| model.tokenizer.encode(t, false))
                .collect::<Result<_, _>>()?;
            let refs: Vec<&EncodedText> = enc.iter().collect();
            match model.info.task {
                LocalTask::SequenceClassification => drop(model.classify(&refs)?),
                LocalTask::TokenClassification => {
                    let pairs: Vec<(&str, &EncodedText)> =
                        texts.iter().copied().zip(refs).collect();
                    drop(model.tag(&pairs, Default::default())?)
                }
                LocalTask::Embedding => drop(model.embed(&refs)?),
            }
            Ok(())
        };
        run()?; // warm-up
        let start = Instant::now();
        let cpu_start = cpu_seconds();
        let mut done = 0usize;
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            run()?;
            done += batch;
        }
        let rate = done as f64 / start.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_start;
        let per_cpu_s = if cpu > 0.0 { done as f64 / cpu } else { 0.0 };
        let line = serde_json::json!({"impl": impl_name, "model": dir, "device": device_name, "set": set, "batch": batch, "threads": threads, "texts_per_s": rate, "texts_per_cpu_s": per_cpu_s});
        println!("{line}");
    }
    Ok(())
}

/// CPU time (user + system) of this process so far, all threads, from
/// /proc/self/stat: on a loaded machine, texts per CPU-second compare the
/// work each side does, whatever share of the cores it got.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line; here, from field 3
    // (the state) on, indices 11 and 12. Ticks are 1/100 s on Linux.
    (ticks(11) + ticks(12)) / 100.0
}
