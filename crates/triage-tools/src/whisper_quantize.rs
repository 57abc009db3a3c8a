//! Quantise a whisper.cpp (ggml) Whisper model to `q8_0` or `q5_1`, as
//! whisper.cpp's own `quantize` tool does, offline.
//!
//! The block formats are written here in Rust rather than by calling ggml's
//! `ggml_quantize_chunk` through whisper-rs-sys: the two formats are a few
//! lines each, safe code needs no `unsafe` FFI module and no promise about
//! ggml's internal thread-safety, and every length read from the file is
//! checked before anything is allocated. The arithmetic follows ggml's
//! reference quantisers (`quantize_row_q8_0_ref`, `quantize_row_q5_1_ref`)
//! step for step — f32 maths, the same rounding, f16 scales rounded to
//! nearest even — so the bytes are the ones ggml writes.
//!
//! The file layout (whisper.cpp's legacy ggml format, little-endian):
//! magic `ggml`, eleven `i32` hyper-parameters (the last is the file type),
//! the mel filterbank (`n_mel`, `n_fft`, then `n_mel * n_fft` f32), the
//! vocabulary (`n_vocab`, then a `u32` length and the bytes of each token),
//! then tensors until the end of the file: `n_dims`, name length and type
//! (`i32` each), `n_dims` extents, the name, the data. whisper.cpp's loader
//! creates the 2-D `.weight` matrices (attention, MLP, token embedding) in
//! the file's type and keeps the convolutions in f16 and the rest in f32;
//! the quantiser converts exactly those 2-D weights, so the file loads.

use serde::Serialize;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const GGML_MAGIC: u32 = 0x6767_6d6c;
/// ggml tensor type codes.
const TYPE_F32: i32 = 0;
const TYPE_F16: i32 = 1;
/// ggml's quantisation format version, stored in the file type as
/// `version * 1000 + ftype` (whisper.cpp reads `ftype % 1000`).
const QNT_VERSION: i32 = 2;
const QNT_VERSION_FACTOR: i32 = 1000;
/// Values per block in both formats.
const BLOCK: usize = 32;
/// Longest tensor name and vocabulary token accepted: far above Whisper's
/// (the longest tensor name is 41 bytes), small enough that a corrupt
/// length is refused before it is allocated.
const MAX_NAME: usize = 1024;
const MAX_TOKEN: usize = 1 << 16;

/// The quantised formats this tool writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    /// 8-bit, one f16 scale per 32 values: 8.5 bits a weight.
    Q8_0,
    /// 5-bit, an f16 scale and minimum per 32 values: 6 bits a weight.
    Q5_1,
}

impl QuantType {
    /// ggml's tensor type code.
    fn tensor_type(self) -> i32 {
        match self {
            Self::Q8_0 => 8,
            Self::Q5_1 => 7,
        }
    }

    /// ggml's file type code (`GGML_FTYPE_MOSTLY_*`).
    fn file_type(self) -> i32 {
        match self {
            Self::Q8_0 => 7,
            Self::Q5_1 => 9,
        }
    }

    /// Bytes of one block of [`BLOCK`] values.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 2 + BLOCK,
            Self::Q5_1 => 2 + 2 + 4 + BLOCK / 2,
        }
    }

    /// The name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q5_1 => "q5_1",
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantType {
    type Err = QuantizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Self::Q8_0),
            "q5_1" => Ok(Self::Q5_1),
            _ => Err(QuantizeError::UnknownType(s.to_owned())),
        }
    }
}

/// Why a model could not be quantised.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error("unknown quantisation type `{0}` (use q8_0 or q5_1)")]
    UnknownType(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a ggml Whisper model (its first bytes are not the ggml magic)")]
    NotGgml { path: PathBuf },
    #[error("{path} is truncated: it ends inside {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path} is not a valid ggml Whisper model: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "{path} is already quantised (file type {ftype}); quantise the f16 or f32 model instead"
    )]
    AlreadyQuantized { path: PathBuf, ftype: i32 },
    #[error("the output {0} is the input file; choose another --out")]
    OutIsInput(PathBuf),
}

