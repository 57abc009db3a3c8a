//! A BERT encoder with a classification head whose every weight is a candle
//! `Var`, built from differentiable tensor ops only. candle-transformers'
//! `BertModel` uses a fused layer-norm kernel without a backward pass, so
//! gradients cannot flow through it; inference keeps using that model, and the
//! weights trained here are saved under the same Hugging Face names.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::bert;
use std::cell::RefCell;
use std::sync::Arc;
use triage_local::weights::{BertView, Checkpoint, Family};

/// What the head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    Sequence,
    Token,
}

/// One named, possibly trainable weight.
#[derive(Debug, Clone)]
pub struct Param {
    /// The BERT name (`encoder.layer.3.attention.self.query.weight`, `classifier.bias`, ...).
    pub name: String,
    pub var: Var,
}

#[derive(Debug)]
struct Linear {
    w: Var,
    b: Var,
}

impl Linear {
    /// One 2-D matmul over all leading dimensions: a broadcast batched matmul
    /// is several times slower on CPU, forward and backward.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / inp.max(1);
        let y = x
            .reshape((rows, inp))?
            .matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())?;
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(out)
    }
}

#[derive(Debug)]
struct Norm {
    w: Var,
    b: Var,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(self.w.as_tensor())?
            .broadcast_add(self.b.as_tensor())
    }
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
}

/// Softmax with the maximum detached: the result does not depend on the shift,
/// so no gradient needs to flow through it.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Inverted dropout with masks drawn from a seeded generator, so a training
/// run is reproducible (candle's own dropout draws from an unseeded one).
/// Only training passes get one; evaluation runs the net as inference does.
#[derive(Debug)]
pub struct Dropout {
    p: f32,
    rng: RefCell<SplitMix64>,
}

impl Dropout {
    /// `None` when `p` is 0: nothing to drop.
    pub fn new(p: f32, seed: u64) -> Option<Self> {
        (p > 0.0 && p < 1.0).then(|| Self {
            p,
            rng: RefCell::new(SplitMix64(seed ^ 0xD80F_0C7A_11E5_5EED)),
        })
    }

