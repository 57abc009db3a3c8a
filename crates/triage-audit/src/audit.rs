//! Replay and audit of a moderation cascade on labelled data.
//!
//! The local tier runs once per item ([`Replay::run`]) and every item keeps
//! its task-label scores, computed with the cascade's own mapping, so any
//! band can be re-scored afterwards without running the model again: the
//! audit's frontier and `calibrate` are arithmetic over those scores.
//! Escalated items are priced from the price table with token counts
//! estimated from the text ([`Mode::Offline`]), or sent to the hosted tiers
//! through the gateway with a disk cache and a spending cap ([`Mode::Live`]).

use crate::answer_cache::{AnswerCache, Cached};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;
use triage_cloud::gateway::Target;
use triage_cloud::prices::PriceTable;
use triage_core::TaskAnswer;
use triage_core::llm::Usage;
use triage_core::trace::Decision;
use triage_engine::config::{Cascade, CascadeKind, Strategy, Task, Tier, TierKind};
use triage_engine::engine::{Engine, Input, Overrides};
use triage_engine::error::EngineError;
use triage_engine::specialists::Specialist;
use triage_engine::strategy::cascade::{local_scores, outside_band};
use triage_engine::strategy::{CHARS_PER_TOKEN, strongest};

/// Characters of instructions an LLM tier reads besides the item (the
/// moderation prompt); the same figure the all-LLM counterfactual uses.
const PROMPT_CHARS: usize = 300;
/// Output tokens per task label of an LLM tier's JSON answer.
const OUTPUT_TOKENS_PER_LABEL: u64 = 8;
/// Bands of the audit's frontier: `lo` and `hi` in steps of 0.05.
const FRONTIER_STEPS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{origin} line {line}: {message}")]
    Data {
        origin: String,
        line: usize,
        message: String,
    },
    #[error("{origin} has no labelled items")]
    Empty { origin: String },
    #[error(
        "task `{task}` is a {what}; audit takes moderation cascades ({{\"text\", \"label\"}}), \
         routers ({{\"text\", \"route\"}}), NER pipelines ({{\"text\", \"entities\"}}) and \
         transcription pipelines ({{\"audio\", \"text\"}}), and calibrate the bands of \
         moderation cascades"
    )]
    Unsupported { task: String, what: &'static str },
    #[error("task `{task}` cannot be audited offline: {why}; use --live --max-cost-usd X")]
    NeedsLive { task: String, why: &'static str },
    #[error("item {item} failed")]
    Item {
        item: usize,
        #[source]
        source: EngineError,
    },
    #[error("task `{task}` has no tier `{tier}`; its tiers are: {known}")]
    UnknownTier {
        task: String,
        tier: String,
        known: String,
    },
    #[error("tier `{tier}` of task `{task}` {why}")]
    NotReplayable {
        task: String,
        tier: String,
        why: &'static str,
    },
    #[error(
        "tier `{tier}` of task `{task}` is reached only by what tier `{before}` escalates, and \
         `{before}` is hosted: calibrating `{tier}` replays the tiers before it, which must be local"
    )]
    HostedBefore {
        task: String,
        tier: String,
        before: String,
    },
    #[error("local tier `{tier}` failed on item {item}")]
    Local {
        tier: String,
        item: usize,
        #[source]
        source: EngineError,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the answer cache {path}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One labelled item: its text and the task labels that apply (none: clean).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    pub text: String,
    pub labels: Vec<String>,
}

/// The moderation cascade of `task`, or why it cannot be replayed.
pub fn cascade_of(task: &Task) -> Result<&Cascade, AuditError> {
    let unsupported = |what| AuditError::Unsupported {
        task: task.name.clone(),
        what,
    };
    match &task.strategy {
        Strategy::Cascade(c) if c.kind == CascadeKind::Moderation => Ok(c),
        Strategy::Cascade(_) => Err(unsupported("chat cascade")),
        Strategy::Router(_) => Err(unsupported("router")),
        Strategy::Pipeline(_) => Err(unsupported("pipeline")),
    }
}

/// The tier to replay: `name`, else the first. It must be a local classifier
/// with a band (not the last tier, which always answers). A later tier is
/// reached by the items the tiers before it escalate, so those are replayed
/// with their configured bands: they must be local classifiers too.
pub fn replay_tier<'a>(
    task: &'a Task,
    name: Option<&str>,
) -> Result<(usize, &'a Tier), AuditError> {
    find_tier(task, name, false)
}

/// The tier `triage calibrate --tier NAME` chooses a band for: a local
/// classifier as [`replay_tier`] takes, or a hosted tier with a band (its
/// band decides what goes on to the next tier), whose scores are asked of
/// its provider ([`Replay::run_hosted`]). Returns whether it is hosted.
pub fn calibration_tier<'a>(
    task: &'a Task,
    name: &str,
) -> Result<(usize, &'a Tier, bool), AuditError> {
    let (index, tier) = find_tier(task, Some(name), true)?;
    Ok((index, tier, !matches!(tier.kind, TierKind::Local { .. })))
}

