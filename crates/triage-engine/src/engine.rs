//! [`Engine::execute`]: run one task's strategy on one input and return the
//! answer with its trace. The engine owns the loaded specialists, the gateway
//! to the hosted providers and the ledger; a config reload builds a new one
//! while requests in flight finish on the old.

use crate::config::{Config, Strategy, Task};
use crate::error::EngineError;
use crate::ledger::{AttemptRecord, Ledger, LocalAttempt, RequestRecord};
use crate::redact::{self, Restorer};
use crate::specialists::{Specialist, Specialists};
use crate::strategy;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use triage_cloud::gateway::{AttemptSink, CallContext, Gateway};
use triage_core::TaskAnswer;
use triage_core::llm::ChatRequest;
use triage_core::trace::{Decision, TierTrace, Trace};

/// What a task is run on.
#[derive(Debug, Clone)]
pub enum Input {
    Text(String),
    Audio {
        bytes: Vec<u8>,
        file_name: Option<String>,
    },
    /// Audio in a file (an upload spooled to disk): decoded as it is read,
    /// never held whole in memory.
    AudioFile {
        path: std::path::PathBuf,
        file_name: Option<String>,
    },
    /// A full chat request (for chat cascades and `/v1/chat/completions`).
    Chat(ChatRequest),
}

impl Input {
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Text(_) => "text",
            Input::Audio { .. } | Input::AudioFile { .. } => "audio",
            Input::Chat(_) => "chat",
        }
    }
}

/// Per-call changes to a task's configured behaviour.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Start the cascade at this tier (skip the cheaper ones).
    #[serde(default)]
    pub start_tier: Option<String>,
    /// Use only these tiers (by name), in their configured order.
    #[serde(default)]
    pub tiers: Option<Vec<String>>,
    /// Replace every non-final tier's acceptance band.
    #[serde(default)]
    pub hi: Option<f64>,
    #[serde(default)]
    pub lo: Option<f64>,
    /// Replace the shadow sampling fraction.
    #[serde(default)]
    pub shadow: Option<f64>,
    /// The caller's own id for this request, kept in the ledger as a tag
    /// (`requests.caller_id`) beside the id the engine generates: it need
    /// not be unique.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The API key (by name) the request came with: set by the server, never
    /// by the caller; budgets per key count against it.
    #[serde(skip)]
    pub key: Option<String>,
    /// Force a router's route.
    #[serde(default)]
    pub route: Option<String>,
}

impl Overrides {
    /// Overrides that can make a request spend more hosted money: a TCP key
    /// needs `allow_overrides` to send any of them.
    pub const SPENDING: &[&str] = &["start_tier", "tiers", "hi", "lo", "shadow", "route"];
    /// Overrides that cannot change what a request spends.
    pub const FREE: &[&str] = &["request_id"];

    /// The spending overrides this request sets (by name), from
    /// [`Self::SPENDING`]. The struct is taken apart without `..`: a field
    /// added later does not compile until it is sorted here, and the test
    /// `every_override_is_sorted_into_spending_or_free` checks the lists.
    pub fn spending(&self) -> Vec<&'static str> {
        let Overrides {
            start_tier,
            tiers,
            hi,
            lo,
            shadow,
            route,
            request_id: _,
            key: _,
        } = self;
        [
            ("start_tier", start_tier.is_some()),
            ("tiers", tiers.is_some()),
            ("hi", hi.is_some()),
            ("lo", lo.is_some()),
            ("shadow", shadow.is_some()),
            ("route", route.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        for (name, v) in [("hi", self.hi), ("lo", self.lo), ("shadow", self.shadow)] {
            if let Some(v) = v
                && !(0.0..=1.0).contains(&v)
            {
                return Err(EngineError::Override(format!(
                    "{name} = {v} is outside 0..1"
                )));
            }
        }
        if let (Some(hi), Some(lo)) = (self.hi, self.lo)
            && lo > hi
        {
            return Err(EngineError::Override(format!(
                "lo = {lo} is above hi = {hi}"
            )));
        }
        Ok(())
    }
}

/// The answer and how it was reached (shape used by acceptance checks).
#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    pub answer: TaskAnswer,
    pub trace: Trace,
    pub request_id: String,
}

/// A request that failed, and the trace of the tiers it ran first.
#[derive(Debug)]
pub struct Failure {
    pub error: EngineError,
    pub trace: Trace,
}

