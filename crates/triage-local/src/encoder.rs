//! The BERT encoder on the CPU, over plain `f32` buffers instead of candle
//! tensors, for speed. It computes what candle-transformers' `BertModel`
//! (and Hugging Face's BERT and DistilBERT) compute, with three differences
//! in how:
//!
//! - **No padding.** The texts of a batch are packed one after another;
//!   every dense layer runs over exactly the real tokens and attention runs
//!   per text, so a short text costs the same in a batch as alone.
//! - **Work skipped when only the first token is read.** A sequence
//!   classifier reads `[CLS]` alone, so the last layer's attention queries,
//!   output projection and feed-forward run for that one row per text.
//! - **Fused, vectorised element-wise work.** Bias, activation, residual and
//!   layer norm are single passes over each row, compiled for the CPU's best
//!   SIMD level at run time (`pulp`), with a rational `erf` and a polynomial
//!   `exp` accurate to a few ulps instead of scalar library calls.
//!
//! The matrix products are the `gemm` crate's (see `matmul`), or, once
//! [`CpuEncoder::quantize_int8`] has run, the dense layers' are int8 ones
//! (see `qmatmul`). The model tests compare the results with PyTorch's
//! within 1e-4 in f32 and 5e-2 in int8.

use crate::matmul::{self, Operand, Product, View};
use crate::qmatmul::QDense;
use crate::threads::CoreShare;
use crate::weights::BertView;
use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;
use std::sync::Arc;

type Result<T> = candle_core::Result<T>;

/// An int8 batch of fewer tokens than this runs on the calling thread alone.
const INT8_SEQUENTIAL_TOKENS: usize = 64;

/// A dense layer: `y = x · w + b`, with `w` stored `inp × out`, or in int8
/// once [`CpuEncoder::quantize_int8`] has run.
#[derive(Debug)]
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    inp: usize,
    out: usize,
    int8: Option<QDense>,
}

impl Dense {
    /// From PyTorch's `(out, in)` weight and `(out)` bias.
    fn from_tensors(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        if b.dims1()? != out {
            candle_core::bail!("bias has {} entries for {out} outputs", b.dims1()?);
        }
        Ok(Self {
            w: w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
            b: b.to_vec1::<f32>()?,
            inp,
            out,
            int8: None,
        })
    }

    /// Several layers over the same input as one: their outputs side by side.
    fn concat(parts: &[Dense]) -> Result<Self> {
        let inp = parts.first().map_or(0, |p| p.inp);
        if parts.iter().any(|p| p.inp != inp) {
            candle_core::bail!("layers to fuse take different input sizes");
        }
        let out: usize = parts.iter().map(|p| p.out).sum();
        let mut w = Vec::with_capacity(inp * out);
        for r in 0..inp {
            for p in parts {
                w.extend_from_slice(&p.w[r * p.out..(r + 1) * p.out]);
            }
        }
        let b = parts.iter().flat_map(|p| p.b.iter().copied()).collect();
        Ok(Self {
            w,
            b,
            inp,
            out,
            int8: None,
        })
    }

    /// Swap the `f32` weights for int8 ones (their memory is freed).
    fn quantize_int8(&mut self) {
        if self.int8.is_none() {
            self.int8 = Some(QDense::quantize(&self.w, &self.b, self.inp, self.out));
            self.w = Vec::new();
        }
    }

    fn forward(&self, x: &[f32], rows: usize, threads: usize) -> Vec<f32> {
        if let Some(q) = &self.int8 {
            return q.forward(x, rows, threads);
        }
        let mut y = Vec::with_capacity(rows * self.out);
        for _ in 0..rows {
            y.extend_from_slice(&self.b);
        }
        matmul::gemm(
            (rows, self.out, self.inp),
            &mut y,
            View::rows(0, self.out),
            Operand {
                data: x,
                view: View::rows(0, self.inp),
            },
            Operand {
                data: &self.w,
                view: View::rows(0, self.out),
            },
            Product {
                accumulate: true,
                scale: 1.0,
                threads,
            },
        );
        y
    }
}

#[derive(Debug)]
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

