//! Ctrl-C during `triage train`: the process stops after the batch in flight,
//! exits 130, and leaves the best finished epoch as a loadable model folder.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn data(path: &Path, n: usize) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    for i in 0..n {
        let bad = i % 3 == 0;
        let word = if bad { "awful" } else { "lovely" };
        writeln!(
            f,
            "{}",
            serde_json::json!({"text": format!("the {word} day number {i}"), "label": i32::from(bad)})
        )?;
    }
    Ok(())
}

#[test]
fn ctrl_c_keeps_the_best_checkpoint() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (train, val, out) = (
        tmp.path().join("train.jsonl"),
        tmp.path().join("val.jsonl"),
        tmp.path().join("model"),
    );
    data(&train, 400)?;
    data(&val, 60)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["train", "--task", "sequence-classification", "--base"])
        .arg(fixture("bert-seq-single"))
        .arg("--train")
        .arg(&train)
        .arg("--val")
        .arg(&val)
        .arg("--out")
        .arg(&out)
        .args([
            "--label-names",
            "ok,toxic",
            "--epochs",
            "100000",
            "--lr",
            "3e-3",
        ])
        .args([
            "--batch",
            "8",
            "--max-length",
            "32",
            "--unfreeze-layers",
            "1",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;

    // Wait for the first finished epoch on stderr, then press Ctrl-C.
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("epoch 1:") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let first_epoch = rx.recv_timeout(Duration::from_secs(300));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(killed.success());
    let output = child.wait_with_output()?;
    let stderr = reader.join().unwrap_or_default();
    assert!(first_epoch.is_ok(), "no epoch finished: {stderr}");
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopping after this batch"), "{stderr}");

    let report: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["interrupted"], true);
    let best = report["best_epoch"].as_u64().unwrap_or(0);
    assert!(best >= 1, "{report}");
    let epochs = report["epochs"].as_array().map(Vec::len).unwrap_or(0);
    assert!(epochs < 100_000, "it did not stop: {epochs} epochs");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(out.join("training.json"))?)?;
    assert_eq!(saved["best_epoch"].as_u64(), Some(best));
    let leftovers: Vec<_> = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "half-written files: {leftovers:?}");

    // The folder is a working model.
    let run = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["moderate", "--model"])
        .arg(&out)
        .arg("the awful day number 7")
        .env("HF_HUB_OFFLINE", "1")
        .output()?;
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let line: Value = serde_json::from_slice(&run.stdout)?;
    let scores = line["scores"].as_object().cloned().unwrap_or_default();
    let mut labels: Vec<&String> = scores.keys().collect();
    labels.sort();
    assert_eq!(labels, ["ok", "toxic"], "{line}");
    Ok(())
}
