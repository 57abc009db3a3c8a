//! A loaded local model: encoder (candle-transformers' BERT layers) plus our
//! head, built from a Hugging Face folder (`config.json`, weights, tokenizer).

use crate::aggregation::{self, TokenPrediction};
use crate::encoder::{CpuEncoder, Packed, Sequence};
use crate::error::{LocalError, Result};
use crate::tokenize::{Encoded, EncodedText, TextTokenizer};
use crate::weights::{BertView, Checkpoint, Family};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::{LayerNorm, Linear, Module, VarBuilder};
use candle_transformers::models::bert::{self, BertEncoder};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use triage_core::{Aggregation, Classification, Embedding, LabelScore, LocalTask, Tagging};

/// How a sequence classifier turns logits into probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// One label per input (`single_label_classification`).
    Softmax,
    /// Independent labels (`multi_label_classification`, or a single output).
    Sigmoid,
}

enum Head {
    Sequence {
        /// BERT: the pooler (dense + tanh on `[CLS]`).
        pooler: Option<Linear>,
        /// DistilBERT: `pre_classifier` (dense + ReLU on `[CLS]`).
        pre_classifier: Option<Linear>,
        classifier: Linear,
        activation: Activation,
    },
    Token {
        classifier: Linear,
    },
    MeanPool,
}

/// What a model was loaded from and what it does.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub task: LocalTask,
    pub family: Family,
    pub labels: Vec<String>,
    pub max_length: usize,
    /// Temperature applied to logits before the activation (1.0 = none).
    pub temperature: f32,
    /// For sequence classifiers: how logits become probabilities.
    pub activation: Option<Activation>,
}

/// A loaded encoder with its head. Not `Sync`-shared across threads by
/// design: one worker thread owns it (see `worker`).
/// Most padded tokens (windows × the longest) in one forward pass: about
/// 0.5 GB of activations for a base-size encoder at 512-token windows.
pub const PASS_PADDED_TOKENS: usize = 8192;

/// The encoder: our own on the CPU in F32 (see `encoder`), candle's layers
/// on a GPU or in half precision.
enum Encoder {
    Cpu(Box<CpuEncoder>),
    Candle(Box<CandleEncoder>),
}

/// BERT's embeddings and candle-transformers' encoder layers (the GPU and
/// half precision path), with the
/// attention bias made here. candle's `BertModel` builds the bias as
/// `(1 - mask) * f32::MIN` in the model's dtype: in F16 or BF16 `f32::MIN`
/// rounds to -inf and `0 * -inf` is NaN for every kept token, so a half
/// precision model with padding would answer NaN. The embeddings are the
/// same sums and layer norm as candle's (which are private to it).
struct CandleEncoder {
    word: candle_nn::Embedding,
    position: candle_nn::Embedding,
    token_type: candle_nn::Embedding,
    norm: LayerNorm,
    layers: BertEncoder,
    dtype: DType,
}

impl CandleEncoder {
    fn load(vb: VarBuilder, cfg: &bert::Config) -> candle_core::Result<Self> {
        let emb = vb.pp("embeddings");
        let h = cfg.hidden_size;
        Ok(Self {
            word: candle_nn::embedding(cfg.vocab_size, h, emb.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                cfg.max_position_embeddings,
                h,
                emb.pp("position_embeddings"),
            )?,
            token_type: candle_nn::embedding(
                cfg.type_vocab_size,
                h,
                emb.pp("token_type_embeddings"),
            )?,
            norm: candle_nn::layer_norm(h, cfg.layer_norm_eps, emb.pp("LayerNorm"))?,
            layers: BertEncoder::load(vb.pp("encoder"), cfg)?,
            dtype: vb.dtype(),
        })
    }

    /// Hidden states `(batch, seq, hidden)` in the model's dtype.
    fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let x = (self.word.forward(ids)? + self.token_type.forward(types)?)?
            .broadcast_add(&self.position.forward(&positions)?)?;
        let x = self.norm.forward(&x)?;
        // PyTorch adds torch.finfo(dtype).min. In F32 that is kept (the
        // fixtures match to 1e-6); in half precision -1e4 keeps the sum with
        // a score finite, and exp(-1e4) is 0 all the same.
        let fill = match self.dtype {
            DType::F32 | DType::F64 => f64::from(f32::MIN),
            _ => -1e4,
        };
        let keep = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
        let bias = ((keep.ones_like()? - keep)? * fill)?.to_dtype(self.dtype)?;
        self.layers.forward(&x, &bias)
    }
}

