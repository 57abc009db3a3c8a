//! Reading checkpoints written by Hugging Face `transformers`
//! (`model.safetensors` or `pytorch_model.bin`) and presenting them to
//! candle-transformers' `BertModel` under BERT's tensor names.
//!
//! DistilBERT is a BERT without token-type embeddings and with other tensor
//! names; its layers compute exactly what BERT's do (post-norm attention and
//! feed-forward blocks). candle's own DistilBERT module uses the tanh
//! approximation of GELU where `transformers` uses the exact one, so we run
//! DistilBERT checkpoints through `BertModel` (exact GELU) with renamed tensors
//! and a zero token-type embedding: one encoder path, reference-exact outputs.

use crate::error::{LocalError, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The encoder family of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Bert,
    DistilBert,
}

/// All tensors of a checkpoint, in memory, keyed by their names in the file.
pub struct Checkpoint {
    tensors: HashMap<String, Tensor>,
    pub path: PathBuf,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Load `model.safetensors`, else `pytorch_model.bin`, from `dir`, converting to `dtype`.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let st = dir.join("model.safetensors");
        if st.is_file() {
            return Self::load_file(&st, dtype, device);
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Self::load_file(&bin, dtype, device);
        }
        Err(LocalError::MissingFile {
            dir: dir.to_path_buf(),
            what: "model.safetensors or pytorch_model.bin".into(),
        })
    }

    pub fn load_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let wrap = |source| LocalError::Weights {
            path: path.to_path_buf(),
            source,
        };
        let raw: Vec<(String, Tensor)> = if path.extension().is_some_and(|e| e == "safetensors") {
            // Read into memory rather than mmap: a file replaced while mapped is UB.
            let bytes = std::fs::read(path).map_err(|source| LocalError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(wrap)?
                .into_iter()
                .collect()
        } else {
            candle_core::pickle::read_all(path).map_err(wrap)?
        };
        if raw.is_empty() {
            return Err(wrap(candle_core::Error::Msg(
                "the file holds no tensors".into(),
            )));
        }
        let mut tensors = HashMap::with_capacity(raw.len());
        for (name, t) in raw {
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype).map_err(wrap)?
            } else {
                t
            };
            tensors.insert(name, t.to_device(device).map_err(wrap)?);
        }
        Ok(Self {
            tensors,
            path: path.to_path_buf(),
        })
    }

    /// Replace or add tensors from `other` (a delta over this checkpoint).
    pub fn overlay(&mut self, other: Checkpoint) {
        self.tensors.extend(other.tensors);
    }

    /// Every tensor with its name.
    pub fn tensors(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The prefix under which the encoder's tensors live (`bert.`, `distilbert.` or none).
    pub fn encoder_prefix(&self, family: Family) -> &'static str {
        let (prefixed, probe) = match family {
            Family::Bert => ("bert.", "embeddings.word_embeddings.weight"),
            Family::DistilBert => ("distilbert.", "embeddings.word_embeddings.weight"),
        };
        if self.contains(&format!("{prefixed}{probe}")) {
            prefixed
        } else {
            ""
        }
    }
}

/// A candle backend that serves a checkpoint's tensors under BERT names.
#[derive(Debug)]
pub struct BertView {
    checkpoint: std::sync::Arc<Checkpoint>,
    family: Family,
    prefix: &'static str,
    hidden: usize,
}

impl BertView {
    pub fn new(checkpoint: std::sync::Arc<Checkpoint>, family: Family, hidden: usize) -> Self {
        let prefix = checkpoint.encoder_prefix(family);
        Self {
            checkpoint,
            family,
            prefix,
            hidden,
        }
    }

    /// The checkpoint name that holds BERT tensor `name`, or `None` for the
    /// token-type embedding that DistilBERT does not have.
    fn source_name(&self, name: &str) -> Option<String> {
        match self.family {
            Family::Bert => Some(format!("{}{name}", self.prefix)),
            Family::DistilBert => distilbert_name(name).map(|n| format!("{}{n}", self.prefix)),
        }
    }
}

/// The DistilBERT checkpoint name of a BERT tensor name (`None` for a
/// tensor DistilBERT does not have).
pub fn distilbert_name(bert: &str) -> Option<String> {
    if bert.starts_with("embeddings.token_type_embeddings") {
        return None;
    }
    if let Some(rest) = bert.strip_prefix("encoder.layer.") {
        let (idx, tail) = rest.split_once('.')?;
        let mapped = [
            ("attention.self.query.", "attention.q_lin."),
            ("attention.self.key.", "attention.k_lin."),
            ("attention.self.value.", "attention.v_lin."),
            ("attention.output.dense.", "attention.out_lin."),
            ("attention.output.LayerNorm.", "sa_layer_norm."),
            ("intermediate.dense.", "ffn.lin1."),
            ("output.dense.", "ffn.lin2."),
            ("output.LayerNorm.", "output_layer_norm."),
        ]
        .iter()
        .find_map(|(from, to)| tail.strip_prefix(from).map(|p| format!("{to}{p}")))
        .unwrap_or_else(|| tail.to_owned());
        return Some(format!("transformer.layer.{idx}.{mapped}"));
    }
    Some(bert.to_owned())
}

impl SimpleBackend for BertView {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "tensor {name} in {} has shape {:?}, expected {:?}",
                self.checkpoint.path.display(),
                t.shape(),
                s
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.source_name(name) {
            None => Tensor::zeros((1, self.hidden), dtype, dev),
            Some(src) => match self.checkpoint.get(&src) {
                Some(t) => t.to_dtype(dtype)?.to_device(dev),
                None => candle_core::bail!(
                    "tensor {src} is missing from {}",
                    self.checkpoint.path.display()
                ),
            },
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.source_name(name) {
            None => true,
            Some(src) => self.checkpoint.contains(&src),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distilbert_names_map_onto_bert_names() {
        assert_eq!(
            distilbert_name("encoder.layer.3.attention.self.query.weight").as_deref(),
            Some("transformer.layer.3.attention.q_lin.weight")
        );
        assert_eq!(
            distilbert_name("encoder.layer.0.output.LayerNorm.bias").as_deref(),
            Some("transformer.layer.0.output_layer_norm.bias")
        );
        assert_eq!(
            distilbert_name("encoder.layer.1.attention.output.LayerNorm.weight").as_deref(),
            Some("transformer.layer.1.sa_layer_norm.weight")
        );
        assert_eq!(
            distilbert_name("embeddings.LayerNorm.weight").as_deref(),
            Some("embeddings.LayerNorm.weight")
        );
        assert_eq!(
            distilbert_name("embeddings.token_type_embeddings.weight"),
            None
        );
    }
}
