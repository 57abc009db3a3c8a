//! The real hf-hub download path against a local server that answers like
//! the Hugging Face hub (`HEAD`/`GET /{repo}/resolve/{revision}/{file}` with
//! `ETag`, `X-Repo-Commit`, 404 for absent files): files land in the standard
//! cache layout, the model loads from there, and offline lookups use it.

use candle_core::Device;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use triage_local::{HubSettings, LocalError, LocalModel, ModelRef, resolve_with};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serve `dir` as repository `repo` until the test ends; returns the endpoint
/// and the log of requested paths.
fn fake_hub(
    repo: &'static str,
    dir: std::path::PathBuf,
) -> anyhow::Result<(String, Arc<Mutex<Vec<String>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(match stream.try_clone() {
                Ok(s) => s,
                Err(_) => continue,
            });
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok() && line.trim_end() != "" {
                line.clear();
            }
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            seen.lock()
                .map(|mut l| l.push(format!("{method} {path}")))
                .ok();
            let prefix = format!("/{repo}/resolve/");
            let file = path
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
                .map(|(_rev, file)| file.to_owned());
            let body = file.and_then(|f| std::fs::read(dir.join(&f)).ok());
            let mut out = stream;
            let response = match body {
                Some(bytes) => {
                    let etag = format!("{:x}", bytes.len() * 2654435761 % 1_000_000_007);
                    let mut head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                        bytes.len()
                    )
                    .into_bytes();
                    if method == "GET" {
                        head.extend_from_slice(&bytes);
                    }
                    head
                }
                None => format!(
                    "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nX-Repo-Commit: {COMMIT}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .into_bytes(),
            };
            let _ = out.write_all(&response);
        }
    });
    Ok((endpoint, log))
}

#[tokio::test]
async fn downloads_into_the_standard_cache_then_works_offline() -> anyhow::Result<()> {
    let (endpoint, log) = fake_hub(
        "triage-test/tiny-bert",
        crate::common::model_dir("bert-token"),
    )?;
    let cache = tempfile::tempdir()?;
    let online = HubSettings {
        endpoint: Some(endpoint),
        cache_dir: Some(cache.path().to_path_buf()),
        offline: false,
    };
    let reference = ModelRef::parse("triage-test/tiny-bert@main")?;
    let dir = resolve_with(&reference, &online)
        .await
        .map_err(|e| anyhow::anyhow!("{e}: requests {:?}", log.lock().map(|l| l.clone())))?;
    assert_eq!(
        dir,
        cache
            .path()
            .join("models--triage-test--tiny-bert")
            .join("snapshots")
            .join(COMMIT)
    );
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(dir.join(f).is_file(), "{f} missing from the snapshot");
    }
    let requests = log.lock().map(|l| l.clone()).unwrap_or_default();
    assert!(
        requests
            .iter()
            .any(|r| r == "GET /triage-test/tiny-bert/resolve/main/model.safetensors")
    );

    let model = LocalModel::load(&dir, "hub", &Device::Cpu)?;
    let local = LocalModel::load(
        &crate::common::model_dir("bert-token"),
        "local",
        &Device::Cpu,
    )?;
    let text = "Angela Merkel visited Paris";
    let a = model.tag(
        &[(text, &model.tokenizer.encode(text, false)?)],
        Default::default(),
    )?;
    let b = local.tag(
        &[(text, &local.tokenizer.encode(text, false)?)],
        Default::default(),
    )?;
    assert_eq!(a, b);

    // Offline: the same reference comes from the cache, without a request.
    let before = log.lock().map(|l| l.len()).unwrap_or_default();
    let offline = HubSettings {
        offline: true,
        ..online.clone()
    };
    assert_eq!(resolve_with(&reference, &offline).await?, dir);
    assert_eq!(log.lock().map(|l| l.len()).unwrap_or_default(), before);

    // Offline and not cached: the error names the model and the fix.
    let other = ModelRef::parse("triage-test/other@main")?;
    let err = resolve_with(&other, &offline).await.err();
    assert!(
        matches!(err, Some(LocalError::NotCachedOffline { .. })),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_repository_the_hub_does_not_have_is_a_hub_error() -> anyhow::Result<()> {
    let (endpoint, _) = fake_hub(
        "triage-test/tiny-bert",
        crate::common::model_dir("bert-token"),
    )?;
    let cache = tempfile::tempdir()?;
    let hub = HubSettings {
        endpoint: Some(endpoint),
        cache_dir: Some(cache.path().into()),
        offline: false,
    };
    let err = resolve_with(&ModelRef::parse("someone/missing")?, &hub)
        .await
        .err();
    let msg = err.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(matches!(err, Some(LocalError::Hub { .. })), "{err:?}");
    assert!(msg.contains("someone/missing"), "{msg}");
    Ok(())
}
