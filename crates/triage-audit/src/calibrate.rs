//! Calibration: choose a local tier's band (`lo`, `hi`) that meets a target
//! on a [`Replay`], with a bootstrap 95% interval, and write it into the
//! config file in place (comments and layout kept, a `.bak` left, never
//! half-written).

use crate::audit::{BandPoint, Replay, round};
use indexmap::IndexMap;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::{Path, PathBuf};
use triage_engine::config::Config;

/// Grid of candidate bands: `lo` 0–0.5 and `hi` 0.5–1 in steps of 0.01.
const GRID: usize = 50;

/// What the band must achieve on the data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Local accuracy at least this; the largest local share wins.
    Accuracy(f64),
    /// Local share at least this; the highest local accuracy wins.
    LocalShare(f64),
    /// Estimated dollars per 100k requests at most this; the highest local
    /// accuracy wins.
    MaxCostPer100k(f64),
}

#[derive(Debug, Clone, Copy)]
pub struct CalibrateOptions {
    /// `Accuracy` targets: `None` (the default) asks that the band's
    /// one-sided 95% lower bound of local accuracy (normal approximation over
    /// the items it accepts) reach the target, so that the largest-share band
    /// (chosen among thousands, and so a little lucky on this data) still
    /// meets it on new data; `Some(m)` asks instead that its accuracy on the
    /// data be at least target + m.
    pub margin: Option<f64>,
    /// A band must accept at least this many items for its accuracy to count.
    pub min_accepted: usize,
    pub resamples: usize,
    pub seed: u64,
}

impl Default for CalibrateOptions {
    fn default() -> Self {
        Self {
            margin: None,
            min_accepted: 30,
            resamples: 1000,
            seed: 42,
        }
    }
}

/// Bootstrap 95% intervals of the chosen band's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ci95 {
    pub local_share: [f64; 2],
    pub local_accuracy: [f64; 2],
    pub cost_per_100k_usd: [f64; 2],
    pub resamples: usize,
}

/// A band bound: one number, or one per task label for a multi-label task.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Bound {
    One(f64),
    PerLabel(IndexMap<String, f64>),
}

/// `triage calibrate`'s answer (key order used by acceptance checks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    pub tier: String,
    /// A number, or for a multi-label task an object with one per label.
    pub lo: Bound,
    pub hi: Bound,
    pub local_share: f64,
    pub local_accuracy: f64,
    pub ci95: Ci95,
    pub cost_per_100k_usd: f64,
    /// All items.
    pub n: usize,
    /// Items that reach the tier (fewer than `n` for a tier after others,
    /// replayed with their configured bands); `local_share` and
    /// `local_accuracy` are over these.
    pub reached: usize,
    pub target: Target,
    /// How the accuracy target was applied.
    pub rule: String,
    /// A hosted tier: what was asked of its provider (set by the caller
    /// that replayed it live).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<crate::audit::LiveStats>,
}

