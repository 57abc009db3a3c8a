//! Fine-tuning on candle: `triage train`. A base encoder (BERT or DistilBERT)
//! gets a sequence- or token-classification head; the head alone, the top N
//! layers, or everything is trained with AdamW (linear warm-up, then linear
//! decay), class weights for imbalanced labels, evaluation on the validation
//! file after each epoch, and the best epoch kept. Temperature scaling is
//! fitted on the validation set and stored with the model. The output is an
//! ordinary Hugging Face folder.
//!
//! Layers that are not trained run once per example and are cached, so an
//! epoch only pays for the trained layers.

use crate::calibrate;
use crate::data::{self, Example};
use crate::net::{self, Dropout, HeadKind, NetSpec, SplitMix64, TrainableNet};
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use triage_local::error::LocalError;
use triage_local::tokenize::TextTokenizer;
use triage_local::weights::{Checkpoint, Family};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}:{line}: {why}")]
    Data {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("output folder {path} is not writable")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("training computation failed")]
    Compute(#[from] candle_core::Error),
    #[error("interrupted before the first epoch finished: no checkpoint was written")]
    Interrupted,
}

/// Everything `triage train` takes.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub task: HeadKind,
    /// Folder of the base model (already resolved).
    pub base_dir: PathBuf,
    pub train: PathBuf,
    pub val: PathBuf,
    pub out: PathBuf,
    pub epochs: usize,
    pub lr: f64,
    pub batch: usize,
    pub max_length: usize,
    /// Top encoder layers to train; `None` trains every layer and the embeddings.
    pub unfreeze_layers: Option<usize>,
    pub seed: u64,
    /// Weight each class by inverse frequency in the loss.
    pub class_weights: bool,
    /// Names for integer labels (sequence task).
    pub label_names: Option<Vec<String>>,
    /// Fraction of steps spent warming the learning rate up.
    pub warmup: f64,
    /// Dropout probability in the trained part of the net (BERT trains with 0.1).
    pub dropout: f32,
}

/// How an epoch went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub train_loss: f32,
    /// Macro-F1 (sequence) or entity-level F1 (token) on the validation file.
    pub val_metric: f32,
    pub val_accuracy: f32,
    pub seconds: f32,
    pub best: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub labels: Vec<String>,
    pub epochs: Vec<EpochReport>,
    pub best_epoch: usize,
    pub calibration: calibrate::Calibration,
    pub train_examples: usize,
    pub val_examples: usize,
    pub trained_parameters: usize,
    pub seconds: f32,
    /// Stopped early by the caller ([`Progress::cancelled`]); the folder holds
    /// the best epoch that finished.
    pub interrupted: bool,
}

/// Progress callbacks, so the CLI can draw bars without this crate knowing.
pub trait Progress {
    fn phase(&self, _what: &str, _total: usize) {}
    fn step(&self, _loss: f32) {}
    fn epoch(&self, _report: &EpochReport) {}
    /// Polled between batches: `true` stops training after the current batch,
    /// keeping the best checkpoint written so far (Ctrl-C in the CLI).
    fn cancelled(&self) -> bool {
        false
    }
}

/// No progress output.
#[derive(Debug)]
pub struct Silent;
impl Progress for Silent {}

fn read_config(dir: &Path) -> Result<Value, TrainError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| {
        TrainError::Local(LocalError::BadConfig {
            path,
            why: e.to_string(),
        })
    })
}

/// Sequence batches of similar length: shuffle, then sort within windows of
/// 50 batches, then shuffle the batches. Less padding, still random.
fn batches(
    order: &mut [usize],
    lens: &[usize],
    batch: usize,
    rng: &mut SplitMix64,
) -> Vec<Vec<usize>> {
    rng.shuffle(order);
    let window = batch * 50;
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| lens[i]);
    }
    let mut out: Vec<Vec<usize>> = order.chunks(batch).map(<[usize]>::to_vec).collect();
    rng.shuffle(&mut out);
    out
}

