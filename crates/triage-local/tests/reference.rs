//! Our outputs against PyTorch `transformers` on the same checkpoints
//! (fixtures written by scripts/fixtures/make_fixtures.py).

use crate::common::{assert_close, f32s, model_dir, reference};
use candle_core::Device;
use serde_json::Value;
use triage_core::{Aggregation, LocalTask};
use triage_local::LocalModel;
use triage_local::tokenize::EncodedText;

const TOL: f32 = 1e-4;

fn load(name: &str) -> anyhow::Result<LocalModel> {
    Ok(LocalModel::load(&model_dir(name), name, &Device::Cpu)?)
}

fn cases(reference: &Value) -> &[Value] {
    reference["cases"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn check_sequence_model(name: &str) -> anyhow::Result<()> {
    let model = load(name)?;
    assert_eq!(model.info.task, LocalTask::SequenceClassification);
    let reference = reference(name)?;
    let cases = cases(&reference);
    assert!(cases.len() >= 10, "{name}: too few reference cases");
    let encoded: Vec<EncodedText> = cases
        .iter()
        .map(|c| {
            model
                .tokenizer
                .encode(c["text"].as_str().unwrap_or_default(), false)
        })
        .collect::<Result<_, _>>()?;

    // One at a time, then all in one padded batch: both must match the reference.
    let single: Vec<_> = encoded
        .iter()
        .map(|e| model.classify(&[e]).map(|mut v| v.remove(0)))
        .collect::<Result<_, _>>()?;
    let batched = model.classify(&encoded.iter().collect::<Vec<_>>())?;
    for (i, case) in cases.iter().enumerate() {
        let want: Vec<f32> = model
            .info
            .labels
            .iter()
            .map(|l| case["probs"][l].as_f64().unwrap_or(f64::NAN) as f32)
            .collect();
        for (how, got) in [("single", &single[i]), ("batched", &batched[i])] {
            let ours: Vec<f32> = got.scores.iter().map(|s| s.score).collect();
            assert_close(&ours, &want, TOL, &format!("{name} case {i} ({how})"));
            assert_eq!(
                got.truncated,
                case["truncated"].as_bool().unwrap_or(false),
                "{name} case {i}: truncated flag"
            );
        }
    }
    Ok(())
}

#[test]
fn distilbert_multilabel_matches_pytorch() -> anyhow::Result<()> {
    check_sequence_model("distilbert-seq-multilabel")
}

#[test]
fn bert_single_label_from_pytorch_bin_matches_pytorch() -> anyhow::Result<()> {
    assert!(
        model_dir("bert-seq-single")
            .join("pytorch_model.bin")
            .is_file()
    );
    check_sequence_model("bert-seq-single")
}

fn check_token_model(name: &str) -> anyhow::Result<()> {
    let model = load(name)?;
    assert_eq!(model.info.task, LocalTask::TokenClassification);
    let reference = reference(name)?;
    let cases = cases(&reference);
    let mut nonempty = 0;
    let mut ties = 0;
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().unwrap_or_default();
        let enc = model.tokenizer.encode(text, false)?;
        assert_eq!(
            enc.truncated,
            case["truncated"].as_bool().unwrap_or(false),
            "{name} case {i}"
        );

        let probs = model.tag_windows(&[&enc.windows[0]])?.remove(0);
        let want = case["token_probs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert_eq!(probs.len(), want.len(), "{name} case {i}: token count");
        for (t, (ours, theirs)) in probs.iter().zip(want).enumerate() {
            assert_close(
                ours,
                &f32s(theirs),
                TOL,
                &format!("{name} case {i} token {t}"),
            );
        }

        // Where the reference's top two labels of a token tie (to float
        // precision), argmax is decided by rounding noise: the token
        // probabilities above are still compared, the entity lists are not.
        let tie = want.iter().any(|p| {
            let mut v = f32s(p);
            v.sort_by(|a, b| b.total_cmp(a));
            v.len() > 1 && v[0] - v[1] < 1e-5
        });
        if tie {
            ties += 1;
            continue;
        }
        for (key, strategy) in [
            ("simple", Aggregation::Simple),
            ("first", Aggregation::First),
            ("max", Aggregation::Max),
        ] {
            let ours = model.tag(&[(text, &enc)], strategy)?.remove(0).entities;
            let theirs = case["entities"][key]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let what = format!("{name} case {i} ({key})");
            assert_eq!(ours.len(), theirs.len(), "{what}: {ours:?} vs {theirs:?}");
            nonempty += usize::from(!ours.is_empty());
            for (o, t) in ours.iter().zip(&theirs) {
                assert_eq!(
                    o.label,
                    t["entity_group"].as_str().unwrap_or_default(),
                    "{what}"
                );
                assert_eq!(
                    o.start as u64,
                    t["start"].as_u64().unwrap_or(u64::MAX),
                    "{what}"
                );
                assert_eq!(
                    o.end as u64,
                    t["end"].as_u64().unwrap_or(u64::MAX),
                    "{what}"
                );
                let score = t["score"].as_f64().unwrap_or(f64::NAN) as f32;
                assert!(
                    (o.score - score).abs() <= TOL,
                    "{what}: score {} vs {score}",
                    o.score
                );
                let chars: Vec<char> = text.chars().collect();
                assert_eq!(o.text, chars[o.start..o.end].iter().collect::<String>());
            }
        }
    }
    assert!(nonempty > 0, "{name}: the reference has no entities at all");
    assert!(
        ties <= 2,
        "{name}: {ties} cases with tied labels; regenerate the fixtures"
    );
    Ok(())
}

#[test]
fn bert_token_classifier_matches_the_pipeline() -> anyhow::Result<()> {
    check_token_model("bert-token")
}

#[test]
fn distilbert_token_classifier_matches_the_pipeline() -> anyhow::Result<()> {
    check_token_model("distilbert-token")
}

#[test]
fn long_input_is_truncated_or_windowed() -> anyhow::Result<()> {
    let model = load("distilbert-seq-multilabel")?;
    let long = "word ".repeat(2000);
    let one = model.tokenizer.encode(&long, false)?;
    assert!(one.truncated);
    assert_eq!(one.windows.len(), 1);
    assert_eq!(one.windows[0].len(), model.info.max_length);
    let all = model.tokenizer.encode(&long, true)?;
    assert!(
        all.windows.len() > 10,
        "2000 words need many windows of {}, got {}",
        model.info.max_length,
        all.windows.len()
    );
    let c = model.classify(&[&all])?.remove(0);
    assert_eq!(c.windows, all.windows.len());
    // Max over windows is at least the first window's score for every label.
    let first = model.classify(&[&one])?.remove(0);
    for (w, f) in c.scores.iter().zip(&first.scores) {
        assert!(w.score >= f.score - 1e-6);
    }
    Ok(())
}

#[test]
fn minilm_mean_pooled_embeddings_match_sentence_transformers() -> anyhow::Result<()> {
    let Some(dir) = crate::common::minilm_dir() else {
        return Ok(());
    };
    let model = LocalModel::load(&dir, "all-MiniLM-L6-v2", &Device::Cpu)?;
    assert_eq!(model.info.task, LocalTask::Embedding);
    let reference = reference("all-MiniLM-L6-v2")?;
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let want = reference["embeddings_unnormalized"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(texts.len(), want.len());
    let encoded: Vec<EncodedText> = texts
        .iter()
        .map(|t| model.tokenizer.encode(t, false))
        .collect::<Result<_, _>>()?;
    let ours = model.embed(&encoded.iter().collect::<Vec<_>>())?;
    for (i, (o, w)) in ours.iter().zip(&want).enumerate() {
        assert_close(&o.vector, &f32s(w), TOL, &format!("MiniLM text {i}"));
    }
    let find = |s: &str| texts.iter().position(|t| *t == s);
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    };
    if let (Some(a), Some(b), Some(c)) = (
        find("A man is eating food."),
        find("A man is eating a piece of bread."),
        find("The stock market crashed today."),
    ) {
        assert!((cos(&ours[a].vector, &ours[b].vector) - 0.7553).abs() < 1e-3);
        assert!((cos(&ours[a].vector, &ours[c].vector) - 0.0088).abs() < 1e-3);
    } else {
        panic!("reference texts lack the cosine probes");
    }
    Ok(())
}
