//! One OS thread owns each model. Callers reach it through a bounded queue
//! and get their answer on a oneshot channel; the worker drains the queue
//! into batches bounded by a token budget and a maximum wait, drops requests
//! whose caller has gone, and runs each batch in one forward pass. A full
//! queue is an immediate `Overloaded` error, never an unbounded wait.

use crate::error::{LocalError, Result};
use crate::model::{LocalModel, ModelInfo};
use crate::tokenize::EncodedText;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use triage_core::{Aggregation, Classification, Embedding, Tagging};

/// Batching limits for one model's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Requests waiting beyond this are refused with `Overloaded`.
    pub queue_capacity: usize,
    /// Most tokens (over all windows, padding excluded) in one forward pass.
    pub max_batch_tokens: usize,
    /// Most texts in one forward pass.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for company.
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 1024,
            max_batch_tokens: 16_384,
            max_batch_size: 32,
            max_wait: Duration::from_millis(2),
        }
    }
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
    reply: oneshot::Sender<Result<Answer>>,
    span: tracing::Span,
}

/// A cheap, cloneable handle to a model worker.
#[derive(Debug, Clone)]
pub struct ModelHandle {
    tx: SyncSender<Job>,
    info: Arc<ModelInfo>,
    tokenizer: Arc<crate::tokenize::TextTokenizer>,
    capacity: usize,
}

impl ModelHandle {
    /// Move `model` onto its own thread and return a handle to it.
    pub fn spawn(model: LocalModel, config: BatchConfig) -> Result<Self> {
        let (tx, rx) = sync_channel(config.queue_capacity.max(1));
        let info = Arc::new(model.info.clone());
        let tokenizer = Arc::new(model.tokenizer.clone());
        let name = format!("triage-model-{}", model.info.name);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run_worker(model, rx, config))
            .map_err(|source| LocalError::Io {
                path: "worker thread".into(),
                source,
            })?;
        Ok(Self {
            tx,
            info,
            tokenizer,
            capacity: config.queue_capacity,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    async fn submit(&self, op: Op, text: &str, all_windows: bool) -> Result<Answer> {
        let encoded = self.tokenizer.encode(text, all_windows)?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            op,
            text: text.to_owned(),
            encoded,
            reply,
            span: tracing::Span::current(),
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(LocalError::Overloaded {
                    model: self.info.name.clone(),
                    capacity: self.capacity,
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
        match self.submit(Op::Classify, text, windows).await? {
            Answer::Classified(c) => Ok(c),
            _ => Err(self.mismatch()),
        }
    }

    /// Find entity spans in `text`.
    pub async fn tag(&self, text: &str, strategy: Aggregation) -> Result<Tagging> {
        match self.submit(Op::Tag(strategy), text, false).await? {
            Answer::Tagged(t) => Ok(t),
            _ => Err(self.mismatch()),
        }
    }

    /// Mean-pooled embedding of `text`.
    pub async fn embed(&self, text: &str) -> Result<Embedding> {
        match self.submit(Op::Embed, text, false).await? {
            Answer::Embedded(e) => Ok(e),
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
        let mut tokens = first.encoded.token_count();
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
            let cost = next.encoded.token_count();
            // Keep ops of one kind together; the odd one starts the next batch.
            if tokens + cost > config.max_batch_tokens || !same_op(next.op, batch[0].op) {
                pending = Some(next);
                break;
            }
            tokens += cost;
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

fn run_batch(model: &LocalModel, batch: Vec<Job>) {
    let span = tracing::debug_span!(parent: &batch[0].span, "batch", model = %model.info.name, size = batch.len());
    let _enter = span.enter();
    let answers: Result<Vec<Answer>> = match batch[0].op {
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
    };
    match answers {
        Ok(answers) => {
            for (job, answer) in batch.into_iter().zip(answers) {
                let _ = job.reply.send(Ok(answer));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "batch failed");
            let msg = e.to_string();
            let mut batch = batch.into_iter();
            if let Some(first) = batch.next() {
                let _ = first.reply.send(Err(e));
            }
            for job in batch {
                let _ = job
                    .reply
                    .send(Err(LocalError::Compute(candle_core::Error::Msg(
                        msg.clone(),
                    ))));
            }
        }
    }
}