pub struct LocalModel {
    pub info: ModelInfo,
    pub tokenizer: TextTokenizer,
    encoder: Encoder,
    head: Head,
    device: Device,
    pad_id: u32,
    /// Most padded tokens in one forward pass (see [`PASS_PADDED_TOKENS`]).
    pass_tokens: usize,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LocalError::BadConfig {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn usize_field(cfg: &Value, key: &str) -> Option<usize> {
    cfg.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| usize::try_from(v).ok())
}

/// The labels of the model in `dir` (its `config.json`'s `id2label`, in id
/// order), without loading its weights.
pub fn read_labels(dir: &Path) -> Result<Vec<String>> {
    let config_path = dir.join("config.json");
    labels_from(&read_json(&config_path)?, &config_path)
}

/// Labels in id order from `id2label`; every id from 0 to n-1 must be present.
fn labels_from(cfg: &Value, path: &Path) -> Result<Vec<String>> {
    let bad = |why: String| LocalError::BadConfig {
        path: path.to_path_buf(),
        why,
    };
    let Some(map) = cfg.get("id2label").and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    let mut labels = vec![None; map.len()];
    for (k, v) in map {
        let id: usize = k
            .parse()
            .map_err(|_| bad(format!("id2label key `{k}` is not an integer")))?;
        let slot = labels
            .get_mut(id)
            .ok_or_else(|| bad(format!("id2label id {id} is out of range 0..{}", map.len())))?;
        *slot = Some(
            v.as_str()
                .ok_or_else(|| bad(format!("id2label[{id}] is not a string")))?
                .to_owned(),
        );
    }
    labels
        .into_iter()
        .enumerate()
        .map(|(i, l)| l.ok_or_else(|| bad(format!("id2label has no entry for id {i}"))))
        .collect()
}

/// Build candle's BERT config from a BERT or DistilBERT `config.json`.
pub fn bert_config(cfg: &Value, family: Family, path: &Path) -> Result<bert::Config> {
    let bad = |why: String| LocalError::BadConfig {
        path: path.to_path_buf(),
        why,
    };
    let need =
        |key: &str| usize_field(cfg, key).ok_or_else(|| bad(format!("missing integer `{key}`")));
    let act_name = match family {
        Family::Bert => cfg.get("hidden_act"),
        Family::DistilBert => cfg.get("activation"),
    }
    .and_then(Value::as_str)
    .unwrap_or("gelu");
    let hidden_act = match act_name {
        "gelu" => bert::HiddenAct::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => bert::HiddenAct::GeluApproximate,
        "relu" => bert::HiddenAct::Relu,
        other => {
            return Err(bad(format!(
                "activation `{other}` is not supported (gelu, gelu_new, relu)"
            )));
        }
    };
    let mut c = bert::Config {
        hidden_act,
        ..bert::Config::default()
    };
    c.model_type = None;
    match family {
        Family::Bert => {
            c.vocab_size = need("vocab_size")?;
            c.hidden_size = need("hidden_size")?;
            c.num_hidden_layers = need("num_hidden_layers")?;
            c.num_attention_heads = need("num_attention_heads")?;
            c.intermediate_size = need("intermediate_size")?;
            c.max_position_embeddings = need("max_position_embeddings")?;
            c.type_vocab_size = usize_field(cfg, "type_vocab_size").unwrap_or(2);
            c.layer_norm_eps = cfg
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12);
            if let Some(kind) = cfg.get("position_embedding_type").and_then(Value::as_str)
                && kind != "absolute"
            {
                return Err(bad(format!(
                    "position_embedding_type `{kind}` is not supported"
                )));
            }
        }
        Family::DistilBert => {
            c.vocab_size = need("vocab_size")?;
            c.hidden_size = need("dim")?;
            c.num_hidden_layers = need("n_layers")?;
            c.num_attention_heads = need("n_heads")?;
            c.intermediate_size = need("hidden_dim")?;
            c.max_position_embeddings = need("max_position_embeddings")?;
            c.type_vocab_size = 1;
            c.layer_norm_eps = 1e-12;
        }
    }
    c.pad_token_id = usize_field(cfg, "pad_token_id").unwrap_or(0);
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(bad(
            "hidden size is not a multiple of the number of heads".into()
        ));
    }
    Ok(c)
}

