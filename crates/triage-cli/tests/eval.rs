//! `triage eval` end to end on the committed tiny checkpoints (interface used
//! by acceptance checks). The metrics are recomputed here, independently,
//! from what `triage moderate` and `triage entities` print for the same data,
//! so a wrong mapping, metric or word alignment in `eval` shows up.

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const COVERAGES: [f64; 6] = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn triage_env(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_triage"));
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn triage(args: &[&str]) -> Result<Output> {
    triage_env(args, &[])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The one JSON object a successful `eval` prints.
fn report(out: &Output) -> Result<Value> {
    assert!(out.status.success(), "{}", stderr(out));
    let text = String::from_utf8(out.stdout.clone())?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object on one line: {text}");
    Ok(serde_json::from_str(lines[0])?)
}

/// `moderate`/`entities` output, one object per line.
fn lines(out: &Output) -> Result<Vec<Value>> {
    assert!(out.status.success(), "{}", stderr(out));
    String::from_utf8(out.stdout.clone())?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn num(v: &Value) -> Result<f64> {
    v.as_f64().with_context(|| format!("not a number: {v}"))
}

fn assert_close(got: &Value, want: f64, what: &str) -> Result<()> {
    let got = num(got)?;
    assert!(
        (got - want).abs() < 1e-6,
        "{what}: eval says {got}, expected {want}"
    );
    Ok(())
}

fn write(dir: &Path, name: &str, body: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    Ok(path.to_string_lossy().into_owned())
}

/// Toxicity data with varied texts, so model confidences rarely tie.
fn toxicity_data(n: usize) -> (String, Vec<usize>) {
    let words = [
        "you", "idiot", "lovely", "weather", "shut", "up", "thanks", "for", "help", "stupid",
        "great", "game", "hate", "this", "nice", "work",
    ];
    let mut body = String::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let len = 2 + i % 9;
        let text: Vec<&str> = (0..len)
            .map(|j| words[(i * 7 + j * 3 + j * j) % words.len()])
            .collect();
        let label = usize::from(i % 3 == 0 || i % 5 == 0);
        body.push_str(&serde_json::json!({"text": text.join(" "), "label": label}).to_string());
        body.push('\n');
        labels.push(label);
    }
    (body, labels)
}

/// Recompute the toxicity report from `moderate` scores and check `eval`'s.
fn check_toxicity(
    ev: &Value,
    scores: &[Value],
    gold: &[usize],
    p_of: impl Fn(&Value) -> Result<f64>,
) -> Result<()> {
    let n = gold.len();
    assert_eq!(ev["task"], "toxicity");
    assert_eq!(ev["n"], n);
    let p: Vec<f64> = scores.iter().map(&p_of).collect::<Result<_>>()?;
    let pred: Vec<usize> = p.iter().map(|&p| usize::from(p >= 0.5)).collect();
    let conf: Vec<f64> = p.iter().map(|&p| p.max(1.0 - p)).collect();
    let correct: Vec<bool> = gold.iter().zip(&pred).map(|(g, p)| g == p).collect();

    let right = correct.iter().filter(|&&c| c).count();
    assert_close(&ev["accuracy"], right as f64 / n as f64, "accuracy")?;
    let mut f1s = Vec::new();
    for label in [0usize, 1] {
        let tp = gold
            .iter()
            .zip(&pred)
            .filter(|&(&g, &p)| g == label && p == label)
            .count();
        let predicted = pred.iter().filter(|&&p| p == label).count();
        let support = gold.iter().filter(|&&g| g == label).count();
        let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let stats = &ev["per_label"][label.to_string()];
        assert_close(&stats["precision"], div(tp, predicted), "precision")?;
        assert_close(&stats["recall"], div(tp, support), "recall")?;
        let f1 = div(2 * tp, predicted + support);
        assert_close(&stats["f1"], f1, "f1")?;
        assert_eq!(stats["support"], support);
        if predicted + support > 0 {
            f1s.push(f1);
        }
    }
    assert_close(
        &ev["macro_f1"],
        f1s.iter().sum::<f64>() / f1s.len() as f64,
        "macro_f1",
    )?;

    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| conf[b].total_cmp(&conf[a]));
    let selective = ev["selective"].as_array().context("selective")?;
    assert_eq!(selective.len(), COVERAGES.len());
    for (point, coverage) in selective.iter().zip(COVERAGES) {
        assert_close(&point["coverage"], coverage, "coverage")?;
        let acc = num(&point["accuracy"])?;
        assert!((0.0..=1.0).contains(&acc));
        let k = (coverage * n as f64 - 1e-9).ceil() as usize;
        // `moderate` batches differently, so a near-tie at the cut may swap.
        if k < n && (conf[order[k - 1]] - conf[order[k]]).abs() < 1e-5 {
            continue;
        }
        let right = order[..k].iter().filter(|&&i| correct[i]).count();
        assert_close(
            &point["accuracy"],
            right as f64 / k as f64,
            "selective accuracy",
        )?;
    }

    let mut bins = vec![(0usize, 0usize, 0.0f64); 15];
    for (&c, &ok) in conf.iter().zip(&correct) {
        let b = ((c * 15.0).ceil() as usize).clamp(1, 15) - 1;
        bins[b].0 += 1;
        bins[b].1 += usize::from(ok);
        bins[b].2 += c;
    }
    let ece: f64 = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(count, right, sum)| {
            (right as f64 / count as f64 - sum / count as f64).abs() * count as f64 / n as f64
        })
        .sum();
    let got = num(&ev["ece"])?;
    assert!(
        (got - ece).abs() < 1e-4,
        "ece: eval says {got}, expected {ece}"
    );
    assert!((0.0..=1.0).contains(&got));
    Ok(())
}

