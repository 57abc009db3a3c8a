//! Audit of the other labelled-data shapes: routers (`{"text", "route"}`:
//! route accuracy, and the router's share per route), NER pipelines
//! (`{"text", "entities"}`: entity-level precision, recall and F1) and
//! transcription pipelines (`{"audio", "text"}`: word error rate).
//!
//! Unlike a moderation cascade there is no band to re-score, so each item
//! runs through the engine once. Offline, the engine runs a copy of the task
//! whose hosted parts (a router's model routes, a pipeline's summarize
//! stages) are left out; what they would have cost is priced from the price
//! table. Live, the real task runs, with the answers cached on disk and no
//! call started that could pass the spending cap.

use crate::answer_cache::{AnswerCache, Cached};
use crate::audit::{
    AuditError, AuditOptions, AuditReport, Frontier, KnobPoint, LiveStats, Mode, TierReport,
    percentile, round,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use triage_cloud::gateway::Target;
use triage_cloud::prices::PriceTable;
use triage_core::TaskAnswer;
use triage_core::llm::Usage;
use triage_core::trace::{Decision, Trace};
use triage_engine::config::{Config, Handler, Intent, StageKind, Strategy, Task};
use triage_engine::engine::{Engine, Input, Overrides};
use triage_engine::strategy::pipeline::type_key;
use triage_engine::strategy::router::classifier_label;
use triage_engine::strategy::{CHARS_PER_TOKEN, strongest};

/// Entity types a tagger trained on CoNLL-2003 knows; a gold entity of one of
/// these that the task does not extract is left out of the scores, any other
/// label is refused.
const CONLL_TYPES: [&str; 4] = ["PER", "ORG", "LOC", "MISC"];
/// Characters of instructions a summarize stage or a model route reads
/// besides the text (its system prompt, when it sets none).
const PROMPT_CHARS: usize = 200;
/// Output tokens a summarize stage writes when it sets no `max_tokens`.
const SUMMARY_TOKENS: u64 = 200;
/// Output tokens a model route writes when it sets no `max_tokens`.
const ROUTE_TOKENS: u64 = 256;

/// What a task's labelled data looks like, and what is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// `{"text", "route"}`: the route the router should choose.
    Router { routes: Vec<String> },
    /// `{"text", "entities"}` for a text pipeline with an `entities` stage.
    Ner { stage: String, types: Vec<String> },
    /// `{"audio", "text"}` for a pipeline that starts by transcribing.
    Transcription { stage: String },
}

impl Shape {
    pub fn data(&self) -> &'static str {
        match self {
            Shape::Router { .. } => "{\"text\", \"route\"}",
            Shape::Ner { .. } => "{\"text\", \"entities\"}",
            Shape::Transcription { .. } => "{\"audio\", \"text\"}",
        }
    }

    /// What the report's `accuracy` is.
    pub fn metric(&self) -> &'static str {
        match self {
            Shape::Router { .. } => "route accuracy",
            Shape::Ner { .. } => "entity-level F1",
            Shape::Transcription { .. } => "1 - WER",
        }
    }
}

/// The shape of `task`'s labelled data; `None` for a moderation cascade
/// (audited by [`crate::audit::Replay`]).
pub fn shape_of(task: &Task) -> Result<Option<Shape>, AuditError> {
    let unsupported = |what| AuditError::Unsupported {
        task: task.name.clone(),
        what,
    };
    match &task.strategy {
        Strategy::Cascade(_) => crate::audit::cascade_of(task).map(|_| None),
        Strategy::Router(r) => Ok(Some(Shape::Router {
            routes: r.routes.keys().cloned().collect(),
        })),
        Strategy::Pipeline(p) => {
            if let Some(s) = p.stages.first()
                && matches!(s.kind, StageKind::Transcribe { .. })
            {
                return Ok(Some(Shape::Transcription {
                    stage: s.name.clone(),
                }));
            }
            p.stages
                .iter()
                .find_map(|s| match &s.kind {
                    StageKind::Entities { types, .. } => Some(Shape::Ner {
                        stage: s.name.clone(),
                        types: types.clone(),
                    }),
                    _ => None,
                })
                .map(Some)
                .ok_or_else(|| {
                    unsupported("pipeline with neither a transcribe nor an entities stage")
                })
        }
    }
}