fn linear(ck: &Checkpoint, name: &str) -> Result<Linear> {
    let missing = || LocalError::Weights {
        path: ck.path.clone(),
        source: candle_core::Error::Msg(format!("tensor {name}.weight is missing")),
    };
    let w = ck
        .get(&format!("{name}.weight"))
        .ok_or_else(missing)?
        .clone();
    let b = ck.get(&format!("{name}.bias")).cloned();
    Ok(Linear::new(w, b))
}

/// Window length: the smallest of the encoder's positions and the limits the
/// tokenizer or sentence-transformers config declare.
fn max_length(dir: &Path, cfg: &Value, family: Family) -> usize {
    let positions = usize_field(cfg, "max_position_embeddings").unwrap_or(512);
    let mut limit = positions;
    if let Ok(tc) = read_json(&dir.join("tokenizer_config.json"))
        && let Some(m) = usize_field(&tc, "model_max_length")
    {
        limit = limit.min(m);
    }
    if let Ok(st) = read_json(&dir.join("sentence_bert_config.json"))
        && let Some(m) = usize_field(&st, "max_seq_length")
    {
        limit = limit.min(m);
    }
    let _ = family;
    limit.max(4)
}

impl LocalModel {
    /// Load a model folder. `name` is how errors and logs refer to it.
    pub fn load(dir: &Path, name: &str, device: &Device) -> Result<Self> {
        Self::load_with_base(dir, None, name, device)
    }

    /// Load a folder that may be a delta over a base (see `delta`): the base
    /// folder supplies the untouched weights and the tokenizer.
    pub fn load_with_base(
        dir: &Path,
        base: Option<&Path>,
        name: &str,
        device: &Device,
    ) -> Result<Self> {
        Self::load_as(dir, base, name, device, crate::encoder_dtype(device))
    }