fn moderate_scores(model_dir: &str, data: &str) -> Result<Vec<Value>> {
    let out = triage(&["moderate", "--model", model_dir, "--file", data])?;
    Ok(lines(&out)?
        .into_iter()
        .map(|l| l["scores"].clone())
        .collect())
}

#[test]
fn toxicity_on_a_sigmoid_model_matches_moderate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (body, gold) = toxicity_data(60);
    let data = write(dir.path(), "tox.jsonl", &body)?;
    let m = model("distilbert-seq-multilabel");
    let svg = dir.path().join("curve.svg");
    let svg_arg = svg.to_string_lossy().into_owned();
    // No --positive-labels: `toxic` and `insult` are found by name; a
    // multi-label model takes their maximum.
    let out = triage(&[
        "eval", "--task", "toxicity", "--model", &m, "--data", &data, "--out", &svg_arg, "--batch",
        "7",
    ])?;
    let ev = report(&out)?;
    assert_eq!(ev["model"], m.as_str());
    let scores = moderate_scores(&m, &data)?;
    check_toxicity(&ev, &scores, &gold, |s| {
        Ok(num(&s["toxic"])?.max(num(&s["insult"])?))
    })?;

    let drawn = std::fs::read_to_string(&svg)?;
    assert!(drawn.starts_with("<svg") && drawn.trim_end().ends_with("</svg>"));
    assert_eq!(
        drawn.matches("<circle").count(),
        6,
        "one marker per coverage"
    );
    assert!(drawn.contains("coverage") && drawn.contains("accuracy"));

    // The same curve as PNG: twice the SVG's size, and the title's text is
    // drawn (the font is compiled in, not looked up on the machine).
    let png = dir.path().join("curve.png");
    let png_arg = png.to_string_lossy().into_owned();
    let out = triage(&[
        "eval", "--task", "toxicity", "--model", &m, "--data", &data, "--out", &png_arg,
    ])?;
    assert_eq!(report(&out)?["macro_f1"], ev["macro_f1"]);
    let image = resvg::tiny_skia::Pixmap::decode_png(&std::fs::read(&png)?)?;
    let width: f32 = attr(&drawn, "width")?;
    let height: f32 = attr(&drawn, "height")?;
    assert_eq!(
        (image.width(), image.height()),
        ((width * 2.0) as u32, (height * 2.0) as u32)
    );
    // Title band: rows 30..64 of the 2x image (the title's baseline is y = 28).
    let dark_in_title = (30..64)
        .flat_map(|y| (0..image.width()).map(move |x| (x, y)))
        .filter(|&(x, y)| image.pixel(x, y).is_some_and(|p| p.red() < 128))
        .count();
    assert!(
        dark_in_title > 200,
        "title not drawn: {dark_in_title} dark pixels"
    );
    Ok(())
}