impl Calibration {
    /// The chosen band of every task label, in the cascade's order.
    pub fn bands(&self, labels: &[String]) -> Vec<(String, f64, f64)> {
        labels
            .iter()
            .map(|l| {
                let get = |b: &Bound| match b {
                    Bound::One(x) => *x,
                    Bound::PerLabel(m) => m.get(l).copied().unwrap_or(0.0),
                };
                (l.clone(), get(&self.lo), get(&self.hi))
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("{what}: the best this data allows is {best}")]
    Unreachable { what: String, best: String },
    #[error("{0}")]
    BadTarget(String),
}

fn describe(p: &BandPoint) -> String {
    format!(
        "local accuracy {:.4} at local share {:.4} (lo = {}, hi = {}, ${:.4} per 100k)",
        p.local_accuracy.unwrap_or(0.0),
        p.local_share,
        p.lo,
        p.hi,
        p.cost_per_100k_usd
    )
}

/// Every candidate band with its figures on the whole replay.
fn grid(replay: &Replay) -> Vec<BandPoint> {
    let mut v = Vec::with_capacity((GRID + 1) * (GRID + 1));
    for a in 0..=GRID {
        for b in 0..=GRID {
            let lo = round(a as f64 * 0.5 / GRID as f64);
            let hi = round(0.5 + b as f64 * 0.5 / GRID as f64);
            v.push(replay.point(lo, hi, None));
        }
    }
    v
}

/// Choose the band that meets `target` on the replay.
pub fn calibrate(
    replay: &Replay,
    target: Target,
    opts: &CalibrateOptions,
) -> Result<Calibration, CalibrateError> {
    match target {
        Target::Accuracy(a) | Target::LocalShare(a) if !(0.0..=1.0).contains(&a) => {
            return Err(CalibrateError::BadTarget(format!(
                "the target {a} is not a fraction between 0 and 1"
            )));
        }
        Target::MaxCostPer100k(x) if !(x.is_finite() && x >= 0.0) => {
            return Err(CalibrateError::BadTarget(format!(
                "the cost target {x} is not a dollar amount"
            )));
        }
        _ => {}
    }
    if replay.n() == 0 {
        return Err(CalibrateError::Unreachable {
            what: format!(
                "no item reaches tier `{}`: the tiers before it ({}) answer all {}",
                replay.tier.name,
                replay.before.tiers.join(", "),
                replay.n_total()
            ),
            best: "nothing to calibrate on".into(),
        });
    }
    if replay.cascade.labels.len() > 1 {
        return calibrate_per_label(replay, target, opts);
    }
    let n = replay.n();
    let min_share = opts.min_accepted as f64 / n.max(1) as f64;
    let candidates: Vec<BandPoint> = grid(replay)
        .into_iter()
        .filter(|p| p.local_accuracy.is_some() && p.local_share >= min_share.min(1.0))
        .collect();
    let acc = |p: &BandPoint| p.local_accuracy.unwrap_or(0.0);
    // Ties go to the band nearest the middle of the grid's order: a wider
    // band escalates more for the same figures, so the narrower one is kept.
    let by_accuracy = |a: &&BandPoint, b: &&BandPoint| {
        acc(a)
            .total_cmp(&acc(b))
            .then(a.local_share.total_cmp(&b.local_share))
    };
    let chosen = match target {
        Target::Accuracy(t) => {
            let meets = |p: &BandPoint| match opts.margin {
                Some(m) => acc(p) >= t + m,
                None => lower_bound(p, n) >= t,
            };
            let best = candidates.iter().filter(|p| meets(p)).max_by(|a, b| {
                a.local_share
                    .total_cmp(&b.local_share)
                    .then(acc(a).total_cmp(&acc(b)))
            });
            best.copied().ok_or_else(|| CalibrateError::Unreachable {
                what: format!(
                    "no band reaches local accuracy {t} ({}) on {n} items with at least {} accepted",
                    rule(opts),
                    opts.min_accepted
                ),
                best: candidates
                    .iter()
                    .max_by(by_accuracy)
                    .map_or("no band accepts enough items".into(), describe),
            })?
        }
        Target::LocalShare(s) => candidates
            .iter()
            .filter(|p| p.local_share >= s)
            .max_by(by_accuracy)
            .copied()
            .ok_or_else(|| CalibrateError::Unreachable {
                what: format!("no band lets the local tier answer {s} of {n} items"),
                best: candidates
                    .iter()
                    .max_by(|a, b| a.local_share.total_cmp(&b.local_share))
                    .map_or("no band accepts enough items".into(), describe),
            })?,
        Target::MaxCostPer100k(x) => candidates
            .iter()
            .filter(|p| p.cost_per_100k_usd <= x)
            .max_by(by_accuracy)
            .copied()
            .ok_or_else(|| CalibrateError::Unreachable {
                what: format!("no band costs at most ${x} per 100k requests"),
                best: candidates
                    .iter()
                    .min_by(|a, b| a.cost_per_100k_usd.total_cmp(&b.cost_per_100k_usd))
                    .map_or("no band accepts enough items".into(), describe),
            })?,
    };
    let bands = vec![(chosen.lo, chosen.hi); replay.cascade.labels.len()];
    Ok(Calibration {
        tier: replay.tier.name.clone(),
        lo: Bound::One(chosen.lo),
        hi: Bound::One(chosen.hi),
        local_share: chosen.local_share,
        local_accuracy: acc(&chosen),
        ci95: bootstrap(replay, &bands, opts),
        cost_per_100k_usd: chosen.cost_per_100k_usd,
        n: replay.n_total(),
        reached: n,
        target,
        rule: rule_for(target, opts),
        live: None,
    })
}

fn rule_for(target: Target, opts: &CalibrateOptions) -> String {
    match target {
        Target::Accuracy(_) => rule(opts),
        Target::LocalShare(_) => "the most accurate band with at least the target share".into(),
        Target::MaxCostPer100k(_) => {
            "the most accurate band within the cost (price-table estimate for escalated items)"
                .into()
        }
    }
}

/// How good a band is for `target`: bands that meet it beat bands that do
/// not; among those that meet it, the target's objective (then the other
/// figure) decides; among those that do not, the nearest to meeting it.
fn rank(p: &BandPoint, target: Target, opts: &CalibrateOptions, n: usize) -> (bool, f64, f64) {
    let acc = p.local_accuracy.unwrap_or(0.0);
    let enough = p.local_accuracy.is_some()
        && p.local_share * n as f64 + 1e-9 >= opts.min_accepted.min(n) as f64;
    match target {
        Target::Accuracy(t) => {
            let meets = match opts.margin {
                Some(m) => acc >= t + m,
                None => lower_bound(p, n) >= t,
            };
            if enough && meets {
                (true, p.local_share, acc)
            } else {
                (
                    false,
                    if enough { lower_bound(p, n) } else { -1.0 },
                    p.local_share,
                )
            }
        }
        Target::LocalShare(s) => {
            if enough && p.local_share >= s {
                (true, acc, p.local_share)
            } else {
                (false, if enough { p.local_share } else { -1.0 }, acc)
            }
        }
        Target::MaxCostPer100k(x) => {
            if enough && p.cost_per_100k_usd <= x {
                (true, acc, p.local_share)
            } else {
                (
                    false,
                    if enough {
                        -p.cost_per_100k_usd
                    } else {
                        f64::MIN
                    },
                    acc,
                )
            }
        }
    }
}

fn better(a: (bool, f64, f64), b: (bool, f64, f64)) -> bool {
    if a.0 != b.0 {
        return a.0;
    }
    if (a.1 - b.1).abs() > 1e-12 {
        return a.1 > b.1;
    }
    a.2 > b.2 + 1e-12
}

/// A band per label for a multi-label task: start from the best common band
/// on the grid, then search each label's band with the others held
/// (coordinate ascent, until a round changes nothing; at most 5 rounds).
/// Each label's grid is the single-label one (`lo` 0–0.5 × `hi` 0.5–1 in
/// steps of 0.01), so a round is 2,601 re-scorings per label.
fn calibrate_per_label(
    replay: &Replay,
    target: Target,
    opts: &CalibrateOptions,
) -> Result<Calibration, CalibrateError> {
    let n = replay.n();
    let labels = replay.cascade.labels.clone();
    let steps: Vec<f64> = (0..=GRID)
        .map(|a| round(a as f64 * 0.5 / GRID as f64))
        .collect();
    let eval = |bands: &[(f64, f64)]| {
        let p = replay.point_with(bands, bands[0], None);
        (rank(&p, target, opts, n), p)
    };
    let mut best: Vec<(f64, f64)> = vec![(0.0, 1.0); labels.len()];
    let mut best_rank = eval(&best).0;
    for lo in &steps {
        for hi in &steps {
            let bands = vec![(*lo, round(0.5 + hi)); labels.len()];
            let (r, _) = eval(&bands);
            if better(r, best_rank) {
                best = bands;
                best_rank = r;
            }
        }
    }
    for _round in 0..5 {
        let mut changed = false;
        for j in 0..labels.len() {
            for lo in &steps {
                for hi in &steps {
                    let mut bands = best.clone();
                    bands[j] = (*lo, round(0.5 + hi));
                    let (r, _) = eval(&bands);
                    if better(r, best_rank) {
                        best = bands;
                        best_rank = r;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    let (rank, chosen) = eval(&best);
    let describe_bands = |bands: &[(f64, f64)], p: &BandPoint| {
        let per: Vec<String> = labels
            .iter()
            .zip(bands)
            .map(|(l, (lo, hi))| format!("{l} {lo}–{hi}"))
            .collect();
        format!(
            "local accuracy {:.4} at local share {:.4} (bands {}, ${:.4} per 100k)",
            p.local_accuracy.unwrap_or(0.0),
            p.local_share,
            per.join(", "),
            p.cost_per_100k_usd
        )
    };
    if !rank.0 {
        let what = match target {
            Target::Accuracy(t) => format!(
                "no per-label bands reach local accuracy {t} ({}) on {n} items with at least {} accepted",
                rule(opts),
                opts.min_accepted
            ),
            Target::LocalShare(s) => {
                format!("no per-label bands let the local tier answer {s} of {n} items")
            }
            Target::MaxCostPer100k(x) => {
                format!("no per-label bands cost at most ${x} per 100k requests")
            }
        };
        return Err(CalibrateError::Unreachable {
            what,
            best: if chosen.local_accuracy.is_some() {
                describe_bands(&best, &chosen)
            } else {
                "no band accepts enough items".into()
            },
        });
    }
    let per = |f: fn(&(f64, f64)) -> f64| {
        Bound::PerLabel(labels.iter().cloned().zip(best.iter().map(f)).collect())
    };
    Ok(Calibration {
        tier: replay.tier.name.clone(),
        lo: per(|b| b.0),
        hi: per(|b| b.1),
        local_share: chosen.local_share,
        local_accuracy: chosen.local_accuracy.unwrap_or(0.0),
        ci95: bootstrap(replay, &best, opts),
        cost_per_100k_usd: chosen.cost_per_100k_usd,
        n: replay.n_total(),
        reached: n,
        target,
        rule: format!(
            "{}, with a band per label (coordinate search from the best common band)",
            rule_for(target, opts)
        ),
        live: None,
    })
}

fn rule(opts: &CalibrateOptions) -> String {
    match opts.margin {
        Some(m) => format!("accuracy on the data at least the target + {m}"),
        None => "one-sided 95% lower bound of local accuracy at least the target".into(),
    }
}

/// One-sided 95% lower bound of a band's local accuracy (normal
/// approximation over the items it accepts).
fn lower_bound(p: &BandPoint, n: usize) -> f64 {
    let a = p.local_accuracy.unwrap_or(0.0);
    let k = (p.local_share * n as f64).max(1.0);
    a - 1.645 * (a * (1.0 - a) / k).sqrt()
}

/// Percentile bootstrap over the items that reach the tier (resampled with
/// replacement, seeded).
fn bootstrap(replay: &Replay, bands: &[(f64, f64)], opts: &CalibrateOptions) -> Ci95 {
    let n = replay.n();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let (mut share, mut accuracy, mut cost) = (Vec::new(), Vec::new(), Vec::new());
    let mut weights = vec![0u32; n];
    for _ in 0..opts.resamples {
        weights.iter_mut().for_each(|w| *w = 0);
        for _ in 0..n {
            weights[rng.random_range(0..n)] += 1;
        }
        let p = replay.point_with(
            bands,
            bands.first().copied().unwrap_or((0.0, 1.0)),
            Some(&weights),
        );
        share.push(p.local_share);
        if let Some(a) = p.local_accuracy {
            accuracy.push(a);
        }
        cost.push(p.cost_per_100k_usd);
    }
    let interval = |v: &[f64]| {
        [
            crate::audit::percentile(v, 0.025).map_or(0.0, round),
            crate::audit::percentile(v, 0.975).map_or(0.0, round),
        ]
    };
    Ci95 {
        local_share: interval(&share),
        local_accuracy: interval(&accuracy),
        cost_per_100k_usd: interval(&cost),
        resamples: opts.resamples,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {why}")]
    NotWritable {
        path: String,
        why: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("{path}: {why}")]
    Edit { path: String, why: String },
    #[error("{path} is not valid TOML")]
    Parse {
        path: String,
        #[source]
        source: toml_edit::TomlError,
    },
    #[error("the edited config would not validate")]
    Invalid(#[source] triage_engine::config::ConfigError),
}

/// Refuse early when `path` cannot be rewritten in place: the file must be
/// writable and its folder must take the temporary file and the `.bak`.
pub fn check_writable(path: &Path) -> Result<(), WriteError> {
    let fail = |why: &str, source: Option<std::io::Error>| WriteError::NotWritable {
        path: path.display().to_string(),
        why: why.to_owned(),
        source,
    };
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| fail("the file cannot be opened for writing", Some(e)))?;
    let bak = bak_path(path);
    if bak.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&bak)
            .map_err(|e| fail("its .bak copy cannot be replaced", Some(e)))?;
    }
    let probe = temp_path(path, "probe");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| {
            fail(
                "its folder does not accept new files (the temporary copy and the .bak)",
                Some(e),
            )
        })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn bak_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".bak");
    PathBuf::from(s)
}

fn temp_path(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".into());
    path.with_file_name(format!(".{name}.{what}-{}", std::process::id()))
}

fn set_number(t: &mut dyn toml_edit::TableLike, key: &str, v: f64) {
    // Keep the decoration (a trailing comment) of a value that is replaced.
    let decor = t
        .get(key)
        .and_then(|i| i.as_value())
        .map(|v| v.decor().clone());
    let mut value = toml_edit::Value::from(v);
    if let Some(d) = decor {
        *value.decor_mut() = d;
    }
    t.insert(key, toml_edit::Item::Value(value));
}

/// The band to write: the tier's `lo`/`hi`, or `bands` per label.
#[derive(Debug, Clone, Copy)]
pub enum Written<'a> {
    One { lo: f64, hi: f64 },
    PerLabel(&'a [(String, f64, f64)]),
}

impl Written<'_> {
    /// What a calibration chose, in the form the config takes.
    pub fn of<'b>(c: &Calibration, bands: &'b [(String, f64, f64)]) -> Written<'b> {
        match (&c.lo, &c.hi) {
            (Bound::One(lo), Bound::One(hi)) => Written::One { lo: *lo, hi: *hi },
            _ => Written::PerLabel(bands),
        }
    }
}

fn set_bands(t: &mut dyn toml_edit::TableLike, bands: &[(String, f64, f64)]) {
    let decor = t
        .get("bands")
        .and_then(|i| i.as_value())
        .map(|v| v.decor().clone());
    let mut table = toml_edit::InlineTable::new();
    for (label, lo, hi) in bands {
        let mut one = toml_edit::InlineTable::new();
        one.insert("lo", (*lo).into());
        one.insert("hi", (*hi).into());
        table.insert(label, toml_edit::Value::InlineTable(one));
    }
    let mut value = toml_edit::Value::InlineTable(table);
    if let Some(d) = decor {
        *value.decor_mut() = d;
    }
    t.insert("bands", toml_edit::Item::Value(value));
}

/// Write the band (`lo`/`hi`, or per-label `bands`) and
/// `calibrated_accuracy` into tier `tier` of task `task` in `path`, with
/// toml_edit (comments and layout kept). The edited text is validated
/// first, the original is kept as `path.bak`, and the new file replaces the
/// old by a rename in the same folder. Returns the `.bak`.
pub fn write_band(
    path: &Path,
    task: &str,
    tier: &str,
    band: Written<'_>,
    calibrated_accuracy: f64,
) -> Result<PathBuf, WriteError> {
    let shown = path.display().to_string();
    let io = |why: &str, e: std::io::Error| WriteError::NotWritable {
        path: shown.clone(),
        why: why.to_owned(),
        source: Some(e),
    };
    let edit = |why: String| WriteError::Edit {
        path: shown.clone(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| io("cannot read it", e))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|source| WriteError::Parse {
        path: shown.clone(),
        source,
    })?;
    let tiers = doc
        .get_mut("tasks")
        .and_then(|t| t.get_mut(task))
        .and_then(|t| t.get_mut("tiers"))
        .ok_or_else(|| edit(format!("no `tasks.{task}.tiers`")))?;
    let named = |t: &dyn toml_edit::TableLike| t.get("name").and_then(|n| n.as_str()) == Some(tier);
    let edit_tier = |t: &mut dyn toml_edit::TableLike| {
        match band {
            Written::One { lo, hi } => {
                set_number(t, "lo", lo);
                set_number(t, "hi", hi);
            }
            Written::PerLabel(bands) => set_bands(t, bands),
        }
        set_number(t, "calibrated_accuracy", round(calibrated_accuracy));
    };
    let mut found = false;
    if let Some(array) = tiers.as_array_of_tables_mut() {
        for t in array.iter_mut() {
            if named(&*t) {
                edit_tier(t);
                found = true;
            }
        }
    } else if let Some(array) = tiers.as_array_mut() {
        for t in array.iter_mut().filter_map(|v| v.as_inline_table_mut()) {
            if named(&*t) {
                edit_tier(t);
                found = true;
            }
        }
    }
    if !found {
        return Err(edit(format!(
            "no tier named `{tier}` in `tasks.{task}.tiers`"
        )));
    }
    let new = doc.to_string();
    let base = path.parent().unwrap_or(Path::new("."));
    Config::from_toml(&new, &shown, base).map_err(WriteError::Invalid)?;
    let bak = bak_path(path);
    std::fs::copy(path, &bak).map_err(|e| io("cannot keep a .bak copy", e))?;
    let tmp = temp_path(path, "new");
    let written = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("cannot replace it", e));
    }
    Ok(bak)
}
