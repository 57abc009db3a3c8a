//! `triage eval`: score a specialist on a labelled JSONL file and print one
//! JSON object of metrics. Toxicity maps the model's labels onto the data's
//! binary label and adds confidence metrics (selective accuracy, ECE, an
//! optional SVG or PNG curve); NER scores entities the way seqeval does.
//!
//! The model runs here, in one blocking task, rather than behind the batching
//! worker: NER needs per-token probabilities, which the worker does not hand
//! out, and an offline evaluation gains nothing from request batching.

use crate::input;
use crate::manifests;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use triage_audit::render::selective::{CurvePoint, selective_svg};
use triage_audit::render::svg_to_png;
use triage_core::LocalTask;
use triage_local::tokenize::{Encoded, first_subtokens, join_words};
use triage_local::{Activation, LocalModel, ModelRef};
use triage_train::metrics::{self, LabelStats, SelectivePoint};

/// What `triage eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalTask {
    /// Binary toxic/offensive classification: data lines {"text", "label": 0|1}.
    Toxicity,
    /// Named entities: data lines {"tokens": [...], "tags": [...]} in IOB2.
    Ner,
}

impl EvalTask {
    fn name(self) -> &'static str {
        match self {
            Self::Toxicity => "toxicity",
            Self::Ner => "ner",
        }
    }

    fn local_task(self) -> LocalTask {
        match self {
            Self::Toxicity => LocalTask::SequenceClassification,
            Self::Ner => LocalTask::TokenClassification,
        }
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// What to evaluate: toxicity or ner.
    #[arg(long)]
    task: EvalTask,
    /// Model: a local folder or org/name[@revision] (default: the task's default specialist).
    #[arg(long)]
    model: Option<String>,
    /// Labelled JSONL file (`-` for stdin): {"text", "label": 0|1} for toxicity,
    /// {"tokens": [...], "tags": [...]} (IOB2) for ner.
    #[arg(long)]
    data: PathBuf,
    /// Model labels that mean 1 (toxic/offensive), comma-separated (toxicity only).
    #[arg(long, value_delimiter = ',')]
    positive_labels: Option<Vec<String>>,
    /// Write the selective-accuracy curve to this .svg or .png file (toxicity only).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Run the encoder's dense layers in int8 (CPU only), as `int8 = true`
    /// does. Default: on for the shipped specialists, as `triage serve` runs
    /// them (the default model, or `--model toxicity`/`ner`).
    #[arg(long, conflicts_with = "f32")]
    int8: bool,
    /// Evaluate in f32 even where int8 is the default.
    #[arg(long)]
    f32: bool,
}

/// Words labelled when their sub-tokens fell past the model's window.
const OUTSIDE: &str = "O";

/// Labels that mean "toxic" when a model names them so (compared case-insensitively).
const TOXIC_NAMES: [&str; 5] = ["toxic", "offensive", "hate", "abusive", "insult"];

/// The model `triage eval` uses without `--model`. Where defaults come from
/// will change; this is the one place that knows.
fn default_reference(task: EvalTask) -> Result<String> {
    let name = task.name();
    manifests::all()?
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.default_reference())
        .with_context(|| format!("no default specialist for `{name}`: pass --model"))
}