/// A numeric attribute of the root `<svg>` element.
fn attr(svg: &str, name: &str) -> Result<f32> {
    let key = format!(" {name}=\"");
    let start = svg.find(&key).map(|i| i + key.len()).unwrap_or_default();
    let end = svg[start..].find('"').unwrap_or_default();
    Ok(svg[start..start + end].parse()?)
}

#[test]
fn toxicity_on_a_softmax_model_sums_the_positive_labels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (body, gold) = toxicity_data(45);
    let data = write(dir.path(), "tox.jsonl", &body)?;
    let m = model("bert-seq-single");
    let out = triage(&[
        "eval",
        "--task",
        "toxicity",
        "--model",
        &m,
        "--data",
        &data,
        "--positive-labels",
        "neutral,positive",
    ])?;
    let ev = report(&out)?;
    let scores = moderate_scores(&m, &data)?;
    check_toxicity(&ev, &scores, &gold, |s| {
        Ok((num(&s["neutral"])? + num(&s["positive"])?).min(1.0))
    })?;

    // The same choice written in the model folder's triage.json.
    let copy = dir.path().join("model");
    std::fs::create_dir(&copy)?;
    for entry in std::fs::read_dir(&m)? {
        let entry = entry?;
        std::fs::copy(entry.path(), copy.join(entry.file_name()))?;
    }
    std::fs::write(
        copy.join("triage.json"),
        r#"{"positive_labels": ["neutral", "positive"]}"#,
    )?;
    let c = copy.to_string_lossy().into_owned();
    let mut from_file = report(&triage(&[
        "eval", "--task", "toxicity", "--model", &c, "--data", &data,
    ])?)?;
    assert_eq!(from_file["model"], c.as_str());
    from_file["model"] = ev["model"].clone();
    assert_eq!(from_file, ev);
    Ok(())
}

#[test]
fn toxicity_refuses_bad_input_and_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let good = write(
        d,
        "good.jsonl",
        "{\"text\": \"hi\", \"label\": 0}\n{\"text\": \"you idiot\", \"label\": 1}\n",
    )?;
    let multi = model("distilbert-seq-multilabel");
    let single = model("bert-seq-single");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--model".into(),
                multi.clone(),
                "--data".into(),
                good.clone(),
                "--positive-labels".into(),
                "toxic,rude".into(),
            ],
            "rude",
        ),
        (
            vec![
                "--model".into(),
                multi.clone(),
                "--data".into(),
                write(
                    d,
                    "two.jsonl",
                    "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 2}\n",
                )?,
            ],
            "line 2",
        ),
        (
            vec![
                "--model".into(),
                multi.clone(),
                "--data".into(),
                write(d, "str.jsonl", "{\"text\": \"a\", \"label\": \"1\"}\n")?,
            ],
            "line 1",
        ),
        (
            vec![
                "--model".into(),
                multi.clone(),
                "--data".into(),
                write(
                    d,
                    "nolabel.jsonl",
                    "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\"}\n",
                )?,
            ],
            "line 3",
        ),
        (
            vec![
                "--model".into(),
                multi.clone(),
                "--data".into(),
                write(
                    d,
                    "bad.jsonl",
                    "{\"text\": \"a\", \"label\": 0}\n{\"text\": oops}\n",
                )?,
            ],
            "line 2",
        ),
        (
            vec![
                "--model".into(),
                multi.clone(),
                "--data".into(),
                write(d, "empty.jsonl", "\n\n")?,
            ],
            "no examples",
        ),
        (
            vec![
                "--model".into(),
                multi.clone(),
                "--data".into(),
                good.clone(),
                "--out".into(),
                d.join("c.pdf").to_string_lossy().into_owned(),
            ],
            "ending in .svg or .png",
        ),
        (
            vec!["--model".into(), single, "--data".into(), good.clone()],
            "--positive-labels",
        ),
        (
            vec![
                "--model".into(),
                model("bert-token"),
                "--data".into(),
                good.clone(),
            ],
            "sequence-classification",
        ),
        (
            vec![
                "--model".into(),
                multi,
                "--data".into(),
                d.join("missing.jsonl").to_string_lossy().into_owned(),
            ],
            "missing.jsonl",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["eval", "--task", "toxicity"];
        args.extend(extra.iter().map(String::as_str));
        let out = triage(&args)?;
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "{args:?} printed a report");
        let err = stderr(&out);
        assert!(
            err.contains(needle),
            "{args:?}: expected `{needle}` in: {err}"
        );
    }
    assert!(!d.join("c.pdf").exists());
    Ok(())
}

