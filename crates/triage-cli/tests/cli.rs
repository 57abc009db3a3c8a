//! The `triage` binary end to end on the committed tiny checkpoints: the
//! output contract of `moderate` and `entities` (interface used by acceptance
//! checks), input order, pass-through fields and bad input.

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn triage(args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.unwrap_or_default())?;
    }
    Ok(child.wait_with_output()?)
}

fn lines(out: &Output) -> anyhow::Result<Vec<Value>> {
    String::from_utf8(out.stdout.clone())?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[test]
fn moderate_one_text_prints_every_label() -> anyhow::Result<()> {
    let out = triage(
        &[
            "moderate",
            "--model",
            &model("distilbert-seq-multilabel"),
            "you idiot",
        ],
        None,
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = lines(&out)?;
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["text"], "you idiot");
    assert_eq!(v[0]["truncated"], false);
    let scores = v[0]["scores"].as_object().expect("scores object");
    let labels: Vec<&str> = scores.keys().map(String::as_str).collect();
    for l in ["toxic", "insult", "threat", "identity_hate"] {
        assert!(labels.contains(&l), "missing {l} in {labels:?}");
    }
    assert!(
        scores
            .values()
            .all(|p| p.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)))
    );
    Ok(())
}

#[test]
fn moderate_file_keeps_order_and_passes_fields_through() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("in.jsonl");
    let mut body = String::new();
    for i in 0..100 {
        body.push_str(&format!(
            "{{\"text\": \"message {i} {}\", \"id\": {i}}}\n",
            "x ".repeat(i % 7)
        ));
    }
    body.push_str("{\"text\": \"\", \"id\": 100}\n\n");
    std::fs::write(&path, body)?;
    let p = path.to_string_lossy();
    let out = triage(
        &[
            "moderate",
            "--model",
            &model("bert-seq-single"),
            "--file",
            &p,
        ],
        None,
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = lines(&out)?;
    assert_eq!(v.len(), 101);
    for (i, line) in v.iter().enumerate() {
        assert_eq!(line["id"], i, "output out of order at {i}");
        let sum: f64 = line["scores"]
            .as_object()
            .expect("scores")
            .values()
            .filter_map(Value::as_f64)
            .sum();
        assert!((sum - 1.0).abs() < 1e-4, "softmax scores sum to {sum}");
    }
    Ok(())
}

#[test]
fn malformed_line_stops_with_its_line_number() -> anyhow::Result<()> {
    let input = b"{\"text\": \"ok\"}\n{\"text\": oops}\n{\"text\": \"fine\"}\n";
    let m = model("distilbert-seq-multilabel");
    let out = triage(&["moderate", "--model", &m, "--file", "-"], Some(input))?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
    assert!(
        out.stdout.is_empty(),
        "nothing is scored when the input is bad"
    );

    let out = triage(
        &["moderate", "--model", &m, "--file", "-", "--keep-going"],
        Some(input),
    )?;
    assert_eq!(out.status.code(), Some(3));
    let v = lines(&out)?;
    assert_eq!(v.len(), 3, "one output line per input line");
    assert_eq!(v[0]["text"], "ok");
    assert_eq!(v[1]["line"], 2);
    assert_eq!(v[1]["error"]["kind"], "malformed_json");
    assert_eq!(v[2]["text"], "fine");
    Ok(())
}

#[test]
fn invalid_utf8_and_missing_text_are_reported() -> anyhow::Result<()> {
    let m = model("distilbert-seq-multilabel");
    let out = triage(
        &["moderate", "--model", &m, "--file", "-", "--keep-going"],
        Some(b"\xff\xfe\n{\"msg\": 1}\n"),
    )?;
    let v = lines(&out)?;
    assert_eq!(v[0]["error"]["kind"], "invalid_utf8");
    assert_eq!(v[1]["error"]["kind"], "missing_text");
    Ok(())
}

#[test]
fn entities_prints_spans_with_offsets() -> anyhow::Result<()> {
    let text = "Angela Merkel met Emmanuel Macron in Paris on Tuesday.";
    for agg in ["simple", "first", "max"] {
        let out = triage(
            &[
                "entities",
                "--model",
                &model("bert-token"),
                "--aggregation",
                agg,
                text,
            ],
            None,
        )?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = lines(&out)?;
        assert_eq!(v[0]["text"], text);
        for e in v[0]["entities"].as_array().expect("entities array") {
            let (s, end) = (
                e["start"].as_u64().expect("start") as usize,
                e["end"].as_u64().expect("end") as usize,
            );
            assert_eq!(e["text"].as_str(), text.get(s..end));
            let label = e["label"].as_str().expect("label");
            assert!(
                !label.starts_with("B-") && !label.starts_with("I-"),
                "{label}"
            );
            assert!(e["score"].as_f64().is_some());
        }
    }
    Ok(())
}

