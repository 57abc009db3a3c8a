//! One OS thread owns each model. Callers reach it through a bounded queue
//! and get their answer on a oneshot channel; the worker drains the queue
//! into batches bounded by a padded-token budget and a maximum wait, drops
//! requests whose caller has gone, and runs each batch (a long text's windows
//! spread over several forward passes). A full queue is an immediate
//! `Overloaded` error, never an unbounded wait; an input over
//! `max_input_tokens` is refused before it is queued; a panic inside a
//! forward pass fails that batch with a typed error and the worker carries on.

use crate::cache::{CacheStats, ScoreCache};
use crate::error::{LocalError, Result};
use crate::model::{LocalModel, ModelInfo};
use crate::tokenize::EncodedText;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use triage_core::{Aggregation, Classification, Embedding, Tagging};

/// Batching limits for one model's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Requests waiting beyond this are refused with `Overloaded`.
    pub queue_capacity: usize,
    /// Most padded tokens (texts' windows × the longest window) in one batch;
    /// the first request of a batch is always taken.
    pub max_batch_tokens: usize,
    /// Most texts in one batch.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for company.
    pub max_wait: Duration,
    /// Longest input accepted, in tokens; longer is refused with
    /// [`LocalError::InputTooLong`] before any model work.
    pub max_input_tokens: usize,
    /// Classification answers kept for repeat texts (see `cache`); 0 turns
    /// the cache off.
    pub cache_entries: usize,
    /// Most padded tokens in one forward pass: a batch (or one long text's
    /// windows) bigger than this runs in several passes, which bounds the
    /// activations' memory (see [`crate::model::PASS_PADDED_TOKENS`]).
    pub max_pass_tokens: usize,
    /// Run the encoder's dense layers in int8 (CPU `f32` encoders only; see
    /// [`LocalModel::quantize_int8`]).
    pub int8: bool,
}

/// The default `max_input_tokens`.
pub const DEFAULT_MAX_INPUT_TOKENS: usize = 32_768;

/// Inputs longer than this (bytes) are tokenized on a blocking thread, not
/// on the caller's async thread.
const INLINE_TOKENIZE_BYTES: usize = 4096;

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_batch_tokens: 16_384,
            max_batch_size: 32,
            max_wait: Duration::from_millis(2),
            max_input_tokens: DEFAULT_MAX_INPUT_TOKENS,
            cache_entries: 0,
            max_pass_tokens: crate::model::PASS_PADDED_TOKENS,
            int8: false,
        }
    }
}

impl BatchConfig {
    /// The defaults for a model on a GPU (`gpu`) or the CPU. A GPU is
    /// underused by the CPU's batches: it wants many texts per pass and has
    /// the memory for them (a base-size encoder in F16 at 32,768 padded
    /// tokens of 512-token windows needs about 1 GB of activations), while
    /// on the CPU a bigger batch only adds waiting. Each value can still be
    /// set per specialist in the config.
    pub fn for_device(gpu: bool) -> Self {
        if gpu {
            Self {
                max_batch_tokens: 65_536,
                max_batch_size: 128,
                max_pass_tokens: 32_768,
                ..Self::default()
            }
        } else {
            Self::default()
        }
    }
}

/// Where a request's time went: waiting in the queue, and its share of the
/// batch's compute (by padded tokens), so a batch member is not charged for
/// the whole batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    pub queue: Duration,
    pub compute: Duration,
}

/// What a request asks of the model.
#[derive(Debug, Clone, Copy)]
enum Op {
    Classify,
    Tag(Aggregation),
    Embed,
}

enum Answer {
    Classified(Classification),
    Tagged(Tagging),
    Embedded(Embedding),
}

struct Job {
    op: Op,
    text: String,
    encoded: EncodedText,
    reply: oneshot::Sender<Result<(Answer, Timing)>>,
    queued_at: Instant,
    span: tracing::Span,
}

/// A cheap, cloneable handle to a model worker.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    tx: SyncSender<Job>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<crate::tokenize::TextTokenizer>,
    config: BatchConfig,
    alive: Arc<AtomicBool>,
    cache: Option<Arc<ScoreCache>>,
}

