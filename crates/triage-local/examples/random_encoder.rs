//! Write a BERT folder with random weights of a real model's shape, for
//! throughput and memory measurements where the real weights cannot travel
//! (scripts/gpu-check): speed and memory depend on the shapes, not the values.
//!
//! `cargo run -p triage-local --example random_encoder -- OUT SHAPE TASK TOKENIZER`
//!
//! SHAPE: `minilm` (all-MiniLM-L6-v2, the default specialists' base: 6
//! layers, 384 wide) or `base` (BERT-base: 12 layers, 768 wide). TASK: `seq`
//! (2 labels, like the toxicity specialist) or `token` (9 IOB2 labels, like
//! the NER specialist). TOKENIZER: a `tokenizer.json` to copy (the real
//! model's, so texts split into as many tokens as they would).

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, shape, task, tokenizer] = args.as_slice() else {
        anyhow::bail!("usage: random_encoder OUT minilm|base seq|token TOKENIZER");
    };
    let (layers, hidden, heads, inter) = match shape.as_str() {
        "minilm" => (6, 384, 12, 1536),
        "base" => (12, 768, 12, 3072),
        other => anyhow::bail!("unknown shape {other}: use minilm or base"),
    };
    let labels: Vec<String> = match task.as_str() {
        "seq" => vec!["neutral".into(), "offensive".into()],
        "token" => [
            "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC",
        ]
        .map(String::from)
        .to_vec(),
        other => anyhow::bail!("unknown task {other}: use seq or token"),
    };
    let (vocab, positions) = (30522, 512);
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, dims: &[usize]| -> anyhow::Result<()> {
        let w = if name.ends_with("LayerNorm.weight") {
            Tensor::ones(dims, DType::F32, &dev)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(dims, DType::F32, &dev)?
        } else {
            // BERT's initializer_range.
            Tensor::randn(0f32, 0.02, dims, &dev)?
        };
        t.insert(name, w);
        Ok(())
    };
    add("embeddings.word_embeddings.weight".into(), &[vocab, hidden])?;
    add(
        "embeddings.position_embeddings.weight".into(),
        &[positions, hidden],
    )?;
    add(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, hidden],
    )?;
    add("embeddings.LayerNorm.weight".into(), &[hidden])?;
    add("embeddings.LayerNorm.bias".into(), &[hidden])?;
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for (name, o, i) in [
            ("attention.self.query", hidden, hidden),
            ("attention.self.key", hidden, hidden),
            ("attention.self.value", hidden, hidden),
            ("attention.output.dense", hidden, hidden),
            ("intermediate.dense", inter, hidden),
            ("output.dense", hidden, inter),
        ] {
            add(format!("{p}.{name}.weight"), &[o, i])?;
            add(format!("{p}.{name}.bias"), &[o])?;
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{norm}.weight"), &[hidden])?;
            add(format!("{p}.{norm}.bias"), &[hidden])?;
        }
    }
    let architecture = if task == "seq" {
        add("pooler.dense.weight".into(), &[hidden, hidden])?;
        add("pooler.dense.bias".into(), &[hidden])?;
        "BertForSequenceClassification"
    } else {
        "BertForTokenClassification"
    };
    add("classifier.weight".into(), &[labels.len(), hidden])?;
    add("classifier.bias".into(), &[labels.len()])?;

    let out = std::path::Path::new(out);
    std::fs::create_dir_all(out)?;
    candle_core::safetensors::save(&t, out.join("model.safetensors"))?;
    std::fs::copy(tokenizer, out.join("tokenizer.json"))?;
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.as_str().into()))
        .collect();
    let config = serde_json::json!({
        "architectures": [architecture],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": inter,
        "hidden_act": "gelu",
        "max_position_embeddings": positions,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "id2label": id2label,
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}
