//! `train`: it learns, it is deterministic, what it saves loads through the
//! inference path with the same predictions, deltas round-trip, and bad data
//! is refused before any training.

use crate::common::model_dir;
use candle_core::Device;
use std::io::Write;
use std::path::{Path, PathBuf};
use triage_local::LocalModel;
use triage_train::net::HeadKind;
use triage_train::{Silent, TrainConfig, TrainError, train};

const GOOD: &[&str] = &["lovely", "great", "kind", "happy", "sunny", "calm"];
const BAD: &[&str] = &["awful", "idiot", "hate", "stupid", "ugly", "rude"];

fn write_lines(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    for l in lines {
        writeln!(f, "{l}")?;
    }
    Ok(())
}

/// A separable two-class set: the label is whether a "bad" word occurs.
fn sequence_data(dir: &Path, n: usize, seed: usize) -> anyhow::Result<PathBuf> {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let k = i * 7 + seed;
            let bad = k.is_multiple_of(3);
            let word = if bad {
                BAD[k % BAD.len()]
            } else {
                GOOD[k % GOOD.len()]
            };
            let text = format!(
                "the {word} day with people {}",
                ["here", "there", "again"][k % 3]
            );
            serde_json::json!({"text": text, "label": i32::from(bad)}).to_string()
        })
        .collect();
    let path = dir.join(format!("seq-{seed}.jsonl"));
    write_lines(&path, &lines)?;
    Ok(path)
}

fn config(task: HeadKind, base: &str, train: PathBuf, val: PathBuf, out: PathBuf) -> TrainConfig {
    TrainConfig {
        task,
        base_dir: model_dir(base),
        train,
        val,
        out,
        epochs: 4,
        lr: 3e-3,
        batch: 8,
        max_length: 32,
        unfreeze_layers: Some(1),
        seed: 7,
        class_weights: true,
        label_names: Some(vec!["ok".into(), "toxic".into()]),
        warmup: 0.1,
        dropout: 0.1,
    }
}

#[test]
fn sequence_training_learns_and_saves_what_inference_loads() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let train_file = sequence_data(tmp.path(), 160, 0)?;
    let val_file = sequence_data(tmp.path(), 60, 1)?;
    let out = tmp.path().join("model");
    let cfg = config(
        HeadKind::Sequence,
        "bert-seq-single",
        train_file,
        val_file.clone(),
        out.clone(),
    );
    let report = train(&cfg, &Silent)?;
    let first = &report.epochs[0];
    let last = report.epochs.last().expect("epochs");
    assert!(
        last.train_loss < first.train_loss,
        "loss did not fall: {:?}",
        report.epochs
    );
    let best = &report.epochs[report.best_epoch - 1];
    assert!(
        best.val_accuracy > 0.9,
        "a separable set should be learnt: {:?}",
        report.epochs
    );
    assert_eq!(report.labels, ["ok", "toxic"]);
    assert!(report.calibration.temperature > 0.0);

    // The inference path (candle-transformers encoder + our head) agrees
    // with the training net on every validation example.
    let model = LocalModel::load(&out, "trained", &Device::Cpu)?;
    assert_eq!(model.info.labels, ["ok", "toxic"]);
    assert!((model.info.temperature - report.calibration.temperature).abs() < 1e-6);
    let mut right = 0;
    let lines = std::fs::read_to_string(&val_file)?;
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let enc = model
            .tokenizer
            .encode(v["text"].as_str().unwrap_or_default(), false)?;
        let c = model.classify(&[&enc])?.remove(0);
        let predicted = usize::from(c.scores[1].score > c.scores[0].score);
        right += usize::from(predicted as i64 == v["label"].as_i64().unwrap_or(-1));
    }
    let accuracy = right as f32 / lines.lines().count() as f32;
    assert!(
        (accuracy - best.val_accuracy).abs() < 1e-6,
        "inference {accuracy} vs training {}",
        best.val_accuracy
    );

    // Same seed, same data: the same model.
    let out2 = tmp.path().join("again");
    let report2 = train(
        &TrainConfig {
            out: out2.clone(),
            ..cfg.clone()
        },
        &Silent,
    )?;
    for (a, b) in report.epochs.iter().zip(&report2.epochs) {
        assert!((a.train_loss - b.train_loss).abs() < 1e-5, "{a:?} vs {b:?}");
        assert_eq!(a.val_accuracy, b.val_accuracy);
    }

    // As a delta over its base: f16 weights, same predictions.
    let delta = tmp.path().join("delta");
    let manifest = triage_local::delta::pack(
        &out,
        &model_dir("bert-seq-single"),
        "org/base@0123456789abcdef0123456789abcdef01234567",
        &delta,
        Some(vec!["toxic".into()]),
    )?;
    assert!(manifest.delta_sha256.is_some());
    let full_size = std::fs::metadata(out.join("model.safetensors"))?.len();
    let delta_size = std::fs::metadata(delta.join("delta.safetensors"))?.len();
    assert!(
        delta_size * 2 < full_size,
        "delta {delta_size} vs full {full_size}"
    );
    let unpacked = LocalModel::load_with_base(
        &delta,
        Some(&model_dir("bert-seq-single")),
        "delta",
        &Device::Cpu,
    )?;
    assert!(
        LocalModel::load(&delta, "no-base", &Device::Cpu).is_err(),
        "a delta needs its base"
    );
    for line in lines.lines().take(20) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = v["text"].as_str().unwrap_or_default();
        let a = model
            .classify(&[&model.tokenizer.encode(text, false)?])?
            .remove(0);
        let b = unpacked
            .classify(&[&unpacked.tokenizer.encode(text, false)?])?
            .remove(0);
        for (x, y) in a.scores.iter().zip(&b.scores) {
            assert!(
                (x.score - y.score).abs() < 2e-2,
                "{text}: {} vs {}",
                x.score,
                y.score
            );
        }
    }
    // A corrupted delta is refused by its checksum.
    let path = delta.join("delta.safetensors");
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes)?;
    assert!(
        LocalModel::load_with_base(
            &delta,
            Some(&model_dir("bert-seq-single")),
            "x",
            &Device::Cpu
        )
        .is_err()
    );
    Ok(())
}