pub async fn run(args: EvalArgs, device: &candle_core::Device) -> Result<ExitCode> {
    check_flags(&args)?;
    let bytes = input::read_source(&args.data)
        .with_context(|| format!("cannot read {}", args.data.display()))?;
    let data = match args.task {
        EvalTask::Toxicity => Data::Toxicity(parse_toxicity(&bytes)?),
        EvalTask::Ner => Data::Ner(parse_ner(&bytes)?),
    };
    if data.is_empty() {
        bail!("{} has no examples", args.data.display());
    }

    let reference = match &args.model {
        Some(m) => m.clone(),
        None => default_reference(args.task)?,
    };
    let dir = triage_local::resolve(&ModelRef::parse(&reference)?)
        .await
        .with_context(|| format!("cannot load model `{reference}`"))?;
    let mut model = triage_local::load_model(&reference, device)
        .await
        .with_context(|| format!("cannot load model `{reference}`"))?;
    let shipped = args.model.as_deref().unwrap_or(args.task.name());
    if args.int8 || (!args.f32 && triage_local::int8_by_default(shipped, device.is_cpu())) {
        model.quantize_int8()?;
    }
    let report = tokio::task::spawn_blocking(move || -> Result<String> {
        let wanted = args.task.local_task();
        if model.info.task != wanted {
            bail!(
                "model `{reference}` does {}, but eval --task {} needs {wanted}",
                model.info.task,
                args.task.name()
            );
        }
        match data {
            Data::Toxicity(examples) => eval_toxicity(&model, &dir, &args, &reference, &examples),
            Data::Ner(sentences) => eval_ner(&model, &args, &reference, &sentences),
        }
    })
    .await
    .context("evaluation task panicked")??;

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "{report}")?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// What `--task toxicity` prints, fields in this order.
#[derive(Debug, Serialize)]
struct ToxicityReport<'a> {
    task: &'static str,
    model: &'a str,
    n: usize,
    accuracy: f64,
    macro_f1: f64,
    /// Keyed by the data's label, "0" and "1".
    per_label: BTreeMap<String, LabelStats>,
    selective: Vec<SelectivePoint>,
    ece: f64,
}

/// What `--task ner` prints, fields in this order.
#[derive(Debug, Serialize)]
struct NerReport<'a> {
    task: &'static str,
    model: &'a str,
    n: usize,
    precision: f64,
    recall: f64,
    f1: f64,
    per_type: BTreeMap<String, LabelStats>,
    /// Sentences cut at the model's window (their cut words count as `O`).
    truncated: usize,
}

/// Flag combinations that cannot work, refused before anything is loaded.
fn check_flags(args: &EvalArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.task == EvalTask::Ner {
        if args.out.is_some() {
            bail!("--out draws the selective-accuracy curve of --task toxicity; ner has none");
        }
        if args.positive_labels.is_some() {
            bail!("--positive-labels applies to --task toxicity only");
        }
    }
    if let Some(path) = &args.out {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("svg" | "png") => {}
            _ => bail!(
                "--out {}: give a file name ending in .svg or .png",
                path.display()
            ),
        }
    }
    Ok(())
}

enum Data {
    Toxicity(Vec<Labelled>),
    Ner(Vec<Sentence>),
}

impl Data {
    fn is_empty(&self) -> bool {
        match self {
            Self::Toxicity(v) => v.is_empty(),
            Self::Ner(v) => v.is_empty(),
        }
    }
}

/// One toxicity example.
#[derive(Debug, Clone, PartialEq)]
struct Labelled {
    text: String,
    label: usize,
}

/// One NER example: words and their gold IOB2 tags.
#[derive(Debug, Clone, PartialEq)]
struct Sentence {
    tokens: Vec<String>,
    tags: Vec<String>,
}

fn parse_toxicity(bytes: &[u8]) -> Result<Vec<Labelled>> {
    input::parse_objects(bytes)
        .into_iter()
        .map(|r| {
            let input::Object { line, fields: map } = r?;
            let Some(Value::String(text)) = map.get("text") else {
                bail!("line {line}: no string field `text`");
            };
            let label = match map.get("label") {
                None => bail!("line {line}: no field `label` (0 or 1)"),
                Some(v) => match v.as_u64() {
                    Some(l @ (0 | 1)) => l as usize,
                    _ => bail!("line {line}: label must be 0 or 1, not {v}"),
                },
            };
            Ok(Labelled {
                text: text.clone(),
                label,
            })
        })
        .collect()
}

fn parse_ner(bytes: &[u8]) -> Result<Vec<Sentence>> {
    input::parse_objects(bytes)
        .into_iter()
        .map(|r| {
            let input::Object { line, fields: map } = r?;
            let strings = |key: &str| -> Result<Vec<String>> {
                let values = map
                    .get(key)
                    .and_then(Value::as_array)
                    .with_context(|| format!("line {line}: `{key}` must be an array of strings"))?;
                values
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_owned).with_context(|| {
                            format!("line {line}: `{key}` must be an array of strings, found {v}")
                        })
                    })
                    .collect()
            };
            let tokens = strings("tokens")?;
            let tags = strings("tags")?;
            if tokens.len() != tags.len() {
                bail!(
                    "line {line}: {} tokens but {} tags",
                    tokens.len(),
                    tags.len()
                );
            }
            if let Some(bad) = tags.iter().find(|t| !is_iob2_tag(t)) {
                bail!("line {line}: tag `{bad}` is not IOB2 (O, B-TYPE or I-TYPE)");
            }
            Ok(Sentence { tokens, tags })
        })
        .collect()
}

