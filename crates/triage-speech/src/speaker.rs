//! Who speaks when in a mono recording. A d-vector speaker encoder embeds
//! short pieces of the speech, average-linkage clustering groups the pieces
//! into speakers, and each word takes the speaker of the piece it falls in.
//!
//! The encoder is Resemblyzer's (GE2E training; a 3-layer LSTM over a
//! 40-band mel spectrogram of 1.6 s partials, a linear layer, ReLU and L2
//! norm): its weights, `pretrained.pt`, ship in the Apache-2.0 wheel
//! `Resemblyzer-0.1.4-py3-none-any.whl` on PyPI; `scripts/fetch-speaker-model`
//! takes them from there and writes the model's tensors to safetensors.

use crate::SpeechError;
use crate::audio::SAMPLE_RATE;
use candle_core::{D, DType, Device, Tensor};
use realfft::{RealFftPlanner, RealToComplex};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use triage_core::{TranscriptSegment, Word};

/// Samples per analysis window (25 ms) and between frames (10 ms).
const N_FFT: usize = 400;
const HOP: usize = 160;
const N_MELS: usize = 40;
const HIDDEN: usize = 256;
const LAYERS: usize = 3;
/// Frames in one partial utterance (1.6 s).
const PARTIAL_FRAMES: usize = 160;
/// Partials per second of audio and the least a last, padded partial must
/// cover (Resemblyzer's `embed_utterance` defaults).
const PARTIAL_RATE: f64 = 1.3;
const MIN_COVERAGE: f64 = 0.75;
/// Quiet audio is raised to this loudness before it is embedded (never lowered).
const TARGET_DBFS: f64 = -30.0;
/// Partials run through the LSTM together.
const BATCH: usize = 64;

/// Pieces of speech embedded on their own: spans longer than this are cut
/// into pieces about this long.
const PIECE_S: f64 = 2.0;
/// Pieces shorter than this are too short to embed.
const MIN_PIECE_S: f64 = 0.5;
/// Pieces at least this long take part in the clustering; shorter ones
/// join the nearest speaker afterwards.
const ANCHOR_S: f64 = 1.0;
/// Two groups of pieces with a mean cosine similarity below this are
/// different speakers. Measured on the 13 development clips (four sources)
/// cut into 1.5 s pieces: 1% of same-speaker pairs fall below 0.65 and 1% of
/// different-speaker pairs reach it.
pub const SAME_SPEAKER: f32 = 0.65;
/// A speaker heard for less than this in all is merged into the nearest one.
const MIN_SPEAKER_S: f64 = 2.0;
/// Most pieces clustered (an evenly spaced choice when there are more; the
/// others join the nearest speaker): the similarity matrix is at most 9 MB
/// (1,500 pieces of 2 s are 50 minutes of speech), whatever the recording's
/// length.
const MAX_ANCHORS: usize = 1500;

/// The speaker encoder and its mel front end.
pub struct SpeakerEncoder {
    /// Per layer: input weights transposed (in × 4H), recurrent weights
    /// transposed (H × 4H), and the two biases summed (4H).
    layers: Vec<(Tensor, Tensor, Tensor)>,
    linear_t: Tensor,
    linear_b: Tensor,
    /// Mel filter bank, `N_MELS` rows of `N_FFT / 2 + 1`.
    filters: Vec<f32>,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for SpeakerEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpeakerEncoder").finish_non_exhaustive()
    }
}

/// A stretch of speech and its embedding.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub start_s: f64,
    pub end_s: f64,
    pub embedding: Vec<f32>,
}

