//! Training data: JSONL read, checked and tokenized before any training starts.

use crate::TrainError;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use triage_local::tokenize::{TextTokenizer, first_subtokens, join_words};

/// One tokenized example.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Sequence task: the label index.
    pub label: Option<usize>,
    /// Token task: for each token, the label of the word it starts (None elsewhere).
    pub token_labels: Vec<Option<usize>>,
    /// Token task: for each word, the token that starts it (None when truncated away).
    pub word_tokens: Vec<Option<usize>>,
    /// Token task: the gold IOB2 tags of the words.
    pub gold_tags: Vec<String>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

fn data_err(path: &Path, line: usize, why: impl Into<String>) -> TrainError {
    TrainError::Data {
        path: path.to_path_buf(),
        line,
        why: why.into(),
    }
}

fn read_lines(path: &Path) -> Result<Vec<(usize, Value)>, TrainError> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| data_err(path, line, "not valid UTF-8"))?;
        let v: Value = serde_json::from_str(s)
            .map_err(|e| data_err(path, line, format!("malformed JSON: {e}")))?;
        out.push((line, v));
    }
    if out.is_empty() {
        return Err(data_err(path, 0, "the file has no examples"));
    }
    Ok(out)
}

/// A sequence-classification data line's label, as a string key.
fn seq_label(v: &Value) -> Option<String> {
    match v.get("label")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => n.as_i64().map(|i| i.to_string()),
        Value::Bool(b) => Some(u8::from(*b).to_string()),
        _ => None,
    }
}

/// Labels seen in the training file: integers in numeric order, else sorted
/// strings. With integer labels, `names` renames them (`0 → names[0]`, ...).
pub fn sequence_labels(
    path: &Path,
    names: Option<&[String]>,
) -> Result<(Vec<String>, Vec<String>), TrainError> {
    let lines = read_lines(path)?;
    let mut keys = BTreeSet::new();
    for (line, v) in &lines {
        v.get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| data_err(path, *line, "no string field `text`"))?;
        keys.insert(
            seq_label(v)
                .ok_or_else(|| data_err(path, *line, "no integer or string field `label`"))?,
        );
    }
    let mut keys: Vec<String> = keys.into_iter().collect();
    let all_int = keys.iter().all(|k| k.parse::<i64>().is_ok());
    if all_int {
        keys.sort_by_key(|k| k.parse::<i64>().unwrap_or(0));
    }
    if keys.len() < 2 {
        return Err(data_err(
            path,
            0,
            "training data needs at least two different labels",
        ));
    }
    let display = match names {
        Some(names) if all_int => {
            if names.len() != keys.len() {
                return Err(data_err(
                    path,
                    0,
                    format!(
                        "--label-names gives {} names for {} labels",
                        names.len(),
                        keys.len()
                    ),
                ));
            }
            names.to_vec()
        }
        Some(_) => {
            return Err(data_err(
                path,
                0,
                "--label-names applies to integer labels only",
            ));
        }
        None => keys.clone(),
    };
    Ok((keys, display))
}

pub fn load_sequence(
    path: &Path,
    keys: &[String],
    tok: &TextTokenizer,
) -> Result<Vec<Example>, TrainError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, v)| {
            let text = v
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| data_err(path, line, "no string field `text`"))?;
            let key = seq_label(&v)
                .ok_or_else(|| data_err(path, line, "no integer or string field `label`"))?;
            let label = keys.iter().position(|k| *k == key).ok_or_else(|| {
                data_err(
                    path,
                    line,
                    format!(
                        "label `{key}` does not occur in the training data (known: {})",
                        keys.join(", ")
                    ),
                )
            })?;
            let enc = tok.encode(text, false).map_err(TrainError::Local)?;
            let w = &enc.windows[0];
            Ok(Example {
                ids: w.ids.clone(),
                type_ids: w.type_ids.clone(),
                label: Some(label),
                token_labels: Vec::new(),
                word_tokens: Vec::new(),
                gold_tags: Vec::new(),
            })
        })
        .collect()
}

fn strings(v: &Value, key: &str) -> Option<Vec<String>> {
    v.get(key)?
        .as_array()?
        .iter()
        .map(|t| t.as_str().map(str::to_owned))
        .collect()
}

/// Tags seen in the training file, `O` first, then sorted; every tag must be IOB2-shaped.
pub fn token_labels(path: &Path) -> Result<Vec<String>, TrainError> {
    let mut tags = BTreeSet::new();
    for (line, v) in read_lines(path)? {
        let (tokens, tg) = token_fields(path, line, &v)?;
        let _ = tokens;
        for t in tg {
            if t != "O" && !(t.starts_with("B-") || t.starts_with("I-")) {
                return Err(data_err(
                    path,
                    line,
                    format!("tag `{t}` is not O, B-X or I-X"),
                ));
            }
            tags.insert(t);
        }
    }
    tags.remove("O");
    let mut out = vec!["O".to_owned()];
    out.extend(tags);
    if out.len() < 2 {
        return Err(data_err(path, 0, "training data has no entity tags"));
    }
    Ok(out)
}

fn token_fields(
    path: &Path,
    line: usize,
    v: &Value,
) -> Result<(Vec<String>, Vec<String>), TrainError> {
    let tokens =
        strings(v, "tokens").ok_or_else(|| data_err(path, line, "no string array `tokens`"))?;
    let tags = strings(v, "tags").ok_or_else(|| data_err(path, line, "no string array `tags`"))?;
    if tokens.len() != tags.len() {
        return Err(data_err(
            path,
            line,
            format!("{} tokens but {} tags", tokens.len(), tags.len()),
        ));
    }
    Ok((tokens, tags))
}

pub fn load_tokens(
    path: &Path,
    labels: &[String],
    tok: &TextTokenizer,
) -> Result<Vec<Example>, TrainError> {
    read_lines(path)?
        .into_iter()
        .map(|(line, v)| {
            let (words, tags) = token_fields(path, line, &v)?;
            let (text, spans) = join_words(&words);
            let enc = tok.encode(&text, false).map_err(TrainError::Local)?;
            let w = &enc.windows[0];
            let word_tokens = first_subtokens(w, &spans);
            let mut token_labels = vec![None; w.len()];
            for (wi, t) in word_tokens.iter().enumerate() {
                if let Some(t) = t {
                    let idx = labels.iter().position(|l| *l == tags[wi]).ok_or_else(|| {
                        data_err(
                            path,
                            line,
                            format!("tag `{}` does not occur in the training data", tags[wi]),
                        )
                    })?;
                    token_labels[*t] = Some(idx);
                }
            }
            Ok(Example {
                ids: w.ids.clone(),
                type_ids: w.type_ids.clone(),
                label: None,
                token_labels,
                word_tokens,
                gold_tags: tags,
            })
        })
        .collect()
}