    /// As [`Self::load_with_base`], computing in `dtype` (F32, F16 or BF16)
    /// whatever the device: the tests run the half precision path on the CPU
    /// against the PyTorch fixtures.
    pub fn load_as(
        dir: &Path,
        base: Option<&Path>,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let manifest = crate::delta::DeltaManifest::read(dir)?.filter(|m| m.base.is_some());
        let (weights_from, tokenizer_dir) = match (&manifest, base) {
            (Some(m), Some(base)) => (
                Some((m, base)),
                if dir.join("tokenizer.json").is_file() {
                    dir
                } else {
                    base
                },
            ),
            (Some(m), None) => {
                return Err(LocalError::MissingFile {
                    dir: dir.to_path_buf(),
                    what: format!(
                        "its base model {} (resolve it and load with a base)",
                        m.base.as_deref().unwrap_or("?")
                    ),
                });
            }
            (None, _) => (None, dir),
        };
        let config_path = dir.join("config.json");
        let cfg = read_json(&config_path)?;
        let bad = |why: String| LocalError::BadConfig {
            path: config_path.clone(),
            why,
        };
        let model_type = cfg
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("bert");
        let family = match model_type {
            "bert" => Family::Bert,
            "distilbert" => Family::DistilBert,
            other => {
                return Err(bad(format!(
                    "model_type `{other}` is not supported: triage runs bert and distilbert"
                )));
            }
        };
        let architecture = cfg
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or("");
        let labels = labels_from(&cfg, &config_path)?;
        let bert_cfg = bert_config(&cfg, family, &config_path)?;
        let checkpoint = Arc::new(match weights_from {
            Some((m, base)) => crate::delta::load_checkpoint(dir, m, base, dtype, device)?,
            None => Checkpoint::load_dir(dir, dtype, device)?,
        });

        let task = if architecture.ends_with("ForSequenceClassification") {
            LocalTask::SequenceClassification
        } else if architecture.ends_with("ForTokenClassification") {
            LocalTask::TokenClassification
        } else if checkpoint.contains("classifier.weight") {
            return Err(bad(format!(
                "architecture `{architecture}` is unknown but the weights carry a classifier: \
                 set architectures to a *ForSequenceClassification or *ForTokenClassification"
            )));
        } else {
            LocalTask::Embedding
        };

        let head = match task {
            LocalTask::SequenceClassification | LocalTask::TokenClassification => {
                let classifier = linear(&checkpoint, "classifier")?;
                let outputs = classifier.weight().dim(0).map_err(LocalError::Compute)?;
                if labels.len() != outputs {
                    return Err(bad(format!(
                        "id2label has {} labels but the classifier has {outputs} outputs",
                        labels.len()
                    )));
                }
                if task == LocalTask::TokenClassification {
                    Head::Token { classifier }
                } else {
                    let problem = cfg.get("problem_type").and_then(Value::as_str);
                    let activation = match problem {
                        Some("multi_label_classification") => Activation::Sigmoid,
                        Some("single_label_classification") => Activation::Softmax,
                        Some("regression") => Activation::Sigmoid,
                        _ if outputs == 1 => Activation::Sigmoid,
                        _ => Activation::Softmax,
                    };
                    let (pooler, pre_classifier) = match family {
                        Family::Bert => {
                            let p = if checkpoint.contains("bert.pooler.dense.weight") {
                                "bert.pooler.dense"
                            } else {
                                "pooler.dense"
                            };
                            (Some(linear(&checkpoint, p)?), None)
                        }
                        Family::DistilBert => (None, Some(linear(&checkpoint, "pre_classifier")?)),
                    };
                    Head::Sequence {
                        pooler,
                        pre_classifier,
                        classifier,
                        activation,
                    }
                }
            }
            LocalTask::Embedding => Head::MeanPool,
        };

        let weights_error = |source| LocalError::Weights {
            path: checkpoint.path.clone(),
            source,
        };
        let encoder =
            if device.is_cpu() && dtype == DType::F32 {
                let view = BertView::new(checkpoint.clone(), family, bert_cfg.hidden_size);
                Encoder::Cpu(Box::new(
                    CpuEncoder::load(&view, &bert_cfg).map_err(weights_error)?,
                ))
            } else {
                let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(
                    BertView::new(checkpoint.clone(), family, bert_cfg.hidden_size),
                );
                let vb = VarBuilder::from_backend(backend, dtype, device.clone());
                Encoder::Candle(Box::new(
                    CandleEncoder::load(vb, &bert_cfg).map_err(weights_error)?,
                ))
            };

        let max_length = max_length(dir, &cfg, family).min(bert_cfg.max_position_embeddings);
        let tokenizer =
            TextTokenizer::from_file(&tokenizer_dir.join("tokenizer.json"), max_length)?;
        let temperature = read_json(&dir.join("calibration.json"))
            .ok()
            .and_then(|c| c.get("temperature").and_then(Value::as_f64))
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(1.0) as f32;
        let activation = match &head {
            Head::Sequence { activation, .. } => Some(*activation),
            _ => None,
        };
        Ok(Self {
            info: ModelInfo {
                name: name.to_owned(),
                task,
                family,
                labels,
                max_length,
                temperature,
                activation,
            },
            tokenizer,
            encoder,
            head,
            device: device.clone(),
            pad_id: u32::try_from(bert_cfg.pad_token_id).unwrap_or(0),
            pass_tokens: PASS_PADDED_TOKENS,
        })
    }

    /// Run the encoder's dense layers in int8 (weights quantised per output,
    /// activations per row; see `docs/specialists.md` for what it costs in
    /// accuracy). Only the CPU's `f32` encoder has an int8 form: on a GPU or
    /// in half precision this is an error.
    pub fn quantize_int8(&mut self) -> Result<()> {
        match &mut self.encoder {
            Encoder::Cpu(cpu) => {
                cpu.quantize_int8();
                Ok(())
            }
            Encoder::Candle(_) => Err(LocalError::Unsupported {
                model: self.info.name.clone(),
                what: "int8 weights run on the CPU in f32 only (not on a GPU or in half precision)"
                    .to_owned(),
            }),
        }
    }

