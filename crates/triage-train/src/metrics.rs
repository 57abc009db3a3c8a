//! Evaluation metrics for the local specialists, as pure functions over
//! labels and confidences (no model, no I/O), so `triage eval` and training
//! report the same numbers.
//!
//! - Classification: accuracy, per-label precision/recall/F1/support and
//!   macro-F1 with scikit-learn's conventions (`f1_score(average="macro")`
//!   averages over the labels that occur in the gold or predicted labels; a
//!   ratio with a zero denominator is 0).
//! - Confidence: selective accuracy (accuracy on the most confident fraction
//!   of the inputs) and expected calibration error over equal-width bins.
//! - Named entities: entity-level micro precision/recall/F1 and per-type
//!   scores over chunks of IOB2 tag sequences, as seqeval's default mode
//!   (conlleval chunking) computes them.

use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// The coverages `triage eval` reports selective accuracy at.
pub const COVERAGES: [f64; 6] = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Bins of the expected calibration error.
pub const ECE_BINS: usize = 15;

/// Precision, recall and F1 of one label (or entity type), with its support
/// (how many gold items carry it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LabelStats {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

impl LabelStats {
    /// From true positives, predicted and gold counts; 0 where a denominator is 0.
    fn from_counts(tp: usize, predicted: usize, gold: usize) -> Self {
        Self {
            precision: ratio(tp, predicted),
            recall: ratio(tp, gold),
            // 2tp / (2tp + fp + fn), as scikit-learn computes it.
            f1: ratio(2 * tp, predicted + gold),
            support: gold,
        }
    }
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Scores of a single-label classifier over a data set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationReport {
    pub n: usize,
    pub accuracy: f64,
    /// Mean F1 over the labels present in the gold or predicted labels.
    pub macro_f1: f64,
    /// Indexed by label id; labels that never occur have all-zero stats.
    pub per_label: Vec<LabelStats>,
}

/// Compare predicted label ids with gold ones. `n_labels` is how many labels
/// to report at least (ids seen beyond it extend the list). Extra items of
/// the longer slice are ignored.
pub fn classification_report(
    gold: &[usize],
    pred: &[usize],
    n_labels: usize,
) -> ClassificationReport {
    debug_assert_eq!(gold.len(), pred.len());
    let n = gold.len().min(pred.len());
    let width = gold
        .iter()
        .chain(pred)
        .map(|&l| l + 1)
        .max()
        .unwrap_or(0)
        .max(n_labels);
    let mut tp = vec![0usize; width];
    let mut gold_count = vec![0usize; width];
    let mut pred_count = vec![0usize; width];
    for (&g, &p) in gold.iter().zip(pred) {
        gold_count[g] += 1;
        pred_count[p] += 1;
        if g == p {
            tp[g] += 1;
        }
    }
    let per_label: Vec<LabelStats> = (0..width)
        .map(|l| LabelStats::from_counts(tp[l], pred_count[l], gold_count[l]))
        .collect();
    let present: Vec<f64> = (0..width)
        .filter(|&l| gold_count[l] + pred_count[l] > 0)
        .map(|l| per_label[l].f1)
        .collect();
    ClassificationReport {
        n,
        accuracy: ratio(tp.iter().sum(), n),
        macro_f1: if present.is_empty() {
            0.0
        } else {
            present.iter().sum::<f64>() / present.len() as f64
        },
        per_label,
    }
}

/// Accuracy on the most confident part of the data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SelectivePoint {
    pub coverage: f64,
    pub accuracy: f64,
}

/// For each coverage c, the accuracy on the ceil(c·n) most confident items
/// (confidence descending, ties in input order). At least one item is kept
/// for a positive coverage; an empty input gives accuracy 0.
pub fn selective_accuracy(
    correct: &[bool],
    confidence: &[f64],
    coverages: &[f64],
) -> Vec<SelectivePoint> {
    debug_assert_eq!(correct.len(), confidence.len());
    let n = correct.len().min(confidence.len());
    let mut order: Vec<usize> = (0..n).collect();
    // A stable sort keeps tied items in input order.
    order.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
    coverages
        .iter()
        .map(|&coverage| {
            let k = kept(coverage, n);
            let right = order[..k].iter().filter(|&&i| correct[i]).count();
            SelectivePoint {
                coverage,
                accuracy: ratio(right, k),
            }
        })
        .collect()
}

/// ceil(coverage·n), shielded from products like 0.7·10 = 7.000000000000001.
fn kept(coverage: f64, n: usize) -> usize {
    if n == 0 || coverage.is_nan() || coverage <= 0.0 {
        return 0;
    }
    let exact = coverage.min(1.0) * n as f64;
    let k = (exact * (1.0 - 1e-12)).ceil() as usize;
    k.clamp(1, n)
}