/// One labelled item of a router or pipeline task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskItem {
    pub input: ItemInput,
    pub gold: Gold,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ItemInput {
    Text(String),
    /// An audio file (resolved against the data file's folder).
    Audio(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Gold {
    Route(String),
    /// (type key as the pipeline answers it, surface text); gold entities of
    /// types the task does not extract are already left out.
    Entities(Vec<(String, String)>),
    Transcript(String),
}

/// Parse labelled JSONL for `shape`. Audio paths are resolved against `base`
/// and must name files. Returns the items and how many gold entities were
/// left out because the task does not extract their type.
pub fn parse_task_data(
    shape: &Shape,
    bytes: &[u8],
    origin: &str,
    base: &Path,
) -> Result<(Vec<TaskItem>, usize), AuditError> {
    let text = String::from_utf8_lossy(bytes);
    let mut items = Vec::new();
    let mut left_out = 0usize;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| AuditError::Data {
            origin: origin.to_owned(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        let string = |key: &str| -> Result<String, AuditError> {
            value
                .get(key)
                .and_then(|t| t.as_str())
                .map(str::to_owned)
                .ok_or_else(|| {
                    err(format!(
                        "no string field `{key}` (this task's data is {})",
                        shape.data()
                    ))
                })
        };
        let item = match shape {
            Shape::Router { routes } => {
                let route = string("route")?;
                if !routes.contains(&route) {
                    return Err(err(format!(
                        "route `{route}` is not one of the router's routes ({})",
                        routes.join(", ")
                    )));
                }
                TaskItem {
                    input: ItemInput::Text(string("text")?),
                    gold: Gold::Route(route),
                }
            }
            Shape::Ner { types, .. } => {
                let text = string("text")?;
                let Some(list) = value.get("entities").and_then(|e| e.as_array()) else {
                    return Err(err(format!(
                        "no list field `entities` (this task's data is {})",
                        shape.data()
                    )));
                };
                let chars: Vec<char> = text.chars().collect();
                let mut gold = Vec::new();
                for e in list {
                    let Some(label) = e.get("label").and_then(|l| l.as_str()) else {
                        return Err(err(format!("entity {e} has no string `label`")));
                    };
                    let surface = match (
                        e.get("text").and_then(|t| t.as_str()),
                        e.get("start").and_then(|s| s.as_u64()),
                        e.get("end").and_then(|s| s.as_u64()),
                    ) {
                        (Some(t), _, _) => t.trim().to_owned(),
                        (None, Some(s), Some(en)) if s < en && en as usize <= chars.len() => chars
                            [s as usize..en as usize]
                            .iter()
                            .collect::<String>()
                            .trim()
                            .to_owned(),
                        (None, Some(s), Some(en)) => {
                            return Err(err(format!(
                                "entity {e}: start {s} and end {en} are not a span of the text's {} characters",
                                chars.len()
                            )));
                        }
                        _ => {
                            return Err(err(format!(
                                "entity {e} needs `text` or character offsets `start` and `end`"
                            )));
                        }
                    };
                    if types.iter().any(|t| t == label) {
                        let key = (type_key(label), surface);
                        if !gold.contains(&key) {
                            gold.push(key);
                        }
                    } else if CONLL_TYPES.contains(&label) {
                        left_out += 1;
                    } else {
                        return Err(err(format!(
                            "entity label `{label}` is not one the task extracts ({}) nor a CoNLL type ({})",
                            types.join(", "),
                            CONLL_TYPES.join(", ")
                        )));
                    }
                }
                TaskItem {
                    input: ItemInput::Text(text),
                    gold: Gold::Entities(gold),
                }
            }
            Shape::Transcription { .. } => {
                let audio = base.join(string("audio")?);
                if !audio.is_file() {
                    return Err(err(format!("audio file {} not found", audio.display())));
                }
                TaskItem {
                    input: ItemInput::Audio(audio),
                    gold: Gold::Transcript(string("text")?),
                }
            }
        };
        items.push(item);
    }
    if items.is_empty() {
        return Err(AuditError::Empty {
            origin: origin.to_owned(),
        });
    }
    Ok((items, left_out))
}

/// A copy of `config` whose task `task` calls no hosted model: a router's
/// model routes answer with an empty template, a pipeline's summarize stages
/// are left out. A router whose intent is an LLM cannot be audited offline.
pub fn offline_config(config: &Config, task: &str) -> Result<Config, AuditError> {
    let mut config = config.clone();
    let Some(t) = config.tasks.get_mut(task) else {
        return Ok(config);
    };
    match &mut t.strategy {
        Strategy::Router(r) => {
            if matches!(r.intent, Intent::Llm { .. }) {
                return Err(AuditError::NeedsLive {
                    task: task.to_owned(),
                    why: "its intent step is an LLM, so no route is known without calling it",
                });
            }
            for route in r.routes.values_mut() {
                if matches!(route.handler, Handler::Model { .. }) {
                    route.handler = Handler::Template {
                        template: String::new(),
                        requires: Vec::new(),
                    };
                }
            }
        }
        Strategy::Pipeline(p) => {
            p.stages
                .retain(|s| !matches!(s.kind, StageKind::Summarize { .. }));
        }
        Strategy::Cascade(_) => {}
    }
    Ok(config)
}

/// What one item's run gave, kept in the live cache.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Outcome {
    /// The route the intent step chose, and the one that answered.
    intent_route: Option<String>,
    route: Option<String>,
    transcript: Option<String>,
    transcript_confidence: Option<f64>,
    duration_s: Option<f64>,
    entities: BTreeMap<String, Vec<String>>,
    /// The text the hosted parts would read (for offline pricing).
    chars: usize,
    /// (tier, decision, dollars, milliseconds) of every tier that ran.
    ran: Vec<(String, Decision, f64, f64)>,
    failed: bool,
    /// A local intent step's top label and score, to re-score the router at
    /// another `min_score` (absent from cache lines written before them:
    /// such an item keeps its route at every setting).
    #[serde(default)]
    intent_label: Option<String>,
    #[serde(default)]
    intent_score: Option<f64>,
}

impl Outcome {
    fn from_run(answer: Option<&TaskAnswer>, trace: &Trace, input_chars: usize) -> Self {
        let mut o = Outcome {
            chars: input_chars,
            ran: trace
                .tiers
                .iter()
                .map(|t| (t.tier.clone(), t.decision, t.cost_usd, t.latency_ms))
                .collect(),
            failed: answer.is_none(),
            intent_route: trace
                .tiers
                .iter()
                .find_map(|t| t.tier.strip_prefix("route:").map(str::to_owned)),
            ..Outcome::default()
        };
        if let Some(intent) = trace.tiers.iter().find(|t| t.tier == "intent") {
            o.intent_score = intent.score;
            o.intent_label = classifier_label(&intent.reason).map(str::to_owned);
        }
        match answer {
            Some(TaskAnswer::Route(r)) => o.route = Some(r.route.clone()),
            Some(TaskAnswer::Pipeline(p)) => {
                o.transcript = p.transcript.clone();
                o.transcript_confidence = p.transcript_confidence.map(f64::from);
                o.duration_s = p.duration_s;
                o.entities = p.entities.clone();
                if let Some(t) = &p.transcript {
                    o.chars = t.chars().count();
                }
            }
            _ => {}
        }
        o
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedOutcome {
    path: String,
    input: String,
    outcome: Outcome,
}

impl Cached for CachedOutcome {
    fn path(&self) -> &str {
        &self.path
    }
    fn input(&self) -> &str {
        &self.input
    }
}

fn input_key(input: &ItemInput) -> String {
    match input {
        ItemInput::Text(t) => t.clone(),
        ItemInput::Audio(p) => {
            let meta = std::fs::metadata(p).ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!(
                "audio:{}:{}:{modified}",
                p.display(),
                meta.map_or(0, |m| m.len())
            )
        }
    }
}

/// The price table, and the day its prices are read for.
#[derive(Debug, Clone, Copy)]
struct Pricing<'a> {
    prices: &'a PriceTable,
    today: &'a str,
}

/// A hosted part of a task: a model call the offline engine leaves out.
#[derive(Debug, Clone)]
struct HostedPart {
    /// The tier name as traced: `intent`, `route:NAME`, a stage's name.
    tier: String,
    targets: Vec<Target>,
    /// Output tokens a call is priced at (its `max_tokens`, or a default).
    output_tokens: u64,
    /// Characters of the prompt the call sends besides the item's text.
    prompt_chars: usize,
}

/// Hosted parts of the task, in the order the task may call them.
fn hosted_parts(task: &Task) -> Vec<HostedPart> {
    let prompt = |p: &Option<String>| p.as_ref().map_or(PROMPT_CHARS, |s| s.chars().count());
    match &task.strategy {
        Strategy::Router(r) => {
            let mut v = Vec::new();
            if let Intent::Llm { targets, .. } = &r.intent {
                v.push(HostedPart {
                    tier: "intent".to_owned(),
                    targets: targets.clone(),
                    output_tokens: 16,
                    prompt_chars: PROMPT_CHARS,
                });
            }
            for (name, route) in &r.routes {
                if let Handler::Model {
                    targets,
                    system_prompt,
                    max_tokens,
                } = &route.handler
                {
                    v.push(HostedPart {
                        tier: format!("route:{name}"),
                        targets: targets.clone(),
                        output_tokens: max_tokens.map_or(ROUTE_TOKENS, u64::from),
                        prompt_chars: prompt(system_prompt),
                    });
                }
            }
            v
        }
        Strategy::Pipeline(p) => p
            .stages
            .iter()
            .filter_map(|s| match &s.kind {
                StageKind::Summarize {
                    targets,
                    system_prompt,
                    max_tokens,
                    ..
                } => Some(HostedPart {
                    tier: s.name.clone(),
                    targets: targets.clone(),
                    output_tokens: max_tokens.map_or(SUMMARY_TOKENS, u64::from),
                    prompt_chars: prompt(system_prompt),
                }),
                _ => None,
            })
            .collect(),
        Strategy::Cascade(_) => Vec::new(),
    }
}

fn price(prices: &PriceTable, t: &Target, chars: usize, output: u64, today: &str) -> Option<f64> {
    prices.cost(
        &t.provider,
        &t.model,
        &Usage {
            input_tokens: chars.div_ceil(CHARS_PER_TOKEN) as u64,
            output_tokens: output,
            ..Usage::default()
        },
        0.0,
        today,
    )
}

/// Worst case of one item before it is sent live: the intent (if hosted) and
/// the dearest model route, or every summarize stage at its dearest target,
/// each writing its whole `max_tokens`. Audio items are sized from the audio
/// at 16 characters a second of speech.
fn worst_case(prices: &PriceTable, task: &Task, item: &TaskItem, today: &str) -> f64 {
    let chars = match &item.input {
        ItemInput::Text(t) => t.chars().count(),
        ItemInput::Audio(p) => {
            // 16 kHz 16-bit mono is 32 kB a second; any other encoding is
            // smaller per second, so this overestimates the transcript.
            let bytes = std::fs::metadata(p).map_or(0, |m| m.len());
            (bytes / 32_000 + 1) as usize * 16 * 4
        }
    };
    let dearest = |targets: &[Target], output: u64, prompt: usize| {
        targets
            .iter()
            .filter_map(|t| price(prices, t, chars + prompt, output, today))
            .fold(0.0_f64, f64::max)
    };
    let parts = hosted_parts(task);
    match &task.strategy {
        Strategy::Router(_) => {
            let intent: f64 = parts
                .iter()
                .filter(|p| p.tier == "intent")
                .map(|p| dearest(&p.targets, p.output_tokens, p.prompt_chars))
                .sum();
            let route = parts
                .iter()
                .filter(|p| p.tier != "intent")
                .map(|p| dearest(&p.targets, p.output_tokens, p.prompt_chars))
                .fold(0.0_f64, f64::max);
            intent + route
        }
        _ => parts
            .iter()
            .map(|p| dearest(&p.targets, p.output_tokens, p.prompt_chars))
            .sum(),
    }
}

/// The all-LLM path for one item: the task's strongest priced model reads the
/// text (or transcript) and writes what the task would, plus a hosted
/// transcription of any audio at the table's highest per-minute price.
fn all_llm(prices: &PriceTable, task: &Task, o: &Outcome, today: &str) -> f64 {
    let output = match &task.strategy {
        Strategy::Router(r) => {
            o.route
                .as_ref()
                .and_then(|name| r.routes.get(name))
                .map_or(ROUTE_TOKENS, |route| match &route.handler {
                    Handler::Model { max_tokens, .. } => max_tokens.map_or(ROUTE_TOKENS, u64::from),
                    Handler::Template { template, .. } => {
                        template.chars().count().div_ceil(CHARS_PER_TOKEN) as u64
                    }
                })
        }
        _ => hosted_parts(task)
            .iter()
            .map(|p| p.output_tokens)
            .max()
            .unwrap_or(SUMMARY_TOKENS),
    };
    let mut total = strongest(prices, task)
        .and_then(|t| price(prices, t, o.chars + PROMPT_CHARS, output, today))
        .unwrap_or(0.0);
    if let Some(s) = o.duration_s {
        let per_minute = prices
            .prices()
            .iter()
            .map(|p| p.per_audio_minute)
            .fold(0.0_f64, f64::max);
        total += per_minute * s / 60.0;
    }
    total
}

/// Lower case, punctuation dropped, hyphens split words, numbers up to
/// twenty spelled out (the usual way references are written).
pub fn normalise_words(text: &str) -> Vec<String> {
    const NUMBERS: [&str; 21] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
    ];
    let cleaned: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '\'' {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned
        .split_whitespace()
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse::<usize>()
                .ok()
                .and_then(|n| NUMBERS.get(n))
                .map_or_else(|| w.to_owned(), |s| (*s).to_owned())
        })
        .collect()
}

/// Word-level edit distance (substitutions, insertions, deletions).
pub fn word_edits(reference: &[String], hypothesis: &[String]) -> usize {
    let mut prev: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut cur = Vec::with_capacity(hypothesis.len() + 1);
        cur.push(i + 1);
        for (j, h) in hypothesis.iter().enumerate() {
            let sub = prev[j] + usize::from(r != h);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[hypothesis.len()]
}

#[derive(Default)]
struct Tally {
    ran: usize,
    answered: usize,
    measured: usize,
    correct: usize,
    cost: f64,
    latencies: Vec<f64>,
}

/// Audit a router or pipeline task: each item runs once through `engine`
/// (offline: an engine built from [`offline_config`]; live: the real one).
/// `task` is the task as configured (with its hosted parts), used to name
/// and price them. `left_out` is the count from [`parse_task_data`].
pub async fn audit_task(
    engine: &Engine,
    task: &Task,
    shape: &Shape,
    items: &[TaskItem],
    left_out: usize,
    opts: &AuditOptions,
    progress: &mut (dyn FnMut() + Send),
) -> Result<AuditReport, AuditError> {
    let prices = engine.config.prices.clone();
    let today = PriceTable::today();
    let parts = hosted_parts(task);
    let path = parts
        .iter()
        .map(|part| {
            let models: Vec<String> = part
                .targets
                .iter()
                .map(|t| format!("{}/{}", t.provider, t.model))
                .collect();
            format!("{}={}", part.tier, models.join("|"))
        })
        .collect::<Vec<_>>()
        .join(" > ");
    let path = format!("{}:{path}", task.name);
    let (mut cache, mut live) = match &opts.mode {
        Mode::Live {
            cache_dir,
            max_cost_usd,
        } => {
            let cache = AnswerCache::<CachedOutcome>::open(cache_dir, &task.name)?;
            let stats = LiveStats {
                max_cost_usd: *max_cost_usd,
                cache: cache.file().display().to_string(),
                ..LiveStats::default()
            };
            (Some(cache), Some(stats))
        }
        Mode::Offline => (None, None),
    };
    let mut outcomes: Vec<(usize, Outcome)> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let key = input_key(&item.input);
        if let (Some(c), Some(stats)) = (cache.as_mut(), live.as_mut()) {
            if let Some(o) = c.get(&path, &key) {
                stats.cached += 1;
                outcomes.push((i, o.outcome.clone()));
                progress();
                continue;
            }
            if stats.spent_usd + worst_case(&prices, task, item, &today) > stats.max_cost_usd {
                stats.skipped_over_budget += 1;
                progress();
                continue;
            }
            stats.calls += 1;
        }
        let (input, chars) = match &item.input {
            ItemInput::Text(t) => (Input::Text(t.clone()), t.chars().count()),
            ItemInput::Audio(p) => {
                let bytes = std::fs::read(p).map_err(|source| AuditError::Cache {
                    path: p.display().to_string(),
                    source,
                })?;
                let file_name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                (Input::Audio { bytes, file_name }, 0)
            }
        };
        let overrides = Overrides {
            shadow: Some(0.0),
            ..Overrides::default()
        };
        let outcome = match engine.execute_traced(&task.name, input, &overrides).await {
            Ok(e) => Outcome::from_run(Some(&e.answer), &e.trace, chars),
            Err(f) => {
                if live.is_none() {
                    // Offline nothing hosted ran: a local failure is ours
                    // to report, not an item to count as wrong.
                    return Err(AuditError::Item {
                        item: i + 1,
                        source: f.error,
                    });
                }
                Outcome::from_run(None, &f.trace, chars)
            }
        };
        if let (Some(c), Some(stats)) = (cache.as_mut(), live.as_mut()) {
            stats.spent_usd += outcome.ran.iter().map(|r| r.2).sum::<f64>();
            if outcome.failed {
                stats.failed += 1;
            } else {
                c.put(CachedOutcome {
                    path: path.clone(),
                    input: key,
                    outcome: outcome.clone(),
                })?;
            }
        }
        outcomes.push((i, outcome));
        progress();
    }
    let pricing = Pricing {
        prices: &prices,
        today: &today,
    };
    Ok(report(
        task, shape, items, &outcomes, left_out, live, pricing,
    ))
}

/// The tiers of the report, in the task's order: (name, model).
fn tiers_of(task: &Task) -> Vec<(String, String)> {
    let first = |targets: &[Target]| {
        targets
            .first()
            .map(|t| format!("{}/{}", t.provider, t.model))
            .unwrap_or_default()
    };
    match &task.strategy {
        Strategy::Router(r) => {
            let mut v = vec![(
                "intent".to_owned(),
                match &r.intent {
                    Intent::Rules { .. } => "rules".to_owned(),
                    Intent::Local { specialist, .. } => format!("local/{specialist}"),
                    Intent::Llm { targets, .. } => first(targets),
                },
            )];
            for (name, route) in &r.routes {
                v.push((
                    format!("route:{name}"),
                    match &route.handler {
                        Handler::Template { .. } => "template".to_owned(),
                        Handler::Model { targets, .. } => first(targets),
                    },
                ));
            }
            v
        }
        Strategy::Pipeline(p) => p
            .stages
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    match &s.kind {
                        StageKind::Transcribe { specialist }
                        | StageKind::Entities { specialist, .. } => format!("local/{specialist}"),
                        StageKind::Summarize { targets, .. } => first(targets),
                        StageKind::ActionItems => "rules".to_owned(),
                    },
                )
            })
            .collect(),
        Strategy::Cascade(c) => c
            .tiers
            .iter()
            .map(|t| (t.name.clone(), t.model_name()))
            .collect(),
    }
}