    /// Size CPU passes by the cores `share` says are free (a GPU encoder
    /// ignores it).
    pub fn set_core_share(&mut self, share: std::sync::Arc<crate::CoreShare>) {
        if let Encoder::Cpu(cpu) = &mut self.encoder {
            cpu.set_core_share(share);
        }
    }

    /// Whether the encoder's dense layers run in int8.
    pub fn is_int8(&self) -> bool {
        matches!(&self.encoder, Encoder::Cpu(cpu) if cpu.is_int8())
    }

    /// Change the padded-token budget of one forward pass (at least one
    /// window always runs).
    pub fn set_pass_tokens(&mut self, tokens: usize) {
        self.pass_tokens = tokens.max(1);
    }

    fn require(&self, wanted: LocalTask) -> Result<()> {
        if self.info.task == wanted {
            Ok(())
        } else {
            Err(LocalError::WrongTask {
                model: self.info.name.clone(),
                actual: self.info.task,
                wanted,
            })
        }
    }

    /// Run the CPU encoder over a batch, packed without padding.
    fn encode_packed(
        cpu: &CpuEncoder,
        batch: &[&Encoded],
        first_only: bool,
    ) -> candle_core::Result<Packed> {
        let seqs: Vec<Sequence<'_>> = batch
            .iter()
            .map(|e| Sequence {
                ids: &e.ids,
                type_ids: &e.type_ids,
            })
            .collect();
        cpu.forward(&seqs, first_only)
    }