/// Marks the worker gone when its thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ModelHandle {
    /// Move `model` onto its own thread and return a handle to it.
    pub fn spawn(mut model: LocalModel, config: BatchConfig) -> Result<Self> {
        model.set_pass_tokens(config.max_pass_tokens);
        if config.int8 {
            model.quantize_int8()?;
        }
        let (tx, rx) = sync_channel(config.queue_capacity.max(1));
        let info = Arc::new(model.info.clone());
        let tokenizer = Arc::new(model.tokenizer.clone());
        let name = format!("triage-model-{}", model.info.name);
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _guard = guard;
                run_worker(model, rx, config);
            })
            .map_err(|source| LocalError::Io {
                path: "worker thread".into(),
                source,
            })?;
        Ok(Self {
            tx,
            info,
            tokenizer,
            config,
            alive,
            cache: (config.cache_entries > 0)
                .then(|| Arc::new(ScoreCache::new(config.cache_entries))),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The classification cache's counters, when the cache is on.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    /// Whether the worker thread is still running (`/ready` reports one that is not).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    fn too_long(&self, tokens: usize) -> LocalError {
        LocalError::InputTooLong {
            model: self.info.name.clone(),
            tokens,
            limit: self.config.max_input_tokens,
        }
    }

    /// Tokenize `text`, off the async thread when it is long, refusing it
    /// when it is over `max_input_tokens`.
    async fn encode(&self, text: &str, all_windows: bool) -> Result<EncodedText> {
        // No WordPiece token covers more than 100 characters (longer words
        // become [UNK]), so a text this long is over the limit whatever it holds.
        let chars_bound = self.config.max_input_tokens.saturating_mul(100);
        if text.len() > chars_bound.saturating_mul(4) && text.chars().count() > chars_bound {
            return Err(self.too_long(text.chars().count() / 100));
        }
        let encoded = if text.len() <= INLINE_TOKENIZE_BYTES {
            self.tokenizer.encode(text, all_windows)?
        } else {
            // On the compute pool, not tokio's blocking pool (up to 512
            // threads): many long texts at once queue for the same cores
            // the encoders use instead of each starting a thread.
            let tokenizer = self.tokenizer.clone();
            let owned = text.to_owned();
            let (tx, rx) = oneshot::channel();
            rayon::spawn(move || {
                let encoded =
                    catch_unwind(AssertUnwindSafe(|| tokenizer.encode(&owned, all_windows)));
                let _ = tx.send(encoded);
            });
            match rx.await {
                Ok(Ok(encoded)) => encoded?,
                Ok(Err(_)) | Err(_) => {
                    return Err(LocalError::Panicked {
                        model: self.info.name.clone(),
                    });
                }
            }
        };
        if encoded.input_tokens > self.config.max_input_tokens {
            return Err(self.too_long(encoded.input_tokens));
        }
        Ok(encoded)
    }

    async fn submit(&self, op: Op, text: &str, all_windows: bool) -> Result<(Answer, Timing)> {
        let encoded = self.encode(text, all_windows).await?;
        self.submit_encoded(op, text, encoded).await
    }

    async fn submit_encoded(
        &self,
        op: Op,
        text: &str,
        encoded: EncodedText,
    ) -> Result<(Answer, Timing)> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            op,
            text: text.to_owned(),
            encoded,
            reply,
            queued_at: Instant::now(),
            span: tracing::Span::current(),
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(LocalError::Overloaded {
                    model: self.info.name.clone(),
                    capacity: self.config.queue_capacity,
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(LocalError::WorkerGone {
                    model: self.info.name.clone(),
                });
            }
        }
        rx.await.map_err(|_| LocalError::WorkerGone {
            model: self.info.name.clone(),
        })?
    }

    /// Score every label of `text`. With `windows`, a long text is scored in
    /// overlapping windows and each label keeps its maximum.
    pub async fn classify(&self, text: &str, windows: bool) -> Result<Classification> {
        self.classify_timed(text, windows).await.map(|(c, _)| c)
    }

    /// [`ModelHandle::classify`], with where the time went.
    pub async fn classify_timed(
        &self,
        text: &str,
        windows: bool,
    ) -> Result<(Classification, Timing)> {
        let encoded = self.encode(text, windows).await?;
        // A text that fits one window scores the same with or without
        // `windows`, so its token ids alone are the key.
        let cached = match (&self.cache, encoded.windows.as_slice()) {
            (Some(cache), [only]) => Some((cache, only.ids.clone())),
            _ => None,
        };
        if let Some((cache, key)) = &cached
            && let Some(hit) = cache.get(key)
        {
            return Ok((hit, Timing::default()));
        }
        match self.submit_encoded(Op::Classify, text, encoded).await? {
            (Answer::Classified(c), t) => {
                if let Some((cache, key)) = cached {
                    cache.insert(key, c.clone());
                }
                Ok((c, t))
            }
            _ => Err(self.mismatch()),
        }
    }

    /// Find entity spans in `text`: every window of a long text is tagged,
    /// so entities (and redaction built on them) cover the whole text.
    pub async fn tag(&self, text: &str, strategy: Aggregation) -> Result<Tagging> {
        self.tag_timed(text, strategy).await.map(|(t, _)| t)
    }

    /// [`ModelHandle::tag`], with where the time went.
    pub async fn tag_timed(&self, text: &str, strategy: Aggregation) -> Result<(Tagging, Timing)> {
        match self.submit(Op::Tag(strategy), text, true).await? {
            (Answer::Tagged(t), timing) => Ok((t, timing)),
            _ => Err(self.mismatch()),
        }
    }

    /// Mean-pooled embedding of `text`.
    pub async fn embed(&self, text: &str) -> Result<Embedding> {
        match self.submit(Op::Embed, text, false).await? {
            (Answer::Embedded(e), _) => Ok(e),
            _ => Err(self.mismatch()),
        }
    }

    fn mismatch(&self) -> LocalError {
        LocalError::WorkerGone {
            model: self.info.name.clone(),
        }
    }
}

