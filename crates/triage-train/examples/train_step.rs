//! Where a training step's time goes: inference forward (candle-transformers),
//! our trainable forward, and forward + backward, on one batch.
//!
//! `cargo run --release -p triage-train --example train_step -- BASE_DIR [BATCH]`
#![allow(clippy::print_stdout)]

use candle_core::{DType, Device, Tensor};
use std::sync::Arc;
use std::time::Instant;
use triage_local::weights::{Checkpoint, Family};
use triage_train::net::{HeadKind, NetSpec, TrainableNet};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!("BASE_DIR"))?);
    let batch: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    let seq = 48usize;
    let dev = Device::Cpu;
    let model = triage_local::LocalModel::load(&dir, "base", &dev)?;
    let text = "@user this is a fairly typical tweet about politics and people, with some words that might offend someone somewhere";
    let enc = model.tokenizer.encode(text, false)?;
    let refs: Vec<_> = (0..batch).map(|_| &enc.windows[0]).collect();
    let t = Instant::now();
    for _ in 0..3 {
        model.embed_windows(&refs)?;
    }
    println!(
        "inference forward: {:.3} s/batch",
        t.elapsed().as_secs_f64() / 3.0
    );

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let bert_cfg: candle_transformers::models::bert::Config = serde_json::from_value(cfg)?;
    let ck = Arc::new(Checkpoint::load_dir(&dir, DType::F32, &dev)?);
    for unfreeze in [6usize, 2] {
        let spec = NetSpec {
            kind: HeadKind::Sequence,
            num_labels: 2,
            unfreeze_layers: unfreeze,
            train_embeddings: false,
            seed: 1,
        };
        let net = TrainableNet::from_checkpoint(ck.clone(), Family::Bert, &bert_cfg, &spec, &dev)?;
        let ids = Tensor::ones((batch, seq), DType::U32, &dev)?;
        let mask = Tensor::ones((batch, seq), DType::U32, &dev)?;
        let types = Tensor::zeros((batch, seq), DType::U32, &dev)?;
        let t = Instant::now();
        let x = net.frozen_prefix(&ids, &types, &mask, None)?;
        println!(
            "unfreeze {unfreeze}: prefix {:.3} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let logits = net.trained_suffix(&x, &mask, None)?;
        println!(
            "unfreeze {unfreeze}: suffix forward {:.3} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let loss = logits.sum_all()?;
        let grads = loss.backward()?;
        println!(
            "unfreeze {unfreeze}: backward {:.3} s ({} grads)",
            t.elapsed().as_secs_f64(),
            net.trainable()
                .iter()
                .filter(|p| grads.get(&p.var).is_some())
                .count()
        );
    }
    Ok(())
}