fn report(
    task: &Task,
    shape: &Shape,
    items: &[TaskItem],
    outcomes: &[(usize, Outcome)],
    left_out: usize,
    live: Option<LiveStats>,
    pricing: Pricing<'_>,
) -> AuditReport {
    let Pricing { prices, today } = pricing;
    let n = outcomes.len();
    let parts = hosted_parts(task);
    let offline = live.is_none();
    let mut tally: HashMap<String, Tally> = HashMap::new();
    let (mut total, mut all) = (0.0, 0.0);
    let (mut routes_right, mut edits, mut words) = (0usize, 0usize, 0usize);
    let (mut tp, mut predicted, mut gold_n) = (0usize, 0usize, 0usize);
    let mut estimated = 0usize;
    for (i, o) in outcomes {
        all += all_llm(prices, task, o, today);
        for (tier, decision, cost, ms) in &o.ran {
            let stripped = offline && parts.iter().any(|p| &p.tier == tier);
            let t = tally.entry(tier.clone()).or_default();
            if !stripped {
                t.cost += cost;
                total += cost;
                t.latencies.push(*ms);
            }
            t.ran += 1;
            if *decision == Decision::Accepted {
                t.answered += 1;
            }
        }
        if offline {
            // What the hosted parts left out of the offline engine would
            // have cost, from the price table.
            for HostedPart {
                tier: name,
                targets,
                output_tokens: output,
                prompt_chars: prompt,
            } in &parts
            {
                let runs = match &task.strategy {
                    Strategy::Router(_) => o.route.as_deref() == name.strip_prefix("route:"),
                    _ => true,
                };
                if !runs {
                    continue;
                }
                // A summarize stage starts at its second model when the
                // transcript is not confident enough.
                let skip = match (&task.strategy, o.transcript_confidence) {
                    (Strategy::Pipeline(p), Some(c)) => p
                        .stages
                        .iter()
                        .find(|s| &s.name == name)
                        .and_then(|s| match &s.kind {
                            StageKind::Summarize {
                                min_transcript_confidence: Some(min),
                                targets,
                                ..
                            } if c < *min && targets.len() > 1 => Some(1),
                            _ => None,
                        })
                        .unwrap_or(0),
                    _ => 0,
                };
                let cost = targets
                    .get(skip)
                    .and_then(|t| price(prices, t, o.chars + prompt, *output, today))
                    .unwrap_or(0.0);
                let t = tally.entry(name.clone()).or_default();
                t.cost += cost;
                total += cost;
                if !matches!(task.strategy, Strategy::Router(_)) {
                    t.ran += 1;
                }
                estimated += 1;
            }
        }
        match &items[*i].gold {
            Gold::Route(want) => {
                let right = o.intent_route.as_ref() == Some(want);
                routes_right += usize::from(right);
                let t = tally.entry("intent".to_owned()).or_default();
                t.measured += 1;
                t.correct += usize::from(right);
                if let Some(r) = &o.route {
                    let t = tally.entry(format!("route:{r}")).or_default();
                    t.measured += 1;
                    t.correct += usize::from(r == want);
                }
            }
            Gold::Transcript(want) => {
                let reference = normalise_words(want);
                let hypothesis = normalise_words(o.transcript.as_deref().unwrap_or(""));
                edits += word_edits(&reference, &hypothesis);
                words += reference.len();
            }
            Gold::Entities(want) => {
                let got: Vec<(String, String)> = o
                    .entities
                    .iter()
                    .flat_map(|(k, names)| names.iter().map(move |n| (k.clone(), n.clone())))
                    .collect();
                tp += got.iter().filter(|g| want.contains(g)).count();
                predicted += got.len();
                gold_n += want.len();
            }
        }
    }
    let wer = (words > 0).then(|| edits as f64 / words as f64);
    let precision = (predicted > 0).then(|| tp as f64 / predicted as f64);
    let recall = (gold_n > 0).then(|| tp as f64 / gold_n as f64);
    let f1 = match (precision, recall) {
        (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
        (Some(_), Some(_)) => Some(0.0),
        // Entities predicted where the data has none, or none predicted
        // where it has some: F1 is 0 (one of P and R is 0, the other undefined).
        (Some(_), None) | (None, Some(_)) => Some(0.0),
        (None, None) => None,
    };
    let accuracy = match shape {
        Shape::Router { .. } => (n > 0).then(|| routes_right as f64 / n as f64),
        Shape::Ner { .. } => f1,
        Shape::Transcription { .. } => wer.map(|w| 1.0 - w),
    };
    let measured_stage = match shape {
        Shape::Ner { stage, .. } | Shape::Transcription { stage } => Some(stage.as_str()),
        Shape::Router { .. } => None,
    };
    let mut tiers = Vec::new();
    for (name, model) in tiers_of(task) {
        let t = tally.remove(&name).unwrap_or_default();
        let measured_here = measured_stage == Some(name.as_str());
        let share = if n == 0 {
            0.0
        } else if matches!(shape, Shape::Router { .. }) && name != "intent" {
            t.answered as f64 / n as f64
        } else {
            t.ran as f64 / n as f64
        };
        tiers.push(TierReport {
            tier: name,
            model,
            share,
            accuracy: if measured_here {
                accuracy
            } else {
                (t.measured > 0).then(|| t.correct as f64 / t.measured as f64)
            },
            cost_usd: t.cost,
            latency_ms_p50: percentile(&t.latencies, 0.5),
            latency_ms_p99: percentile(&t.latencies, 0.99),
            wer: if measured_here { wer } else { None },
            precision: if measured_here && matches!(shape, Shape::Ner { .. }) {
                precision
            } else {
                None
            },
            recall: if measured_here && matches!(shape, Shape::Ner { .. }) {
                recall
            } else {
                None
            },
        });
    }
    let mut assumptions = vec![format!(
        "`accuracy` is {} on {n} item(s); {}",
        shape.metric(),
        match shape {
            Shape::Router { .. } =>
                "the intent step's route against the label; a route tier's share is the items it answered (after any `otherwise`), its accuracy how many of them were labelled with it",
            Shape::Ner { .. } =>
                "entities matched by type and text (the pipeline answers each name once per type), micro-averaged",
            Shape::Transcription { .. } =>
                "WER over all words (lower case, no punctuation, numbers to twenty spelled out); `wer` is the rate itself",
        }
    )];
    if left_out > 0 {
        assumptions.push(format!(
            "{left_out} gold entit(ies) of types the task does not extract are not scored"
        ));
    }
    if offline && estimated > 0 {
        assumptions.push(format!(
            "offline: no hosted provider was called; {} priced from the price table at {CHARS_PER_TOKEN} characters per token plus the prompt, writing its whole max_tokens ({} when unset)",
            parts
                .iter()
                .map(|p| p.tier.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if matches!(shape, Shape::Router { .. }) {
                ROUTE_TOKENS
            } else {
                SUMMARY_TOKENS
            }
        ));
    }
    if let Some(s) = &live {
        if s.skipped_over_budget > 0 {
            assumptions.push(format!(
                "live: {} item(s) were not run because they could have passed --max-cost-usd {}; the figures cover the {n} that ran",
                s.skipped_over_budget, s.max_cost_usd
            ));
        }
        if s.failed > 0 {
            assumptions.push(format!(
                "live: {} item(s) failed and count as wrong",
                s.failed
            ));
        }
    }
    assumptions.push(
        "local tiers priced by measured compute time at the [compute] rate; all-LLM path: every item to the strongest priced model of the task (and audio to the dearest per-minute transcription)"
            .into(),
    );
    let (frontier, setting) = match knob_frontier(task, items, outcomes, offline, accuracy, pricing)
    {
        Some((points, setting, why)) => {
            assumptions.push(why);
            (points, Some(setting))
        }
        None => {
            assumptions.push(
                "frontier: empty, this task has no setting to re-score (a router's local intent has min_score, a summarize stage min_transcript_confidence with two models)"
                    .into(),
            );
            (Vec::new(), None)
        }
    };
    let per_100k = |x: f64| if n > 0 { x / n as f64 * 100_000.0 } else { 0.0 };
    AuditReport {
        n,
        task: task.name.clone(),
        tiers,
        accuracy,
        assumptions,
        cost_per_100k_usd: per_100k(total),
        all_llm_cost_per_100k_usd: per_100k(all),
        savings_pct: (all > 0.0).then(|| 100.0 * (1.0 - total / all)),
        frontier: Frontier::Knob(frontier),
        mode: if offline { "offline" } else { "live" },
        band: None,
        setting,
        live,
        metric: Some(shape.metric()),
        wer,
        precision: if matches!(shape, Shape::Ner { .. }) {
            precision
        } else {
            None
        },
        recall: if matches!(shape, Shape::Ner { .. }) {
            recall
        } else {
            None
        },
    }
}

/// Whether the audit of `task` has a frontier: a router whose intent is a
/// local classifier (`min_score`), or a pipeline with a summarize stage that
/// gates two models on transcript confidence.
pub fn has_knob(task: &Task) -> bool {
    match &task.strategy {
        Strategy::Router(r) => matches!(r.intent, Intent::Local { .. }),
        Strategy::Pipeline(p) => p.stages.iter().any(|s| {
            matches!(&s.kind, StageKind::Summarize {
                targets,
                min_transcript_confidence: Some(_),
                ..
            } if targets.len() > 1)
        }),
        Strategy::Cascade(_) => false,
    }
}

/// Settings of a frontier's knob: 0 to 1 in steps of 0.05, and the
/// configured one.
fn knob_grid(configured: f64) -> Vec<f64> {
    let mut v: Vec<f64> = (0..=20).map(|i| round(f64::from(i) / 20.0)).collect();
    if !v.contains(&configured) {
        v.push(configured);
        v.sort_by(f64::total_cmp);
    }
    v
}

/// The audit re-scored over the task's knob, with no item run again:
/// a router with a local intent over its `min_score` (each item's top label
/// and score are in its outcome), or a pipeline over the first summarize
/// stage that gates on transcript confidence with two models. Returns the
/// points, the configured setting's point and what was assumed; `None`
/// when the task has no such knob.
fn knob_frontier(
    task: &Task,
    items: &[TaskItem],
    outcomes: &[(usize, Outcome)],
    offline: bool,
    accuracy: Option<f64>,
    pricing: Pricing<'_>,
) -> Option<(Vec<KnobPoint>, KnobPoint, String)> {
    let Pricing { prices, today } = pricing;
    let n = outcomes.len();
    if n == 0 {
        return None;
    }
    let parts = hosted_parts(task);
    let part = |name: &str| parts.iter().find(|p| p.tier == name);
    let estimate = |name: &str, o: &Outcome, target: usize| {
        part(name)
            .and_then(|p| {
                p.targets.get(target).and_then(|t| {
                    price(prices, t, o.chars + p.prompt_chars, p.output_tokens, today)
                })
            })
            .unwrap_or(0.0)
    };
    let measured = |name: &str, o: &Outcome| {
        o.ran
            .iter()
            .filter(|t| t.0 == name)
            .map(|t| t.2)
            .sum::<f64>()
    };
    // What ran and is not a hosted part: the local steps, the templates.
    let local = |o: &Outcome| {
        o.ran
            .iter()
            .filter(|t| part(&t.0).is_none())
            .map(|t| t.2)
            .sum::<f64>()
    };
    let per_100k = |x: f64| x / n as f64 * 100_000.0;
    match &task.strategy {
        Strategy::Router(r) => {
            let Intent::Local {
                default, min_score, ..
            } = &r.intent
            else {
                return None;
            };
            let hosted = |route: &str| {
                r.routes
                    .get(route)
                    .is_some_and(|x| matches!(x.handler, Handler::Model { .. }))
            };
            let point = |m: f64| {
                let (mut right, mut templated, mut cost) = (0usize, 0usize, 0.0);
                for (i, o) in outcomes {
                    let route = match (&o.intent_label, o.intent_score) {
                        (Some(l), Some(s)) if s >= m && r.routes.contains_key(l) => l.as_str(),
                        (Some(_), Some(_)) => default.as_str(),
                        _ => o.intent_route.as_deref().unwrap_or(default),
                    };
                    if let Gold::Route(want) = &items[*i].gold {
                        right += usize::from(route == want);
                    }
                    cost += local(o);
                    let name = format!("route:{route}");
                    if hosted(route) {
                        cost += if !offline && o.intent_route.as_deref() == Some(route) {
                            measured(&name, o)
                        } else {
                            estimate(&name, o, 0)
                        };
                    } else {
                        templated += 1;
                    }
                }
                KnobPoint {
                    knob: "min_score",
                    value: m,
                    share: templated as f64 / n as f64,
                    accuracy: Some(right as f64 / n as f64),
                    cost_per_100k_usd: per_100k(cost),
                }
            };
            let points: Vec<KnobPoint> = knob_grid(*min_score).into_iter().map(point).collect();
            let setting = point(*min_score);
            Some((
                points,
                setting,
                format!(
                    "frontier: the intent's min_score from 0 to 1 in steps of 0.05 (and the configured {min_score}), re-scored from each item's top label and score: below it the default route `{default}` answers; `share` is the items answered by a route that calls no model, `accuracy` route accuracy; a model route costs what it cost in this run where the item took it live, else its price-table estimate"
                ),
            ))
        }
        Strategy::Pipeline(p) => {
            let (stage, min) = p.stages.iter().find_map(|s| match &s.kind {
                StageKind::Summarize {
                    targets,
                    min_transcript_confidence: Some(min),
                    ..
                } if targets.len() > 1 => Some((s.name.clone(), *min)),
                _ => None,
            })?;
            // The pipeline's other hosted stages cost the same at every
            // setting: measured live, estimated offline (at the model the
            // transcript's confidence chose, as the report prices them).
            let others = |o: &Outcome| {
                parts
                    .iter()
                    .filter(|q| q.tier != stage)
                    .map(|q| {
                        if offline {
                            let second = p.stages.iter().any(|s| {
                                s.name == q.tier
                                    && matches!(&s.kind, StageKind::Summarize {
                                        min_transcript_confidence: Some(m),
                                        targets,
                                        ..
                                    } if targets.len() > 1
                                        && o.transcript_confidence.is_some_and(|c| c < *m))
                            });
                            estimate(&q.tier, o, usize::from(second))
                        } else {
                            measured(&q.tier, o)
                        }
                    })
                    .sum::<f64>()
            };
            let point = |m: f64| {
                let (mut first, mut cost) = (0usize, 0.0);
                for (_, o) in outcomes {
                    let second = o.transcript_confidence.is_some_and(|c| c < m);
                    let was = o.transcript_confidence.is_some_and(|c| c < min);
                    first += usize::from(!second);
                    cost += local(o) + others(o);
                    cost += if !offline && second == was {
                        measured(&stage, o)
                    } else {
                        estimate(&stage, o, usize::from(second))
                    };
                }
                KnobPoint {
                    knob: "min_transcript_confidence",
                    value: m,
                    share: first as f64 / n as f64,
                    accuracy,
                    cost_per_100k_usd: per_100k(cost),
                }
            };
            let points: Vec<KnobPoint> = knob_grid(min).into_iter().map(point).collect();
            let setting = point(min);
            Some((
                points,
                setting,
                format!(
                    "frontier: stage `{stage}`'s min_transcript_confidence from 0 to 1 in steps of 0.05 (and the configured {min}): below it the transcript goes to the stage's second model; `share` is the items its first model summarizes; `accuracy` is the pipeline's metric, which this setting does not change (summaries have no labels); the stage costs what it cost in this run where the item went to the same model live, else its price-table estimate"
                ),
            ))
        }
        Strategy::Cascade(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_error_counts_substitutions_insertions_and_deletions() {
        let r = normalise_words("He was not an ill-disposed young man.");
        assert_eq!(
            r,
            ["he", "was", "not", "an", "ill", "disposed", "young", "man"]
        );
        let h = normalise_words("he is not an ill disposed man, really");
        // was→is, young deleted, really inserted.
        assert_eq!(word_edits(&r, &h), 3);
        assert_eq!(normalise_words("4 cards"), ["four", "cards"]);
        assert_eq!(word_edits(&r, &[]), r.len());
    }
}