/// Pad cached (len, hidden) tensors into (batch, max_len, hidden) and a mask.
fn pad_cached(items: &[&Tensor], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let max = items
        .iter()
        .map(|t| t.dim(0).unwrap_or(0))
        .max()
        .unwrap_or(1)
        .max(1);
    let hidden = items.first().map(|t| t.dim(1)).transpose()?.unwrap_or(1);
    let mut rows = Vec::with_capacity(items.len());
    let mut mask = Vec::with_capacity(items.len() * max);
    for t in items {
        let n = t.dim(0)?;
        rows.push(if n < max {
            Tensor::cat(
                &[*t, &Tensor::zeros((max - n, hidden), DType::F32, device)?],
                0,
            )?
        } else {
            (*t).clone()
        });
        mask.extend(std::iter::repeat_n(1u32, n));
        mask.extend(std::iter::repeat_n(0u32, max - n));
    }
    Ok((
        Tensor::stack(&rows, 0)?,
        Tensor::from_vec(mask, (items.len(), max), device)?,
    ))
}

fn id_batch(items: &[&Example], device: &Device) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let max = items.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
    let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for e in items {
        let pad = max - e.len();
        ids.extend(e.ids.iter().copied().chain(std::iter::repeat_n(0, pad)));
        types.extend(
            e.type_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
        mask.extend(std::iter::repeat_n(1u32, e.len()).chain(std::iter::repeat_n(0, pad)));
    }
    let shape = (items.len(), max);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(types, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

/// Targets as a weighted one-hot matrix (rows without a target are zero), so
/// the loss is `-sum(onehot * log_softmax) / sum(weights)`.
fn weighted_targets(
    targets: &[Option<usize>],
    weights: &[f32],
    n_labels: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, f32)> {
    let mut m = vec![0f32; targets.len() * n_labels];
    let mut total = 0f32;
    for (i, t) in targets.iter().enumerate() {
        if let Some(t) = t {
            m[i * n_labels + t] = weights[*t];
            total += weights[*t];
        }
    }
    Ok((
        Tensor::from_vec(m, (targets.len(), n_labels), device)?,
        total,
    ))
}

/// Run the whole training. Errors in the data or options come before any compute.
pub fn train(cfg: &TrainConfig, progress: &dyn Progress) -> Result<TrainReport, TrainError> {
    let started = Instant::now();
    let device = Device::Cpu;
    if cfg.epochs == 0 || cfg.batch == 0 || cfg.lr <= 0.0 || !cfg.lr.is_finite() {
        return Err(TrainError::Options(
            "--epochs, --batch and --lr must be positive".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.out).map_err(|source| TrainError::Output {
        path: cfg.out.clone(),
        source,
    })?;
    let probe = cfg.out.join(".triage-write-test");
    std::fs::write(&probe, b"").map_err(|source| TrainError::Output {
        path: cfg.out.clone(),
        source,
    })?;
    let _ = std::fs::remove_file(&probe);

    let base_cfg = read_config(&cfg.base_dir)?;
    let family = match base_cfg
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("bert")
    {
        "bert" => Family::Bert,
        "distilbert" => Family::DistilBert,
        other => {
            return Err(TrainError::Options(format!(
                "base model_type `{other}` is not bert or distilbert"
            )));
        }
    };
    let tokenizer_path = cfg.base_dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(TrainError::Local(LocalError::MissingFile {
            dir: cfg.base_dir.clone(),
            what: "tokenizer.json".into(),
        }));
    }
    let bert_cfg =
        triage_local::model::bert_config(&base_cfg, family, &cfg.base_dir.join("config.json"))?;
    let max_length = cfg.max_length.min(bert_cfg.max_position_embeddings);
    let tokenizer = TextTokenizer::from_file(&tokenizer_path, max_length)?;

    let (labels, train_ex, val_ex) = match cfg.task {
        HeadKind::Sequence => {
            let (keys, names) = data::sequence_labels(&cfg.train, cfg.label_names.as_deref())?;
            let tr = data::load_sequence(&cfg.train, &keys, &tokenizer)?;
            let va = data::load_sequence(&cfg.val, &keys, &tokenizer)?;
            (names, tr, va)
        }
        HeadKind::Token => {
            let labels = data::token_labels(&cfg.train)?;
            let tr = data::load_tokens(&cfg.train, &labels, &tokenizer)?;
            let va = data::load_tokens(&cfg.val, &labels, &tokenizer)?;
            (labels, tr, va)
        }
    };
    let n_labels = labels.len();

    let checkpoint = Arc::new(Checkpoint::load_dir(&cfg.base_dir, DType::F32, &device)?);
    let spec = NetSpec {
        kind: cfg.task,
        num_labels: n_labels,
        unfreeze_layers: cfg.unfreeze_layers.unwrap_or(bert_cfg.num_hidden_layers),
        train_embeddings: cfg.unfreeze_layers.is_none(),
        seed: cfg.seed,
    };
    let net = TrainableNet::from_checkpoint(checkpoint, family, &bert_cfg, &spec, &device)?;
    let trainable = net.trainable();
    let trained_parameters = trainable.iter().map(|p| p.var.elem_count()).sum();

    // Class weights: n / (classes * count), over the targets the loss sees.
    let mut counts = vec![0usize; n_labels];
    for e in &train_ex {
        match cfg.task {
            HeadKind::Sequence => e.label.iter().for_each(|&l| counts[l] += 1),
            HeadKind::Token => e
                .token_labels
                .iter()
                .flatten()
                .for_each(|&l| counts[l] += 1),
        }
    }
    let total: usize = counts.iter().sum();
    let weights: Vec<f32> = counts
        .iter()
        .map(|&c| {
            if cfg.class_weights && c > 0 {
                total as f32 / (n_labels as f32 * c as f32)
            } else {
                1.0
            }
        })
        .collect();

    // Cache what does not train.
    let cache = |examples: &[Example], what: &str| -> Result<Vec<Tensor>, TrainError> {
        let mut out = Vec::with_capacity(examples.len());
        if net.train_embeddings {
            return Ok(out);
        }
        progress.phase(what, examples.len());
        for chunk in examples.chunks(64) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (ids, types, mask) = id_batch(&refs, &device)?;
            let hidden = net.frozen_prefix(&ids, &types, &mask, None)?;
            for (i, e) in chunk.iter().enumerate() {
                out.push(hidden.get(i)?.narrow(0, 0, e.len())?.contiguous()?);
                progress.step(0.0);
            }
        }
        Ok(out)
    };
    let train_cache = cache(&train_ex, "caching frozen layers (train)")?;
    let val_cache = cache(&val_ex, "caching frozen layers (val)")?;

    let forward = |idx: &[usize],
                   examples: &[Example],
                   cached: &[Tensor],
                   dropout: Option<&Dropout>|
     -> candle_core::Result<(Tensor, Vec<Option<usize>>)> {
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let (hidden, mask) = if net.train_embeddings {
            let (ids, types, mask) = id_batch(&refs, &device)?;
            (net.frozen_prefix(&ids, &types, &mask, dropout)?, mask)
        } else {
            let items: Vec<&Tensor> = idx.iter().map(|&i| &cached[i]).collect();
            pad_cached(&items, &device)?
        };
        let logits = net.trained_suffix(&hidden, &mask, dropout)?;
        match cfg.task {
            HeadKind::Sequence => Ok((logits, refs.iter().map(|e| e.label).collect())),
            HeadKind::Token => {
                let (b, s, c) = logits.dims3()?;
                let targets = refs
                    .iter()
                    .flat_map(|e| {
                        e.token_labels
                            .iter()
                            .copied()
                            .chain(std::iter::repeat_n(None, s - e.len()))
                    })
                    .collect();
                Ok((logits.reshape((b * s, c))?, targets))
            }
        }
    };

    let steps_per_epoch = train_ex.len().div_ceil(cfg.batch);
    let total_steps = (steps_per_epoch * cfg.epochs).max(1);
    let warmup_steps = ((total_steps as f64) * cfg.warmup).round() as usize;
    let lr_at = |step: usize| -> f64 {
        if step < warmup_steps {
            cfg.lr * (step + 1) as f64 / warmup_steps as f64
        } else {
            cfg.lr * (total_steps - step) as f64 / (total_steps - warmup_steps).max(1) as f64
        }
    };
    let mut opt = candle_nn::AdamW::new(
        trainable.iter().map(|p| p.var.clone()).collect(),
        candle_nn::ParamsAdamW {
            lr: lr_at(0),
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;

    let mut rng = SplitMix64(cfg.seed);
    let dropout = Dropout::new(cfg.dropout, cfg.seed);
    let mut interrupted = false;
    let lens: Vec<usize> = train_ex.iter().map(Example::len).collect();
    let mut order: Vec<usize> = (0..train_ex.len()).collect();
    let mut step = 0usize;
    let mut reports = Vec::new();
    let mut best: Option<(f32, usize, calibrate::Calibration)> = None;
    for epoch in 1..=cfg.epochs {
        if interrupted {
            break;
        }
        let t0 = Instant::now();
        progress.phase(&format!("epoch {epoch}/{}", cfg.epochs), steps_per_epoch);
        let (mut loss_sum, mut loss_n) = (0f64, 0usize);
        for batch in batches(&mut order, &lens, cfg.batch, &mut rng) {
            if progress.cancelled() {
                interrupted = true;
                break;
            }
            opt.set_learning_rate(lr_at(step));
            let (logits, targets) = forward(&batch, &train_ex, &train_cache, dropout.as_ref())?;
            let (onehot, weight_sum) = weighted_targets(&targets, &weights, n_labels, &device)?;
            if weight_sum <= 0.0 {
                step += 1;
                continue;
            }
            let logp = net::log_softmax_last(&logits)?;
            let loss = ((logp * onehot)?.sum_all()? * (-1.0 / f64::from(weight_sum)))?;
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()?;
            loss_sum += f64::from(l);
            loss_n += 1;
            step += 1;
            progress.step(l);
        }
        if interrupted {
            // A half-trained epoch is not evaluated: the best finished one stays.
            break;
        }

        // Validation: logits for every target, metric, calibration.
        let (val_logits, val_targets) = {
            let mut all_logits: Vec<Vec<f32>> = Vec::new();
            let mut all_targets = Vec::new();
            let idx: Vec<usize> = (0..val_ex.len()).collect();
            for chunk in idx.chunks(64) {
                let (logits, targets) = forward(chunk, &val_ex, &val_cache, None)?;
                all_logits.extend(logits.detach().to_vec2::<f32>()?);
                all_targets.extend(targets);
            }
            (all_logits, all_targets)
        };
        let (metric, accuracy) = match cfg.task {
            HeadKind::Sequence => seq_metrics(&val_logits, &val_targets, n_labels),
            HeadKind::Token => token_metrics(&val_logits, &val_ex, &labels),
        };
        let is_best = best.as_ref().is_none_or(|(m, _, _)| metric > *m);
        if is_best {
            let (logits, gold): (Vec<Vec<f32>>, Vec<usize>) = val_logits
                .iter()
                .zip(&val_targets)
                .filter_map(|(l, t)| t.map(|t| (l.clone(), t)))
                .unzip();
            let calibration = calibrate::fit_temperature(&logits, &gold);
            save(
                cfg,
                &net,
                family,
                &base_cfg,
                &labels,
                max_length,
                &calibration,
            )?;
            best = Some((metric, epoch, calibration));
        }
        let report = EpochReport {
            epoch,
            train_loss: if loss_n > 0 {
                (loss_sum / loss_n as f64) as f32
            } else {
                0.0
            },
            val_metric: metric,
            val_accuracy: accuracy,
            seconds: t0.elapsed().as_secs_f32(),
            best: is_best,
        };
        progress.epoch(&report);
        reports.push(report);
    }
    let Some((_, best_epoch, calibration)) = best else {
        return Err(if interrupted {
            TrainError::Interrupted
        } else {
            TrainError::Options("no epoch ran".into())
        });
    };
    let report = TrainReport {
        labels,
        epochs: reports,
        best_epoch,
        calibration,
        train_examples: train_ex.len(),
        val_examples: val_ex.len(),
        trained_parameters,
        seconds: started.elapsed().as_secs_f32(),
        interrupted,
    };
    write_atomic(
        &cfg.out.join("training.json"),
        serde_json::to_vec_pretty(&report)
            .unwrap_or_default()
            .as_slice(),
    )?;
    Ok(report)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

/// Macro-F1 and accuracy over labelled rows.
fn seq_metrics(logits: &[Vec<f32>], targets: &[Option<usize>], n: usize) -> (f32, f32) {
    let pairs: Vec<(usize, usize)> = logits
        .iter()
        .zip(targets)
        .filter_map(|(l, t)| t.map(|t| (argmax(l), t)))
        .collect();
    let pred: Vec<usize> = pairs.iter().map(|p| p.0).collect();
    let gold: Vec<usize> = pairs.iter().map(|p| p.1).collect();
    let m = crate::metrics::classification_report(&gold, &pred, n);
    (m.macro_f1 as f32, m.accuracy as f32)
}

/// Entity-level F1 (word-level tags from each word's first token) and token accuracy.
fn token_metrics(logits: &[Vec<f32>], examples: &[Example], labels: &[String]) -> (f32, f32) {
    let mut gold_all = Vec::new();
    let mut pred_all = Vec::new();
    let mut row = 0;
    let (mut right, mut seen) = (0usize, 0usize);
    // Validation logits come in chunks of 64 examples, each padded to its longest.
    for chunk in examples.chunks(64) {
        let s = chunk.iter().map(Example::len).max().unwrap_or(0);
        for e in chunk {
            let tags: Vec<String> = e
                .word_tokens
                .iter()
                .map(|t| match t {
                    Some(t) => labels[argmax(&logits[row + t])].clone(),
                    None => "O".to_owned(),
                })
                .collect();
            for (t, l) in e.token_labels.iter().enumerate() {
                if let Some(l) = l {
                    seen += 1;
                    right += usize::from(argmax(&logits[row + t]) == *l);
                }
            }
            let mut tags = tags;
            crate::metrics::iob1_to_iob2(&mut tags);
            pred_all.push(tags);
            gold_all.push(e.gold_tags.clone());
            row += s;
        }
    }
    let m = crate::metrics::entity_report(&gold_all, &pred_all);
    (
        m.f1 as f32,
        if seen > 0 {
            right as f32 / seen as f32
        } else {
            0.0
        },
    )
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|source| TrainError::Output {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| TrainError::Output {
        path: path.to_path_buf(),
        source,
    })
}

/// The Hugging Face name of a trained weight.
pub fn hf_name(name: &str, family: Family) -> String {
    match family {
        Family::Bert => {
            if name.starts_with("embeddings.")
                || name.starts_with("encoder.")
                || name.starts_with("pooler.")
            {
                format!("bert.{name}")
            } else {
                name.to_owned()
            }
        }
        Family::DistilBert => {
            if name.starts_with("embeddings.") || name.starts_with("encoder.") {
                triage_local::weights::distilbert_name(name)
                    .map(|n| format!("distilbert.{n}"))
                    .unwrap_or_default()
            } else {
                name.to_owned()
            }
        }
    }
}

/// Write the folder: weights, config, tokenizer files, calibration.
fn save(
    cfg: &TrainConfig,
    net: &TrainableNet,
    family: Family,
    base_cfg: &Value,
    labels: &[String],
    max_length: usize,
    calibration: &calibrate::Calibration,
) -> Result<(), TrainError> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for p in net.params() {
        let name = hf_name(&p.name, family);
        if name.is_empty() {
            continue; // DistilBERT has no token-type embedding
        }
        tensors.insert(name, p.var.as_tensor().detach().contiguous()?);
    }
    let tmp = cfg.out.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, cfg.out.join("model.safetensors")).map_err(|source| {
        TrainError::Output {
            path: cfg.out.clone(),
            source,
        }
    })?;

    let mut config = base_cfg.clone();
    let arch = match (family, cfg.task) {
        (Family::Bert, HeadKind::Sequence) => "BertForSequenceClassification",
        (Family::Bert, HeadKind::Token) => "BertForTokenClassification",
        (Family::DistilBert, HeadKind::Sequence) => "DistilBertForSequenceClassification",
        (Family::DistilBert, HeadKind::Token) => "DistilBertForTokenClassification",
    };
    config["architectures"] = json!([arch]);
    config["id2label"] = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    config["label2id"] = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    if cfg.task == HeadKind::Sequence {
        config["problem_type"] = json!("single_label_classification");
    }
    write_atomic(
        &cfg.out.join("config.json"),
        serde_json::to_vec_pretty(&config)
            .unwrap_or_default()
            .as_slice(),
    )?;

    for f in ["tokenizer.json", "vocab.txt", "special_tokens_map.json"] {
        let src = cfg.base_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, cfg.out.join(f)).map_err(|source| TrainError::Output {
                path: cfg.out.join(f),
                source,
            })?;
        }
    }
    let mut tok_cfg: Value = std::fs::read_to_string(cfg.base_dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    tok_cfg["model_max_length"] = json!(max_length);
    write_atomic(
        &cfg.out.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tok_cfg)
            .unwrap_or_default()
            .as_slice(),
    )?;
    write_atomic(
        &cfg.out.join("calibration.json"),
        serde_json::to_vec_pretty(calibration)
            .unwrap_or_default()
            .as_slice(),
    )
}