fn is_iob2_tag(tag: &str) -> bool {
    tag == OUTSIDE
        || tag
            .strip_prefix("B-")
            .or_else(|| tag.strip_prefix("I-"))
            .is_some_and(|t| !t.is_empty())
}

fn progress_bar(len: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Batches of indices into `encoded`, shortest first so that a batch pads little.
fn batches(lengths: &[usize], size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    order.chunks(size.max(1)).map(<[usize]>::to_vec).collect()
}

// ---------------------------------------------------------------- toxicity

/// Where the positive labels came from, for the note on stderr.
fn positive_labels(
    flag: Option<&[String]>,
    dir: &Path,
    reference: &str,
    labels: &[String],
) -> Result<(Vec<usize>, String)> {
    let lookup = |names: &[String], source: &str| -> Result<Vec<usize>> {
        if names.is_empty() {
            bail!("{source} names no positive labels");
        }
        names
            .iter()
            .map(|name| {
                let name = name.trim();
                labels.iter().position(|l| l == name).with_context(|| {
                    format!(
                        "{source}: model `{reference}` has no label `{name}`; its labels are {}",
                        labels.join(", ")
                    )
                })
            })
            .collect()
    };
    if let Some(names) = flag {
        return Ok((
            lookup(names, "--positive-labels")?,
            "--positive-labels".into(),
        ));
    }
    let path = dir.join("triage.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if let Some(v) = value.get("positive_labels") {
            let names: Vec<String> = serde_json::from_value(v.clone()).with_context(|| {
                format!(
                    "{}: positive_labels must be a list of strings",
                    path.display()
                )
            })?;
            let source = path.display().to_string();
            return Ok((lookup(&names, &source)?, source));
        }
    }
    let named: Vec<usize> = labels
        .iter()
        .enumerate()
        .filter(|(_, l)| TOXIC_NAMES.contains(&l.to_lowercase().as_str()))
        .map(|(i, _)| i)
        .collect();
    if !named.is_empty() {
        return Ok((named, "label names".into()));
    }
    if labels.len() == 2 {
        return Ok((vec![1], "the second of two labels".into()));
    }
    bail!(
        "cannot tell which labels of model `{reference}` mean toxic (its labels are {}): \
         pass --positive-labels LABEL[,LABEL...]",
        labels.join(", ")
    )
}

/// P(positive) from one input's label probabilities: the positive labels'
/// sum for a softmax model (exclusive labels), their maximum for sigmoid.
fn positive_probability(probs: &[f32], positive: &[usize], activation: Activation) -> f64 {
    let picked = positive
        .iter()
        .filter_map(|&i| probs.get(i))
        .map(|&p| f64::from(p));
    match activation {
        Activation::Softmax => picked.sum::<f64>().clamp(0.0, 1.0),
        Activation::Sigmoid => picked.fold(0.0, f64::max),
    }
}