#[derive(Debug)]
struct Layer {
    /// Query, key and value projections as one product.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    up: Dense,
    down: Dense,
    out_norm: Norm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    GeluErf,
    GeluTanh,
    Relu,
}

/// One text of a batch: its token and token-type ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sequence<'a> {
    pub ids: &'a [u32],
    pub type_ids: &'a [u32],
}

/// The encoder's output: hidden rows, `hidden` floats each. Text `i` owns
/// rows `starts[i]..starts[i + 1]` (one row, its first token's, when only
/// first tokens were asked for).
#[derive(Debug)]
pub(crate) struct Packed {
    pub hidden: Vec<f32>,
    pub starts: Vec<usize>,
}

/// A BERT-shaped encoder whose weights live in plain vectors.
#[derive(Debug)]
pub(crate) struct CpuEncoder {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    act: Act,
    /// Cores whisper.cpp is not using; `None`: the whole pool.
    share: Option<Arc<CoreShare>>,
}

fn tensor(view: &BertView, name: &str) -> Result<Tensor> {
    view.get_unchecked(name, DType::F32, &Device::Cpu)
}

fn dense(view: &BertView, name: &str, inp: usize, out: usize) -> Result<Dense> {
    let d = Dense::from_tensors(
        &tensor(view, &format!("{name}.weight"))?,
        &tensor(view, &format!("{name}.bias"))?,
    )?;
    if (d.inp, d.out) != (inp, out) {
        candle_core::bail!("{name} is {}×{}, expected {inp}×{out}", d.out, d.inp);
    }
    Ok(d)
}

fn norm(view: &BertView, name: &str, hidden: usize) -> Result<Norm> {
    // Old BERT checkpoints call layer-norm parameters gamma and beta.
    let (g, b) = if view.contains_tensor(&format!("{name}.weight")) {
        ("weight", "bias")
    } else {
        ("gamma", "beta")
    };
    let gamma = tensor(view, &format!("{name}.{g}"))?.to_vec1::<f32>()?;
    let beta = tensor(view, &format!("{name}.{b}"))?.to_vec1::<f32>()?;
    if gamma.len() != hidden || beta.len() != hidden {
        candle_core::bail!("{name} has {} entries, expected {hidden}", gamma.len());
    }
    Ok(Norm { gamma, beta })
}

fn table(view: &BertView, name: &str, hidden: usize) -> Result<Vec<f32>> {
    let t = tensor(view, name)?;
    let (_, cols) = t.dims2()?;
    if cols != hidden {
        candle_core::bail!("{name} has rows of {cols}, expected {hidden}");
    }
    t.flatten_all()?.to_vec1::<f32>()
}

