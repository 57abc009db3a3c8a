//! Turning per-token label probabilities into entity spans, with the same
//! rules as the `transformers` token-classification pipeline
//! (`aggregation_strategy` simple, first, max): sub-words are detected by
//! comparing the token's text with the original slice it covers, words are
//! merged according to the strategy, then adjacent words of one entity type
//! are grouped (a `B-` tag always starts a new group; `I-` and bare tags
//! continue one), and groups labelled `O` are dropped.

use triage_core::{Aggregation, Entity};

/// One non-special token of an encoded text, ready for aggregation.
#[derive(Debug, Clone)]
pub struct TokenPrediction<'a> {
    /// The vocabulary string of the token (`##ing` for a WordPiece continuation).
    pub token: &'a str,
    /// Character offsets into the original text.
    pub start: usize,
    pub end: usize,
    /// True for the tokenizer's unknown token, which is never a sub-word.
    pub is_unknown: bool,
    /// Probability of every label, in `id2label` order.
    pub probs: &'a [f32],
}

struct Scored {
    label: usize,
    score: f32,
    start: usize,
    end: usize,
}

fn argmax(p: &[f32]) -> (usize, f32) {
    // First maximum wins, as numpy's argmax does.
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in p.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best
}

/// `(is_begin, type)` for a tag, as the pipeline's `get_tag`.
fn split_tag(label: &str) -> (bool, &str) {
    if let Some(t) = label.strip_prefix("B-") {
        (true, t)
    } else if let Some(t) = label.strip_prefix("I-") {
        (false, t)
    } else {
        (false, label)
    }
}