/// Expected calibration error: confidences fall into `bins` equal-width bins
/// `(i/bins, (i+1)/bins]` (a confidence of 0 into the first), and the ECE is
/// the mean over items of |accuracy − mean confidence| of their bin.
pub fn expected_calibration_error(correct: &[bool], confidence: &[f64], bins: usize) -> f64 {
    debug_assert_eq!(correct.len(), confidence.len());
    let n = correct.len().min(confidence.len());
    if n == 0 || bins == 0 {
        return 0.0;
    }
    let mut count = vec![0usize; bins];
    let mut right = vec![0usize; bins];
    let mut conf_sum = vec![0.0f64; bins];
    for (&ok, &c) in correct.iter().zip(confidence) {
        let b = bin_of(c, bins);
        count[b] += 1;
        conf_sum[b] += c;
        if ok {
            right[b] += 1;
        }
    }
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| {
            let size = count[b] as f64;
            let gap = (right[b] as f64 / size - conf_sum[b] / size).abs();
            gap * size / n as f64
        })
        .sum()
}

/// The bin `(lower, upper]` holding `c`, with the edges computed as i/bins.
fn bin_of(c: f64, bins: usize) -> usize {
    (0..bins)
        .find(|&b| c <= (b + 1) as f64 / bins as f64)
        .unwrap_or(bins - 1)
}

/// One entity chunk of a tag sequence: type and token range `start..end`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chunk {
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// `Some((is_begin, type))` for `B-X` / `I-X`; `None` for `O` and anything else.
fn split_tag(tag: &str) -> Option<(bool, &str)> {
    if let Some(kind) = tag.strip_prefix("B-") {
        Some((true, kind))
    } else {
        tag.strip_prefix("I-").map(|kind| (false, kind))
    }
}

/// The chunks of an IOB tag sequence, with conlleval's rules: a chunk starts
/// at `B-X`, or at `I-X` after `O` or another type; it ends before any tag
/// that is not `I-X` of its type. Tags other than `B-X`/`I-X` count as `O`.
pub fn chunks<S: AsRef<str>>(tags: &[S]) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut open: Option<(&str, usize)> = None;
    for (i, tag) in tags.iter().enumerate() {
        let parsed = split_tag(tag.as_ref());
        if let (Some((kind, _)), Some((false, next))) = (open, parsed)
            && kind == next
        {
            continue;
        }
        if let Some((kind, start)) = open.take() {
            out.push(Chunk {
                kind: kind.to_owned(),
                start,
                end: i,
            });
        }
        open = parsed.map(|(_, kind)| (kind, i));
    }
    if let Some((kind, start)) = open {
        out.push(Chunk {
            kind: kind.to_owned(),
            start,
            end: tags.len(),
        });
    }
    out
}

/// Rewrite IOB1 tags as IOB2 in place: an `I-X` that starts a chunk (first
/// tag, or after `O` or another type) becomes `B-X`. IOB2 input is unchanged.
pub fn iob1_to_iob2(tags: &mut [String]) {
    let mut previous: Option<String> = None;
    for tag in tags.iter_mut() {
        let kind = split_tag(tag).map(|(_, k)| k.to_owned());
        if let Some(k) = &kind
            && tag.starts_with("I-")
            && previous.as_deref() != Some(k.as_str())
        {
            *tag = format!("B-{k}");
        }
        previous = kind;
    }
}

/// Entity-level scores over a data set of tagged sentences.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityReport {
    /// Micro-averaged over all chunks of all sentences.
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Every type found in the gold or predicted chunks.
    pub per_type: BTreeMap<String, LabelStats>,
}