/// What a quantisation wrote.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub input: PathBuf,
    pub output: PathBuf,
    #[serde(rename = "type")]
    pub quant_type: QuantType,
    /// Tensors in the file, and how many were quantised.
    pub tensors: usize,
    pub quantized: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The file name `triage models quantize` writes when no `--out` is given:
/// `ggml-model-f16.bin` becomes `ggml-model-q8_0.bin`.
pub fn default_output(input: &Path, ty: QuantType) -> PathBuf {
    let stem = input
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("ggml-model");
    let base = stem
        .strip_suffix("-f16")
        .or_else(|| stem.strip_suffix("-f32"))
        .unwrap_or(stem);
    input.with_file_name(format!("{base}-{ty}.bin"))
}

/// Quantise the ggml Whisper model `input` into `output` (written to a
/// temporary file beside it and renamed, so a failure leaves no partial
/// model). Reads and converts one tensor at a time.
pub fn quantize_ggml(
    input: &Path,
    output: &Path,
    ty: QuantType,
) -> Result<QuantizeReport, QuantizeError> {
    let read_err = |source| QuantizeError::Read {
        path: input.to_owned(),
        source,
    };
    let file = std::fs::File::open(input).map_err(read_err)?;
    let bytes_in = file.metadata().map_err(read_err)?.len();
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize())
        && a == b
    {
        return Err(QuantizeError::OutIsInput(output.to_owned()));
    }
    let tmp = output.with_extension("bin.partial");
    let write_err = |source| QuantizeError::Write {
        path: output.to_owned(),
        source,
    };
    let out_file = std::fs::File::create(&tmp).map_err(write_err)?;
    let mut reader = Reader {
        inner: BufReader::new(file),
        path: input,
        offset: 0,
        len: bytes_in,
    };
    let mut writer = BufWriter::new(out_file);
    let result = convert(&mut reader, &mut writer, ty).and_then(|counts| {
        writer
            .into_inner()
            .map_err(|e| write_err(e.into_error()))?
            .sync_all()
            .map_err(write_err)?;
        Ok(counts)
    });
    let (tensors, quantized) = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, output).map_err(write_err)?;
    let bytes_out = std::fs::metadata(output).map_err(write_err)?.len();
    Ok(QuantizeReport {
        input: input.to_owned(),
        output: output.to_owned(),
        quant_type: ty,
        tensors,
        quantized,
        bytes_in,
        bytes_out,
    })
}

/// The input with its position, so every error says where the file ended.
struct Reader<'a, R> {
    inner: R,
    path: &'a Path,
    offset: u64,
    len: u64,
}

