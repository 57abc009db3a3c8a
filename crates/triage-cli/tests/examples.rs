//! Every shipped example (examples/*.toml) runs exactly as its header comment
//! says, on a copy of a fresh checkout: the `triage ...` and `scripts/...`
//! lines of each header run through bash with the built `triage` first on
//! PATH. Without API keys or a self-hosted LLM server, a command may still
//! fail, but only with an error that names the missing key or server and
//! the fix. The models come from a hub mirror laid out as scripts/serve
//! leaves it: all-MiniLM-L6-v2 from `TRIAGE_MINILM_DIR` (scripts/test) and
//! Whisper tiny.en from `$TRIAGE_SHARED/models/whisper-tiny.en`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The commands of a config's header comment: lines `#   triage ...` or
/// `#   scripts/...`, with `\` continuations joined.
fn header_commands(text: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        let Some(comment) = line.strip_prefix('#') else {
            break;
        };
        let body = comment.trim();
        if let Some(cmd) = open.as_mut() {
            cmd.push(' ');
            cmd.push_str(body.trim_end_matches('\\').trim());
        } else if comment.starts_with("   ")
            && (body.starts_with("triage ") || body.starts_with("scripts/"))
        {
            open = Some(body.trim_end_matches('\\').trim().to_owned());
        } else {
            continue;
        }
        if !body.ends_with('\\') {
            commands.extend(open.take());
        }
    }
    commands
}

#[test]
fn header_commands_are_parsed_with_their_continuations() {
    let text = "# An example.\n#\n#   scripts/make-example-db      # the database\n\
                #   triage execute --config x.toml \\\n#       --text \"a b\"\n\
                # Not a command: triage is the binary.\n\nprices_file = \"p\"\n#   triage later\n";
    assert_eq!(
        header_commands(text),
        [
            "scripts/make-example-db      # the database",
            "triage execute --config x.toml --text \"a b\""
        ]
    );
}

/// A copy of what a fresh checkout has for the examples: the configs, the
/// SQL, the scripts they name and the committed audio fixtures.
fn fresh_checkout(dir: &Path) -> anyhow::Result<()> {
    let copy = |rel: &str| -> anyhow::Result<()> {
        let from = repo().join(rel);
        let to = dir.join(rel);
        std::fs::create_dir_all(to.parent().expect("a parent folder"))?;
        std::fs::copy(&from, &to)?;
        Ok(())
    };
    for entry in std::fs::read_dir(repo().join("examples"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // A database left by an earlier run is not part of a fresh checkout.
        if name.ends_with(".toml") || name.ends_with(".sql") {
            copy(&format!("examples/{name}"))?;
        }
    }
    copy("scripts/make-example-db")?;
    for entry in std::fs::read_dir(repo().join("tests/fixtures/audio"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        copy(&format!("tests/fixtures/audio/{name}"))?;
    }
    Ok(())
}

struct Models {
    mirror: tempfile::TempDir,
    whisper: bool,
}

/// A hub mirror as scripts/serve fills it, or `None` (skipped loudly; a
/// failure in CI) without all-MiniLM-L6-v2.
fn hub_mirror() -> anyhow::Result<Option<Models>> {
    let minilm = std::env::var_os("TRIAGE_MINILM_DIR").map(PathBuf::from);
    let Some(minilm) = minilm.filter(|p| p.join("config.json").is_file()) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set TRIAGE_MINILM_DIR (scripts/test does)"
        );
        eprintln!("SKIPPED: TRIAGE_MINILM_DIR not set; run scripts/test, which fetches it");
        return Ok(None);
    };
    let mirror = tempfile::tempdir()?;
    std::fs::create_dir_all(mirror.path().join("sentence-transformers"))?;
    std::os::unix::fs::symlink(
        &minilm,
        mirror.path().join("sentence-transformers/all-MiniLM-L6-v2"),
    )?;
    let shared = std::env::var_os("TRIAGE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"));
    let ggml = shared.join("models/whisper-tiny.en/ggml-model-f16.bin");
    let whisper = ggml.is_file();
    if whisper {
        std::fs::create_dir_all(mirror.path().join("ggerganov/whisper.cpp"))?;
        std::os::unix::fs::symlink(
            &ggml,
            mirror.path().join("ggerganov/whisper.cpp/ggml-tiny.en.bin"),
        )?;
    }
    Ok(Some(Models { mirror, whisper }))
}