/// Aggregate token predictions into entities. `text` is the original input,
/// `labels` the model's `id2label` in order.
pub fn aggregate(
    text: &str,
    tokens: &[TokenPrediction<'_>],
    labels: &[String],
    strategy: Aggregation,
) -> Vec<Entity> {
    let chars: Vec<char> = text.chars().collect();
    let slice_len = |s: usize, e: usize| e.saturating_sub(s).min(chars.len().saturating_sub(s));

    let words: Vec<Scored> = match strategy {
        Aggregation::Simple => tokens
            .iter()
            .map(|t| {
                let (label, score) = argmax(t.probs);
                Scored {
                    label,
                    score,
                    start: t.start,
                    end: t.end,
                }
            })
            .collect(),
        Aggregation::First | Aggregation::Max => {
            let mut groups: Vec<Vec<&TokenPrediction<'_>>> = Vec::new();
            for t in tokens {
                let is_subword =
                    !t.is_unknown && t.token.chars().count() != slice_len(t.start, t.end);
                match groups.last_mut() {
                    Some(g) if is_subword => g.push(t),
                    _ => groups.push(vec![t]),
                }
            }
            groups
                .into_iter()
                .filter_map(|g| {
                    let first = g.first()?;
                    let last = g.last()?;
                    let chosen = match strategy {
                        Aggregation::Max => g.iter().copied().fold(*first, |best, t| {
                            if argmax(t.probs).1 > argmax(best.probs).1 {
                                t
                            } else {
                                best
                            }
                        }),
                        _ => *first,
                    };
                    let (label, score) = argmax(chosen.probs);
                    Some(Scored {
                        label,
                        score,
                        start: first.start,
                        end: last.end,
                    })
                })
                .collect()
        }
    };

    let label_of = |i: usize| labels.get(i).map(String::as_str).unwrap_or("O");
    let mut groups: Vec<Vec<&Scored>> = Vec::new();
    for w in &words {
        let (begin, tag) = split_tag(label_of(w.label));
        let continues = groups.last().and_then(|g| g.last()).is_some_and(|prev| {
            let (_, prev_tag) = split_tag(label_of(prev.label));
            prev_tag == tag && !begin
        });
        match groups.last_mut() {
            Some(g) if continues => g.push(w),
            _ => groups.push(vec![w]),
        }
    }

    groups
        .into_iter()
        .filter_map(|g| {
            let first = g.first()?;
            let last = g.last()?;
            let (_, tag) = split_tag(label_of(first.label));
            if tag == "O" {
                return None;
            }
            let score = g.iter().map(|w| f64::from(w.score)).sum::<f64>() / g.len() as f64;
            let start = first.start.min(chars.len());
            let end = last.end.min(chars.len()).max(start);
            Some(Entity {
                label: tag.to_owned(),
                text: chars[start..end].iter().collect(),
                start,
                end,
                score: score as f32,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    // "Jo Smithson works": tokens Jo | Smith | ##son | works
    fn tokens<'a>(p: &'a [[f32; 5]; 4]) -> Vec<TokenPrediction<'a>> {
        let spans = [
            ("jo", 0, 2),
            ("smith", 3, 8),
            ("##son", 8, 11),
            ("works", 12, 17),
        ];
        spans
            .iter()
            .zip(p.iter())
            .map(|(&(token, start, end), probs)| TokenPrediction {
                token,
                start,
                end,
                is_unknown: false,
                probs,
            })
            .collect()
    }

    const TEXT: &str = "Jo Smithson works";

    #[test]
    fn simple_groups_adjacent_tokens_of_one_type() {
        let p = [
            [0.1, 0.8, 0.1, 0.0, 0.0],
            [0.1, 0.0, 0.7, 0.2, 0.0],
            [0.2, 0.0, 0.6, 0.2, 0.0],
            [0.9, 0.0, 0.1, 0.0, 0.0],
        ];
        let e = aggregate(TEXT, &tokens(&p), &labels(), Aggregation::Simple);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].label.as_str(), e[0].start, e[0].end), ("PER", 0, 11));
        assert_eq!(e[0].text, "Jo Smithson");
        assert!((e[0].score - 0.7).abs() < 1e-6);
    }

    #[test]
    fn a_b_tag_starts_a_new_entity() {
        let p = [
            [0.1, 0.8, 0.1, 0.0, 0.0],
            [0.1, 0.7, 0.0, 0.2, 0.0],
            [0.2, 0.0, 0.6, 0.2, 0.0],
            [0.9, 0.0, 0.1, 0.0, 0.0],
        ];
        let e = aggregate(TEXT, &tokens(&p), &labels(), Aggregation::Simple);
        let spans: Vec<_> = e.iter().map(|e| (e.start, e.end)).collect();
        assert_eq!(spans, vec![(0, 2), (3, 11)]);
    }

    #[test]
    fn first_and_max_differ_when_sub_words_disagree() {
        // "Smith" says ORG weakly, "##son" says PER strongly.
        let p = [
            [0.9, 0.1, 0.0, 0.0, 0.0],
            [0.2, 0.0, 0.0, 0.5, 0.3],
            [0.0, 0.95, 0.05, 0.0, 0.0],
            [0.9, 0.0, 0.1, 0.0, 0.0],
        ];
        let first = aggregate(TEXT, &tokens(&p), &labels(), Aggregation::First);
        let max = aggregate(TEXT, &tokens(&p), &labels(), Aggregation::Max);
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].label.as_str(), first[0].start, first[0].end),
            ("ORG", 3, 11)
        );
        assert!((first[0].score - 0.5).abs() < 1e-6);
        assert_eq!(max.len(), 1);
        assert_eq!(
            (max[0].label.as_str(), max[0].text.as_str()),
            ("PER", "Smithson")
        );
        assert!((max[0].score - 0.95).abs() < 1e-6);
    }

    #[test]
    fn all_outside_gives_no_entities() {
        let p = [[1.0, 0.0, 0.0, 0.0, 0.0]; 4];
        for s in [Aggregation::Simple, Aggregation::First, Aggregation::Max] {
            assert!(aggregate(TEXT, &tokens(&p), &labels(), s).is_empty());
        }
    }
}