fn run_worker(model: LocalModel, rx: Receiver<Job>, config: BatchConfig) {
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // every handle dropped
            },
        };
        let deadline = Instant::now() + config.max_wait;
        let mut windows = first.encoded.windows.len();
        let mut longest = first.encoded.longest();
        let mut batch = vec![first];
        while batch.len() < config.max_batch_size {
            let now = Instant::now();
            let next = match rx.try_recv() {
                Ok(j) => j,
                Err(_) if now >= deadline => break,
                Err(_) => match rx.recv_timeout(deadline - now) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                },
            };
            // The batch pays for padding: every window at the longest length.
            let padded =
                (windows + next.encoded.windows.len()) * longest.max(next.encoded.longest());
            // Keep ops of one kind together; the odd one starts the next batch.
            if padded > config.max_batch_tokens || !same_op(next.op, batch[0].op) {
                pending = Some(next);
                break;
            }
            windows += next.encoded.windows.len();
            longest = longest.max(next.encoded.longest());
            batch.push(next);
        }
        batch.retain(|j| !j.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        run_batch(&model, batch);
    }
}

fn same_op(a: Op, b: Op) -> bool {
    match (a, b) {
        (Op::Classify, Op::Classify) | (Op::Embed, Op::Embed) => true,
        (Op::Tag(x), Op::Tag(y)) => x == y,
        _ => false,
    }
}

/// The batch's answers, one per job, in order.
fn compute(model: &LocalModel, batch: &[Job]) -> Result<Vec<Answer>> {
    match batch[0].op {
        Op::Classify => {
            let texts: Vec<&EncodedText> = batch.iter().map(|j| &j.encoded).collect();
            model
                .classify(&texts)
                .map(|v| v.into_iter().map(Answer::Classified).collect())
        }
        Op::Tag(strategy) => {
            let texts: Vec<(&str, &EncodedText)> = batch
                .iter()
                .map(|j| (j.text.as_str(), &j.encoded))
                .collect();
            model
                .tag(&texts, strategy)
                .map(|v| v.into_iter().map(Answer::Tagged).collect())
        }
        Op::Embed => {
            let texts: Vec<&EncodedText> = batch.iter().map(|j| &j.encoded).collect();
            model
                .embed(&texts)
                .map(|v| v.into_iter().map(Answer::Embedded).collect())
        }
    }
}

/// `compute`, with a panic inside turned into a typed error.
fn compute_caught(model: &LocalModel, batch: &[Job]) -> Result<Vec<Answer>> {
    // A panic in candle (a bad shape, a kernel bug) fails this batch, not the worker.
    catch_unwind(AssertUnwindSafe(|| compute(model, batch))).unwrap_or_else(|_| {
        tracing::error!(model = %model.info.name, "a forward pass panicked");
        Err(LocalError::Panicked {
            model: model.info.name.clone(),
        })
    })
}

fn run_batch(model: &LocalModel, batch: Vec<Job>) {
    let span = tracing::debug_span!(parent: &batch[0].span, "batch", model = %model.info.name, size = batch.len());
    let _enter = span.enter();
    let started = Instant::now();
    let answers = compute_caught(model, &batch);
    let elapsed = started.elapsed();
    let total: usize = batch.iter().map(|j| j.encoded.padded_tokens()).sum();
    let timing = |job: &Job| Timing {
        queue: started.saturating_duration_since(job.queued_at),
        compute: if total == 0 {
            elapsed / u32::try_from(batch.len()).unwrap_or(1).max(1)
        } else {
            elapsed.mul_f64(job.encoded.padded_tokens() as f64 / total as f64)
        },
    };
    match answers {
        Ok(answers) => {
            let timings: Vec<Timing> = batch.iter().map(timing).collect();
            for ((job, answer), t) in batch.into_iter().zip(answers).zip(timings) {
                let _ = job.reply.send(Ok((answer, t)));
            }
        }
        Err(e) if batch.len() == 1 => {
            tracing::warn!(error = %e, "batch failed");
            if let Some(job) = batch.into_iter().next() {
                let _ = job.reply.send(Err(e));
            }
        }
        Err(e) => {
            // One bad item must not fail its neighbours, and each caller is
            // owed its own error with its own kind: run each item alone.
            tracing::warn!(error = %e, size = batch.len(), "batch failed; running its items one by one");
            for job in batch {
                let alone = std::slice::from_ref(&job);
                let started = Instant::now();
                let result = compute_caught(model, alone).and_then(|mut a| {
                    a.pop().ok_or_else(|| LocalError::WorkerGone {
                        model: model.info.name.clone(),
                    })
                });
                let t = Timing {
                    queue: started.saturating_duration_since(job.queued_at),
                    compute: started.elapsed(),
                };
                let _ = job.reply.send(result.map(|a| (a, t)));
            }
        }
    }
}