impl CpuEncoder {
    pub fn load(view: &BertView, cfg: &Config) -> Result<Self> {
        let h = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    qkv: Dense::concat(&[
                        dense(view, &format!("{p}.attention.self.query"), h, h)?,
                        dense(view, &format!("{p}.attention.self.key"), h, h)?,
                        dense(view, &format!("{p}.attention.self.value"), h, h)?,
                    ])?,
                    attn_out: dense(view, &format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: norm(view, &format!("{p}.attention.output.LayerNorm"), h)?,
                    up: dense(
                        view,
                        &format!("{p}.intermediate.dense"),
                        h,
                        cfg.intermediate_size,
                    )?,
                    down: dense(view, &format!("{p}.output.dense"), cfg.intermediate_size, h)?,
                    out_norm: norm(view, &format!("{p}.output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word: table(view, "embeddings.word_embeddings.weight", h)?,
            position: table(view, "embeddings.position_embeddings.weight", h)?,
            token_type: table(view, "embeddings.token_type_embeddings.weight", h)?,
            emb_norm: norm(view, "embeddings.LayerNorm", h)?,
            layers,
            hidden: h,
            heads: cfg.num_attention_heads,
            eps: cfg.layer_norm_eps as f32,
            act: match cfg.hidden_act {
                HiddenAct::Gelu => Act::GeluErf,
                HiddenAct::GeluApproximate => Act::GeluTanh,
                HiddenAct::Relu => Act::Relu,
            },
            share: None,
        })
    }

    /// Run every dense layer of the encoder in int8 (see `qmatmul`):
    /// embeddings, layer norms and attention stay in `f32`.
    pub fn quantize_int8(&mut self) {
        if !QDense::fast_on_this_cpu() {
            tracing::warn!(
                "int8 dense layers: this CPU has neither AVX-512 VNNI nor AVX2, so they run \
                 a portable kernel (same answers, several times slower than f32); set \
                 `int8 = false` in the specialist's config (or pass `--f32` to the CLI) for \
                 speed here"
            );
        }
        for layer in &mut self.layers {
            for d in [
                &mut layer.qkv,
                &mut layer.attn_out,
                &mut layer.up,
                &mut layer.down,
            ] {
                d.quantize_int8();
            }
        }
    }

    /// Size each pass by the cores `share` says are free.
    pub fn set_core_share(&mut self, share: Arc<CoreShare>) {
        self.share = Some(share);
    }

    /// Whether the dense layers run in int8.
    pub fn is_int8(&self) -> bool {
        self.layers.first().is_some_and(|l| l.qkv.int8.is_some())
    }

    /// Encode a batch. With `first_only`, the result holds only each text's
    /// first row, and the last layer computes nothing else.
    pub fn forward(&self, seqs: &[Sequence<'_>], first_only: bool) -> Result<Packed> {
        let h = self.hidden;
        let total_tokens: usize = seqs.iter().map(|s| s.ids.len()).sum();
        // In int8 a single short text's layers take so little time that
        // waking a second thread for each costs more than it saves
        // (measured: MiniLM at batch 1, 172 texts/s on one thread, 134 on two).
        let pool = rayon::current_num_threads();
        let threads = if self.is_int8() && total_tokens < INT8_SEQUENTIAL_TOKENS {
            1
        } else {
            self.share.as_ref().map_or(pool, |s| s.free().min(pool))
        };
        let mut starts = Vec::with_capacity(seqs.len() + 1);
        starts.push(0);
        for s in seqs {
            if s.ids.is_empty() || s.ids.len() != s.type_ids.len() {
                candle_core::bail!("a text has no tokens, or ids and type ids differ in length");
            }
            starts.push(starts.last().copied().unwrap_or(0) + s.ids.len());
        }
        let total = starts.last().copied().unwrap_or(0);
        let mut x = self.embed(seqs, total)?;
        layer_norm_rows(&mut x, None, &self.emb_norm, self.eps, h, threads);
        let last = self.layers.len().saturating_sub(1);
        let mut rows = total;
        for (li, layer) in self.layers.iter().enumerate() {
            let first = first_only && li == last;
            let qkv = layer.qkv.forward(&x, rows, threads);
            let ctx = self.attention(&qkv, &starts, first, threads);
            let resid = if first {
                let mut r = Vec::with_capacity(seqs.len() * h);
                for s in &starts[..seqs.len()] {
                    r.extend_from_slice(&x[s * h..(s + 1) * h]);
                }
                rows = seqs.len();
                r
            } else {
                x
            };
            let mut y = layer.attn_out.forward(&ctx, rows, threads);
            layer_norm_rows(&mut y, Some(&resid), &layer.attn_norm, self.eps, h, threads);
            let mut inter = layer.up.forward(&y, rows, threads);
            activate(&mut inter, self.act, layer.up.out, threads);
            let mut z = layer.down.forward(&inter, rows, threads);
            layer_norm_rows(&mut z, Some(&y), &layer.out_norm, self.eps, h, threads);
            x = z;
        }
        if first_only {
            if self.layers.is_empty() {
                x = starts[..seqs.len()]
                    .iter()
                    .flat_map(|&s| x[s * h..(s + 1) * h].to_vec())
                    .collect();
            }
            starts = (0..=seqs.len()).collect();
        }
        Ok(Packed { hidden: x, starts })
    }

    /// Word + position + token-type embeddings of every token.
    fn embed(&self, seqs: &[Sequence<'_>], total: usize) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut x = Vec::with_capacity(total * h);
        for s in seqs {
            for (p, (&id, &ty)) in s.ids.iter().zip(s.type_ids).enumerate() {
                let row = |t: &[f32], i: usize, what: &str| -> Result<std::ops::Range<usize>> {
                    if (i + 1) * h > t.len() {
                        candle_core::bail!("{what} {i} is past the embedding table");
                    }
                    Ok(i * h..(i + 1) * h)
                };
                let w = row(&self.word, id as usize, "token id")?;
                let pe = row(&self.position, p, "position")?;
                let te = row(&self.token_type, ty as usize, "token type")?;
                x.extend(
                    self.word[w]
                        .iter()
                        .zip(&self.position[pe])
                        .zip(&self.token_type[te])
                        .map(|((a, b), c)| a + b + c),
                );
            }
        }
        Ok(x)
    }

    /// Multi-head self-attention of each text over its own tokens; queries
    /// for every row, or for each text's first row only. Returns the
    /// context rows with the heads side by side.
    fn attention(&self, qkv: &[f32], starts: &[usize], first: bool, threads: usize) -> Vec<f32> {
        let h = self.hidden;
        let d = h / self.heads;
        let w3 = 3 * h;
        let n = starts.len() - 1;
        let q_rows = |s: usize| if first { 1 } else { starts[s + 1] - starts[s] };
        let tq: usize = (0..n).map(q_rows).sum();
        let scale = 1.0 / (d as f32).sqrt();
        // Head-major blocks (text, head) so that each task writes its own slice.
        let mut by_head = vec![0f32; tq * h];
        let mut tasks = Vec::with_capacity(n * self.heads);
        let mut rest = by_head.as_mut_slice();
        for s in 0..n {
            for head in 0..self.heads {
                let (block, tail) = rest.split_at_mut(q_rows(s) * d);
                tasks.push((s, head, block));
                rest = tail;
            }
        }
        let run = |(s, head, out): (usize, usize, &mut [f32])| {
            let start = starts[s];
            let len = starts[s + 1] - start;
            let qr = out.len() / d;
            let mut scores = vec![0f32; qr * len];
            let col = start * w3 + head * d;
            matmul::gemm(
                (qr, len, d),
                &mut scores,
                View::rows(0, len),
                Operand {
                    data: qkv,
                    view: View::rows(col, w3),
                },
                Operand {
                    data: qkv,
                    view: View::transposed(col + h, w3),
                },
                Product {
                    accumulate: false,
                    scale,
                    threads: 1,
                },
            );
            softmax_rows(&mut scores, len);
            matmul::gemm(
                (qr, d, len),
                out,
                View::rows(0, d),
                Operand {
                    data: &scores,
                    view: View::rows(0, len),
                },
                Operand {
                    data: qkv,
                    view: View::rows(col + 2 * h, w3),
                },
                Product {
                    accumulate: false,
                    scale: 1.0,
                    threads: 1,
                },
            );
        };
        if threads > 1 && tasks.len() > 1 {
            tasks.into_par_iter().for_each(run);
        } else {
            tasks.into_iter().for_each(run);
        }
        let mut ctx = vec![0f32; tq * h];
        let mut q0 = 0;
        for s in 0..n {
            let qr = q_rows(s);
            for head in 0..self.heads {
                let block = &by_head[q0 * h + head * qr * d..q0 * h + (head + 1) * qr * d];
                for r in 0..qr {
                    let at = (q0 + r) * h + head * d;
                    ctx[at..at + d].copy_from_slice(&block[r * d..(r + 1) * d]);
                }
            }
            q0 += qr;
        }
        ctx
    }
}

/// Rows per parallel task: at least `min` rows, about one task per thread.
fn chunk_rows(rows: usize, threads: usize, min: usize) -> usize {
    rows.div_ceil(threads.max(1)).max(min).max(1)
}

/// `x = layer_norm(x + resid)` for each row of `cols` floats.
fn layer_norm_rows(
    x: &mut [f32],
    resid: Option<&[f32]>,
    norm: &Norm,
    eps: f32,
    cols: usize,
    threads: usize,
) {
    let rows = x.len() / cols;
    let per = chunk_rows(rows, threads, 16) * cols;
    let work = |(i, chunk): (usize, &mut [f32])| {
        let resid = resid.map(|r| &r[i * per..i * per + chunk.len()]);
        pulp::Arch::new().dispatch(|| {
            for (j, row) in chunk.chunks_exact_mut(cols).enumerate() {
                if let Some(r) = resid {
                    for (a, b) in row.iter_mut().zip(&r[j * cols..(j + 1) * cols]) {
                        *a += b;
                    }
                }
                norm_row(row, norm, eps);
            }
        });
    };
    if threads > 1 && rows > 16 {
        x.par_chunks_mut(per).enumerate().for_each(work);
    } else {
        x.chunks_mut(per).enumerate().for_each(work);
    }
}

#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

#[inline(always)]
fn norm_row(row: &mut [f32], norm: &Norm, eps: f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |v| v) / n;
    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(&norm.gamma).zip(&norm.beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

fn activate(x: &mut [f32], act: Act, cols: usize, threads: usize) {
    let rows = x.len() / cols.max(1);
    let per = chunk_rows(rows, threads, 4) * cols.max(1);
    let work = |chunk: &mut [f32]| {
        pulp::Arch::new().dispatch(|| match act {
            Act::GeluErf => chunk.iter_mut().for_each(|v| *v = gelu_erf(*v)),
            Act::GeluTanh => chunk.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
            Act::Relu => chunk.iter_mut().for_each(|v| *v = v.max(0.0)),
        });
    };
    if threads > 1 && rows > 4 {
        x.par_chunks_mut(per).for_each(work);
    } else {
        x.chunks_mut(per).for_each(work);
    }
}

fn softmax_rows(x: &mut [f32], cols: usize) {
    pulp::Arch::new().dispatch(|| {
        for row in x.chunks_exact_mut(cols) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let inv = 1.0 / lane_sum(row, |v| v);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    });
}

/// `e^x` to about 2 ulps over the range where the result is a normal f32
/// (inputs outside it are clamped to its ends), branch-free so that loops
/// over it vectorise.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // x − k·ln 2 in two parts, so the reduction loses nothing.
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k as i32 + 127) << 23) as u32)
}