impl<R: Read> Reader<'_, R> {
    fn bytes(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<Vec<u8>, QuantizeError> {
        // Refuse a length the file cannot hold before allocating it.
        if self.offset.saturating_add(n as u64) > self.len {
            return Err(self.truncated(what()));
        }
        let mut buf = vec![0u8; n];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.truncated(what())
            } else {
                QuantizeError::Read {
                    path: self.path.to_owned(),
                    source: e,
                }
            }
        })?;
        self.offset += n as u64;
        Ok(buf)
    }

    fn i32(&mut self, what: &dyn Fn() -> String) -> Result<i32, QuantizeError> {
        let b = self.bytes(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn at_end(&self) -> bool {
        self.offset >= self.len
    }

    fn truncated(&self, what: String) -> QuantizeError {
        QuantizeError::Truncated {
            path: self.path.to_owned(),
            what,
        }
    }

    fn corrupt(&self, why: String) -> QuantizeError {
        QuantizeError::Corrupt {
            path: self.path.to_owned(),
            why,
        }
    }
}

/// A non-negative count from the file, as a size.
fn count<R: Read>(r: &Reader<'_, R>, v: i32, what: &str) -> Result<usize, QuantizeError> {
    usize::try_from(v).map_err(|_| r.corrupt(format!("{what} is negative ({v})")))
}

/// Copy the header, vocabulary and tensors, quantising the 2-D weights;
/// returns (tensors, quantised tensors).
fn convert<R: Read, W: Write>(
    r: &mut Reader<'_, R>,
    w: &mut W,
    ty: QuantType,
) -> Result<(usize, usize), QuantizeError> {
    let path = r.path.to_owned();
    let mut put = |bytes: &[u8]| {
        w.write_all(bytes).map_err(|source| QuantizeError::Write {
            path: path.clone(),
            source,
        })
    };
    if r.len < 4 {
        return Err(QuantizeError::NotGgml {
            path: r.path.to_owned(),
        });
    }
    let magic = r.bytes(4, &|| "the magic".into())?;
    if u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]) != GGML_MAGIC {
        return Err(QuantizeError::NotGgml {
            path: r.path.to_owned(),
        });
    }
    put(&magic)?;
    let mut hparams = [0i32; 11];
    for (i, h) in hparams.iter_mut().enumerate() {
        *h = r.i32(&|| format!("hyper-parameter {i}"))?;
    }
    let ftype = hparams[10] % QNT_VERSION_FACTOR;
    if ftype != 0 && ftype != 1 {
        return Err(QuantizeError::AlreadyQuantized {
            path: r.path.to_owned(),
            ftype: hparams[10],
        });
    }
    hparams[10] = QNT_VERSION * QNT_VERSION_FACTOR + ty.file_type();
    for h in hparams {
        put(&h.to_le_bytes())?;
    }

    // Mel filterbank: copied.
    let n_mel = r.i32(&|| "the mel filterbank's size".into())?;
    let n_fft = r.i32(&|| "the mel filterbank's size".into())?;
    let mel_bytes = count(r, n_mel, "n_mel")?
        .checked_mul(count(r, n_fft, "n_fft")?)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| r.corrupt("the mel filterbank's size overflows".into()))?;
    let mel = r.bytes(mel_bytes, &|| "the mel filterbank".into())?;
    put(&n_mel.to_le_bytes())?;
    put(&n_fft.to_le_bytes())?;
    put(&mel)?;

    // Vocabulary: copied token by token.
    let n_vocab = r.i32(&|| "the vocabulary size".into())?;
    put(&n_vocab.to_le_bytes())?;
    for i in 0..count(r, n_vocab, "n_vocab")? {
        let len = r.bytes(4, &|| format!("vocabulary token {i}"))?;
        let n = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if n > MAX_TOKEN {
            return Err(r.corrupt(format!("vocabulary token {i} is {n} bytes long")));
        }
        let token = r.bytes(n, &|| format!("vocabulary token {i}"))?;
        put(&len)?;
        put(&token)?;
    }

    // Tensors until the end of the file.
    let (mut tensors, mut quantized) = (0usize, 0usize);
    while !r.at_end() {
        let n_dims = r.i32(&|| format!("the header of tensor {tensors}"))?;
        let name_len = r.i32(&|| format!("the header of tensor {tensors}"))?;
        let ttype = r.i32(&|| format!("the header of tensor {tensors}"))?;
        if !(1..=4).contains(&n_dims) {
            return Err(r.corrupt(format!("tensor {tensors} has {n_dims} dimensions")));
        }
        let name_len = count(r, name_len, "a tensor name's length")?;
        if name_len == 0 || name_len > MAX_NAME {
            return Err(r.corrupt(format!("tensor {tensors}'s name is {name_len} bytes long")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let e = r.i32(&|| format!("the shape of tensor {tensors}"))?;
            if e <= 0 {
                return Err(r.corrupt(format!("tensor {tensors} has an extent of {e}")));
            }
            ne.push(e as usize);
        }
        let name_bytes = r.bytes(name_len, &|| format!("the name of tensor {tensors}"))?;
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        let elements = ne
            .iter()
            .try_fold(1usize, |a, &e| a.checked_mul(e))
            .ok_or_else(|| r.corrupt(format!("tensor `{name}`'s size overflows")))?;
        let elem_bytes = match ttype {
            TYPE_F32 => 4,
            TYPE_F16 => 2,
            other => {
                return Err(r.corrupt(format!(
                    "tensor `{name}` has type {other}; only f32 and f16 tensors can be quantised"
                )));
            }
        };
        let data_len = elements
            .checked_mul(elem_bytes)
            .ok_or_else(|| r.corrupt(format!("tensor `{name}`'s size overflows")))?;
        let data = r.bytes(data_len, &|| format!("the data of tensor `{name}`"))?;
        tensors += 1;

        // whisper.cpp creates the 2-D `.weight` matrices in the file's type
        // (its `wtype`), convolutions in f16 and everything else in f32.
        let is_matrix = n_dims == 2 && name.ends_with(".weight");
        let is_conv = n_dims == 3;
        let (out_type, out_data) = if is_matrix {
            if ne[0] % BLOCK != 0 {
                return Err(r.corrupt(format!(
                    "tensor `{name}` has rows of {} values, not a multiple of {BLOCK}",
                    ne[0]
                )));
            }
            let values = to_f32(&data, ttype);
            quantized += 1;
            (ty.tensor_type(), quantize(&values, ty))
        } else if is_conv && ttype == TYPE_F32 {
            let values = to_f32(&data, ttype);
            let f16: Vec<u8> = values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            (TYPE_F16, f16)
        } else {
            (ttype, data)
        };
        put(&n_dims.to_le_bytes())?;
        put(&(name_len as i32).to_le_bytes())?;
        put(&out_type.to_le_bytes())?;
        for e in &ne {
            put(&(*e as i32).to_le_bytes())?;
        }
        put(&name_bytes)?;
        put(&out_data)?;
    }
    // The format has no tensor count; a file cut between two tensors is
    // found by the count whisper.cpp's loader expects for these layers.
    let expected = whisper_tensors(hparams[4], hparams[8]);
    if tensors < expected {
        return Err(r.truncated(format!(
            "the tensors ({tensors} of the {expected} a model of this size has)"
        )));
    }
    Ok((tensors, quantized))
}

/// Tensors in a Whisper model with these layer counts: the encoder's two
/// convolutions (weight and bias), positional embedding and final norm,
/// 15 per encoder layer (attention q/k/v/out with biases but none on k,
/// MLP, two norms), the decoder's embeddings and final norm, and 24 per
/// decoder layer (the encoder layer's plus cross-attention and its norm).
fn whisper_tensors(audio_layers: i32, text_layers: i32) -> usize {
    let (a, t) = (audio_layers.max(0) as usize, text_layers.max(0) as usize);
    5 + 2 + 15 * a + 2 + 2 + 24 * t
}

fn to_f32(data: &[u8], ttype: i32) -> Vec<f32> {
    if ttype == TYPE_F16 {
        data.chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    } else {
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// Quantise values (a multiple of [`BLOCK`] long) into `ty`'s blocks.
pub fn quantize(values: &[f32], ty: QuantType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK * ty.block_bytes());
    for block in values.chunks_exact(BLOCK) {
        match ty {
            QuantType::Q8_0 => q8_0_block(block, &mut out),
            QuantType::Q5_1 => q5_1_block(block, &mut out),
        }
    }
    out
}

/// One q8_0 block: scale `d = max|x| / 127` (f16), then `round(x / d)` as i8.
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
    // `round` rounds half away from zero, like C's `roundf`.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// One q5_1 block: scale `d = (max - min) / 31` and minimum (f16 each), the
/// fifth bits of the 32 codes as one `u32`, then their low nibbles, value
/// `j` and value `j + 16` sharing a byte.
fn q5_1_block(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = x.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), v| {
        (lo.min(*v), hi.max(*v))
    });
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&half::f16::from_f32(min).to_le_bytes());
    let half_block = BLOCK / 2;
    // Truncating `x + 0.5` (not rounding) is what ggml's reference does.
    let code = |v: f32| (((v - min) * id + 0.5) as u8).min(31);
    let mut qh = 0u32;
    let mut qs = [0u8; BLOCK / 2];
    for j in 0..half_block {
        let c0 = code(x[j]);
        let c1 = code(x[j + half_block]);
        qs[j] = (c0 & 0x0f) | ((c1 & 0x0f) << 4);
        qh |= u32::from((c0 & 0x10) >> 4) << j;
        qh |= u32::from((c1 & 0x10) >> 4) << (j + half_block);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

/// Values back from `ty`'s blocks (for checking the round trip).
pub fn dequantize(bytes: &[u8], ty: QuantType) -> Vec<f32> {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::with_capacity(bytes.len() / ty.block_bytes() * BLOCK);
    for b in bytes.chunks_exact(ty.block_bytes()) {
        match ty {
            QuantType::Q8_0 => {
                let d = f16(&b[0..2]);
                out.extend(b[2..].iter().map(|q| f32::from(*q as i8) * d));
            }
            QuantType::Q5_1 => {
                let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..];
                let mut block = [0f32; BLOCK];
                for j in 0..BLOCK / 2 {
                    let lo = qs[j] & 0x0f;
                    let hi = qs[j] >> 4;
                    let b0 = ((qh >> j) & 1) as u8;
                    let b1 = ((qh >> (j + BLOCK / 2)) & 1) as u8;
                    block[j] = f32::from(lo | (b0 << 4)) * d + m;
                    block[j + BLOCK / 2] = f32::from(hi | (b1 << 4)) * d + m;
                }
                out.extend_from_slice(&block);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37).sin() * 0.2).collect()
    }

    #[test]
    fn blocks_have_ggmls_sizes() {
        assert_eq!(quantize(&ramp(64), QuantType::Q8_0).len(), 2 * 34);
        assert_eq!(quantize(&ramp(64), QuantType::Q5_1).len(), 2 * 24);
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x = ramp(32 * 8);
        for ty in [QuantType::Q8_0, QuantType::Q5_1] {
            let back = dequantize(&quantize(&x, ty), ty);
            for (block, got) in x.chunks(BLOCK).zip(back.chunks(BLOCK)) {
                let (lo, hi) = block
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                let step = match ty {
                    QuantType::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
                    QuantType::Q5_1 => (hi - lo) / 31.0,
                };
                for (a, b) in block.iter().zip(got) {
                    // Half a step, plus the f16 rounding of scale and minimum.
                    assert!(
                        (a - b).abs() <= step * 0.5 + 2e-3 * a.abs().max(step),
                        "{ty}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_constant_block_survives_and_zero_is_zero() {
        let zeros = vec![0f32; 32];
        assert!(
            dequantize(&quantize(&zeros, QuantType::Q8_0), QuantType::Q8_0)
                .iter()
                .all(|v| *v == 0.0)
        );
        let c = vec![0.5f32; 32];
        let back = dequantize(&quantize(&c, QuantType::Q5_1), QuantType::Q5_1);
        assert!(back.iter().all(|v| (*v - 0.5).abs() < 1e-3), "{back:?}");
    }

    #[test]
    fn names_and_default_output() {
        assert_eq!("Q8_0".parse::<QuantType>().ok(), Some(QuantType::Q8_0));
        assert!(matches!(
            "q4_k".parse::<QuantType>(),
            Err(QuantizeError::UnknownType(_))
        ));
        assert_eq!(
            default_output(Path::new("/m/ggml-model-f16.bin"), QuantType::Q5_1),
            Path::new("/m/ggml-model-q5_1.bin")
        );
    }
}