    /// Zero each element with probability `p`, scale the rest by 1/(1-p).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.elem_count();
        let keep = 1.0 / (1.0 - self.p);
        let threshold = (f64::from(self.p) * (1u64 << 24) as f64) as u64;
        let mask: Vec<f32> = {
            let mut rng = self.rng.borrow_mut();
            (0..n)
                .map(|_| {
                    if rng.next_u64() >> 40 < threshold {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect()
        };
        x * Tensor::from_vec(mask, x.dims(), x.device())?
    }
}

fn drop_opt(x: Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
    match dropout {
        Some(d) => d.apply(&x),
        None => Ok(x),
    }
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        mask_bias: &Tensor,
        heads: usize,
        act: bert::HiddenAct,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let d = h / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(mask_bias)?;
        let probs = drop_opt(softmax_last(&scores)?, dropout)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        let a = self
            .attn_norm
            .forward(&(drop_opt(self.attn_out.forward(&ctx)?, dropout)? + x)?)?;
        let i = self.inter.forward(&a)?;
        let i = match act {
            bert::HiddenAct::Gelu => i.gelu_erf()?,
            bert::HiddenAct::GeluApproximate => i.gelu()?,
            bert::HiddenAct::Relu => i.relu()?,
        };
        self.out_norm
            .forward(&(drop_opt(self.out.forward(&i)?, dropout)? + a)?)
    }
}

/// The encoder and head, split at `frozen_layers`: everything below runs
/// without gradients (and can be cached), everything above is trained.
#[derive(Debug)]
pub struct TrainableNet {
    word: Var,
    position: Var,
    token_type: Var,
    emb_norm: Norm,
    layers: Vec<Layer>,
    /// BERT's pooler (dense + tanh on `[CLS]`), for sequence heads of BERT bases.
    pooler: Option<Linear>,
    /// DistilBERT's `pre_classifier` (dense + ReLU on `[CLS]`).
    pre_classifier: Option<Linear>,
    classifier: Linear,
    pub kind: HeadKind,
    pub family: Family,
    heads: usize,
    act: bert::HiddenAct,
    params: Vec<Param>,
    /// Layers below this index are frozen.
    pub first_trained_layer: usize,
    pub train_embeddings: bool,
}

/// Deterministic normal(0, std) samples from a seed (SplitMix64 + Box-Muller).
pub fn seeded_normal(seed: u64, n: usize, std: f32) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| {
            let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
            let u2 = rng.next_f64();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect()
}

/// A small, fast, seedable generator (Steele et al.); enough for shuffling and init.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Options for building a trainable net from a base checkpoint.
#[derive(Debug, Clone)]
pub struct NetSpec {
    pub kind: HeadKind,
    pub num_labels: usize,
    /// How many of the top encoder layers are trained.
    pub unfreeze_layers: usize,
    pub train_embeddings: bool,
    pub seed: u64,
}

impl TrainableNet {
    /// Build from a base checkpoint. Encoder weights come from the checkpoint;
    /// the head comes from it too when it has one of the right size, else it
    /// is initialised from `seed`.
    pub fn from_checkpoint(
        checkpoint: Arc<Checkpoint>,
        family: Family,
        cfg: &bert::Config,
        spec: &NetSpec,
        device: &Device,
    ) -> Result<Self> {
        let view = BertView::new(checkpoint.clone(), family, cfg.hidden_size);
        let h = cfg.hidden_size;
        let mut params = Vec::new();
        let mut get = |name: &str| -> Result<Var> {
            let v = Var::from_tensor(&view.get_unchecked(name, DType::F32, device)?)?;
            params.push(Param {
                name: name.to_owned(),
                var: v.clone(),
            });
            Ok(v)
        };
        let word = get("embeddings.word_embeddings.weight")?;
        let position = get("embeddings.position_embeddings.weight")?;
        let token_type = get("embeddings.token_type_embeddings.weight")?;
        let emb_norm = Norm {
            w: get("embeddings.LayerNorm.weight")?,
            b: get("embeddings.LayerNorm.bias")?,
            eps: cfg.layer_norm_eps,
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut l = |n: &str| -> Result<Linear> {
                Ok(Linear {
                    w: get(&format!("{p}.{n}.weight"))?,
                    b: get(&format!("{p}.{n}.bias"))?,
                })
            };
            let query = l("attention.self.query")?;
            let key = l("attention.self.key")?;
            let value = l("attention.self.value")?;
            let attn_out = l("attention.output.dense")?;
            let inter = l("intermediate.dense")?;
            let out = l("output.dense")?;
            let attn_norm = Norm {
                w: get(&format!("{p}.attention.output.LayerNorm.weight"))?,
                b: get(&format!("{p}.attention.output.LayerNorm.bias"))?,
                eps: cfg.layer_norm_eps,
            };
            let out_norm = Norm {
                w: get(&format!("{p}.output.LayerNorm.weight"))?,
                b: get(&format!("{p}.output.LayerNorm.bias"))?,
                eps: cfg.layer_norm_eps,
            };
            layers.push(Layer {
                query,
                key,
                value,
                attn_out,
                attn_norm,
                inter,
                out,
                out_norm,
            });
        }

        // Head: reuse the checkpoint's when it fits, else seeded init (biases zero).
        let mut seed = spec.seed;
        let mut head_linear =
            |names: &[&str], out: usize, inp: usize| -> Result<(String, Linear)> {
                for prefix in names {
                    let (w, b) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
                    if let (Some(wt), Some(bt)) = (checkpoint.get(&w), checkpoint.get(&b))
                        && wt.dims() == [out, inp]
                    {
                        let wv = Var::from_tensor(&wt.to_dtype(DType::F32)?.to_device(device)?)?;
                        let bv = Var::from_tensor(&bt.to_dtype(DType::F32)?.to_device(device)?)?;
                        return Ok(((*prefix).to_owned(), Linear { w: wv, b: bv }));
                    }
                }
                seed = seed.wrapping_add(1);
                let w = Tensor::from_vec(seeded_normal(seed, out * inp, 0.02), (out, inp), device)?;
                let b = Tensor::zeros(out, DType::F32, device)?;
                Ok((
                    names[0].to_owned(),
                    Linear {
                        w: Var::from_tensor(&w)?,
                        b: Var::from_tensor(&b)?,
                    },
                ))
            };
        let mut head_params = Vec::new();
        let mut push = |prefix: String, l: &Linear| {
            head_params.push(Param {
                name: format!("{prefix}.weight"),
                var: l.w.clone(),
            });
            head_params.push(Param {
                name: format!("{prefix}.bias"),
                var: l.b.clone(),
            });
        };
        let (mut pooler, mut pre_classifier) = (None, None);
        if spec.kind == HeadKind::Sequence {
            match family {
                Family::Bert => {
                    let (_, l) = head_linear(&["bert.pooler.dense", "pooler.dense"], h, h)?;
                    push("pooler.dense".into(), &l);
                    pooler = Some(l);
                }
                Family::DistilBert => {
                    let (_, l) = head_linear(&["pre_classifier"], h, h)?;
                    push("pre_classifier".into(), &l);
                    pre_classifier = Some(l);
                }
            }
        }
        let (_, classifier) = head_linear(&["classifier"], spec.num_labels, h)?;
        push("classifier".into(), &classifier);
        params.extend(head_params);

        let unfreeze = spec.unfreeze_layers.min(cfg.num_hidden_layers);
        Ok(Self {
            word,
            position,
            token_type,
            emb_norm,
            layers,
            pooler,
            pre_classifier,
            classifier,
            kind: spec.kind,
            family,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
            params,
            first_trained_layer: cfg.num_hidden_layers - unfreeze,
            train_embeddings: spec.train_embeddings,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Every weight with its BERT name.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The weights the optimiser updates.
    pub fn trainable(&self) -> Vec<Param> {
        self.params
            .iter()
            .filter(|p| self.is_trained(&p.name))
            .cloned()
            .collect()
    }

    pub fn is_trained(&self, name: &str) -> bool {
        if let Some(rest) = name.strip_prefix("encoder.layer.") {
            let idx: usize = rest
                .split('.')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            idx >= self.first_trained_layer
        } else if name.starts_with("embeddings.") {
            self.train_embeddings
        } else {
            true
        }
    }

    /// Additive attention bias from a 0/1 mask of shape (batch, seq).
    pub fn mask_bias(mask: &Tensor) -> Result<Tensor> {
        let m = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
        (m.ones_like()? - m)? * f64::from(f32::MIN)
    }

    /// Embeddings and the frozen bottom layers: no gradient, so its output can
    /// be cached. `dropout` only reaches the embeddings, and only when they train.
    pub fn frozen_prefix(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: &Tensor,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let h = self.word.dim(1)?;
        let lookup = |table: &Var, idx: &Tensor| -> Result<Tensor> {
            table
                .as_tensor()
                .embedding(&idx.flatten_all()?)?
                .reshape((b, s, h))
        };
        let positions = Tensor::arange(0u32, s as u32, ids.device())?;
        let emb = lookup(&self.word, ids)?
            .broadcast_add(&self.position.as_tensor().embedding(&positions)?)?
            .broadcast_add(&lookup(&self.token_type, types)?)?;
        let mut x = self.emb_norm.forward(&emb)?;
        if self.train_embeddings {
            x = drop_opt(x, dropout)?;
        } else {
            x = x.detach();
        }
        let bias = Self::mask_bias(mask)?;
        // Frozen layers run as at inference, without dropout.
        for layer in &self.layers[..self.first_trained_layer] {
            x = layer.forward(&x, &bias, self.heads, self.act, None)?;
        }
        if self.first_trained_layer > 0 && !self.train_embeddings {
            x = x.detach();
        }
        Ok(x)
    }

    /// The trained top layers and the head: logits of shape (batch, labels)
    /// for sequence heads, (batch, seq, labels) for token heads. With
    /// `dropout`, as BERT trains: on attention probabilities, on each
    /// sub-layer's output before its residual, and on the classifier's input.
    pub fn trained_suffix(
        &self,
        x: &Tensor,
        mask: &Tensor,
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let bias = Self::mask_bias(mask)?;
        let mut x = x.clone();
        for layer in &self.layers[self.first_trained_layer..] {
            x = layer.forward(&x, &bias, self.heads, self.act, dropout)?;
        }
        match self.kind {
            HeadKind::Token => self.classifier.forward(&drop_opt(x, dropout)?),
            HeadKind::Sequence => {
                let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
                let pooled = match (&self.pooler, &self.pre_classifier) {
                    (Some(p), _) => p.forward(&cls)?.tanh()?,
                    (None, Some(p)) => p.forward(&cls)?.relu()?,
                    (None, None) => cls,
                };
                self.classifier.forward(&drop_opt(pooled, dropout)?)
            }
        }
    }
}
