//! Calibration: choose a local tier's band (`lo`, `hi`) that meets a target
//! on a [`Replay`], with a bootstrap 95% interval, and write it into the
//! config file in place (comments and layout kept, a `.bak` left, never
//! half-written).

use crate::audit::{BandPoint, Replay, round};
use crate::config::Config;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::path::{Path, PathBuf};

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

/// `triage calibrate`'s answer (key order used by acceptance checks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    pub tier: String,
    pub lo: f64,
    pub hi: f64,
    pub local_share: f64,
    pub local_accuracy: f64,
    pub ci95: Ci95,
    pub cost_per_100k_usd: f64,
    pub n: usize,
    pub target: Target,
    /// How the accuracy target was applied.
    pub rule: String,
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
    Ok(Calibration {
        tier: replay.tier.name.clone(),
        lo: chosen.lo,
        hi: chosen.hi,
        local_share: chosen.local_share,
        local_accuracy: acc(&chosen),
        ci95: bootstrap(replay, chosen.lo, chosen.hi, opts),
        cost_per_100k_usd: chosen.cost_per_100k_usd,
        n,
        target,
        rule: match target {
            Target::Accuracy(_) => rule(opts),
            Target::LocalShare(_) => "the most accurate band with at least the target share".into(),
            Target::MaxCostPer100k(_) => {
                "the most accurate band within the cost (price-table estimate for escalated items)"
                    .into()
            }
        },
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

/// Percentile bootstrap over items (resampled with replacement, seeded).
fn bootstrap(replay: &Replay, lo: f64, hi: f64, opts: &CalibrateOptions) -> Ci95 {
    let n = replay.n();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let (mut share, mut accuracy, mut cost) = (Vec::new(), Vec::new(), Vec::new());
    let mut weights = vec![0u32; n];
    for _ in 0..opts.resamples {
        weights.iter_mut().for_each(|w| *w = 0);
        for _ in 0..n {
            weights[rng.random_range(0..n)] += 1;
        }
        let p = replay.point(lo, hi, Some(&weights));
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
    Invalid(#[source] crate::config::ConfigError),
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

/// Write `lo`, `hi` and `calibrated_accuracy` into tier `tier` of task
/// `task` in `path`, with toml_edit (comments and layout kept). The edited
/// text is validated first, the original is kept as `path.bak`, and the new
/// file replaces the old by a rename in the same folder. Returns the `.bak`.
pub fn write_band(
    path: &Path,
    task: &str,
    tier: &str,
    lo: f64,
    hi: f64,
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
    let values = [
        ("lo", lo),
        ("hi", hi),
        ("calibrated_accuracy", round(calibrated_accuracy)),
    ];
    let mut found = false;
    if let Some(array) = tiers.as_array_of_tables_mut() {
        for t in array.iter_mut() {
            if named(&*t) {
                for (k, v) in values {
                    set_number(t, k, v);
                }
                found = true;
            }
        }
    } else if let Some(array) = tiers.as_array_mut() {
        for t in array.iter_mut().filter_map(|v| v.as_inline_table_mut()) {
            if named(&*t) {
                for (k, v) in values {
                    set_number(t, k, v);
                }
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
