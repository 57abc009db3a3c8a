//! Texts per second of one model at several batch sizes, in the same shape
//! as scripts/bench/pytorch_bench.py so the two can be compared in one run.
//!
//! `cargo run --release -p triage-local --example bench_encoder -- DIR [SECONDS] [BATCHES]`
#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use candle_core::Device;
use std::time::{Duration, Instant};
use triage_core::LocalTask;
use triage_local::LocalModel;
use triage_local::tokenize::EncodedText;

const SENTENCES: &[&str] = &[
    "The committee met on Tuesday to review the quarterly budget and agreed to postpone the vote until every member had read the auditors' report in full.",
    "I honestly cannot believe how rude the support agent was when I called about my broken order, and nobody has answered my emails since last week.",
    "Researchers in Geneva published a study showing that the new vaccine reduced hospital admissions by nearly forty percent among older patients this winter.",
    "Please remember to bring your laptop, the signed contract and a copy of the slides to the meeting with the Berlin team tomorrow at nine.",
    "What a ridiculous take, you clearly have no idea what you are talking about and should stop posting nonsense on every thread you find.",
    "The river flooded the lower streets overnight, but volunteers from the town hall had moved most families to the school gym before midnight.",
    "Our quarterly revenue grew by twelve percent, driven mostly by the enterprise plan, while churn among small customers stayed flat at two percent.",
    "She walked along the quiet harbour at dawn, counting the fishing boats and wondering whether her brother would return before the storm arrived.",
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bench_encoder DIR [SECONDS] [BATCHES]"))?;
    let seconds: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5.0);
    let batches: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,8,32".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let model = LocalModel::load(std::path::Path::new(&dir), &dir, &Device::Cpu)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    for &batch in &batches {
        let texts: Vec<&str> = SENTENCES.iter().cycle().take(batch).copied().collect();
        let run = || -> anyhow::Result<()> {
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
        let mut done = 0usize;
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            run()?;
            done += batch;
        }
        let rate = done as f64 / start.elapsed().as_secs_f64();
        let line = serde_json::json!({"impl": "triage-candle", "model": dir, "batch": batch, "threads": threads, "texts_per_s": rate});
        println!("{line}");
    }
    Ok(())
}
