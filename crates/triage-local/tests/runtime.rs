//! The worker: batched answers equal direct ones, order is kept per caller,
//! and a full queue answers `Overloaded` at once.

use crate::common::model_dir;
use candle_core::Device;
use std::time::Duration;
use triage_local::{BatchConfig, LocalError, LocalModel, ModelHandle};

fn texts() -> Vec<String> {
    (0..40)
        .map(|i| format!("Message number {i} from Angela in Paris about IBM."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_answered_correctly() -> anyhow::Result<()> {
    let dir = model_dir("distilbert-seq-multilabel");
    let direct = LocalModel::load(&dir, "direct", &Device::Cpu)?;
    let handle = ModelHandle::spawn(
        LocalModel::load(&dir, "worker", &Device::Cpu)?,
        BatchConfig {
            max_wait: Duration::from_millis(20),
            ..BatchConfig::default()
        },
    )?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in texts().into_iter().enumerate() {
        let h = handle.clone();
        tasks.spawn(async move { (i, h.classify(&t, false).await) });
    }
    let mut answers = vec![None; texts().len()];
    while let Some(r) = tasks.join_next().await {
        let (i, c) = r?;
        answers[i] = Some(c?);
    }
    for (i, t) in texts().iter().enumerate() {
        let enc = direct.tokenizer.encode(t, false)?;
        let want = direct.classify(&[&enc])?.remove(0);
        let got = answers[i].take().expect("every request answered");
        for (a, b) in got.scores.iter().zip(&want.scores) {
            assert_eq!(a.label, b.label);
            assert!(
                (a.score - b.score).abs() < 1e-5,
                "text {i}: {} vs {}",
                a.score,
                b.score
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_is_an_immediate_overload_error() -> anyhow::Result<()> {
    let dir = model_dir("distilbert-seq-multilabel");
    let handle = ModelHandle::spawn(
        LocalModel::load(&dir, "tiny", &Device::Cpu)?,
        BatchConfig {
            queue_capacity: 1,
            max_batch_size: 1,
            ..BatchConfig::default()
        },
    )?;
    let long = "a fairly long message ".repeat(30);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let h = handle.clone();
        let t = long.clone();
        tasks.spawn(async move { h.classify(&t, true).await });
    }
    let (mut ok, mut overloaded) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(_) => ok += 1,
            Err(LocalError::Overloaded { capacity: 1, .. }) => overloaded += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(ok >= 1, "some requests must be served");
    assert!(overloaded >= 1, "a queue of one cannot hold 30 requests");
    assert_eq!(ok + overloaded, 30);
    Ok(())
}

#[tokio::test]
async fn wrong_task_is_a_typed_error() -> anyhow::Result<()> {
    let handle = ModelHandle::spawn(
        LocalModel::load(&model_dir("bert-token"), "ner", &Device::Cpu)?,
        BatchConfig::default(),
    )?;
    let err = handle.classify("hello", false).await.err();
    assert!(matches!(err, Some(LocalError::WrongTask { .. })), "{err:?}");
    // The worker survives the bad request.
    let t = handle.tag("Angela Merkel", Default::default()).await?;
    assert!(!t.truncated);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeat_texts_are_answered_from_the_cache_with_counts() -> anyhow::Result<()> {
    let dir = model_dir("distilbert-seq-multilabel");
    let handle = ModelHandle::spawn(
        LocalModel::load(&dir, "cached", &Device::Cpu)?,
        BatchConfig {
            cache_entries: 2,
            ..BatchConfig::default()
        },
    )?;
    let (first, t1) = handle.classify_timed("you are an idiot", false).await?;
    // The same text, and one the model's tokenizer cannot tell from it.
    let (again, t2) = handle.classify_timed("you are an idiot", false).await?;
    let (spaced, _) = handle
        .classify_timed("  you   are an\tidiot ", true)
        .await?;
    assert_eq!(again.scores, first.scores);
    assert_eq!(spaced.scores, first.scores);
    assert!(t1.compute > Duration::ZERO);
    assert_eq!(t2.compute, Duration::ZERO, "a hit runs no model");
    let stats = handle.cache_stats().expect("the cache is on");
    assert_eq!((stats.hits, stats.misses, stats.entries), (2, 1, 1));
    // Other texts are misses, and the cache keeps only two.
    for t in ["have a nice day", "see you tomorrow", "thanks a lot"] {
        handle.classify(t, false).await?;
    }
    let stats = handle.cache_stats().expect("the cache is on");
    assert_eq!((stats.hits, stats.misses, stats.entries), (2, 4, 2));
    // Off by default.
    let plain = ModelHandle::spawn(
        LocalModel::load(&dir, "plain", &Device::Cpu)?,
        BatchConfig::default(),
    )?;
    assert!(plain.cache_stats().is_none());
    Ok(())
}