fn find_tier<'a>(
    task: &'a Task,
    name: Option<&str>,
    allow_hosted: bool,
) -> Result<(usize, &'a Tier), AuditError> {
    let c = cascade_of(task)?;
    let index = match name {
        None => 0,
        Some(n) => {
            c.tiers
                .iter()
                .position(|t| t.name == n)
                .ok_or_else(|| AuditError::UnknownTier {
                    task: task.name.clone(),
                    tier: n.to_owned(),
                    known: c
                        .tiers
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?
        }
    };
    let tier = c.tiers.get(index).ok_or(AuditError::Unsupported {
        task: task.name.clone(),
        what: "cascade without tiers",
    })?;
    let not = |why| AuditError::NotReplayable {
        task: task.name.clone(),
        tier: tier.name.clone(),
        why,
    };
    if !allow_hosted && !matches!(tier.kind, TierKind::Local { .. }) {
        return Err(not(
            "is not a local specialist; audit and calibrate replay the local tier",
        ));
    }
    if tier.band.is_none() {
        return Err(not(
            "is the last tier (it always answers), so it has no band to audit or calibrate",
        ));
    }
    if let Some(hosted) = c.tiers[..index]
        .iter()
        .find(|t| !matches!(t.kind, TierKind::Local { .. }))
    {
        return Err(AuditError::HostedBefore {
            task: task.name.clone(),
            tier: tier.name.clone(),
            before: hosted.name.clone(),
        });
    }
    Ok((index, tier))
}

/// Parse labelled JSONL for a moderation cascade: `{"text", "label"}` where
/// the label is one of the task's labels, a list of them (`[]` is clean), or
/// 0/1 when the task has a single label. Blank lines are skipped.
pub fn parse_labelled(
    c: &Cascade,
    bytes: &[u8],
    origin: &str,
) -> Result<Vec<Labelled>, AuditError> {
    let text = String::from_utf8_lossy(bytes);
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| AuditError::Data {
            origin: origin.to_owned(),
            line: line_no,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        let Some(text) = value.get("text").and_then(|t| t.as_str()) else {
            return Err(err("no string field `text`".into()));
        };
        let known = || c.labels.join(", ");
        let check = |l: &str| -> Result<String, AuditError> {
            if c.labels.iter().any(|k| k == l) {
                Ok(l.to_owned())
            } else {
                Err(err(format!(
                    "label `{l}` is not one of the task's labels ({})",
                    known()
                )))
            }
        };
        let labels = match value.get("label") {
            None => return Err(err("no field `label`".into())),
            Some(serde_json::Value::String(l)) => vec![check(l)?],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|l| match l.as_str() {
                    Some(l) => check(l),
                    None => Err(err(format!("labels must be strings, found {l}"))),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => {
                let bit = match v {
                    serde_json::Value::Bool(b) => Some(*b),
                    serde_json::Value::Number(n) => match n.as_u64() {
                        Some(0) => Some(false),
                        Some(1) => Some(true),
                        _ => None,
                    },
                    _ => None,
                };
                match (bit, c.labels.as_slice()) {
                    (Some(b), [only]) => {
                        if b {
                            vec![only.clone()]
                        } else {
                            Vec::new()
                        }
                    }
                    (Some(_), _) => {
                        return Err(err(format!(
                            "label {v}: 0/1 labels need a single-label task; this one has {}, so name them",
                            known()
                        )));
                    }
                    (None, _) => {
                        return Err(err(format!(
                            "label {v} is not a task label ({}), a list of them, or 0/1",
                            known()
                        )));
                    }
                }
            }
        };
        items.push(Labelled {
            text: text.to_owned(),
            labels,
        });
    }
    if items.is_empty() {
        return Err(AuditError::Empty {
            origin: origin.to_owned(),
        });
    }
    Ok(items)
}

/// `n` items drawn at random (seeded) without replacement, in file order.
pub fn sample<T>(items: Vec<T>, n: usize, seed: u64) -> Vec<T> {
    use rand::SeedableRng;
    if n >= items.len() {
        return items;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut keep = rand::seq::index::sample(&mut rng, items.len(), n).into_vec();
    keep.sort_unstable();
    let mut keep = keep.into_iter().peekable();
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| {
            (keep.peek() == Some(&i)).then(|| {
                keep.next();
                item
            })
        })
        .collect()
}

/// One item after the local tier ran on it.
#[derive(Debug, Clone)]
pub struct ScoredItem {
    pub text: String,
    /// Per task label, in the cascade's label order.
    pub scores: Vec<f64>,
    pub gold: Vec<bool>,
    pub local_cost_usd: f64,
    pub local_latency_ms: f64,
    /// Price-table estimate of the hosted tiers after the local one, each
    /// called once (the escalation path's upper bound).
    pub escalation_usd: f64,
    /// The strongest model alone (the all-LLM path).
    pub all_llm_usd: f64,
}

impl ScoredItem {
    /// The cascade's rule: accepted when every label is outside the band.
    pub fn accepted(&self, lo: f64, hi: f64) -> bool {
        self.scores.iter().all(|s| outside_band(*s, lo, hi))
    }

    /// The same with a band per label (in the cascade's label order).
    pub fn accepted_bands(&self, bands: &[(f64, f64)]) -> bool {
        self.scores
            .iter()
            .zip(bands)
            .all(|(s, (lo, hi))| outside_band(*s, *lo, *hi))
    }

    /// Whether the local answer (flagged at the task's threshold) matches
    /// every label.
    pub fn correct(&self, threshold: f64) -> bool {
        self.scores
            .iter()
            .zip(&self.gold)
            .all(|(s, g)| (*s >= threshold) == *g)
    }
}

/// One band re-scored over the replay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BandPoint {
    pub lo: f64,
    pub hi: f64,
    pub local_share: f64,
    /// `None` when the band accepts nothing.
    pub local_accuracy: Option<f64>,
    pub cost_per_100k_usd: f64,
}

/// One setting of a router's or pipeline's knob re-scored over the audit's
/// items (the knob is named in [`KnobPoint::knob`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KnobPoint {
    /// `min_score` (a router's local intent: below it the default route
    /// answers) or `min_transcript_confidence` (a summarize stage: below it
    /// the transcript goes to its second model).
    pub knob: &'static str,
    pub value: f64,
    /// Router: the items answered by a route that calls no model; pipeline:
    /// the items summarized by the stage's first model.
    pub share: f64,
    /// The report's metric (route accuracy, 1 − WER) at this setting.
    pub accuracy: Option<f64>,
    pub cost_per_100k_usd: f64,
}

/// The audit re-scored over a grid: bands of a moderation cascade's local
/// tier, or settings of a router's or pipeline's knob. Serialised as the
/// list of points either way.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Frontier {
    Bands(Vec<BandPoint>),
    Knob(Vec<KnobPoint>),
}