#[test]
fn wrong_model_kind_and_unknown_models_fail_clearly() -> anyhow::Result<()> {
    let out = triage(
        &[
            "entities",
            "--model",
            &model("distilbert-seq-multilabel"),
            "hi",
        ],
        None,
    )?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token-classification"));

    let out = triage(
        &["moderate", "--model", "nobody/no-such-model@v1", "hi"],
        None,
    )?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nobody/no-such-model@v1") && err.contains("triage models pull"),
        "{err}"
    );

    let out = triage(&["moderate", "--model", "not a model", "hi"], None)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"));

    let out = triage(
        &[
            "entities",
            "--model",
            &model("bert-token"),
            "--aggregation",
            "average",
            "hi",
        ],
        None,
    )?;
    assert!(!out.status.success());
    Ok(())
}

#[test]
fn models_list_names_every_default_specialist() -> anyhow::Result<()> {
    let out = triage(&["models", "list"], None)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = lines(&out)?;
    let names: Vec<&str> = v.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, ["toxicity", "ner", "embedding"]);
    assert!(v.iter().all(|m| m["status"]["available"].is_boolean()));
    Ok(())
}

#[test]
fn cuda_device_in_a_cpu_build_fails_with_the_feature_name() -> anyhow::Result<()> {
    if cfg!(feature = "cuda") {
        return Ok(());
    }
    let out = triage(
        &[
            "--device",
            "cuda",
            "moderate",
            "--model",
            &model("bert-seq-single"),
            "hi",
        ],
        None,
    )?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cuda"));
    Ok(())
}

/// `triage execute` on the shipped moderation example, for a tweet the
/// default specialist is unsure of, with no OpenAI key: the request fails
/// naming the variable, stdout stays empty, and stderr shows what ran first
/// (the local tier escalated, the hosted tiers failed without a request).
#[test]
fn a_failed_execute_shows_the_trace_of_what_ran_first() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/moderation.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["execute", "--config"])
        .arg(&config)
        .args(["--task", "moderation", "--text"])
        // Scored 0.689 by the default specialist: inside the 0.2-0.8 band.
        .arg("that referee was blind and useless today, write to me at fan@example.com")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRIAGE_DATA_DIR", dir.path())
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("OPENAI_API_KEY"), "{err}");
    let (_, rest) = err
        .split_once("trace of the failed request:\n")
        .ok_or_else(|| anyhow::anyhow!("no trace in: {err}"))?;
    let trace: Value = serde_json::Deserializer::from_str(rest)
        .into_iter::<Value>()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no JSON after the header: {err}"))??;
    let tiers = trace["tiers"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no tiers: {trace}"))?;
    assert_eq!(tiers[0]["tier"], "local", "{trace}");
    assert_eq!(tiers[0]["decision"], "escalated", "{trace}");
    assert!(tiers.len() >= 2, "{trace}");
    assert!(
        tiers[1..].iter().all(|t| t["decision"] == "failed"),
        "{trace}"
    );
    Ok(())
}

#[test]
fn the_printed_default_config_passes_config_check() -> anyhow::Result<()> {
    let out = triage(&["config", "default"], None)?;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("[tasks.moderation]"), "{text}");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("f.toml");
    std::fs::write(&file, &text)?;
    let file = file.to_string_lossy().into_owned();
    let check = triage(&["config", "check", &file], None)?;
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(
        said.contains("ok (2 task(s): moderation, transcription"),
        "{said}"
    );
    // A broken copy is refused with the key it names.
    std::fs::write(&file, text.replace("threshold = 0.5", "threshold = 7"))?;
    let broken = triage(&["config", "check", &file], None)?;
    assert!(!broken.status.success());
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("tasks.moderation.threshold"),
        "{broken:?}"
    );
    Ok(())
}

#[test]
fn transcribe_verbose_json_has_timed_words_with_probabilities() -> anyhow::Result<()> {
    let shared = std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let model = shared.join("models/whisper-tiny.en/ggml-model-f16.bin");
    if !model.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no Whisper model at {}",
            model.display()
        );
        eprintln!("SKIPPED: no Whisper model at {}", model.display());
        return Ok(());
    }
    let clip = shared.join("data/speech/goforward.wav");
    let out = triage(
        &[
            "transcribe",
            "--model",
            &model.to_string_lossy(),
            "--format",
            "verbose_json",
            &clip.to_string_lossy(),
        ],
        None,
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = lines(&out)?.remove(0);
    let words = v["words"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no words: {v}"))?;
    assert!(!words.is_empty(), "{v}");
    let mut last = 0.0;
    for w in words {
        let (start, end) = (
            w["start"].as_f64().unwrap_or(-1.0),
            w["end"].as_f64().unwrap_or(-1.0),
        );
        assert!(last <= start && start <= end, "{w}");
        assert!(
            (0.0..=1.0).contains(&w["probability"].as_f64().unwrap_or(-1.0)),
            "{w}"
        );
        last = end;
    }
    let joined: Vec<&str> = words.iter().filter_map(|w| w["word"].as_str()).collect();
    assert_eq!(joined.join(" "), v["text"].as_str().unwrap_or_default());
    assert!(v["segments"][0]["words"].is_array(), "{v}");
    Ok(())
}