fn eval_toxicity(
    model: &LocalModel,
    dir: &Path,
    args: &EvalArgs,
    reference: &str,
    examples: &[Labelled],
) -> Result<String> {
    let labels = &model.info.labels;
    let (positive, source) =
        positive_labels(args.positive_labels.as_deref(), dir, reference, labels)?;
    let activation = model
        .info
        .activation
        .context("the model has no sequence-classification activation")?;
    eprintln!(
        "positive labels ({source}): {}",
        positive
            .iter()
            .map(|&i| labels[i].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let encoded = examples
        .iter()
        .map(|e| model.tokenizer.encode(&e.text, false))
        .collect::<triage_local::Result<Vec<_>>>()?;
    let lengths: Vec<usize> = encoded.iter().map(|e| e.token_count()).collect();
    let bar = progress_bar(examples.len());
    let mut p_positive = vec![0.0f64; examples.len()];
    for batch in batches(&lengths, args.batch) {
        let texts: Vec<_> = batch.iter().map(|&i| &encoded[i]).collect();
        let scored = model.classify(&texts)?;
        for (&i, c) in batch.iter().zip(scored) {
            let probs: Vec<f32> = c.scores.iter().map(|s| s.score).collect();
            p_positive[i] = positive_probability(&probs, &positive, activation);
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();

    let gold: Vec<usize> = examples.iter().map(|e| e.label).collect();
    let pred: Vec<usize> = p_positive.iter().map(|&p| usize::from(p >= 0.5)).collect();
    let confidence: Vec<f64> = p_positive.iter().map(|&p| p.max(1.0 - p)).collect();
    let correct: Vec<bool> = gold.iter().zip(&pred).map(|(g, p)| g == p).collect();

    let report = metrics::classification_report(&gold, &pred, 2);
    let selective = metrics::selective_accuracy(&correct, &confidence, &metrics::COVERAGES);
    let ece = metrics::expected_calibration_error(&correct, &confidence, metrics::ECE_BINS);
    let per_label: BTreeMap<String, LabelStats> = report
        .per_label
        .iter()
        .enumerate()
        .map(|(i, s)| (i.to_string(), *s))
        .collect();

    if let Some(path) = &args.out {
        let title = format!(
            "Selective accuracy: {} (n = {})",
            keep_end(reference, 60),
            report.n
        );
        let curve: Vec<CurvePoint> = selective
            .iter()
            .map(|p| CurvePoint {
                coverage: p.coverage,
                accuracy: p.accuracy,
            })
            .collect();
        let svg = selective_svg(&curve, &title);
        let png = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        let bytes = if png {
            svg_to_png(&svg)?
        } else {
            svg.into_bytes()
        };
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(serde_json::to_string(&ToxicityReport {
        task: "toxicity",
        model: reference,
        n: report.n,
        accuracy: report.accuracy,
        macro_f1: report.macro_f1,
        per_label,
        selective,
        ece,
    })?)
}

// ---------------------------------------------------------------- ner

/// A model label as an IOB tag: `O`, `B-X` and `I-X` stay; a bare `X` is
/// read as inside an `X` chunk (IO tagging).
fn as_iob(label: &str) -> String {
    if is_iob2_tag(label) || label.is_empty() {
        label.to_owned()
    } else {
        format!("I-{label}")
    }
}

fn argmax(p: &[f32]) -> usize {
    // First maximum wins, as numpy's argmax (and the pipeline) does.
    let mut best = (0, f32::NEG_INFINITY);
    for (i, &v) in p.iter().enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

fn eval_ner(
    model: &LocalModel,
    args: &EvalArgs,
    reference: &str,
    sentences: &[Sentence],
) -> Result<String> {
    let labels: Vec<String> = model.info.labels.iter().map(|l| as_iob(l)).collect();
    let joined: Vec<(String, Vec<(usize, usize)>)> =
        sentences.iter().map(|s| join_words(&s.tokens)).collect();
    // Every window of a long sentence is tagged, as `triage entities` does;
    // a word keeps the prediction of the window where its first sub-token has
    // the most context on both sides.
    let encoded = joined
        .iter()
        .map(|(text, _)| model.tokenizer.encode(text, true))
        .collect::<triage_local::Result<Vec<_>>>()?;
    let truncated = encoded.iter().filter(|e| e.truncated).count();
    let pairs: Vec<(usize, usize)> = encoded
        .iter()
        .enumerate()
        .flat_map(|(i, e)| (0..e.windows.len()).map(move |w| (i, w)))
        .collect();
    let lengths: Vec<usize> = pairs
        .iter()
        .map(|&(i, w)| encoded[i].windows[w].len())
        .collect();

    let bar = progress_bar(pairs.len());
    let mut best: Vec<Vec<Option<(usize, String)>>> = sentences
        .iter()
        .map(|s| vec![None; s.tokens.len()])
        .collect();
    for batch in batches(&lengths, args.batch) {
        let group: Vec<&Encoded> = batch
            .iter()
            .map(|&k| &encoded[pairs[k].0].windows[pairs[k].1])
            .collect();
        let probs = model.tag_windows(&group)?;
        for (&k, per_token) in batch.iter().zip(probs) {
            let (i, w) = pairs[k];
            let window = &encoded[i].windows[w];
            let body: Vec<usize> = (0..window.len()).filter(|&t| !window.special[t]).collect();
            let first = first_subtokens(window, &joined[i].1);
            for (word, t) in first.iter().enumerate() {
                let Some(t) = *t else { continue };
                let Some(pos) = body.iter().position(|&b| b == t) else {
                    continue;
                };
                let context = pos.min(body.len() - 1 - pos);
                let tag = per_token
                    .get(t)
                    .and_then(|p| labels.get(argmax(p)))
                    .map_or_else(|| OUTSIDE.to_owned(), Clone::clone);
                if best[i][word].as_ref().is_none_or(|(c, _)| context > *c) {
                    best[i][word] = Some((context, tag));
                }
            }
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let predicted: Vec<Vec<String>> = best
        .into_iter()
        .map(|words| {
            let mut tags: Vec<String> = words
                .into_iter()
                .map(|b| b.map_or_else(|| OUTSIDE.to_owned(), |(_, tag)| tag))
                .collect();
            metrics::iob1_to_iob2(&mut tags);
            tags
        })
        .collect();

    let gold: Vec<&[String]> = sentences.iter().map(|s| s.tags.as_slice()).collect();
    let report = metrics::entity_report(&gold, &predicted);
    Ok(serde_json::to_string(&NerReport {
        task: "ner",
        model: reference,
        n: sentences.len(),
        precision: report.precision,
        recall: report.recall,
        f1: report.f1,
        per_type: report.per_type,
        truncated,
    })?)
}

// ---------------------------------------------------------------- plot

/// The last `max` characters of `s`, after an ellipsis when cut: model
/// paths are long and their end says the most.
fn keep_end(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        s.to_owned()
    } else {
        let tail: String = s.chars().skip(n - max.saturating_sub(1)).collect();
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_probability_sums_softmax_and_maxes_sigmoid() {
        let p = [0.1, 0.3, 0.6];
        assert!((positive_probability(&p, &[1, 2], Activation::Softmax) - 0.9).abs() < 1e-6);
        assert!((positive_probability(&p, &[1, 2], Activation::Sigmoid) - 0.6).abs() < 1e-6);
    }

    #[test]
    fn positive_labels_follow_the_documented_order() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let labels = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let l = labels(&["ok", "Offensive", "insult", "spam"]);
        assert_eq!(positive_labels(None, dir.path(), "m", &l)?.0, [1, 2]);
        let flag = labels(&["spam", " ok"]);
        assert_eq!(positive_labels(Some(&flag), dir.path(), "m", &l)?.0, [3, 0]);
        let unknown = positive_labels(Some(&labels(&["toxic"])), dir.path(), "m", &l);
        assert!(format!("{:#}", unknown.err().context("must fail")?).contains("no label `toxic`"));
        assert_eq!(
            positive_labels(None, dir.path(), "m", &labels(&["a", "b"]))?.0,
            [1]
        );
        let three = labels(&["a", "b", "c"]);
        let err = positive_labels(None, dir.path(), "m", &three)
            .err()
            .context("must fail")?;
        assert!(err.to_string().contains("--positive-labels"), "{err}");
        std::fs::write(
            dir.path().join("triage.json"),
            r#"{"positive_labels": ["a"]}"#,
        )?;
        assert_eq!(positive_labels(None, dir.path(), "m", &three)?.0, [0]);
        Ok(())
    }

    #[test]
    fn tags_are_checked_and_model_labels_read_as_iob() {
        assert!(is_iob2_tag("O") && is_iob2_tag("B-PER") && is_iob2_tag("I-MISC"));
        assert!(!is_iob2_tag("E-PER") && !is_iob2_tag("PER") && !is_iob2_tag("B-"));
        assert_eq!(as_iob("PER"), "I-PER");
        assert_eq!(as_iob("B-PER"), "B-PER");
        assert_eq!(as_iob("O"), "O");
    }

    #[test]
    fn long_titles_keep_their_end() {
        assert_eq!(keep_end("short", 10), "short");
        assert_eq!(keep_end("/a/long/path/model", 6), "…model");
        assert_eq!(keep_end("/a/long/path/model", 6).chars().count(), 6);
    }

    #[test]
    fn batches_group_similar_lengths() {
        assert_eq!(batches(&[5, 1, 3, 2], 2), [vec![1, 3], vec![2, 0]]);
        assert_eq!(batches(&[], 4), Vec::<Vec<usize>>::new());
    }
}