    /// Run the candle encoder over a padded batch; returns hidden states and the mask.
    fn encode_batch(
        &self,
        encoder: &CandleEncoder,
        batch: &[&Encoded],
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let n = batch.len();
        let mut ids = Vec::with_capacity(n * width);
        let mut types = Vec::with_capacity(n * width);
        let mut mask = Vec::with_capacity(n * width);
        for e in batch {
            ids.extend_from_slice(&e.ids);
            types.extend_from_slice(&e.type_ids);
            mask.extend(std::iter::repeat_n(1u32, e.len()));
            let pad = width - e.len();
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            types.extend(std::iter::repeat_n(0u32, pad));
            mask.extend(std::iter::repeat_n(0u32, pad));
        }
        let ids = Tensor::from_vec(ids, (n, width), &self.device)?;
        let types = Tensor::from_vec(types, (n, width), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, width), &self.device)?;
        let hidden = encoder.forward(&ids, &types, &mask)?;
        Ok((hidden, mask))
    }

    /// Label probabilities for each window of the batch: `[window][label]`.
    pub fn classify_windows(&self, batch: &[&Encoded]) -> Result<Vec<Vec<f32>>> {
        self.require(LocalTask::SequenceClassification)?;
        let Head::Sequence {
            pooler,
            pre_classifier,
            classifier,
            activation,
        } = &self.head
        else {
            return Err(self.wrong_head());
        };
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let cls = match &self.encoder {
                Encoder::Cpu(cpu) => {
                    let packed = Self::encode_packed(cpu, batch, true)?;
                    let n = batch.len();
                    let h = packed.hidden.len() / n.max(1);
                    Tensor::from_vec(packed.hidden, (n, h), &self.device)?
                }
                Encoder::Candle(encoder) => {
                    let (hidden, _) = self.encode_batch(encoder, batch)?;
                    hidden.narrow(1, 0, 1)?.squeeze(1)?
                }
            };
            let x = match (pooler, pre_classifier) {
                (Some(p), _) => p.forward(&cls)?.tanh()?,
                (None, Some(p)) => p.forward(&cls)?.relu()?,
                (None, None) => cls,
            };
            let logits = classifier.forward(&x)?.to_dtype(DType::F32)?;
            let logits = (logits / f64::from(self.info.temperature))?;
            let probs = match activation {
                Activation::Softmax => candle_nn::ops::softmax(&logits, D::Minus1)?,
                Activation::Sigmoid => candle_nn::ops::sigmoid(&logits)?,
            };
            probs.to_dtype(DType::F32)?.to_vec2::<f32>()
        };
        run().map_err(LocalError::Compute)
    }

    /// Per-token label probabilities for each window: `[window][token][label]`,
    /// padding removed.
    pub fn tag_windows(&self, batch: &[&Encoded]) -> Result<Vec<Vec<Vec<f32>>>> {
        self.require(LocalTask::TokenClassification)?;
        let Head::Token { classifier } = &self.head else {
            return Err(self.wrong_head());
        };
        let run = || -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
            if let Encoder::Cpu(cpu) = &self.encoder {
                let packed = Self::encode_packed(cpu, batch, false)?;
                let rows = packed.starts.last().copied().unwrap_or(0);
                let h = packed.hidden.len() / rows.max(1);
                let hidden = Tensor::from_vec(packed.hidden, (rows, h), &self.device)?;
                let logits = (classifier.forward(&hidden)? / f64::from(self.info.temperature))?;
                let probs = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
                let mut probs = probs.into_iter();
                return Ok(packed
                    .starts
                    .windows(2)
                    .map(|w| probs.by_ref().take(w[1] - w[0]).collect())
                    .collect());
            }
            let Encoder::Candle(encoder) = &self.encoder else {
                return Err(candle_core::Error::Msg("no encoder".into()));
            };
            let (hidden, _) = self.encode_batch(encoder, batch)?;
            let logits = classifier.forward(&hidden)?.to_dtype(DType::F32)?;
            let logits = (logits / f64::from(self.info.temperature))?;
            let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
            let mut all = probs.to_vec3::<f32>()?;
            for (row, e) in all.iter_mut().zip(batch) {
                row.truncate(e.len());
            }
            Ok(all)
        };
        run().map_err(LocalError::Compute)
    }

    /// Mean-pooled embeddings for each window: `[window][hidden]`.
    pub fn embed_windows(&self, batch: &[&Encoded]) -> Result<Vec<Vec<f32>>> {
        self.require(LocalTask::Embedding)?;
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let encoder = match &self.encoder {
                Encoder::Cpu(cpu) => {
                    let packed = Self::encode_packed(cpu, batch, false)?;
                    let rows = packed.starts.last().copied().unwrap_or(0);
                    let h = packed.hidden.len() / rows.max(1);
                    return Ok(packed
                        .starts
                        .windows(2)
                        .map(|w| {
                            let mut mean = vec![0f32; h];
                            for row in packed.hidden[w[0] * h..w[1] * h].chunks_exact(h) {
                                for (m, v) in mean.iter_mut().zip(row) {
                                    *m += v;
                                }
                            }
                            let count = (w[1] - w[0]).max(1) as f32;
                            mean.iter_mut().for_each(|m| *m /= count);
                            mean
                        })
                        .collect());
                }
                Encoder::Candle(encoder) => encoder,
            };
            let (hidden, mask) = self.encode_batch(encoder, batch)?;
            let hidden = hidden.to_dtype(DType::F32)?;
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
            summed
                .broadcast_div(&counts)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()
        };
        run().map_err(LocalError::Compute)
    }

    fn wrong_head(&self) -> LocalError {
        LocalError::Compute(candle_core::Error::Msg(format!(
            "model {} has no head for this task",
            self.info.name
        )))
    }

    /// Run `pass` over `windows` in forward passes of at most
    /// `pass_tokens` padded tokens (and at least one window), shortest
    /// windows together so short texts are not padded to long ones; results
    /// come back in the order of `windows`. A long text's windows thus spread
    /// over several passes and memory stays bounded whatever its length.
    fn in_passes<T>(
        &self,
        windows: &[&Encoded],
        pass: impl Fn(&[&Encoded]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&i| windows[i].len());
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None)
            .take(windows.len())
            .collect();
        let mut at = 0;
        while at < order.len() {
            let mut end = at + 1;
            while end < order.len()
                && (end + 1 - at) * windows[order[end]].len() <= self.pass_tokens
            {
                end += 1;
            }
            let chunk: Vec<&Encoded> = order[at..end].iter().map(|&i| windows[i]).collect();
            for (&i, r) in order[at..end].iter().zip(pass(&chunk)?) {
                out[i] = Some(r);
            }
            at = end;
        }
        out.into_iter()
            .map(|r| r.ok_or_else(|| self.wrong_head()))
            .collect()
    }

    /// Classify already-encoded texts. With several windows per text, each
    /// label keeps its maximum over the windows.
    pub fn classify(&self, texts: &[&EncodedText]) -> Result<Vec<Classification>> {
        let windows: Vec<&Encoded> = texts.iter().flat_map(|t| t.windows.iter()).collect();
        let probs = self.in_passes(&windows, |w| self.classify_windows(w))?;
        let mut out = Vec::with_capacity(texts.len());
        let mut rows = probs.into_iter();
        for t in texts {
            let mut best = vec![f32::NEG_INFINITY; self.info.labels.len()];
            for row in rows.by_ref().take(t.windows.len()) {
                for (b, p) in best.iter_mut().zip(row) {
                    *b = b.max(p);
                }
            }
            out.push(Classification {
                scores: self
                    .info
                    .labels
                    .iter()
                    .zip(best)
                    .map(|(label, score)| LabelScore {
                        label: label.clone(),
                        score,
                    })
                    .collect(),
                truncated: t.truncated,
                windows: t.windows.len(),
            });
        }
        Ok(out)
    }

    /// Tag already-encoded texts and aggregate entities. Every window is
    /// tagged; where windows overlap, each token keeps the prediction of the
    /// window in which it has the most context on both sides, so entities
    /// and their offsets cover the whole text.
    pub fn tag(
        &self,
        texts: &[(&str, &EncodedText)],
        strategy: Aggregation,
    ) -> Result<Vec<Tagging>> {
        let windows: Vec<&Encoded> = texts.iter().flat_map(|(_, t)| t.windows.iter()).collect();
        let probs = self.in_passes(&windows, |w| self.tag_windows(w))?;
        let mut probs = probs.into_iter();
        let mut out = Vec::with_capacity(texts.len());
        for (text, enc) in texts {
            let per_window: Vec<Vec<Vec<f32>>> = probs.by_ref().take(enc.windows.len()).collect();
            // Best window per token, keyed by the token's character span.
            let mut best: std::collections::BTreeMap<(usize, usize), (usize, usize, usize)> =
                std::collections::BTreeMap::new();
            for (wi, (w, rows)) in enc.windows.iter().zip(&per_window).enumerate() {
                let body: Vec<usize> = (0..rows.len().min(w.len()))
                    .filter(|&i| !w.special[i])
                    .collect();
                for (pos, &i) in body.iter().enumerate() {
                    let context = pos.min(body.len() - 1 - pos);
                    let key = (w.offsets[i].0, w.offsets[i].1);
                    match best.get(&key) {
                        Some(&(_, _, c)) if c >= context => {}
                        _ => {
                            best.insert(key, (wi, i, context));
                        }
                    }
                }
            }
            let preds: Vec<TokenPrediction<'_>> = best
                .values()
                .map(|&(wi, i, _)| {
                    let w = &enc.windows[wi];
                    TokenPrediction {
                        token: &w.tokens[i],
                        start: w.offsets[i].0,
                        end: w.offsets[i].1,
                        is_unknown: Some(w.ids[i]) == self.tokenizer.unk_id,
                        probs: &per_window[wi][i],
                    }
                })
                .collect();
            out.push(Tagging {
                entities: aggregation::aggregate(text, &preds, &self.info.labels, strategy),
                // Every window was tagged: nothing of the text was cut.
                truncated: false,
            });
        }
        Ok(out)
    }

    /// Embed already-encoded texts (first window only).
    pub fn embed(&self, texts: &[&EncodedText]) -> Result<Vec<Embedding>> {
        let windows: Vec<&Encoded> = texts.iter().map(|t| &t.windows[0]).collect();
        let vectors = self.in_passes(&windows, |w| self.embed_windows(w))?;
        Ok(texts
            .iter()
            .zip(vectors)
            .map(|(t, vector)| Embedding {
                vector,
                truncated: t.truncated,
            })
            .collect())
    }
}