fn token_data(dir: &Path, n: usize, seed: usize) -> anyhow::Result<PathBuf> {
    let people = ["anna", "boris", "carla"];
    let places = ["paris", "rome", "oslo"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let k = i * 5 + seed;
            let (p, l) = (people[k % 3], places[(k / 3) % 3]);
            serde_json::json!({
                "tokens": [p, "went", "to", l, "today"],
                "tags": ["B-PER", "O", "O", "B-LOC", "O"],
            })
            .to_string()
        })
        .collect();
    let path = dir.join(format!("tok-{seed}.jsonl"));
    write_lines(&path, &lines)?;
    Ok(path)
}

#[test]
fn token_training_learns_entities() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("ner");
    let mut cfg = config(
        HeadKind::Token,
        "distilbert-token",
        token_data(tmp.path(), 120, 0)?,
        token_data(tmp.path(), 30, 1)?,
        out.clone(),
    );
    cfg.label_names = None;
    cfg.class_weights = false;
    let report = train(&cfg, &Silent)?;
    assert_eq!(report.labels, ["O", "B-LOC", "B-PER"]);
    let best = &report.epochs[report.best_epoch - 1];
    assert!(best.val_metric > 0.8, "entity F1 {:?}", report.epochs);
    let model = LocalModel::load(&out, "ner", &Device::Cpu)?;
    let text = "boris went to oslo today";
    let tagged = model
        .tag(
            &[(text, &model.tokenizer.encode(text, false)?)],
            triage_core::Aggregation::First,
        )?
        .remove(0);
    let spans: Vec<(&str, &str)> = tagged
        .entities
        .iter()
        .map(|e| (e.label.as_str(), e.text.as_str()))
        .collect();
    assert_eq!(spans, [("PER", "boris"), ("LOC", "oslo")]);
    Ok(())
}