/// Everything a strategy needs while it runs one request.
#[derive(Debug)]
pub struct Run<'a> {
    pub engine: &'a Engine,
    pub task: &'a Task,
    pub request_id: String,
    pub overrides: &'a Overrides,
    pub trace: Trace,
    /// Set when a hosted model was called: the request's rows are then
    /// committed before its answer is returned.
    pub hosted: AtomicBool,
    /// Holds every hosted attempt's ceiling against the budgets that apply
    /// (`None` without `[[budgets]]`).
    pub gate: Option<Arc<crate::budget::BudgetGate>>,
}

impl Run<'_> {
    /// The run's budget gate as the gateway takes it (`None` without
    /// `[[budgets]]`).
    pub fn spend_gate(&self) -> Option<Arc<dyn triage_cloud::SpendGate>> {
        self.gate
            .clone()
            .map(|g| g as Arc<dyn triage_cloud::SpendGate>)
    }

    pub fn ctx(&self, tier: &str) -> CallContext {
        // Every hosted call takes a context: that is where money may be spent.
        self.hosted.store(true, Ordering::Relaxed);
        CallContext {
            request_id: self.request_id.clone(),
            task: self.task.name.clone(),
            tier: tier.to_owned(),
            gate: self.spend_gate(),
        }
    }

    /// Dollars for `elapsed` of local compute on this specialist's device.
    pub fn compute_cost(&self, specialist: &Specialist, elapsed: Duration) -> f64 {
        self.engine
            .config
            .prices
            .compute_cost(elapsed, specialist.on_gpu())
    }

    /// Record a local tier's run in the ledger and the trace. With the
    /// worker's timing, the tier is charged its share of the batch's compute
    /// and the trace shows queue and compute time apart.
    pub fn local_step(&mut self, step: LocalStep<'_>, outcome: StepOutcome) {
        let LocalStep {
            tier,
            model,
            operation,
            specialist,
            time: LocalTime { elapsed, timing },
            error,
        } = step;
        let cost = self.compute_cost(specialist, timing.map_or(elapsed, |t| t.compute));
        if let Some(ledger) = &self.engine.ledger {
            ledger.record(AttemptRecord::local(LocalAttempt {
                request_id: &self.request_id,
                task: &self.task.name,
                tier,
                model,
                operation,
                latency: elapsed,
                cost_usd: cost,
                error,
            }));
        }
        let StepOutcome {
            decision,
            reason,
            score,
        } = outcome;
        self.trace.push(TierTrace {
            tier: tier.into(),
            model: model.into(),
            decision,
            reason,
            score,
            latency_ms: ms(elapsed),
            cost_usd: cost,
            queue_ms: timing.map(|t| ms(t.queue)),
            compute_ms: timing.map(|t| ms(t.compute)),
        });
    }

    /// Redact `text` for a cloud tier with the task's rules; the restorer puts
    /// the originals back into the answer.
    pub async fn redact(&mut self, text: &str) -> Result<(String, Restorer), EngineError> {
        let r = &self.task.redaction;
        if r.is_empty() {
            return Ok((text.to_owned(), Restorer::default()));
        }
        let mut spans = redact::regex_spans(r, text);
        if let Some(name) = &r.ner_specialist {
            let specialist = self.engine.specialists.get(name)?;
            if let Specialist::Tagger { handle, .. } = specialist {
                let started = Instant::now();
                let (tagged, timing) = handle
                    .tag_timed(text, triage_core::Aggregation::Simple)
                    .await
                    .map_err(|source| EngineError::Local {
                        name: name.clone(),
                        source,
                    })?;
                let to_byte = char_to_byte(text);
                let chars: Vec<char> = text.chars().collect();
                for e in tagged
                    .entities
                    .iter()
                    .filter(|e| r.ner_types.contains(&e.label))
                {
                    // A name the model tagged only in part ("Pri" of
                    // "Priya") is redacted as the whole word.
                    let (start, end) = whole_words(&chars, e.start, e.end);
                    if let (Some(&s), Some(&en)) = (to_byte.get(start), to_byte.get(end)) {
                        spans.push(redact::Span {
                            start: s,
                            end: en,
                            kind: e.label.clone(),
                        });
                    }
                }
                let found = spans.len();
                self.local_step(
                    LocalStep {
                        tier: "redact",
                        model: &format!("local/{name}"),
                        operation: "tag",
                        specialist,
                        time: (started.elapsed(), timing).into(),
                        error: None,
                    },
                    StepOutcome {
                        decision: Decision::Ran,
                        reason: format!("{found} span(s) redacted"),
                        score: None,
                    },
                );
            }
        }
        Ok(redact::apply(text, spans))
    }
}