impl Frontier {
    pub fn len(&self) -> usize {
        match self {
            Frontier::Bands(v) => v.len(),
            Frontier::Knob(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The local tier's scores for every item that reaches it, and the prices
/// around them.
#[derive(Debug, Clone)]
pub struct Replay {
    pub task: String,
    pub tier: Tier,
    pub cascade: Cascade,
    /// The items that reach the tier (all of them for the first tier).
    pub items: Vec<ScoredItem>,
    /// What the tiers before it did with the other items.
    pub before: Before,
    /// Hosted models with no price-table entry (priced at 0).
    pub unpriced: Vec<String>,
}

/// The earlier tiers of a replayed middle tier, replayed with their
/// configured bands.
#[derive(Debug, Clone, Default)]
pub struct Before {
    pub tiers: Vec<String>,
    /// Items they answered, and how many of those right.
    pub answered: usize,
    pub correct: usize,
    /// Their compute over all items (the ones they answered and the ones
    /// they escalated): it does not depend on the replayed tier's band.
    pub cost_usd: f64,
}

/// A local classifier tier's specialist.
fn classifier<'e>(
    engine: &'e Engine,
    task: &Task,
    tier: &Tier,
) -> Result<(&'e triage_local::ModelHandle, Vec<String>, bool), AuditError> {
    let TierKind::Local { specialist: name } = &tier.kind else {
        return Err(AuditError::NotReplayable {
            task: task.name.clone(),
            tier: tier.name.clone(),
            why: "is not a local specialist",
        });
    };
    match engine.specialists.get(name)? {
        Specialist::Classifier {
            handle,
            positive_labels,
            gpu,
        } => Ok((handle, positive_labels.clone(), *gpu)),
        _ => Err(EngineError::UnknownSpecialist(name.clone()).into()),
    }
}

/// One local tier's scores for `text`, per task label in the cascade's
/// order, and the time it took.
async fn score(
    c: &Cascade,
    tier: &Tier,
    (handle, positive_labels): (&triage_local::ModelHandle, &[String]),
    text: &str,
    item: usize,
) -> Result<(Vec<f64>, std::time::Duration), AuditError> {
    let started = Instant::now();
    let classified = handle
        .classify(text, true)
        .await
        .map_err(|source| AuditError::Local {
            tier: tier.name.clone(),
            item,
            source: EngineError::Local {
                name: match &tier.kind {
                    TierKind::Local { specialist } => specialist.clone(),
                    _ => tier.name.clone(),
                },
                source,
            },
        })?;
    let elapsed = started.elapsed();
    let scores = local_scores(c, tier, positive_labels, &classified);
    Ok((
        c.labels
            .iter()
            .map(|l| scores.get(l).copied().unwrap_or(0.0))
            .collect(),
        elapsed,
    ))
}

/// A tier's configured band per task label (the cascade's order).
pub fn tier_bands(c: &Cascade, tier: &Tier) -> Vec<(f64, f64)> {
    c.labels
        .iter()
        .map(|l| tier.band_for(l).unwrap_or((0.0, 1.0)))
        .collect()
}

fn hosted_usage(tier: &Tier, chars: usize, labels: usize) -> Usage {
    match tier.kind {
        TierKind::Moderation { .. } => Usage {
            input_tokens: chars.div_ceil(CHARS_PER_TOKEN) as u64,
            ..Usage::default()
        },
        _ => Usage {
            input_tokens: (chars + PROMPT_CHARS).div_ceil(CHARS_PER_TOKEN) as u64,
            output_tokens: OUTPUT_TOKENS_PER_LABEL * labels as u64,
            ..Usage::default()
        },
    }
}

/// Price-table estimate of one hosted tier's call on `chars` characters.
fn tier_estimate(
    prices: &PriceTable,
    tier: &Tier,
    chars: usize,
    labels: usize,
    today: &str,
) -> Option<f64> {
    let target = match &tier.kind {
        TierKind::Moderation { targets } | TierKind::Llm { targets } => targets.first()?,
        TierKind::Local { .. } => return Some(0.0),
    };
    prices.cost(
        &target.provider,
        &target.model,
        &hosted_usage(tier, chars, labels),
        0.0,
        today,
    )
}

/// Hosted models after tier `index` with no price-table entry.
fn unpriced_after(prices: &PriceTable, c: &Cascade, index: usize, today: &str) -> Vec<String> {
    c.tiers[index + 1..]
        .iter()
        .filter(|t| tier_estimate(prices, t, 1, c.labels.len(), today).is_none())
        .map(Tier::model_name)
        .collect()
}

/// Price-table estimate of the tiers after `index`, each called once on an
/// item of `chars` characters (the escalation path's upper bound).
fn escalation_estimate(
    prices: &PriceTable,
    c: &Cascade,
    index: usize,
    chars: usize,
    today: &str,
) -> f64 {
    c.tiers[index + 1..]
        .iter()
        .map(|t| tier_estimate(prices, t, chars, c.labels.len(), today).unwrap_or(0.0))
        .sum()
}

/// The local tiers before a replayed tier, each with its configured bands.
struct Earlier<'e> {
    tiers: Vec<EarlierTier<'e>>,
}

/// An earlier local tier, as the replay runs it.
struct EarlierTier<'e> {
    tier: Tier,
    /// Its (lo, hi) band per label.
    bands: Vec<(f64, f64)>,
    model: &'e triage_local::ModelHandle,
    /// The model's labels that mean "positive".
    positive_labels: Vec<String>,
    /// Whether it runs on a GPU (for its compute price).
    gpu: bool,
}

impl<'e> Earlier<'e> {
    fn of(engine: &'e Engine, task: &Task, c: &Cascade, index: usize) -> Result<Self, AuditError> {
        let tiers = c.tiers[..index]
            .iter()
            .map(|t| {
                classifier(engine, task, t).map(|(model, positive_labels, gpu)| EarlierTier {
                    tier: t.clone(),
                    bands: tier_bands(c, t),
                    model,
                    positive_labels,
                    gpu,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { tiers })
    }

    /// Run the earlier tiers on `item` (1-based `no`) with their bands:
    /// whether one of them answered it; their compute goes to `before`.
    async fn answer(
        &self,
        c: &Cascade,
        item: &Labelled,
        no: usize,
        before: &mut Before,
        prices: &PriceTable,
    ) -> Result<bool, AuditError> {
        for earlier in &self.tiers {
            let model = (earlier.model, earlier.positive_labels.as_slice());
            let (scores, elapsed) = score(c, &earlier.tier, model, &item.text, no).await?;
            before.cost_usd += prices.compute_cost(elapsed, earlier.gpu);
            let bands = &earlier.bands;
            if scores
                .iter()
                .zip(bands)
                .all(|(s, (lo, hi))| outside_band(*s, *lo, *hi))
            {
                before.answered += 1;
                let right = scores
                    .iter()
                    .zip(&c.labels)
                    .all(|(s, l)| (*s >= c.threshold) == item.labels.contains(l));
                before.correct += usize::from(right);
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The all-LLM path for one item of `chars` characters: the strongest
/// priced model of the task, else the last tier's estimate.
fn all_llm_usd(
    prices: &PriceTable,
    strongest: Option<&Target>,
    c: &Cascade,
    chars: usize,
    today: &str,
) -> f64 {
    match strongest {
        Some(t) => prices
            .cost(
                &t.provider,
                &t.model,
                &Usage {
                    input_tokens: (chars + PROMPT_CHARS).div_ceil(CHARS_PER_TOKEN) as u64,
                    output_tokens: OUTPUT_TOKENS_PER_LABEL * c.labels.len() as u64,
                    ..Usage::default()
                },
                0.0,
                today,
            )
            .unwrap_or(0.0),
        None => c
            .tiers
            .last()
            .and_then(|t| tier_estimate(prices, t, chars, c.labels.len(), today))
            .unwrap_or(0.0),
    }
}

/// A hosted tier's scores for one text, kept in the answer cache so that
/// calibrating again on the same data calls nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedScores {
    path: String,
    text: String,
    /// Per task label, in the cascade's order.
    scores: Vec<f64>,
    cost_usd: f64,
    latency_ms: f64,
}

impl Cached for CachedScores {
    fn path(&self) -> &str {
        &self.path
    }
    fn input(&self) -> &str {
        &self.text
    }
}

/// What both replays start from: the task's cascade, the tier replayed
/// (picked by `pick`) and the tiers before it, and the prices.
struct ReplaySetup<'e> {
    task: &'e Task,
    c: Cascade,
    index: usize,
    tier: Tier,
    earlier: Earlier<'e>,
    before: Before,
    prices: &'e PriceTable,
    today: String,
    strongest: Option<Target>,
    unpriced: Vec<String>,
}

impl<'e> ReplaySetup<'e> {
    fn new(
        engine: &'e Engine,
        task_name: &str,
        pick: impl FnOnce(&'e Task) -> Result<(usize, &'e Tier), AuditError>,
    ) -> Result<Self, AuditError> {
        let task = engine.task(task_name)?;
        let c = cascade_of(task)?.clone();
        let (index, tier) = pick(task)?;
        let earlier = Earlier::of(engine, task, &c, index)?;
        let before = Before {
            tiers: earlier.tiers.iter().map(|e| e.tier.name.clone()).collect(),
            ..Before::default()
        };
        let prices = &engine.config.prices;
        let today = PriceTable::today();
        Ok(Self {
            task,
            index,
            tier: tier.clone(),
            before,
            prices,
            strongest: strongest(prices, task).cloned(),
            unpriced: unpriced_after(prices, &c, index, &today),
            today,
            earlier,
            c,
        })
    }
}

impl Replay {
    /// Run the task's local tier (`tier`, else the first) once on each item.
    /// `progress` is called after each item.
    pub async fn run(
        engine: &Engine,
        task_name: &str,
        tier: Option<&str>,
        items: Vec<Labelled>,
        progress: &mut (dyn FnMut() + Send),
    ) -> Result<Self, AuditError> {
        let ReplaySetup {
            task,
            c,
            index,
            tier,
            earlier,
            mut before,
            prices,
            today,
            strongest,
            unpriced,
        } = ReplaySetup::new(engine, task_name, |task| replay_tier(task, tier))?;
        let (handle, positive_labels, gpu) = classifier(engine, task, &tier)?;
        let mut scored = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            if earlier
                .answer(&c, &item, i + 1, &mut before, prices)
                .await?
            {
                progress();
                continue;
            }
            let (scores, elapsed) = score(
                &c,
                &tier,
                (handle, positive_labels.as_slice()),
                &item.text,
                i + 1,
            )
            .await?;
            let chars = item.text.chars().count();
            scored.push(ScoredItem {
                scores,
                gold: c.labels.iter().map(|l| item.labels.contains(l)).collect(),
                local_cost_usd: prices.compute_cost(elapsed, gpu),
                local_latency_ms: elapsed.as_secs_f64() * 1000.0,
                escalation_usd: escalation_estimate(prices, &c, index, chars, &today),
                all_llm_usd: all_llm_usd(prices, strongest.as_ref(), &c, chars, &today),
                text: item.text,
            });
            progress();
        }
        Ok(Self {
            task: task.name.clone(),
            tier,
            cascade: c,
            items: scored,
            before,
            unpriced,
        })
    }

    /// Replay a hosted tier with a band (`triage calibrate --tier NAME` of
    /// hosted moderation or a cheap LLM before the strong one): the local
    /// tiers before it run with their configured bands, and each item they
    /// escalate is sent to that tier alone through the engine (redaction,
    /// retries and fallbacks apply), its label scores cached in
    /// `cache_dir`. No call starts that could take this run's spend past
    /// `max_cost_usd`: such items are left out (counted in the returned
    /// stats as `skipped_over_budget`), as are items whose call failed.
    /// The tier's call is its "local" cost and latency in the replay; what
    /// it escalates is priced for the tiers after it from the price table.
    pub async fn run_hosted(
        engine: &Engine,
        task_name: &str,
        tier: &str,
        items: Vec<Labelled>,
        max_cost_usd: f64,
        cache_dir: &std::path::Path,
        progress: &mut (dyn FnMut() + Send),
    ) -> Result<(Self, LiveStats), AuditError> {
        let ReplaySetup {
            task,
            c,
            index,
            tier,
            earlier,
            mut before,
            prices,
            today,
            strongest,
            mut unpriced,
        } = ReplaySetup::new(engine, task_name, |task| {
            calibration_tier(task, tier).map(|(index, tier, _)| (index, tier))
        })?;
        if tier_estimate(prices, &tier, 1, c.labels.len(), &today).is_none() {
            unpriced.insert(0, tier.model_name());
        }
        let path = format!("scores:{}={}", tier.name, tier.model_name());
        let mut cache = AnswerCache::<CachedScores>::open(cache_dir, &task.name)?;
        let mut stats = LiveStats {
            max_cost_usd,
            cache: cache.file().display().to_string(),
            ..LiveStats::default()
        };
        let overrides = Overrides {
            tiers: Some(vec![tier.name.clone()]),
            shadow: Some(0.0),
            ..Overrides::default()
        };
        let mut scored = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            if earlier
                .answer(&c, &item, i + 1, &mut before, prices)
                .await?
            {
                progress();
                continue;
            }
            let chars = item.text.chars().count();
            let answer = if let Some(a) = cache.get(&path, &item.text) {
                stats.cached += 1;
                Some(a.clone())
            } else if stats.spent_usd + worst_case(engine, &[&tier], chars, c.labels.len())
                > max_cost_usd
            {
                stats.skipped_over_budget += 1;
                None
            } else {
                stats.calls += 1;
                match engine
                    .execute_traced(&task.name, Input::Text(item.text.clone()), &overrides)
                    .await
                {
                    Ok(e) => {
                        stats.spent_usd += e.trace.cost_usd;
                        let scores = match &e.answer {
                            TaskAnswer::Scores(s) => c
                                .labels
                                .iter()
                                .map(|l| s.labels.get(l).copied().unwrap_or(0.0))
                                .collect(),
                            // A refusal is an answer that flags every label
                            // it could mean: sure, and positive.
                            _ => vec![1.0; c.labels.len()],
                        };
                        let a = CachedScores {
                            path: path.clone(),
                            text: item.text.clone(),
                            scores,
                            cost_usd: e.trace.cost_usd,
                            latency_ms: e.trace.tiers.iter().map(|t| t.latency_ms).sum(),
                        };
                        cache.put(a.clone())?;
                        Some(a)
                    }
                    Err(f) => {
                        stats.spent_usd += f.trace.cost_usd;
                        stats.failed += 1;
                        tracing::warn!(
                            "item {}: tier `{}` failed: {}",
                            i + 1,
                            tier.name,
                            triage_engine::error::chain(&f.error)
                        );
                        None
                    }
                }
            };
            if let Some(a) = answer {
                scored.push(ScoredItem {
                    scores: a.scores,
                    gold: c.labels.iter().map(|l| item.labels.contains(l)).collect(),
                    local_cost_usd: a.cost_usd,
                    local_latency_ms: a.latency_ms,
                    escalation_usd: escalation_estimate(prices, &c, index, chars, &today),
                    all_llm_usd: all_llm_usd(prices, strongest.as_ref(), &c, chars, &today),
                    text: item.text,
                });
            }
            progress();
        }
        Ok((
            Self {
                task: task.name.clone(),
                tier,
                cascade: c,
                items: scored,
                before,
                unpriced,
            },
            stats,
        ))
    }

    /// Items that reach the replayed tier.
    pub fn n(&self) -> usize {
        self.items.len()
    }

    /// All items, including those the tiers before it answered.
    pub fn n_total(&self) -> usize {
        self.items.len() + self.before.answered
    }

    /// The configured band of the replayed tier.
    pub fn band(&self) -> (f64, f64) {
        self.tier.band.unwrap_or((0.0, 1.0))
    }

    /// The configured band of every label (per-label `bands` included).
    pub fn bands(&self) -> Vec<(f64, f64)> {
        tier_bands(&self.cascade, &self.tier)
    }

    /// Share, accuracy and estimated cost of band (`lo`, `hi`) over the
    /// items, each counted `weights[i]` times (all once when `None`).
    pub fn point(&self, lo: f64, hi: f64, weights: Option<&[u32]>) -> BandPoint {
        let bands = vec![(lo, hi); self.cascade.labels.len()];
        self.point_with(&bands, (lo, hi), weights)
    }

    /// [`Replay::point`] with a band per label; `shown` is the `lo`/`hi`
    /// the point reports. Share and accuracy are over the items that reach
    /// the tier; the cost is per item of all of them, the earlier tiers'
    /// compute included.
    pub fn point_with(
        &self,
        bands: &[(f64, f64)],
        shown: (f64, f64),
        weights: Option<&[u32]>,
    ) -> BandPoint {
        let (lo, hi) = shown;
        let (mut total, mut accepted, mut correct, mut cost) = (0.0, 0.0, 0.0, 0.0);
        for (i, item) in self.items.iter().enumerate() {
            let w = f64::from(weights.map_or(1, |w| w[i]));
            if w == 0.0 {
                continue;
            }
            total += w;
            cost += w * item.local_cost_usd;
            if item.accepted_bands(bands) {
                accepted += w;
                if item.correct(self.cascade.threshold) {
                    correct += w;
                }
            } else {
                cost += w * item.escalation_usd;
            }
        }
        BandPoint {
            lo,
            hi,
            local_share: if total > 0.0 { accepted / total } else { 0.0 },
            local_accuracy: (accepted > 0.0).then(|| correct / accepted),
            cost_per_100k_usd: {
                let all = self.n_total().max(1) as f64;
                let reached = self.items.len() as f64 / all;
                let per_item = if total > 0.0 { cost / total } else { 0.0 };
                (self.before.cost_usd / all + per_item * reached) * 100_000.0
            },
        }
    }

    /// The replay re-scored over a grid of bands (`lo` 0–0.5 and `hi`
    /// 0.5–1 in steps of 0.05, plus the configured band), by local share.
    pub fn frontier(&self) -> Vec<BandPoint> {
        let step = 0.5 / FRONTIER_STEPS as f64;
        let mut points = Vec::new();
        for a in 0..=FRONTIER_STEPS {
            for b in 0..=FRONTIER_STEPS {
                let lo = round(a as f64 * step);
                let hi = round(0.5 + b as f64 * step);
                points.push(self.point(lo, hi, None));
            }
        }
        let (lo, hi) = self.band();
        if !points.iter().any(|p| p.lo == lo && p.hi == hi) {
            points.push(self.point(lo, hi, None));
        }
        points.sort_by(|a, b| {
            a.local_share
                .total_cmp(&b.local_share)
                .then(a.lo.total_cmp(&b.lo))
                .then(a.hi.total_cmp(&b.hi))
        });
        points
    }
}

/// Round to 4 decimals (grid values print as written).
pub(crate) fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// How escalated items are answered.
#[derive(Debug, Clone)]
pub enum Mode {
    /// No hosted call: priced from the price table, accuracy assumed.
    Offline,
    /// Hosted calls through the gateway, answers cached in `cache_dir`, no
    /// call that would take the spend past `max_cost_usd`.
    Live {
        max_cost_usd: f64,
        cache_dir: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub mode: Mode,
    /// Accuracy assumed for escalated items that were not sent (offline,
    /// or over the spending cap).
    pub hosted_accuracy: f64,
}

/// One tier's line of the audit (shape used by acceptance checks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierReport {
    pub tier: String,
    pub model: String,
    /// Fraction of items this tier answered.
    pub share: f64,
    /// On the items it answered, against the labels; `None` where not measured.
    pub accuracy: Option<f64>,
    /// Dollars this tier cost over all items.
    pub cost_usd: f64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    /// Transcription: the word error rate of this stage (`accuracy` is 1 − it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wer: Option<f64>,
    /// NER: entity-level precision and recall of this stage (`accuracy` is F1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
}

/// What live mode did with the hosted providers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveStats {
    /// Items sent to the providers in this run.
    pub calls: usize,
    /// Items answered from the cache (free).
    pub cached: usize,
    /// Items not sent because the call could have passed `--max-cost-usd`.
    pub skipped_over_budget: usize,
    /// Items whose hosted tiers all failed (counted as wrong).
    pub failed: usize,
    /// Dollars spent in this run (cached answers cost nothing).
    pub spent_usd: f64,
    pub max_cost_usd: f64,
    pub cache: String,
}

/// `triage audit`'s report (key order used by acceptance checks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    pub n: usize,
    pub task: String,
    pub tiers: Vec<TierReport>,
    pub accuracy: Option<f64>,
    pub assumptions: Vec<String>,
    pub cost_per_100k_usd: f64,
    pub all_llm_cost_per_100k_usd: f64,
    pub savings_pct: Option<f64>,
    pub frontier: Frontier,
    /// `offline` or `live`.
    pub mode: &'static str,
    /// The replayed tier's configured band, as a point of the frontier
    /// (moderation cascades only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub band: Option<BandPoint>,
    /// Routers and pipelines: the configured setting of the frontier's knob,
    /// as a point of the frontier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setting: Option<KnobPoint>,
    pub live: Option<LiveStats>,
    /// What `accuracy` measures, for routers and pipelines (`route
    /// accuracy`, `entity-level F1`, `1 - WER`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<&'static str>,
    /// Transcription: the word error rate over all items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wer: Option<f64>,
    /// NER: entity-level precision and recall over all items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
}

/// A hosted answer kept on disk, keyed by the hosted path and the text.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedAnswer {
    path: String,
    text: String,
    /// The tier that answered and the task labels it flagged.
    tier: String,
    flagged_labels: Vec<String>,
    /// Per hosted tier that ran: (tier, dollars, milliseconds).
    ran: Vec<(String, f64, f64)>,
}

impl Cached for CachedAnswer {
    fn path(&self) -> &str {
        &self.path
    }
    fn input(&self) -> &str {
        &self.text
    }
}

#[derive(Default)]
struct TierTally {
    answered: usize,
    /// Answers scored against the labels, and how many were right.
    measured: usize,
    correct: usize,
    /// Answers not obtained, whose accuracy is assumed.
    assumed: usize,
    cost: f64,
    latencies: Vec<f64>,
}

/// Percentile `q` (0–1) of `v`, nearest rank.
pub fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

/// Audit the replay: the configured band decides which items the local tier
/// answers; the rest are answered as `opts.mode` says. `progress` is called
/// after each escalated item in live mode.
pub async fn audit(
    engine: &Engine,
    replay: &Replay,
    opts: &AuditOptions,
    progress: &mut (dyn FnMut() + Send),
) -> Result<AuditReport, AuditError> {
    let c = &replay.cascade;
    let n = replay.n();
    let (lo, hi) = replay.band();
    let bands = replay.bands();
    let hosted: Vec<&Tier> = c
        .tiers
        .iter()
        .skip_while(|t| t.name != replay.tier.name)
        .skip(1)
        .collect();
    let path = hosted
        .iter()
        .map(|t| format!("{}={}", t.name, t.model_name()))
        .collect::<Vec<_>>()
        .join(" > ");
    let last = hosted.last().map_or(String::new(), |t| t.name.clone());
    let mut tally: HashMap<String, TierTally> = HashMap::new();
    let mut assumptions = Vec::new();
    let mut live = None;
    let mut cache = match &opts.mode {
        Mode::Live {
            cache_dir,
            max_cost_usd,
        } => {
            let cache = AnswerCache::<CachedAnswer>::open(cache_dir, &replay.task)?;
            live = Some(LiveStats {
                max_cost_usd: *max_cost_usd,
                cache: cache.file().display().to_string(),
                ..LiveStats::default()
            });
            Some(cache)
        }
        Mode::Offline => None,
    };
    let mut assumed = 0usize;
    let mut total_cost = 0.0;
    let mut all_llm = 0.0;
    let mut correct_all = 0usize;
    let labels = &c.labels;
    // What each escalated item cost the hosted tiers live (or from the
    // cache): the frontier prices those items at that instead of the
    // every-tier estimate, so its point at the configured band is this audit.
    let mut measured: Vec<Option<f64>> = vec![None; replay.items.len()];
    for (idx, item) in replay.items.iter().enumerate() {
        all_llm += item.all_llm_usd;
        let local = tally.entry(replay.tier.name.clone()).or_default();
        local.cost += item.local_cost_usd;
        local.latencies.push(item.local_latency_ms);
        total_cost += item.local_cost_usd;
        if item.accepted_bands(&bands) {
            local.answered += 1;
            local.measured += 1;
            if item.correct(c.threshold) {
                local.correct += 1;
                correct_all += 1;
            }
            continue;
        }
        // Escalated: from the cache, live, or assumed.
        let gold: Vec<String> = labels
            .iter()
            .zip(&item.gold)
            .filter(|(_, g)| **g)
            .map(|(l, _)| l.clone())
            .collect();
        let mut answer: Option<CachedAnswer> = None;
        if let (Some(cache), Some(stats), Mode::Live { max_cost_usd, .. }) =
            (cache.as_mut(), live.as_mut(), &opts.mode)
        {
            if let Some(a) = cache.get(&path, &item.text) {
                stats.cached += 1;
                answer = Some(a.clone());
            } else if stats.spent_usd
                + worst_case(engine, &hosted, item.text.chars().count(), labels.len())
                > *max_cost_usd
            {
                stats.skipped_over_budget += 1;
            } else {
                let overrides = Overrides {
                    start_tier: hosted.first().map(|t| t.name.clone()),
                    shadow: Some(0.0),
                    ..Overrides::default()
                };
                stats.calls += 1;
                match engine
                    .execute_traced(&replay.task, Input::Text(item.text.clone()), &overrides)
                    .await
                {
                    Ok(e) => {
                        stats.spent_usd += e.trace.cost_usd;
                        let ran = e
                            .trace
                            .tiers
                            .iter()
                            .map(|t| (t.tier.clone(), t.cost_usd, t.latency_ms))
                            .collect();
                        let tier = e
                            .trace
                            .tiers
                            .iter()
                            .rev()
                            .find(|t| t.decision == Decision::Accepted)
                            .map_or(last.clone(), |t| t.tier.clone());
                        let flagged_labels = match &e.answer {
                            TaskAnswer::Scores(s) => s.flagged_labels.clone(),
                            // A refusal flags the item: every label it could mean.
                            TaskAnswer::Refusal(_) => labels.clone(),
                            _ => Vec::new(),
                        };
                        let a = CachedAnswer {
                            path: path.clone(),
                            text: item.text.clone(),
                            tier,
                            flagged_labels,
                            ran,
                        };
                        cache.put(a.clone())?;
                        answer = Some(a);
                    }
                    Err(f) => {
                        stats.spent_usd += f.trace.cost_usd;
                        stats.failed += 1;
                        measured[idx] = Some(f.trace.cost_usd);
                        for t in &f.trace.tiers {
                            let e = tally.entry(t.tier.clone()).or_default();
                            e.cost += t.cost_usd;
                            e.latencies.push(t.latency_ms);
                            total_cost += t.cost_usd;
                        }
                        let e = tally.entry(last.clone()).or_default();
                        e.answered += 1;
                        e.measured += 1;
                        progress();
                        continue;
                    }
                }
            }
            progress();
        }
        match answer {
            Some(a) => {
                measured[idx] = Some(a.ran.iter().map(|r| r.1).sum());
                for (t, cost, ms) in &a.ran {
                    let e = tally.entry(t.clone()).or_default();
                    e.cost += cost;
                    e.latencies.push(*ms);
                    total_cost += cost;
                }
                let mut flagged = a.flagged_labels.clone();
                flagged.sort();
                let mut want = gold.clone();
                want.sort();
                let e = tally.entry(a.tier.clone()).or_default();
                e.answered += 1;
                e.measured += 1;
                if flagged == want {
                    e.correct += 1;
                    correct_all += 1;
                }
            }
            None => {
                // Every hosted tier once, the last one answering: the
                // conservative path.
                assumed += 1;
                let chars = item.text.chars().count();
                let prices = &engine.config.prices;
                let today = PriceTable::today();
                for t in &hosted {
                    let cost = tier_estimate(prices, t, chars, labels.len(), &today).unwrap_or(0.0);
                    tally.entry(t.name.clone()).or_default().cost += cost;
                    total_cost += cost;
                }
                let e = tally.entry(last.clone()).or_default();
                e.answered += 1;
                e.assumed += 1;
            }
        }
    }
    if assumed > 0 {
        let why = match &live {
            None => "offline: no hosted provider was called".to_owned(),
            Some(s) => format!(
                "live: {} item(s) were not sent because the call could have passed --max-cost-usd {}",
                s.skipped_over_budget, s.max_cost_usd
            ),
        };
        assumptions.push(format!(
            "{why}; {assumed} escalated item(s) are priced from the price table as one call to each hosted tier ({}) with tokens estimated at {CHARS_PER_TOKEN} characters per token plus {PROMPT_CHARS} characters of prompt and {OUTPUT_TOKENS_PER_LABEL} output tokens per label, answered by the last tier",
            hosted
                .iter()
                .map(|t| t.model_name())
                .collect::<Vec<_>>()
                .join(", "),
        ));
        assumptions.push(format!(
            "hosted accuracy {} (--hosted-accuracy) on those {assumed} item(s)",
            opts.hosted_accuracy
        ));
        let middle: Vec<&str> = hosted[..hosted.len().saturating_sub(1)]
            .iter()
            .filter(|t| t.band.is_some())
            .map(|t| t.name.as_str())
            .collect();
        if !middle.is_empty() {
            assumptions.push(format!(
                "the band of hosted tier(s) `{}` needs their scores, so it is not applied to those item(s): each pays for them and answers none (their share 0); --live measures it",
                middle.join("`, `")
            ));
        }
    }
    if let Some(s) = &live
        && s.failed > 0
    {
        assumptions.push(format!(
            "live: {} escalated item(s) failed on every hosted tier and count as wrong",
            s.failed
        ));
    }
    for m in &replay.unpriced {
        assumptions.push(format!("{m} has no entry in the price table: priced at $0"));
    }
    assumptions.push(format!(
        "local tier `{}` priced by measured compute time ({} items, one at a time) at the [compute] rate; all-LLM path: every item to the strongest priced model of the task",
        replay.tier.name, n
    ));
    let mut tiers = Vec::new();
    for t in &c.tiers {
        let tt = tally.remove(&t.name).unwrap_or_default();
        tiers.push(TierReport {
            tier: t.name.clone(),
            model: t.model_name(),
            share: if n > 0 {
                tt.answered as f64 / n as f64
            } else {
                0.0
            },
            accuracy: (tt.measured + tt.assumed > 0).then(|| {
                (tt.correct as f64 + tt.assumed as f64 * opts.hosted_accuracy)
                    / (tt.measured + tt.assumed) as f64
            }),
            cost_usd: tt.cost,
            latency_ms_p50: percentile(&tt.latencies, 0.5),
            latency_ms_p99: percentile(&tt.latencies, 0.99),
            wer: None,
            precision: None,
            recall: None,
        });
    }
    let priced = if measured.iter().any(Option::is_some) {
        let mut r = replay.clone();
        for (item, m) in r.items.iter_mut().zip(&measured) {
            if let Some(m) = m {
                item.escalation_usd = *m;
            }
        }
        assumptions.push(
            "frontier: an item the configured band escalated costs what its hosted tiers cost in this run (or the cache); one it kept local is priced as one call to each hosted tier"
                .into(),
        );
        std::borrow::Cow::Owned(r)
    } else {
        std::borrow::Cow::Borrowed(replay)
    };
    let per_100k = |x: f64| if n > 0 { x / n as f64 * 100_000.0 } else { 0.0 };
    Ok(AuditReport {
        n,
        task: replay.task.clone(),
        tiers,
        accuracy: (n > 0)
            .then(|| (correct_all as f64 + assumed as f64 * opts.hosted_accuracy) / n as f64),
        assumptions,
        cost_per_100k_usd: per_100k(total_cost),
        all_llm_cost_per_100k_usd: per_100k(all_llm),
        savings_pct: (all_llm > 0.0).then(|| 100.0 * (1.0 - total_cost / all_llm)),
        frontier: Frontier::Bands(priced.frontier()),
        mode: if live.is_some() { "live" } else { "offline" },
        band: Some(priced.point_with(&bands, (lo, hi), None)),
        setting: None,
        live,
        metric: None,
        wer: None,
        precision: None,
        recall: None,
    })
}

/// The most one escalated item of `chars` characters can cost before it is
/// sent: every tier of `hosted` once, an LLM writing its full `max_tokens`
/// (64 by default).
fn worst_case(engine: &Engine, hosted: &[&Tier], chars: usize, labels: usize) -> f64 {
    let prices = &engine.config.prices;
    let today = PriceTable::today();
    hosted
        .iter()
        .map(|t| {
            let mut usage = hosted_usage(t, chars, labels);
            if matches!(t.kind, TierKind::Llm { .. }) {
                usage.output_tokens = usage
                    .output_tokens
                    .max(u64::from(t.max_tokens.unwrap_or(64)));
            }
            match &t.kind {
                TierKind::Moderation { targets } | TierKind::Llm { targets } => targets
                    .iter()
                    .filter_map(|x| prices.cost(&x.provider, &x.model, &usage, 0.0, &today))
                    .fold(0.0, f64::max),
                TierKind::Local { .. } => 0.0,
            }
        })
        .sum()
}