#[test]
fn bad_data_is_refused_before_training() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let good = sequence_data(tmp.path(), 20, 0)?;
    let out = tmp.path().join("out");
    let case = |train: PathBuf, val: PathBuf, task: HeadKind| {
        let mut cfg = config(task, "bert-seq-single", train, val, out.clone());
        if task == HeadKind::Token {
            cfg.label_names = None;
        }
        train_error(&cfg)
    };

    let unknown = tmp.path().join("unknown.jsonl");
    write_lines(&unknown, &[r#"{"text": "x", "label": 5}"#.into()])?;
    assert!(
        case(good.clone(), unknown, HeadKind::Sequence)
            .contains("does not occur in the training data")
    );

    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n")?;
    assert!(case(empty, good.clone(), HeadKind::Sequence).contains("no examples"));

    let mismatched = tmp.path().join("mismatch.jsonl");
    write_lines(
        &mismatched,
        &[r#"{"tokens": ["a", "b"], "tags": ["O"]}"#.into()],
    )?;
    let msg = case(mismatched.clone(), mismatched, HeadKind::Token);
    assert!(
        msg.contains(":1:") && msg.contains("2 tokens but 1 tags"),
        "{msg}"
    );

    let mut cfg = config(
        HeadKind::Sequence,
        "bert-seq-single",
        good.clone(),
        good.clone(),
        PathBuf::from("/proc/triage-cannot-write"),
    );
    assert!(matches!(
        train(&cfg, &Silent),
        Err(TrainError::Output { .. })
    ));

    let no_tokenizer = tmp.path().join("base");
    std::fs::create_dir_all(&no_tokenizer)?;
    std::fs::copy(
        model_dir("bert-seq-single").join("config.json"),
        no_tokenizer.join("config.json"),
    )?;
    cfg.out = out;
    cfg.base_dir = no_tokenizer;
    assert!(train_error(&cfg).contains("tokenizer.json"));
    Ok(())
}

fn train_error(cfg: &TrainConfig) -> String {
    match train(cfg, &Silent) {
        Ok(_) => "trained without error".into(),
        Err(e) => e.to_string(),
    }
}

/// Stops training once `after` epochs have been reported, as Ctrl-C does.
struct StopAfter {
    after: usize,
    seen: std::cell::Cell<usize>,
    polls: std::cell::Cell<usize>,
}

impl triage_train::Progress for StopAfter {
    fn epoch(&self, _report: &triage_train::EpochReport) {
        self.seen.set(self.seen.get() + 1);
    }
    fn cancelled(&self) -> bool {
        self.polls.set(self.polls.get() + 1);
        self.seen.get() >= self.after
    }
}

#[test]
fn a_stop_keeps_the_best_finished_epoch_intact() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let train_file = sequence_data(tmp.path(), 160, 0)?;
    let val_file = sequence_data(tmp.path(), 60, 1)?;
    let out = tmp.path().join("model");
    let mut cfg = config(
        HeadKind::Sequence,
        "bert-seq-single",
        train_file,
        val_file,
        out.clone(),
    );
    cfg.epochs = 50;

    // Stopped after the first epoch: one epoch reported, its checkpoint saved
    // and loadable, the report says it was interrupted.
    let stop = StopAfter {
        after: 1,
        seen: 0.into(),
        polls: 0.into(),
    };
    let report = train(&cfg, &stop)?;
    assert!(report.interrupted);
    assert_eq!(report.epochs.len(), 1, "{:?}", report.epochs);
    assert_eq!(report.best_epoch, 1);
    // Polled before every batch of epoch 1 and once in epoch 2 (160 / 8 = 20 batches).
    assert_eq!(stop.polls.get(), 21);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json"))?)?;
    assert_eq!(saved["interrupted"], true);
    assert_eq!(saved["best_epoch"], 1);
    let model = LocalModel::load(&out, "stopped", &Device::Cpu)?;
    assert_eq!(model.info.labels, ["ok", "toxic"]);
    assert!((model.info.temperature - report.calibration.temperature).abs() < 1e-6);

    // Stopped before any epoch finished: a typed error, and no weights written.
    let empty = tmp.path().join("never");
    let stop = StopAfter {
        after: 0,
        seen: 0.into(),
        polls: 0.into(),
    };
    let err = train(
        &TrainConfig {
            out: empty.clone(),
            ..cfg
        },
        &stop,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("interrupted before the first epoch"), "{err}");
    assert!(!empty.join("model.safetensors").exists());
    Ok(())
}
