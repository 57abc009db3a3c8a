//! Tokenization with the model's own `tokenizer.json`: truncation at the
//! model's window, optional overlapping windows for long inputs, and
//! character (not byte) offsets so spans index the caller's string the way
//! Python's `str` does.

use crate::error::{LocalError, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// One window of an encoded text.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub special: Vec<bool>,
    /// Character offsets into the original text.
    pub offsets: Vec<(usize, usize)>,
    pub tokens: Vec<String>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Tokens `range` of `self`, between the given special-token prefix and suffix.
    fn window(&self, head: usize, range: std::ops::Range<usize>, tail: usize) -> Self {
        let n = self.len();
        let pick = |i: &usize| *i < head || range.contains(i) || *i >= n - tail;
        let idx: Vec<usize> = (0..n).filter(pick).collect();
        Self {
            ids: idx.iter().map(|&i| self.ids[i]).collect(),
            type_ids: idx.iter().map(|&i| self.type_ids[i]).collect(),
            special: idx.iter().map(|&i| self.special[i]).collect(),
            offsets: idx.iter().map(|&i| self.offsets[i]).collect(),
            tokens: idx.iter().map(|&i| self.tokens[i].clone()).collect(),
        }
    }
}

/// An encoded text: its first window, and further overlapping windows when asked for.
#[derive(Debug, Clone)]
pub struct EncodedText {
    pub windows: Vec<Encoded>,
    /// True when the text did not fit in one window.
    pub truncated: bool,
    /// Tokens of the whole text (special tokens included), whatever the windows kept.
    pub input_tokens: usize,
}

impl EncodedText {
    /// Total tokens over all windows: what the batcher budgets with.
    pub fn token_count(&self) -> usize {
        self.windows.iter().map(Encoded::len).sum()
    }

    /// Tokens the batcher pays for: every window padded to the longest.
    pub fn padded_tokens(&self) -> usize {
        self.windows.len() * self.longest()
    }

    /// The longest window's length.
    pub fn longest(&self) -> usize {
        self.windows.iter().map(Encoded::len).max().unwrap_or(0)
    }
}

/// A tokenizer bound to a model's window length.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub max_length: usize,
    /// Tokens shared by consecutive windows of a long text.
    pub stride: usize,
    pub unk_id: Option<u32>,
}

impl TextTokenizer {
    /// Load `tokenizer.json`; windows of `max_length` tokens overlap by a quarter.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        let bad = |source: tokenizers::Error| LocalError::Tokenizer {
            path: path.to_path_buf(),
            source,
        };
        let mut inner = Tokenizer::from_file(path).map_err(bad)?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(bad)?;
        let unk_id = inner.token_to_id("[UNK]");
        Ok(Self {
            inner,
            max_length,
            stride: max_length / 4,
            unk_id,
        })
    }

    /// Encode `text`: the first window (exactly what truncation at
    /// `max_length` gives), plus the overlapping windows that cover the rest
    /// when `all_windows` is set. Every window keeps the special tokens the
    /// tokenizer puts around a single sequence.
    pub fn encode(&self, text: &str, all_windows: bool) -> Result<EncodedText> {
        let enc = self
            .inner
            .encode_char_offsets(text, true)
            .map_err(LocalError::Tokenize)?;
        let full = Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
            special: enc
                .get_special_tokens_mask()
                .iter()
                .map(|&m| m == 1)
                .collect(),
            offsets: enc.get_offsets().to_vec(),
            tokens: enc.get_tokens().to_vec(),
        };
        let n = full.len();
        if n <= self.max_length {
            return Ok(EncodedText {
                windows: vec![full],
                truncated: false,
                input_tokens: n,
            });
        }
        let head = full.special.iter().take_while(|s| **s).count();
        let tail = full.special[head..]
            .iter()
            .rev()
            .take_while(|s| **s)
            .count();
        let body = n - head - tail;
        let room = self.max_length.saturating_sub(head + tail).max(1);
        let step = room.saturating_sub(self.stride).max(1);
        let mut windows = Vec::new();
        let mut start = 0;
        loop {
            let stop = (start + room).min(body);
            windows.push(full.window(head, head + start..head + stop, tail));
            if stop == body || !all_windows {
                break;
            }
            start += step;
        }
        Ok(EncodedText {
            windows,
            truncated: true,
            input_tokens: n,
        })
    }
}

/// Join pre-split words with single spaces; returns the text and each word's
/// character span `start..end`.
pub fn join_words(words: &[String]) -> (String, Vec<(usize, usize)>) {
    let mut text = String::new();
    let mut spans = Vec::with_capacity(words.len());
    let mut at = 0;
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            text.push(' ');
            at += 1;
        }
        text.push_str(w);
        let len = w.chars().count();
        spans.push((at, at + len));
        at += len;
    }
    (text, spans)
}

/// For each word, the index of its first sub-token in `window`; `None` for
/// words the window does not reach (truncation) or the tokenizer dropped.
pub fn first_subtokens(window: &Encoded, spans: &[(usize, usize)]) -> Vec<Option<usize>> {
    let mut first = vec![None; spans.len()];
    for (i, &(start, end)) in window.offsets.iter().enumerate() {
        if window.special[i] || end <= start {
            continue;
        }
        // The word whose span holds the sub-token's first character.
        let w = spans.partition_point(|&(s, _)| s <= start);
        if let Some(w) = w.checked_sub(1)
            && start < spans[w].1
            && first[w].is_none()
        {
            first[w] = Some(i);
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(special: Vec<bool>, offsets: Vec<(usize, usize)>, tokens: &[&str]) -> Encoded {
        Encoded {
            ids: vec![0; tokens.len()],
            type_ids: vec![0; tokens.len()],
            special,
            offsets,
            tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn words_map_to_their_first_sub_token() {
        let words: Vec<String> = ["Zürich", "is", "big"].map(String::from).to_vec();
        let (text, spans) = join_words(&words);
        assert_eq!(text, "Zürich is big");
        assert_eq!(spans, [(0, 6), (7, 9), (10, 13)]);
        // [CLS] Zü ##rich is [SEP]: "big" fell past the window.
        let w = window(
            vec![true, false, false, false, true],
            vec![(0, 0), (0, 2), (2, 6), (7, 9), (0, 0)],
            &["[CLS]", "Zü", "##rich", "is", "[SEP]"],
        );
        assert_eq!(first_subtokens(&w, &spans), [Some(1), Some(3), None]);
    }
}