/// Gold sentences: alphabetic words only, so every word is one word for the
/// `transformers` pipeline too and `entities --aggregation first` labels
/// words exactly as `eval` does.
const SENTENCES: &[(&str, &str)] = &[
    ("Angela Merkel visited Paris", "B-PER I-PER O B-LOC"),
    ("John works for Google in London", "B-PER O O B-ORG O B-LOC"),
    (
        "The European Union met in Brussels on Monday",
        "O B-ORG I-ORG O O B-LOC O O",
    ),
    (
        "Emmanuel Macron and Olaf Scholz spoke",
        "B-PER I-PER O B-PER I-PER O",
    ),
    ("He likes Italian food", "O O B-MISC O"),
    ("nothing to see here", "O O O O"),
    (
        "Reuters reported that Microsoft bought Activision Blizzard",
        "B-ORG O O B-ORG O B-ORG I-ORG",
    ),
    ("New York and New Jersey", "B-LOC I-LOC O B-LOC I-LOC"),
];

/// Words and their gold tags.
type Tagged = (Vec<String>, Vec<String>);

fn ner_data(dir: &Path) -> Result<(String, Vec<Tagged>)> {
    let mut sentences: Vec<Tagged> = SENTENCES
        .iter()
        .map(|(t, g)| {
            (
                t.split(' ').map(String::from).collect(),
                g.split(' ').map(String::from).collect(),
            )
        })
        .collect();
    // Longer than the fixtures' 128-token window: its tail words count as O.
    let long: Vec<String> = (0..200)
        .map(|i| ["Paris", "is", "nice", "Berlin"][i % 4].to_owned())
        .collect();
    let tags = long
        .iter()
        .map(|w| {
            if w == "Paris" || w == "Berlin" {
                "B-LOC"
            } else {
                "O"
            }
            .to_owned()
        })
        .collect();
    sentences.push((long, tags));
    let body: String = sentences
        .iter()
        .map(|(tokens, tags)| format!("{}\n", serde_json::json!({"tokens": tokens, "tags": tags})))
        .collect();
    Ok((write(dir, "ner.jsonl", &body)?, sentences))
}

/// Chunks of IOB2 tags as (type, first word, last word + 1), conlleval rules.
fn gold_chunks(tags: &[String]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize)> = None;
    for (i, t) in tags
        .iter()
        .chain(std::iter::once(&"O".to_owned()))
        .enumerate()
    {
        let (begin, kind) = match t.split_once('-') {
            Some((p, k)) => (p == "B", Some(k.to_owned())),
            None => (false, None),
        };
        let continues = !begin && kind.is_some() && open.as_ref().map(|o| &o.0) == kind.as_ref();
        if !continues {
            if let Some((k, s)) = open.take() {
                out.push((k, s, i));
            }
            open = kind.map(|k| (k, i));
        }
    }
    out
}