impl SpeakerEncoder {
    /// Load Resemblyzer's encoder: a safetensors file with the tensors of
    /// its `pretrained.pt` (`lstm.weight_ih_l0` …, `linear.weight`, `linear.bias`).
    pub fn load(path: &Path) -> Result<Self, SpeechError> {
        let err = |why: String| SpeechError::LoadSpeaker {
            path: path.display().to_string(),
            why,
        };
        if !path.is_file() {
            return Err(err("no such file".into()));
        }
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| err(format!("not a safetensors file ({e})")))?;
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor, SpeechError> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| err(format!("no tensor `{name}`: not Resemblyzer's encoder?")))?;
            if t.dims() != shape {
                return Err(err(format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            t.to_dtype(DType::F32)
                .map_err(|e| err(format!("tensor `{name}`: {e}")))
        };
        let t = |r: candle_core::Result<Tensor>| r.map_err(|e| err(e.to_string()));
        let mut layers = Vec::new();
        for l in 0..LAYERS {
            let input = if l == 0 { N_MELS } else { HIDDEN };
            let w_ih = take(&format!("lstm.weight_ih_l{l}"), &[4 * HIDDEN, input])?;
            let w_hh = take(&format!("lstm.weight_hh_l{l}"), &[4 * HIDDEN, HIDDEN])?;
            let b_ih = take(&format!("lstm.bias_ih_l{l}"), &[4 * HIDDEN])?;
            let b_hh = take(&format!("lstm.bias_hh_l{l}"), &[4 * HIDDEN])?;
            layers.push((
                t(w_ih.t().and_then(|w| w.contiguous()))?,
                t(w_hh.t().and_then(|w| w.contiguous()))?,
                t(b_ih + b_hh)?,
            ));
        }
        let linear = take("linear.weight", &[HIDDEN, HIDDEN])?;
        let linear_b = take("linear.bias", &[HIDDEN])?;
        let window = (0..N_FFT)
            .map(|i| {
                // Periodic Hann, as librosa's `get_window("hann", n)`.
                let x = std::f64::consts::PI * 2.0 * i as f64 / N_FFT as f64;
                (0.5 - 0.5 * x.cos()) as f32
            })
            .collect();
        Ok(Self {
            layers,
            linear_t: t(linear.t().and_then(|w| w.contiguous()))?,
            linear_b,
            filters: mel_filters(),
            window,
            fft: RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT),
        })
    }

    /// The power mel spectrogram of 16 kHz `wav` (librosa's
    /// `melspectrogram` with Resemblyzer's settings: centred frames, zero
    /// padding), one row of `N_MELS` per 10 ms frame.
    pub fn mel(&self, wav: &[f32]) -> Vec<[f32; N_MELS]> {
        let frames = 1 + wav.len() / HOP;
        let bins = N_FFT / 2 + 1;
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; bins];
        let mut out = Vec::with_capacity(frames);
        for f in 0..frames {
            // Frame f is centred on sample f * HOP.
            let start = (f * HOP) as isize - (N_FFT / 2) as isize;
            for (i, x) in input.iter_mut().enumerate() {
                let at = start + i as isize;
                let s = if at >= 0 && (at as usize) < wav.len() {
                    wav[at as usize]
                } else {
                    0.0
                };
                *x = s * self.window[i];
            }
            // The lengths come from the plan: this cannot fail.
            let _ = self
                .fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch);
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            let mut row = [0f32; N_MELS];
            for (m, r) in row.iter_mut().enumerate() {
                let filter = &self.filters[m * bins..(m + 1) * bins];
                *r = filter.iter().zip(&power).map(|(a, b)| a * b).sum();
            }
            out.push(row);
        }
        out
    }

    /// Embeddings of partials (each `PARTIAL_FRAMES` mel rows), L2-normed.
    fn forward(&self, partials: &[&[[f32; N_MELS]]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(partials.len());
        for batch in partials.chunks(BATCH) {
            let b = batch.len();
            let flat: Vec<f32> = batch
                .iter()
                .flat_map(|p| p.iter().flat_map(|row| row.iter().copied()))
                .collect();
            // (T, B, in): time-major, so each step's rows are contiguous.
            let mut x = Tensor::from_vec(flat, (b, PARTIAL_FRAMES, N_MELS), &Device::Cpu)?
                .transpose(0, 1)?
                .contiguous()?;
            let mut h = Tensor::zeros((b, HIDDEN), DType::F32, &Device::Cpu)?;
            for (w_ih, w_hh, bias) in &self.layers {
                let input = x.dim(2)?;
                // Input projections of every step at once: (T·B, 4H).
                let projected = x
                    .reshape((PARTIAL_FRAMES * b, input))?
                    .matmul(w_ih)?
                    .broadcast_add(bias)?
                    .reshape((PARTIAL_FRAMES, b, 4 * HIDDEN))?;
                h = Tensor::zeros((b, HIDDEN), DType::F32, &Device::Cpu)?;
                let mut c = Tensor::zeros((b, HIDDEN), DType::F32, &Device::Cpu)?;
                let mut outputs = Vec::with_capacity(PARTIAL_FRAMES);
                for step in 0..PARTIAL_FRAMES {
                    let gates = (projected.get(step)? + h.matmul(w_hh)?)?;
                    let chunks = gates.chunk(4, D::Minus1)?;
                    // PyTorch's gate order: input, forget, cell, output.
                    let i = candle_nn::ops::sigmoid(&chunks[0])?;
                    let f = candle_nn::ops::sigmoid(&chunks[1])?;
                    let g = chunks[2].tanh()?;
                    let o = candle_nn::ops::sigmoid(&chunks[3])?;
                    c = ((f * &c)? + (i * g)?)?;
                    h = (o * c.tanh()?)?;
                    outputs.push(h.clone());
                }
                x = Tensor::stack(&outputs, 0)?;
            }
            let e = h
                .matmul(&self.linear_t)?
                .broadcast_add(&self.linear_b)?
                .relu()?;
            for row in e.to_vec2::<f32>()? {
                out.push(normalised(row));
            }
        }
        Ok(out)
    }

    /// One embedding per utterance, as Resemblyzer's `embed_utterance`:
    /// the quiet ones raised to -30 dBFS, cut into 1.6 s partials 1.3 times
    /// a second, the partials' embeddings averaged and L2-normed.
    pub fn embed(&self, utterances: &[&[f32]]) -> Result<Vec<Vec<f32>>, SpeechError> {
        let mut mels = Vec::with_capacity(utterances.len());
        let mut slices = Vec::with_capacity(utterances.len());
        for wav in utterances {
            let (wav_len, ranges) = partial_slices(wav.len());
            let mut padded = louder(wav);
            padded.resize(wav_len.max(padded.len()), 0.0);
            mels.push(self.mel(&padded));
            slices.push(ranges);
        }
        let mut partials: Vec<&[[f32; N_MELS]]> = Vec::new();
        for (mel, ranges) in mels.iter().zip(&slices) {
            for &(a, b) in ranges {
                partials.push(&mel[a..b]);
            }
        }
        let embedded = self
            .forward(&partials)
            .map_err(|e| SpeechError::Speaker(e.to_string()))?;
        let mut at = 0;
        Ok(slices
            .iter()
            .map(|ranges| {
                let mut sum = vec![0f32; HIDDEN];
                for e in &embedded[at..at + ranges.len()] {
                    for (s, x) in sum.iter_mut().zip(e) {
                        *s += x;
                    }
                }
                at += ranges.len();
                normalised(sum)
            })
            .collect())
    }

    /// Embed the speech spans (sample ranges of `samples`, which start
    /// `base` samples into the recording), long ones cut into pieces of
    /// about [`PIECE_S`]; pieces shorter than [`MIN_PIECE_S`] are left out.
    pub fn pieces(
        &self,
        samples: &[f32],
        base: usize,
        spans: &[(usize, usize)],
    ) -> Result<Vec<Embedded>, SpeechError> {
        let sr = f64::from(SAMPLE_RATE);
        let mut ranges = Vec::new();
        for &(start, end) in spans {
            let len = end.saturating_sub(start);
            let n = ((len as f64 / sr / PIECE_S).round() as usize).max(1);
            for k in 0..n {
                let a = start + len * k / n;
                let b = start + len * (k + 1) / n;
                if (b - a) as f64 / sr >= MIN_PIECE_S {
                    ranges.push((a, b.min(samples.len())));
                }
            }
        }
        let wavs: Vec<&[f32]> = ranges.iter().map(|&(a, b)| &samples[a..b]).collect();
        let embeddings = self.embed(&wavs)?;
        Ok(ranges
            .iter()
            .zip(embeddings)
            .map(|(&(a, b), embedding)| Embedded {
                start_s: (base + a) as f64 / sr,
                end_s: (base + b) as f64 / sr,
                embedding,
            })
            .collect())
    }
}