/// A local tier's run, as [`Run::local_step`] records it.
#[derive(Debug)]
pub struct LocalStep<'a> {
    /// The tier or stage name the trace shows.
    pub tier: &'a str,
    /// `local/NAME`, or the tier's model name.
    pub model: &'a str,
    /// `classify`, `tag`, `transcribe`.
    pub operation: &'a str,
    pub specialist: &'a Specialist,
    pub time: LocalTime,
    /// Set when the step failed (the ledger row's error).
    pub error: Option<String>,
}

/// What a step decided, as its trace line says it.
#[derive(Debug)]
pub struct StepOutcome {
    pub decision: Decision,
    pub reason: String,
    pub score: Option<f64>,
}

/// A local step's wall time, and the worker's account of it when there is one.
#[derive(Debug, Clone, Copy)]
pub struct LocalTime {
    pub elapsed: Duration,
    pub timing: Option<triage_local::Timing>,
}

impl From<Duration> for LocalTime {
    fn from(elapsed: Duration) -> Self {
        Self {
            elapsed,
            timing: None,
        }
    }
}

impl From<(Duration, triage_local::Timing)> for LocalTime {
    fn from((elapsed, timing): (Duration, triage_local::Timing)) -> Self {
        Self {
            elapsed,
            timing: Some(timing),
        }
    }
}

/// `start..end` (char indices) widened to the words it touches.
fn whole_words(chars: &[char], mut start: usize, mut end: usize) -> (usize, usize) {
    let word = |c: &char| c.is_alphanumeric();
    while start > 0 && chars.get(start - 1).is_some_and(word) {
        start -= 1;
    }
    while chars.get(end).is_some_and(word) {
        end += 1;
    }
    (start, end.min(chars.len()))
}