/// `bash -c COMMAND` in `checkout` with the built triage first on PATH, no
/// API keys, and the ledger, sockets and models under `scratch`.
fn shell(checkout: &Path, scratch: &Path, mirror: &Path, command: &str) -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_triage"));
    let path = std::env::join_paths(
        std::iter::once(bin.parent().expect("the binary's folder").to_path_buf()).chain(
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default(),
        ),
    )
    .expect("a PATH");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(command)
        .current_dir(checkout)
        .env("PATH", path)
        .env("TRIAGE_HUB_MIRROR", mirror)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRIAGE_DATA_DIR", scratch.join("data"))
        .env("XDG_RUNTIME_DIR", scratch.join("run"))
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().ends_with("_API_KEY") {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether a failed command's error says what is missing and how to fix it:
/// OPENAI_API_KEY (the tests run without keys) and, when the self-hosted
/// server did not answer, its URL and how to get one. Nothing else may fail.
fn names_what_is_missing(stderr: &str) -> bool {
    let Some(error) = stderr.lines().rev().find(|l| l.starts_with("error: ")) else {
        return false;
    };
    let server_down = error.contains("local-llm/smollm2: Connect");
    error.starts_with("error: nothing could answer tier `")
        && error.contains("set OPENAI_API_KEY for provider `openai`")
        && (!server_down
            || error.contains(
                "start the server of provider `local-llm`: nothing answers at \
                 http://127.0.0.1:8081/v1 (for llama.cpp's llama-server, \
                 scripts/fetch-llama-server fetches one)",
            ))
}

/// `triage serve ...`: it must come up (answer /ready on its default socket)
/// and is then stopped.
fn serve_comes_up(mut cmd: Command, scratch: &Path) -> anyhow::Result<()> {
    let sock = scratch.join("run/triage/triage.sock");
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = loop {
        let answer = UnixStream::connect(&sock).and_then(|mut s| {
            s.write_all(b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        if answer.is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            break true;
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let out = child.wait_with_output()?;
    assert!(
        ready,
        "triage serve did not become ready on {}: {}",
        sock.display(),
        text(&out.stderr)
    );
    Ok(())
}

#[test]
fn every_example_runs_as_its_header_says() -> anyhow::Result<()> {
    let Some(models) = hub_mirror()? else {
        return Ok(());
    };
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    examples.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    examples.sort();
    let mut ran = 0;
    for example in &examples {
        let name = example.file_name().expect("a file name").to_string_lossy();
        let commands = header_commands(&std::fs::read_to_string(example)?);
        // prices.toml is data the configs share, not something to run.
        if name == "prices.toml" {
            assert!(commands.is_empty(), "{name}: {commands:?}");
            continue;
        }
        assert!(
            !commands.is_empty(),
            "{name} says nothing about how to run it"
        );
        // Each example on its own fresh copy: one example's setup must not
        // make another's work.
        let checkout = tempfile::tempdir()?;
        fresh_checkout(checkout.path())?;
        let scratch = tempfile::tempdir()?;
        for command in commands {
            let needs_whisper = name == "meeting-notes.toml" && command.contains("execute");
            if needs_whisper && !models.whisper {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must provide the shared Whisper model"
                );
                eprintln!("SKIPPED: {name}: `{command}` (no shared Whisper model)");
                continue;
            }
            let cmd = shell(
                checkout.path(),
                scratch.path(),
                models.mirror.path(),
                &command,
            );
            ran += 1;
            if command.starts_with("triage serve") {
                serve_comes_up(cmd, scratch.path())?;
                continue;
            }
            let mut cmd = cmd;
            let out: Output = cmd.output()?;
            let stderr = text(&out.stderr);
            assert!(
                out.status.success() || names_what_is_missing(&stderr),
                "{name}: `{command}` failed without naming what is missing and the fix:\n{stderr}"
            );
            if out.status.success() && command.starts_with("triage execute") {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                assert!(v.get("answer").is_some(), "{name}: {}", text(&out.stdout));
            }
        }
    }
    assert!(ran >= 5, "only {ran} header commands ran");
    Ok(())
}

/// What a fresh checkout lacks is named in the error, with the fix: the
/// router's database before scripts/make-example-db, and an audio file.
#[test]
fn a_missing_database_or_audio_file_is_named_with_the_fix() -> anyhow::Result<()> {
    let Some(models) = hub_mirror()? else {
        return Ok(());
    };
    let checkout = tempfile::tempdir()?;
    fresh_checkout(checkout.path())?;
    let scratch = tempfile::tempdir()?;
    let run = |command: &str| -> anyhow::Result<String> {
        let out = shell(
            checkout.path(),
            scratch.path(),
            models.mirror.path(),
            command,
        )
        .output()?;
        assert!(!out.status.success(), "`{command}` succeeded");
        Ok(text(&out.stderr))
    };

    let err = run(
        "triage execute --config examples/support-router.toml --task support \
         --text 'Where is my order #12345?'",
    )?;
    assert!(
        err.contains("cannot open the retrieval database examples/orders.db: no such file")
            && err.contains("run scripts/make-example-db"),
        "{err}"
    );

    let err = run(
        "triage execute --config examples/meeting-notes.toml --task meeting_notes \
         --file meeting.mp3",
    )?;
    assert!(
        err.contains("cannot read the audio file meeting.mp3 (--file): No such file"),
        "{err}"
    );
    Ok(())
}