/// The error function to about 1e-7 absolute: the rational approximation
/// Eigen and XLA use for f32, exact to f32 rounding beyond |x| = 4.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_473_9e-2;
    x * p / q
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/π)
    let u = C * (x + 0.044_715 * x * x * x);
    // tanh(u) = 1 − 2 / (e^{2u} + 1)
    0.5 * x * (2.0 - 2.0 / (exp(2.0 * u) + 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_library_exp() {
        for i in -8000..=8000 {
            let x = i as f32 / 100.0;
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, library {want}"
            );
        }
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn erf_matches_a_series_to_1e_6() {
        // erf(x) = 2/√π · Σ (−1)^n x^(2n+1) / (n! (2n+1)), in f64; fine for |x| ≤ 3.
        let series = |x: f64| {
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for i in -300..=300 {
            let x = i as f64 / 100.0;
            let got = f64::from(erf(x as f32));
            assert!((got - series(x)).abs() < 1e-6, "erf({x}) = {got}");
        }
        assert!((erf(6.0) - 1.0).abs() < 1e-6 && (erf(-6.0) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn gelu_tanh_matches_its_definition() {
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let want = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
            assert!((gelu_tanh(x) - want).abs() < 1e-5, "{x}");
        }
    }

    #[test]
    fn layer_norm_with_residual_normalises_each_row() {
        let norm = Norm {
            gamma: vec![2.0; 20],
            beta: vec![1.0; 20],
        };
        let mut x: Vec<f32> = (0..60).map(|i| (i % 7) as f32).collect();
        let resid: Vec<f32> = (0..60).map(|i| (i % 3) as f32).collect();
        let mut want = x.clone();
        for (a, b) in want.iter_mut().zip(&resid) {
            *a += b;
        }
        layer_norm_rows(&mut x, Some(&resid), &norm, 1e-12, 20, 2);
        for (row, src) in x.chunks(20).zip(want.chunks(20)) {
            let mean = src.iter().sum::<f32>() / 20.0;
            let var = src.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 20.0;
            for (got, v) in row.iter().zip(src) {
                let expect = (v - mean) / var.sqrt() * 2.0 + 1.0;
                assert!((got - expect).abs() < 1e-4);
            }
        }
    }
}