/// Score predicted tag sequences against gold ones, sentence by sentence: a
/// predicted chunk is right when a gold chunk of the same sentence has the
/// same type, start and end. Extra sentences of the longer slice are ignored.
pub fn entity_report<GS, G, PS, P>(gold: &[GS], pred: &[PS]) -> EntityReport
where
    GS: AsRef<[G]>,
    G: AsRef<str>,
    PS: AsRef<[P]>,
    P: AsRef<str>,
{
    debug_assert_eq!(gold.len(), pred.len());
    #[derive(Default)]
    struct Counts {
        tp: usize,
        gold: usize,
        pred: usize,
    }
    let mut by_type: BTreeMap<String, Counts> = BTreeMap::new();
    for (g, p) in gold.iter().zip(pred) {
        let gold_chunks = chunks(g.as_ref());
        let pred_chunks: HashSet<Chunk> = chunks(p.as_ref()).into_iter().collect();
        for c in &gold_chunks {
            let e = by_type.entry(c.kind.clone()).or_default();
            e.gold += 1;
            if pred_chunks.contains(c) {
                e.tp += 1;
            }
        }
        for c in &pred_chunks {
            by_type.entry(c.kind.clone()).or_default().pred += 1;
        }
    }
    let (tp, g, p) = by_type.values().fold((0, 0, 0), |(tp, g, p), c| {
        (tp + c.tp, g + c.gold, p + c.pred)
    });
    let total = LabelStats::from_counts(tp, p, g);
    EntityReport {
        precision: total.precision,
        recall: total.recall,
        f1: total.f1,
        per_type: by_type
            .into_iter()
            .map(|(k, c)| (k, LabelStats::from_counts(c.tp, c.pred, c.gold)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn tags(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn classification_matches_hand_computed_values() {
        // label 0: tp 1, fp 1, fn 1; label 1: tp 2, fp 1, fn 1.
        let r = classification_report(&[0, 0, 1, 1, 1], &[0, 1, 1, 1, 0], 2);
        assert_eq!(r.n, 5);
        assert!(close(r.accuracy, 0.6));
        let l0 = r.per_label[0];
        assert!(close(l0.precision, 0.5) && close(l0.recall, 0.5) && close(l0.f1, 0.5));
        assert_eq!(l0.support, 2);
        let l1 = r.per_label[1];
        assert!(close(l1.precision, 2.0 / 3.0) && close(l1.recall, 2.0 / 3.0));
        assert!(close(l1.f1, 2.0 / 3.0));
        assert_eq!(l1.support, 3);
        assert!(close(r.macro_f1, (0.5 + 2.0 / 3.0) / 2.0));
    }

    #[test]
    fn macro_f1_skips_labels_absent_from_gold_and_predictions() {
        let r = classification_report(&[0, 0], &[0, 0], 2);
        assert_eq!(r.per_label.len(), 2);
        assert_eq!(
            r.per_label[1],
            LabelStats {
                precision: 0.0,
                recall: 0.0,
                f1: 0.0,
                support: 0
            }
        );
        assert!(close(r.macro_f1, 1.0));

        // A label only predicted counts, with F1 0 (precision 0/1, recall 0/0).
        let r = classification_report(&[0, 0], &[0, 1], 2);
        assert!(close(r.per_label[0].f1, 2.0 / 3.0));
        assert!(close(r.macro_f1, 1.0 / 3.0));
        assert!(close(r.accuracy, 0.5));
    }

    #[test]
    fn empty_classification_is_all_zero() {
        let r = classification_report(&[], &[], 2);
        assert_eq!((r.n, r.accuracy, r.macro_f1), (0, 0.0, 0.0));
    }

    #[test]
    fn selective_accuracy_sorts_by_confidence_and_keeps_ties_in_order() {
        let conf = [0.9, 0.6, 0.8, 0.6, 0.7, 0.95, 0.55, 0.65, 0.75, 0.85];
        let correct = [
            true, false, true, true, false, true, false, true, true, false,
        ];
        // Order: 5 0 9 2 8 4 7 1 3 6 → right, right, wrong, right, right,
        // wrong, right, wrong (1 before 3: input order), right, wrong.
        let got: Vec<f64> = selective_accuracy(&correct, &conf, &COVERAGES)
            .iter()
            .map(|p| p.accuracy)
            .collect();
        let want = [4.0 / 5.0, 4.0 / 6.0, 5.0 / 7.0, 5.0 / 8.0, 6.0 / 9.0, 0.6];
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g, w), "{got:?} vs {want:?}");
        }
        let coverages: Vec<f64> = selective_accuracy(&correct, &conf, &COVERAGES)
            .iter()
            .map(|p| p.coverage)
            .collect();
        assert_eq!(coverages, COVERAGES);
    }

    #[test]
    fn selective_accuracy_rounds_the_kept_count_up() {
        // ceil(0.5 · 3) = 2 items: the confident right one and the wrong one.
        let p = selective_accuracy(&[true, false, true], &[0.9, 0.8, 0.7], &[0.5]);
        assert!(close(p[0].accuracy, 0.5));
        assert_eq!(kept(0.7, 10), 7);
        assert_eq!(kept(0.5, 3), 2);
        assert_eq!(kept(0.01, 3), 1);
        assert_eq!(kept(1.0, 0), 0);
        assert!(close(selective_accuracy(&[], &[], &[1.0])[0].accuracy, 0.0));
    }

    #[test]
    fn ece_matches_hand_computed_values() {
        // Bin 14 holds the two 0.95s (accuracy 0.5), bin 8 the 0.55s (accuracy 1).
        let e =
            expected_calibration_error(&[true, false, true, true], &[0.95, 0.95, 0.55, 0.55], 15);
        assert!(close(e, 0.5 * 0.45 + 0.5 * 0.45), "{e}");
        assert!(close(
            expected_calibration_error(&[true, true], &[1.0, 1.0], 15),
            0.0
        ));
        // 0.6 = 9/15 is the upper edge of bin 8, so 0.6 and 0.61 sit apart.
        let e = expected_calibration_error(&[true, false], &[0.6, 0.61], 15);
        assert!(close(e, 0.5 * 0.4 + 0.5 * 0.61), "{e}");
        assert_eq!(bin_of(0.0, 15), 0);
        assert_eq!(bin_of(1.0, 15), 14);
        assert!(close(expected_calibration_error(&[], &[], 15), 0.0));
    }

    #[test]
    fn chunks_follow_conlleval() {
        let c = chunks(&tags("I-PER I-PER O I-LOC B-LOC I-ORG I-LOC B-MISC"));
        let want = [
            ("PER", 0, 2),
            ("LOC", 3, 4),
            ("LOC", 4, 5),
            ("ORG", 5, 6),
            ("LOC", 6, 7),
            ("MISC", 7, 8),
        ];
        assert_eq!(
            c,
            want.iter()
                .map(|&(k, start, end)| Chunk {
                    kind: k.into(),
                    start,
                    end
                })
                .collect::<Vec<_>>()
        );
        assert!(chunks(&tags("O O")).is_empty());
        assert!(chunks::<String>(&[]).is_empty());
    }

    #[test]
    fn entity_scores_match_seqeval() {
        let gold = vec![tags("B-PER I-PER O B-LOC")];
        let pred = vec![tags("B-PER I-PER O B-ORG")];
        let r = entity_report(&gold, &pred);
        assert!(close(r.precision, 0.5) && close(r.recall, 0.5) && close(r.f1, 0.5));
        assert_eq!(r.per_type.keys().collect::<Vec<_>>(), ["LOC", "ORG", "PER"]);
        let per = r.per_type["PER"];
        assert!(close(per.precision, 1.0) && close(per.recall, 1.0) && close(per.f1, 1.0));
        assert_eq!(per.support, 1);
        assert_eq!(r.per_type["LOC"].support, 1);
        assert!(close(r.per_type["LOC"].recall, 0.0));
        assert_eq!(r.per_type["ORG"].support, 0);
        assert!(close(r.per_type["ORG"].precision, 0.0));
    }

    #[test]
    fn a_chunk_may_start_with_i() {
        let r = entity_report(&[tags("B-PER I-PER O")], &[tags("I-PER I-PER O")]);
        assert!(close(r.f1, 1.0));
        // A wrong boundary is a miss, not a partial hit.
        let r = entity_report(&[tags("B-ORG I-ORG I-ORG")], &[tags("B-ORG I-ORG O")]);
        assert!(close(r.precision, 0.0) && close(r.recall, 0.0) && close(r.f1, 0.0));
    }

    #[test]
    fn entity_scores_are_micro_averaged_per_sentence() {
        let gold = vec![tags("B-PER O B-LOC"), tags("B-ORG O O"), tags("O")];
        let pred = vec![tags("B-PER O O"), tags("B-ORG O B-LOC"), tags("B-PER")];
        // tp 2 (PER, ORG); gold 3; predicted 4. PER in sentence 3 does not
        // match sentence 1's PER at the same position.
        let r = entity_report(&gold, &pred);
        assert!(close(r.precision, 0.5));
        assert!(close(r.recall, 2.0 / 3.0));
        assert!(close(r.f1, 4.0 / 7.0));
        let per = r.per_type["PER"];
        assert!(close(per.precision, 0.5) && close(per.recall, 1.0));
        let none: Vec<Vec<String>> = Vec::new();
        let empty = entity_report(&none, &none);
        assert_eq!((empty.precision, empty.recall, empty.f1), (0.0, 0.0, 0.0));
    }

    #[test]
    fn iob1_becomes_iob2() {
        let mut t = tags("I-PER I-PER O I-LOC B-LOC I-ORG I-LOC");
        iob1_to_iob2(&mut t);
        assert_eq!(t, tags("B-PER I-PER O B-LOC B-LOC B-ORG B-LOC"));
        let mut t = tags("B-PER I-PER O B-LOC");
        iob1_to_iob2(&mut t);
        assert_eq!(t, tags("B-PER I-PER O B-LOC"));
    }
}