/// Where Resemblyzer cuts an utterance of `n` samples into partials: the
/// padded length in samples and the mel frame ranges.
fn partial_slices(n: usize) -> (usize, Vec<(usize, usize)>) {
    let n_frames = (n + 1).div_ceil(HOP);
    let step = ((f64::from(SAMPLE_RATE) / PARTIAL_RATE) / HOP as f64).round() as usize;
    let steps = (n_frames + step + 1).saturating_sub(PARTIAL_FRAMES).max(1);
    let mut ranges: Vec<(usize, usize)> = (0..steps)
        .step_by(step)
        .map(|i| (i, i + PARTIAL_FRAMES))
        .collect();
    let last = ranges[ranges.len() - 1];
    let coverage = (n as f64 - (last.0 * HOP) as f64) / (PARTIAL_FRAMES * HOP) as f64;
    if coverage < MIN_COVERAGE && ranges.len() > 1 {
        ranges.pop();
    }
    (ranges[ranges.len() - 1].1 * HOP, ranges)
}

/// `wav` raised to [`TARGET_DBFS`] when it is quieter (never lowered).
pub fn louder(wav: &[f32]) -> Vec<f32> {
    let int16_max = 32767.0;
    let n = wav.len().max(1) as f64;
    let rms = (wav
        .iter()
        .map(|x| (f64::from(*x) * int16_max).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    let change = TARGET_DBFS - 20.0 * (rms / int16_max).log10();
    if !change.is_finite() || change < 0.0 {
        return wav.to_vec();
    }
    let gain = 10f64.powf(change / 20.0) as f32;
    wav.iter().map(|x| x * gain).collect()
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// librosa's `filters.mel(sr=16000, n_fft=400, n_mels=40)`: Slaney's mel
/// scale (linear below 1 kHz, logarithmic above) and area normalisation.
fn mel_filters() -> Vec<f32> {
    let sr = f64::from(SAMPLE_RATE);
    let bins = N_FFT / 2 + 1;
    let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    let hz_to_mel = |hz: f64| {
        if hz >= min_log_hz {
            min_log_mel + (hz / min_log_hz).ln() / logstep
        } else {
            hz / f_sp
        }
    };
    let mel_to_hz = |mel: f64| {
        if mel >= min_log_mel {
            min_log_hz * (logstep * (mel - min_log_mel)).exp()
        } else {
            f_sp * mel
        }
    };
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let points: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (N_MELS + 1) as f64))
        .collect();
    let freqs: Vec<f64> = (0..bins).map(|i| i as f64 * sr / N_FFT as f64).collect();
    let mut filters = vec![0f32; N_MELS * bins];
    for m in 0..N_MELS {
        let (left, centre, right) = (points[m], points[m + 1], points[m + 2]);
        let norm = 2.0 / (right - left);
        for (k, &f) in freqs.iter().enumerate() {
            let rising = (f - left) / (centre - left);
            let falling = (right - f) / (right - centre);
            filters[m * bins + k] = (rising.min(falling).max(0.0) * norm) as f32;
        }
    }
    filters
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Speaker numbers (0, 1, … in order of first appearance) for `pieces`:
/// average-linkage clustering of the pieces at least [`ANCHOR_S`] long,
/// stopped when the closest two groups are less alike than `threshold`;
/// shorter pieces and speakers heard for under [`MIN_SPEAKER_S`] go to the
/// nearest speaker.
pub fn cluster(pieces: &[Embedded], threshold: f32) -> Vec<usize> {
    let n = pieces.len();
    if n == 0 {
        return Vec::new();
    }
    let anchors: Vec<usize> = (0..n)
        .filter(|&i| pieces[i].end_s - pieces[i].start_s >= ANCHOR_S)
        .collect();
    // With no piece long enough, every piece is an anchor.
    let anchors: Vec<usize> = if anchors.is_empty() {
        (0..n).collect()
    } else {
        anchors
    };
    let anchors: Vec<usize> = anchors
        .iter()
        .copied()
        .step_by(anchors.len().div_ceil(MAX_ANCHORS).max(1))
        .collect();
    let m = anchors.len();
    // Average linkage over a similarity matrix with each row's best
    // partner cached: a merge updates one row and the rows that pointed at
    // the merged pair.
    let mut sim = vec![0f32; m * m];
    for a in 0..m {
        for b in 0..a {
            let s = cosine(&pieces[anchors[a]].embedding, &pieces[anchors[b]].embedding);
            sim[a * m + b] = s;
            sim[b * m + a] = s;
        }
    }
    let mut size = vec![1usize; m];
    let mut alive = vec![true; m];
    let mut group: Vec<usize> = (0..m).collect();
    let best_of = |row: usize, alive: &[bool], sim: &[f32]| -> (usize, f32) {
        let mut best = (usize::MAX, f32::NEG_INFINITY);
        for k in 0..m {
            if k != row && alive[k] && sim[row * m + k] > best.1 {
                best = (k, sim[row * m + k]);
            }
        }
        best
    };
    let mut best: Vec<(usize, f32)> = (0..m).map(|r| best_of(r, &alive, &sim)).collect();
    while let Some((a, (b, s))) = (0..m)
        .filter(|&r| alive[r])
        .map(|r| (r, best[r]))
        .max_by(|x, y| x.1.1.total_cmp(&y.1.1))
    {
        if b == usize::MAX || s < threshold {
            break;
        }
        // Merge b into a.
        for k in 0..m {
            if alive[k] && k != a && k != b {
                let v = (size[a] as f32 * sim[a * m + k] + size[b] as f32 * sim[b * m + k])
                    / (size[a] + size[b]) as f32;
                sim[a * m + k] = v;
                sim[k * m + a] = v;
            }
        }
        size[a] += size[b];
        alive[b] = false;
        for g in group.iter_mut() {
            if *g == b {
                *g = a;
            }
        }
        for r in 0..m {
            if !alive[r] {
                continue;
            }
            if r == a || best[r].0 == a || best[r].0 == b {
                best[r] = best_of(r, &alive, &sim);
            } else if sim[r * m + a] > best[r].1 {
                best[r] = (a, sim[r * m + a]);
            }
        }
    }
    // Groups, their centroids and how long each is heard.
    let mut labels = vec![usize::MAX; n];
    for (k, &i) in anchors.iter().enumerate() {
        labels[i] = group[k];
    }
    let centroids = |labels: &[usize]| -> HashMap<usize, (Vec<f32>, f64)> {
        let mut c: HashMap<usize, (Vec<f32>, f64)> = HashMap::new();
        for (i, &g) in labels.iter().enumerate() {
            if g == usize::MAX {
                continue;
            }
            let e = c.entry(g).or_insert_with(|| (vec![0f32; HIDDEN], 0.0));
            for (s, x) in e.0.iter_mut().zip(&pieces[i].embedding) {
                *s += x;
            }
            e.1 += pieces[i].end_s - pieces[i].start_s;
        }
        c
    };
    let all = centroids(&labels);
    let (big, small): (HashMap<_, _>, HashMap<_, _>) =
        all.into_iter().partition(|(_, (_, s))| *s >= MIN_SPEAKER_S);
    if !big.is_empty() {
        for l in labels.iter_mut() {
            if small.contains_key(l) {
                *l = usize::MAX;
            }
        }
    }
    // The kept speakers' centroids, normalised once.
    let keep: Vec<(usize, Vec<f32>)> = centroids(&labels)
        .into_iter()
        .map(|(g, (c, _))| (g, normalised(c)))
        .collect();
    for i in 0..n {
        if labels[i] == usize::MAX {
            labels[i] = keep
                .iter()
                .map(|(g, c)| (*g, cosine(&pieces[i].embedding, c)))
                .max_by(|x, y| x.1.total_cmp(&y.1).then(y.0.cmp(&x.0)))
                .map_or(0, |(g, _)| g);
        }
    }
    // Number speakers in order of first appearance.
    let mut order: HashMap<usize, usize> = HashMap::new();
    let mut by_time: Vec<usize> = (0..n).collect();
    by_time.sort_by(|&x, &y| pieces[x].start_s.total_cmp(&pieces[y].start_s));
    for i in by_time {
        let next = order.len();
        order.entry(labels[i]).or_insert(next);
    }
    labels.iter().map(|l| order[l]).collect()
}

/// The speaker (index into `labels`) heard at `t` seconds: the piece that
/// holds it, else the nearest in time.
pub fn speaker_at(pieces: &[Embedded], labels: &[usize], t: f64) -> Option<usize> {
    pieces
        .iter()
        .zip(labels)
        .map(|(p, &l)| {
            let d = if t < p.start_s {
                p.start_s - t
            } else if t > p.end_s {
                t - p.end_s
            } else {
                0.0
            };
            (d, l)
        })
        .min_by(|x, y| x.0.total_cmp(&y.0))
        .map(|(_, l)| l)
}

/// Words shorter than this that alone say another speaker is talking are
/// taken as the speaker around them (a piece's edge, not a turn).
const LONE_WORD_S: f64 = 0.5;

/// `segments` with their speakers (`Speaker 1`, `Speaker 2`, … from
/// `labels` of `pieces`), found word by word: a segment whose words change
/// speaker is split there. Segments without words take the speaker heard at
/// their middle.
pub fn label(
    segments: Vec<TranscriptSegment>,
    pieces: &[Embedded],
    labels: &[usize],
) -> Vec<TranscriptSegment> {
    let name = |l: usize| format!("Speaker {}", l + 1);
    let mut out = Vec::with_capacity(segments.len());
    for mut seg in segments {
        let words = seg.words.take().unwrap_or_default();
        if words.is_empty() {
            seg.speaker = speaker_at(pieces, labels, (seg.start + seg.end) / 2.0).map(name);
            seg.words = Some(words);
            out.push(seg);
            continue;
        }
        let mut who: Vec<usize> = words
            .iter()
            .map(|w| speaker_at(pieces, labels, (w.start + w.end) / 2.0).unwrap_or(0))
            .collect();
        // A lone short word between (or before, or after) another
        // speaker's words keeps their speaker.
        for i in 0..who.len() {
            let prev = i.checked_sub(1).map(|p| who[p]);
            let next = who.get(i + 1).copied();
            let lone = prev != Some(who[i]) && next != Some(who[i]);
            if lone
                && words[i].end - words[i].start < LONE_WORD_S
                && let Some(s) = prev.or(next)
            {
                who[i] = s;
            }
        }
        // Runs of words with one speaker.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in 0..words.len() {
            match runs.last_mut() {
                Some(r) if who[r.0] == who[i] => r.1 = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
        // Tokens per word, to split the segment's tokens with its words: a
        // word's tokens spell it (leading spaces aside).
        let mut tokens = seg.tokens.take().map(|t| t.into_iter());
        let last = runs.len() - 1;
        for (k, &(a, b)) in runs.iter().enumerate() {
            let part: Vec<Word> = words[a..b].to_vec();
            let part_tokens = tokens.as_mut().map(|it| {
                let mut taken = Vec::new();
                for w in &part {
                    let mut spelt = String::new();
                    while spelt.trim().len() < w.word.len() {
                        let Some(t) = it.next() else { break };
                        spelt.push_str(&t.text);
                        taken.push(t);
                    }
                }
                taken
            });
            out.push(TranscriptSegment {
                start: if k == 0 { seg.start } else { part[0].start },
                end: if k == last {
                    seg.end
                } else {
                    part[part.len() - 1].end
                },
                text: part
                    .iter()
                    .map(|w| w.word.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                avg_logprob: seg.avg_logprob,
                no_speech_prob: seg.no_speech_prob,
                tokens: part_tokens,
                words: Some(part),
                speaker: Some(name(who[a])),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_follow_resemblyzer() {
        // 2 s: 201 frames, a step of 77 frames; the second partial
        // (frames 77-237) covers (32000 - 12320) / 25600 = 0.77 of itself.
        let (len, r) = partial_slices(32000);
        assert_eq!(r, vec![(0, 160), (77, 237)]);
        assert_eq!(len, 237 * HOP);
        // Shorter than a partial: one, padded.
        assert_eq!(partial_slices(8000).1, vec![(0, 160)]);
    }

    #[test]
    fn mel_filters_are_slaney_triangles() {
        let f = mel_filters();
        let bins = N_FFT / 2 + 1;
        // Each filter is a triangle: non-negative, one peak, area-normalised
        // (the widest filters have the lowest peaks).
        for m in 0..N_MELS {
            let row = &f[m * bins..(m + 1) * bins];
            assert!(row.iter().all(|x| *x >= 0.0));
            assert!(row.iter().any(|x| *x > 0.0), "filter {m} is empty");
        }
        let peak = |m: usize| {
            f[m * bins..(m + 1) * bins]
                .iter()
                .copied()
                .fold(0f32, f32::max)
        };
        assert!(peak(0) > peak(N_MELS - 1));
    }

    fn piece(start: f64, len: f64, dir: &[f32]) -> Embedded {
        Embedded {
            start_s: start,
            end_s: start + len,
            embedding: normalised(dir.to_vec()),
        }
    }

    fn direction(axis: usize, wobble: f32) -> Vec<f32> {
        let mut v = vec![0.0; HIDDEN];
        v[axis] = 1.0;
        v[(axis + 7) % HIDDEN] = wobble;
        v
    }

    #[test]
    fn clusters_split_apart_voices_and_keep_alike_ones() {
        // Two voices, alternating, each piece a little different.
        let pieces: Vec<Embedded> = (0..10)
            .map(|i| piece(i as f64 * 2.0, 1.5, &direction(i % 2, 0.1 * i as f32)))
            .collect();
        let labels = cluster(&pieces, SAME_SPEAKER);
        assert_eq!(labels, vec![0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
        // One voice throughout is one speaker.
        let one: Vec<Embedded> = (0..6)
            .map(|i| piece(i as f64 * 2.0, 1.5, &direction(3, 0.2 * i as f32)))
            .collect();
        assert_eq!(cluster(&one, SAME_SPEAKER), vec![0; 6]);
    }

    #[test]
    fn a_long_recording_clusters_a_bounded_number_of_pieces() {
        // Two voices in turns of 5 pieces, 4,000 pieces in all (over two
        // hours): more than MAX_ANCHORS, and still every piece is placed.
        let pieces: Vec<Embedded> = (0..4000)
            .map(|i| {
                piece(
                    i as f64 * 2.0,
                    1.5,
                    &direction((i / 5) % 2, 0.1 * (i % 7) as f32),
                )
            })
            .collect();
        let labels = cluster(&pieces, SAME_SPEAKER);
        assert!(labels.iter().enumerate().all(|(i, &l)| l == (i / 5) % 2));
    }

    #[test]
    fn short_pieces_and_brief_speakers_join_the_nearest_speaker() {
        let mut pieces = vec![
            piece(0.0, 3.0, &direction(0, 0.0)),
            piece(3.0, 3.0, &direction(1, 0.0)),
            // Short: not an anchor, but close to voice 1.
            piece(6.0, 0.6, &direction(1, 0.3)),
        ];
        // Heard for 1.2 s only: merged into the nearest voice.
        let mut odd = direction(0, 0.0);
        odd[50] = 1.2;
        pieces.push(piece(7.0, 1.2, &odd));
        let labels = cluster(&pieces, SAME_SPEAKER);
        assert_eq!(labels, vec![0, 1, 1, 0]);
        assert_eq!(speaker_at(&pieces, &labels, 4.0), Some(1));
        assert_eq!(speaker_at(&pieces, &labels, 9.5), Some(0));
    }

    fn word(w: &str, start: f64, end: f64) -> Word {
        Word {
            word: w.into(),
            start,
            end,
            probability: 0.9,
        }
    }

    #[test]
    fn a_segment_is_split_where_its_words_change_speaker() {
        let pieces = vec![
            piece(0.0, 2.0, &direction(0, 0.0)),
            piece(2.0, 2.0, &direction(1, 0.0)),
        ];
        let labels = vec![0, 1];
        let tokens = [" hello", " there", " how", " are", " y", "ou"]
            .iter()
            .map(|t| triage_core::TokenProb {
                text: (*t).into(),
                p: 0.5,
            })
            .collect();
        let seg = TranscriptSegment {
            start: 0.0,
            end: 4.0,
            text: "hello there how are you".into(),
            avg_logprob: -0.2,
            no_speech_prob: 0.01,
            tokens: Some(tokens),
            words: Some(vec![
                word("hello", 0.1, 0.6),
                word("there", 0.7, 1.2),
                word("how", 2.1, 2.3),
                word("are", 2.4, 2.9),
                word("you", 3.0, 3.5),
            ]),
            speaker: None,
        };
        let out = label(vec![seg], &pieces, &labels);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].text, "hello there");
        assert_eq!(out[0].speaker.as_deref(), Some("Speaker 1"));
        assert_eq!((out[0].start, out[0].end), (0.0, 1.2));
        assert_eq!(out[1].text, "how are you");
        assert_eq!(out[1].speaker.as_deref(), Some("Speaker 2"));
        assert_eq!((out[1].start, out[1].end), (2.1, 4.0));
        let toks: Vec<&str> = out[1]
            .tokens
            .as_ref()
            .unwrap()
            .iter()
            .map(|t| t.text.as_str())
            .collect();
        assert_eq!(toks, vec![" how", " are", " y", "ou"]);
        // A lone short word of the other speaker inside a run is not a turn.
        let seg = TranscriptSegment {
            start: 0.0,
            end: 2.0,
            text: "a b c".into(),
            avg_logprob: 0.0,
            no_speech_prob: 0.0,
            tokens: None,
            words: Some(vec![
                word("a", 0.0, 0.9),
                word("b", 1.9, 2.05),
                word("c", 2.1, 2.2),
            ]),
            speaker: None,
        };
        let pieces = vec![
            piece(0.0, 2.0, &direction(0, 0.0)),
            piece(2.0, 0.1, &direction(1, 0.0)),
        ];
        let out = label(vec![seg], &pieces, &labels);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].text, "a b c");
        assert_eq!(out[0].speaker.as_deref(), Some("Speaker 1"));
    }
}