#[test]
fn ner_matches_entities_with_first_aggregation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, sentences) = ner_data(dir.path())?;
    let texts: String = sentences
        .iter()
        .map(|(tokens, _)| format!("{}\n", serde_json::json!({"text": tokens.join(" ")})))
        .collect();
    let text_file = write(dir.path(), "texts.jsonl", &texts)?;
    for name in ["bert-token", "distilbert-token"] {
        let m = model(name);
        let ev = report(&triage(&[
            "eval", "--task", "ner", "--model", &m, "--data", &data, "--batch", "3",
        ])?)?;
        assert_eq!(ev["task"], "ner");
        assert_eq!(ev["model"], m.as_str());
        assert_eq!(ev["n"], sentences.len());
        assert_eq!(ev["truncated"], 1, "{name}: only the long sentence is cut");

        let tagged = lines(&triage(&[
            "entities",
            "--model",
            &m,
            "--aggregation",
            "first",
            "--file",
            &text_file,
        ])?)?;
        // Counts per type: (true positives, predicted, gold).
        let mut counts: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
        for ((tokens, tags), t) in sentences.iter().zip(&tagged) {
            let mut word_at = Vec::new();
            for (w, token) in tokens.iter().enumerate() {
                word_at.extend(std::iter::repeat_n(Some(w), token.chars().count()));
                word_at.push(None);
            }
            let mut predicted = HashSet::new();
            for e in t["entities"].as_array().context("entities")? {
                let (s, end) = (num(&e["start"])? as usize, num(&e["end"])? as usize);
                let first = word_at[s].context("entity starts on a space")?;
                let last = word_at[end - 1].context("entity ends on a space")?;
                let kind = e["label"].as_str().context("label")?.to_owned();
                counts.entry(kind.clone()).or_default().1 += 1;
                predicted.insert((kind, first, last + 1));
            }
            for chunk in gold_chunks(tags) {
                let c = counts.entry(chunk.0.clone()).or_default();
                c.2 += 1;
                c.0 += usize::from(predicted.contains(&chunk));
            }
        }
        let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let (tp, p, g) = counts
            .values()
            .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
        assert_close(&ev["precision"], div(tp, p), "precision")?;
        assert_close(&ev["recall"], div(tp, g), "recall")?;
        assert_close(&ev["f1"], div(2 * tp, p + g), "f1")?;
        let per_type = ev["per_type"].as_object().context("per_type")?;
        assert_eq!(
            per_type.keys().cloned().collect::<Vec<_>>(),
            counts.keys().cloned().collect::<Vec<_>>()
        );
        for (kind, &(tp, p, g)) in &counts {
            let s = &per_type[kind];
            assert_close(&s["precision"], div(tp, p), "type precision")?;
            assert_close(&s["recall"], div(tp, g), "type recall")?;
            assert_close(&s["f1"], div(2 * tp, p + g), "type f1")?;
            assert_eq!(s["support"], g);
        }
    }
    Ok(())
}

#[test]
fn ner_refuses_bad_input_and_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let ok = "{\"tokens\": [\"Angela\", \"Merkel\"], \"tags\": [\"B-PER\", \"I-PER\"]}\n";
    let good = write(d, "good.jsonl", ok)?;
    let m = model("bert-token");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--data".into(),
                write(
                    d,
                    "len.jsonl",
                    &format!("{ok}{{\"tokens\": [\"a\", \"b\"], \"tags\": [\"O\"]}}\n"),
                )?,
            ],
            "line 2",
        ),
        (
            vec![
                "--data".into(),
                write(
                    d,
                    "tag.jsonl",
                    &format!("{ok}{ok}{{\"tokens\": [\"a\"], \"tags\": [\"E-PER\"]}}\n"),
                )?,
            ],
            "line 3",
        ),
        (
            vec![
                "--data".into(),
                write(d, "text.jsonl", "{\"text\": \"Angela Merkel\"}\n")?,
            ],
            "line 1",
        ),
        (
            vec!["--data".into(), write(d, "empty.jsonl", "")?],
            "no examples",
        ),
        (
            vec![
                "--data".into(),
                good.clone(),
                "--out".into(),
                d.join("c.svg").to_string_lossy().into_owned(),
            ],
            "--out",
        ),
        (
            vec![
                "--data".into(),
                good.clone(),
                "--positive-labels".into(),
                "PER".into(),
            ],
            "--positive-labels",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["eval", "--task", "ner", "--model", &m];
        args.extend(extra.iter().map(String::as_str));
        let out = triage(&args)?;
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty());
        let err = stderr(&out);
        assert!(
            err.contains(needle),
            "{args:?}: expected `{needle}` in: {err}"
        );
    }
    let seq = model("bert-seq-single");
    let out = triage(&["eval", "--task", "ner", "--model", &seq, "--data", &good])?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("token-classification"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

#[test]
fn without_model_eval_uses_the_default_specialist() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = write(
        dir.path(),
        "tox.jsonl",
        "{\"text\": \"have a nice day\", \"label\": 0}\n",
    )?;
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    let empty = empty.to_string_lossy().into_owned();
    // Offline, with no base encoder in the mirror or the cache: the error
    // names the default specialist's base and the fix.
    let out = triage_env(
        &["eval", "--task", "toxicity", "--data", &data],
        &[
            ("HF_HUB_CACHE", &empty),
            ("TRIAGE_HUB_MIRROR", &empty),
            ("HF_HUB_OFFLINE", "1"),
        ],
    )?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("sentence-transformers/all-MiniLM-L6-v2")
            && err.contains("triage models pull"),
        "{err}"
    );
    Ok(())
}