/// Byte offset of every char index (plus one past the end).
pub(crate) fn char_to_byte(text: &str) -> Vec<usize> {
    let mut v: Vec<usize> = text.char_indices().map(|(b, _)| b).collect();
    v.push(text.len());
    v
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A loaded configuration, ready to execute tasks.
#[derive(Debug)]
pub struct Engine {
    pub config: Arc<Config>,
    pub specialists: Specialists,
    pub gateway: Gateway,
    pub ledger: Option<Ledger>,
    /// `[[budgets]]` and what has been spent against them.
    pub budgets: Arc<crate::budget::Budgets>,
    /// Shadow calls still running after their request was answered.
    pub background: crate::background::Background,
}

impl Engine {
    /// Load the specialists, open the ledger and build the gateway.
    pub async fn new(config: Config) -> Result<Self, EngineError> {
        let specialists = Specialists::load(&config.local).await?;
        Self::with_specialists(config, specialists).await
    }

    /// Build an engine that shares already-loaded specialists (config reload
    /// where the `[local]` tables did not change).
    pub async fn with_specialists(
        config: Config,
        specialists: Specialists,
    ) -> Result<Self, EngineError> {
        let ledger = match &config.ledger_url {
            Some(url) => Some(Ledger::open_with(url, config.ledger).await?),
            None => None,
        };
        let mut budgets = crate::budget::Budgets::new(config.budgets.clone());
        if let Some(l) = &ledger {
            budgets.attach(l).await?;
        }
        let sink = ledger.clone().map(|l| Arc::new(l) as Arc<dyn AttemptSink>);
        let gateway = Gateway::new(
            config.providers.values().cloned().collect(),
            config.prices.clone(),
            config.retry,
            sink,
        );
        Ok(Self {
            config: Arc::new(config),
            specialists,
            gateway,
            ledger,
            budgets: Arc::new(budgets),
            background: Default::default(),
        })
    }

    /// Whether a Whisper specialist can answer plain transcriptions
    /// (never in a build without the `speech` feature).
    pub fn transcribes(&self) -> bool {
        #[cfg(feature = "speech")]
        return self.transcriber().is_some();
        #[cfg(not(feature = "speech"))]
        false
    }

    pub fn task(&self, name: &str) -> Result<&Task, EngineError> {
        self.config
            .tasks
            .get(name)
            .ok_or_else(|| EngineError::UnknownTask {
                name: name.to_owned(),
                known: self
                    .config
                    .tasks
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// What to start or set when hosted tiers failed because a server did
    /// not answer or a key is not set (the providers' own errors say "error
    /// sending request" and name neither the URL nor the fix); `None` for
    /// other errors.
    pub fn hint(&self, error: &EngineError) -> Option<String> {
        use triage_cloud::{ErrorKind, ProviderKind};
        let EngineError::Cloud { tier, source } = error else {
            return None;
        };
        let mut fixes: Vec<String> = Vec::new();
        for e in source.errors.values().filter_map(|errors| errors.last()) {
            let Some(p) = self.config.providers.get(&e.provider).map(|p| &p.config) else {
                continue;
            };
            let fix = match e.kind {
                ErrorKind::Connect if p.kind == ProviderKind::OpenaiCompatible => format!(
                    "start the server of provider `{}`: nothing answers at {} \
                     (for llama.cpp's llama-server, scripts/fetch-llama-server fetches one)",
                    e.provider, p.base_url
                ),
                ErrorKind::Connect => format!(
                    "provider `{}` at {} cannot be reached: check the network",
                    e.provider, p.base_url
                ),
                ErrorKind::MissingKey => match &p.api_key_env {
                    Some(var) => format!("set {var} for provider `{}`", e.provider),
                    None => format!("give provider `{}` an api_key_env", e.provider),
                },
                _ => continue,
            };
            if !fixes.contains(&fix) {
                fixes.push(fix);
            }
        }
        (!fixes.is_empty()).then(|| {
            format!(
                "nothing could answer tier `{tier}`; {}",
                fixes.join(", or ")
            )
        })
    }

    /// A ledger key no other request, process or replica will use (UUID v7:
    /// time-ordered, 74 random bits).
    fn new_request_id(&self) -> String {
        format!("req-{}", uuid::Uuid::now_v7().simple())
    }

    /// Run `task` on `input`. The trace lists every tier that ran; the ledger
    /// gets one row per attempt and one per request.
    pub async fn execute(
        &self,
        task: &str,
        input: Input,
        overrides: &Overrides,
    ) -> Result<Execution, EngineError> {
        self.execute_traced(task, input, overrides)
            .await
            .map_err(|f| f.error)
    }

    /// [`Engine::execute`], keeping on failure the trace of the tiers that
    /// ran before it: which escalated, which failed, what they cost.
    pub async fn execute_traced(
        &self,
        task: &str,
        input: Input,
        overrides: &Overrides,
    ) -> Result<Execution, Box<Failure>> {
        let failed = |error| {
            Box::new(Failure {
                error,
                trace: Trace::default(),
            })
        };
        overrides.validate().map_err(failed)?;
        let task = self.task(task).map_err(failed)?;
        // Room for this request's rows first: a ledger that is behind refuses
        // the request here, before any model runs or any money is spent.
        if let Some(ledger) = &self.ledger {
            ledger
                .admit()
                .await
                .map_err(|e| failed(EngineError::Ledger(e)))?;
        }
        let request_id = self.new_request_id();
        // Kept only when the config asks (`[ledger] store_text`).
        let input_text = if self.config.store_text {
            match &input {
                Input::Text(t) => Some(crate::ledger::capped_text(t, self.config.max_text_bytes)),
                Input::Chat(c) => serde_json::to_string(&c.messages)
                    .ok()
                    .map(|t| crate::ledger::capped_text(&t, self.config.max_text_bytes)),
                Input::Audio { .. } | Input::AudioFile { .. } => None,
            }
        } else {
            None
        };
        let started = Instant::now();
        let mut run = Run {
            engine: self,
            task,
            request_id: request_id.clone(),
            overrides,
            trace: Trace::default(),
            hosted: AtomicBool::new(false),
            gate: (!self.budgets.is_empty()).then(|| {
                Arc::new(crate::budget::BudgetGate::new(
                    self.budgets.clone(),
                    &task.name,
                    overrides.key.as_deref(),
                ))
            }),
        };
        let result = match &task.strategy {
            Strategy::Cascade(c) => strategy::cascade::run(&mut run, c, input).await,
            Strategy::Router(r) => strategy::router::run(&mut run, r, input).await,
            Strategy::Pipeline(p) => strategy::pipeline::run(&mut run, p, input).await,
        };
        let hosted = run.hosted.into_inner();
        let mut trace = run.trace;
        let (outcome, answered_by, model) = match (&result, trace.answered_by()) {
            (Ok(a), Some(t)) => (
                if a.value.refusal().is_some() {
                    "refused"
                } else {
                    "answered"
                },
                t.tier.clone(),
                t.model.clone(),
            ),
            (Ok(_), None) => ("answered", String::new(), String::new()),
            (Err(_), _) => ("failed", String::new(), String::new()),
        };
        if let Ok(a) = &result {
            trace.all_llm_cost_usd = strategy::all_llm_cost(self, task, a, &trace);
        }
        if let Some(ledger) = &self.ledger {
            ledger.record_request(RequestRecord {
                request_id: request_id.clone(),
                task: task.name.clone(),
                answered_by,
                model,
                outcome: outcome.into(),
                latency_ms: ms(started.elapsed()),
                cost_usd: trace.cost_usd,
                all_llm_cost_usd: trace.all_llm_cost_usd,
                caller_id: overrides.request_id.clone(),
                key_name: overrides.key.clone(),
                trace: serde_json::to_string(&trace.tiers).ok(),
                input_text,
            });
            // Money was (or may have been) spent: the rows are committed
            // before the answer goes back, so no crash can lose them.
            if hosted {
                match tokio::time::timeout(HOSTED_COMMIT_WAIT, ledger.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(request_id, error = %crate::error::chain(&e), "the ledger did not commit a hosted attempt");
                    }
                    Err(_) => {
                        tracing::error!(
                            request_id,
                            "the ledger did not commit a hosted attempt in time"
                        );
                    }
                }
            }
        }
        match result {
            Ok(answer) => Ok(Execution {
                answer: answer.value,
                trace,
                request_id,
            }),
            Err(error) => Err(Box::new(Failure { error, trace })),
        }
    }
}

/// Longest a hosted answer waits for its ledger rows to commit (a failing
/// database); past it the answer goes back and the error is logged.
const HOSTED_COMMIT_WAIT: Duration = Duration::from_secs(10);

/// What a strategy returns: the answer plus the sizes the counterfactual
/// all-LLM cost is estimated from.
#[derive(Debug, Clone)]
pub struct Answered {
    pub value: TaskAnswer,
    /// Characters the strongest model would have read.
    pub input_chars: usize,
    /// Tokens it would have written (measured where an LLM answered).
    pub output_tokens: u64,
    /// Audio it would have had transcribed by a hosted model.
    pub audio_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::whole_words;

    #[test]
    fn a_partly_tagged_name_widens_to_its_word() {
        let chars: Vec<char> = "ask Priya Raman now".chars().collect();
        // "Pri" → "Priya"; "Raman" stays; a span already on word edges stays.
        assert_eq!(whole_words(&chars, 4, 7), (4, 9));
        assert_eq!(whole_words(&chars, 10, 15), (10, 15));
        assert_eq!(whole_words(&chars, 6, 12), (4, 15));
        assert_eq!(whole_words(&chars, 16, 19), (16, 19));
    }
}

#[cfg(test)]
mod override_tests {
    use super::Overrides;
    use std::collections::BTreeSet;

    /// Every field a caller can send (serde's names) is in exactly one of
    /// the two lists: a new override fails here until it is decided.
    #[test]
    fn every_override_is_sorted_into_spending_or_free() {
        let sent: BTreeSet<String> = serde_json::to_value(Overrides::default())
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let spending: BTreeSet<String> =
            Overrides::SPENDING.iter().map(|s| s.to_string()).collect();
        let free: BTreeSet<String> = Overrides::FREE.iter().map(|s| s.to_string()).collect();
        assert!(spending.is_disjoint(&free));
        let sorted: BTreeSet<String> = spending.union(&free).cloned().collect();
        assert_eq!(sent, sorted, "an override is neither spending nor free");
    }

    #[test]
    fn each_spending_override_is_reported_by_name() {
        for name in Overrides::SPENDING {
            let value = match *name {
                "tiers" => serde_json::json!(["a"]),
                "hi" | "lo" | "shadow" => serde_json::json!(0.5),
                _ => serde_json::json!("x"),
            };
            let o: Overrides = serde_json::from_value(serde_json::json!({ *name: value })).unwrap();
            assert_eq!(o.spending(), [*name]);
        }
        let free: Overrides =
            serde_json::from_value(serde_json::json!({"request_id": "r"})).unwrap();
        assert!(free.spending().is_empty());
    }
}