/// The committed toxicity specialist on real validation tweets (the base
/// comes from the hub mirror that scripts/test fills from PyPI).
#[test]
fn the_default_toxicity_specialist_beats_chance_on_real_tweets() -> Result<()> {
    let Some(shared) = std::env::var_os("TRIAGE_SHARED") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set TRIAGE_SHARED"
        );
        eprintln!("SKIPPED: TRIAGE_SHARED not set");
        return Ok(());
    };
    let val = std::path::Path::new(&shared).join("data/toxicity/tweeteval-offensive/val.jsonl");
    let dir = tempfile::tempdir()?;
    let head: String = std::fs::read_to_string(val)?
        .lines()
        .take(300)
        .map(|l| format!("{l}\n"))
        .collect();
    let data = write(dir.path(), "val300.jsonl", &head)?;
    let out = triage_env(
        &["eval", "--task", "toxicity", "--data", &data],
        &[("HF_HUB_OFFLINE", "1")],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["model"], "toxicity");
    assert_eq!(v["n"], 300);
    // Measured on the whole split: macro-F1 0.774; a random model sits near 0.5.
    let f1 = v["macro_f1"].as_f64().unwrap_or(0.0);
    assert!(f1 > 0.68, "macro-F1 {f1}");
    Ok(())
}

#[test]
fn ner_on_conll2003_validation() -> Result<()> {
    let Some(shared) = std::env::var_os("TRIAGE_SHARED") else {
        eprintln!("TRIAGE_SHARED is not set: skipped");
        return Ok(());
    };
    let source = PathBuf::from(shared).join("data/ner/conll2003/validation.jsonl");
    let text = std::fs::read_to_string(&source).with_context(|| source.display().to_string())?;
    let first: String = text.lines().take(200).map(|l| format!("{l}\n")).collect();
    let dir = tempfile::tempdir()?;
    let data = write(dir.path(), "val200.jsonl", &first)?;
    let ev = report(&triage(&[
        "eval",
        "--task",
        "ner",
        "--model",
        &model("bert-token"),
        "--data",
        &data,
    ])?)?;
    assert_eq!(ev["n"], 200);
    for key in ["precision", "recall", "f1"] {
        assert!((0.0..=1.0).contains(&num(&ev[key])?), "{key}");
    }
    let per_type = ev["per_type"].as_object().context("per_type")?;
    assert!(
        per_type
            .keys()
            .all(|k| ["PER", "ORG", "LOC", "MISC"].contains(&k.as_str()))
    );
    // The first 200 sentences hold entities of every CoNLL type.
    let support: u64 = per_type
        .values()
        .filter_map(|s| s["support"].as_u64())
        .sum();
    assert!(support > 0);
    Ok(())
}
