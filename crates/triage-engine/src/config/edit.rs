//! Edits to a config file from the web UI's designer, with `toml_edit` so
//! comments and layout stay; every earlier version kept as a numbered copy
//! beside the file (`<config>.history/000001.toml`, ...); a version token
//! (the SHA-256 of the file's bytes) so a save made against a file that
//! changed since it was read (by hand, or by a second browser) is refused
//! instead of overwriting it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml_edit::{DocumentMut, Item, Table, TableLike, value};

use super::{Config, ConfigError};

/// One change the designer makes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Edit {
    /// A cascade tier's band: it answers when every score is ≤ lo or ≥ hi.
    SetBand {
        task: String,
        tier: usize,
        lo: f64,
        hi: f64,
    },
    /// A cascade tier's (or a model route's) provider and model; a tier
    /// given `local` becomes a local specialist tier.
    SetTarget {
        task: String,
        /// A cascade tier's index, or a route's name.
        node: String,
        provider: Option<String>,
        model: Option<String>,
        local: Option<String>,
    },
    /// Move a cascade tier from one place to another.
    MoveTier {
        task: String,
        from: usize,
        to: usize,
    },
    RemoveTier {
        task: String,
        tier: usize,
    },
    /// A new tier at index `at` (at the end when absent). The last tier
    /// always answers, so a tier meant to pass uncertain inputs on goes
    /// before it, with a band.
    AddTier {
        task: String,
        name: String,
        provider: Option<String>,
        model: Option<String>,
        local: Option<String>,
        lo: Option<f64>,
        hi: Option<f64>,
        at: Option<usize>,
    },
    /// A new task from a template (`cascade`, `router`, `pipeline`), wired
    /// to the first provider and specialist the file has.
    AddTask {
        name: String,
        template: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not valid TOML")]
    Parse(String, #[source] toml_edit::TomlError),
    /// An edit names something the file does not have.
    #[error("`{key}`: {message}")]
    Target { key: String, message: String },
    /// The edited file would not pass `triage config check`.
    #[error("the edited config is not valid")]
    Invalid(#[source] ConfigError),
    /// The file is not the version the edit was made against.
    #[error(
        "the config file changed since it was read (edited by hand or saved from another browser): reload it and redo the change"
    )]
    Conflict { current: String },
    #[error("no version {0} in the history")]
    NoVersion(u32),
}

/// A file's version token: the SHA-256 of its bytes, in hex.
pub fn version_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn target(key: impl Into<String>, message: impl Into<String>) -> EditError {
    EditError::Target {
        key: key.into(),
        message: message.into(),
    }
}

fn task_table<'a>(doc: &'a mut DocumentMut, task: &str) -> Result<&'a mut Table, EditError> {
    doc.get_mut("tasks")
        .and_then(|t| t.get_mut(task))
        .and_then(Item::as_table_mut)
        .ok_or_else(|| target(format!("tasks.{task}"), "no such task table"))
}

fn tiers<'a>(
    doc: &'a mut DocumentMut,
    task: &str,
) -> Result<&'a mut toml_edit::ArrayOfTables, EditError> {
    task_table(doc, task)?
        .get_mut("tiers")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| {
            target(
                format!("tasks.{task}.tiers"),
                "not a cascade written as [[tiers]] tables",
            )
        })
}

/// Replace `key`'s value, keeping its decoration (a trailing comment).
fn set(t: &mut dyn TableLike, key: &str, v: toml_edit::Value) {
    let mut v = v;
    if let Some(old) = t.get(key).and_then(Item::as_value) {
        *v.decor_mut() = old.decor().clone();
    }
    t.insert(key, Item::Value(v));
}

fn set_opt(t: &mut dyn TableLike, key: &str, v: &Option<String>) {
    match v {
        Some(s) if !s.is_empty() => set(t, key, s.as_str().into()),
        _ => {
            t.remove(key);
        }
    }
}

/// `text` with `edits` applied (not yet validated).
pub fn apply(text: &str, edits: &[Edit]) -> Result<String, EditError> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| EditError::Parse("the config".into(), e))?;
    for e in edits {
        apply_one(&mut doc, e)?;
    }
    Ok(doc.to_string())
}

fn apply_one(doc: &mut DocumentMut, edit: &Edit) -> Result<(), EditError> {
    match edit {
        Edit::SetBand { task, tier, lo, hi } => {
            let t = tiers(doc, task)?
                .get_mut(*tier)
                .ok_or_else(|| target(format!("tasks.{task}.tiers[{tier}]"), "no such tier"))?;
            set(t, "lo", (*lo).into());
            set(t, "hi", (*hi).into());
        }
        Edit::SetTarget {
            task,
            node,
            provider,
            model,
            local,
        } => {
            let t: &mut dyn TableLike = match node.parse::<usize>() {
                Ok(i) => tiers(doc, task)?
                    .get_mut(i)
                    .ok_or_else(|| target(format!("tasks.{task}.tiers[{i}]"), "no such tier"))?,
                Err(_) => task_table(doc, task)?
                    .get_mut("routes")
                    .and_then(|r| r.get_mut(node))
                    .and_then(Item::as_table_like_mut)
                    .ok_or_else(|| {
                        target(format!("tasks.{task}.routes.{node}"), "no such route")
                    })?,
            };
            set_opt(t, "local", local);
            set_opt(t, "provider", provider);
            set_opt(t, "model", model);
        }
        Edit::MoveTier { task, from, to } => {
            let arr = tiers(doc, task)?;
            let n = arr.len();
            if *from >= n || *to >= n {
                return Err(target(
                    format!("tasks.{task}.tiers"),
                    format!("tiers are numbered 0 to {}", n.saturating_sub(1)),
                ));
            }
            let mut tables: Vec<Table> = arr.iter().cloned().collect();
            // Each table keeps its place in the file: the moved tables swap
            // positions, so the comments between them stay where they were.
            let positions: Vec<Option<usize>> = tables.iter().map(Table::position).collect();
            let moved = tables.remove(*from);
            tables.insert(*to, moved);
            arr.clear();
            for (mut t, p) in tables.into_iter().zip(positions) {
                if let Some(p) = p {
                    t.set_position(p);
                }
                arr.push(t);
            }
        }
        Edit::RemoveTier { task, tier } => {
            let arr = tiers(doc, task)?;
            if *tier >= arr.len() {
                return Err(target(
                    format!("tasks.{task}.tiers[{tier}]"),
                    "no such tier",
                ));
            }
            arr.remove(*tier);
        }
        Edit::AddTier {
            task,
            name,
            provider,
            model,
            local,
            lo,
            hi,
            at,
        } => {
            let arr = tiers(doc, task)?;
            let n = arr.len();
            let at = at.unwrap_or(n);
            if at > n {
                return Err(target(
                    format!("tasks.{task}.tiers"),
                    format!("a new tier goes at 0 to {n}"),
                ));
            }
            let mut t = Table::new();
            t.insert("name", value(name.as_str()));
            set_opt(&mut t, "local", local);
            set_opt(&mut t, "provider", provider);
            set_opt(&mut t, "model", model);
            // A chat tier needs only hi; the validator says what is missing.
            if let Some(lo) = lo {
                t.insert("lo", value(*lo));
            }
            if let Some(hi) = hi {
                t.insert("hi", value(*hi));
            }
            // The old tables keep their places in the file; the new one has
            // none, so it is written right after the tier before it (or
            // after the task's header when it goes first).
            let mut tables: Vec<Table> = arr.iter().cloned().collect();
            tables.insert(at, t);
            arr.clear();
            for t in tables {
                arr.push(t);
            }
        }
        Edit::AddTask { name, template } => add_task(doc, name, template)?,
    }
    Ok(())
}

fn first_key(doc: &DocumentMut, table: &str, want: impl Fn(&Item) -> bool) -> Option<String> {
    doc.get(table)
        .and_then(Item::as_table_like)
        .and_then(|t| t.iter().find(|(_, v)| want(v)).map(|(k, _)| k.to_owned()))
}

fn add_task(doc: &mut DocumentMut, name: &str, template: &str) -> Result<(), EditError> {
    let key = format!("tasks.{name}");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(target(key, "a task name is letters, digits, `_` and `-`"));
    }
    if doc.get("tasks").and_then(|t| t.get(name)).is_some() {
        return Err(target(key, "a task of this name exists"));
    }
    let kind_is = |k: &'static str| {
        move |i: &Item| i.get("kind").and_then(Item::as_str).is_none_or(|v| v == k)
    };
    let provider = first_key(doc, "providers", |i| {
        i.get("kind").and_then(Item::as_str) != Some("perspective")
    });
    let whisper_like = |i: &Item| {
        i.get("kind").and_then(Item::as_str) == Some("whisper")
            || i.get("model")
                .and_then(Item::as_str)
                .is_some_and(|m| m.contains("whisper") || m.ends_with(".bin"))
    };
    let classifier = first_key(doc, "local", |i| {
        kind_is("classifier")(i) && !whisper_like(i)
    });
    let whisper = first_key(doc, "local", whisper_like);
    // Written as text with full table paths and appended, so the new tables
    // come after everything else in the file.
    let t = format!("tasks.{name}");
    let text = match template {
        "cascade" => {
            let mut s = format!(
                "[{t}]\nstrategy = \"cascade\"\nkind = \"moderation\"\nlabels = [\"flagged\"]\n"
            );
            if let Some(l) = &classifier {
                s += &format!(
                    "\n[[{t}.tiers]]\nname = \"local\"\nlocal = \"{l}\"\nlo = 0.2\nhi = 0.8\n"
                );
            }
            match &provider {
                Some(p) => {
                    s += &format!(
                        "\n[[{t}.tiers]]\nname = \"llm\"\nprovider = \"{p}\"\nmodel = \"gpt-4o-mini\"\n"
                    )
                }
                None if classifier.is_none() => {
                    return Err(target(
                        key,
                        "a cascade needs a [local.NAME] or a [providers.NAME] first",
                    ));
                }
                None => {}
            }
            s
        }
        "router" => {
            let p = provider
                .ok_or_else(|| target(&key, "a router template needs a [providers.NAME] first"))?;
            format!(
                "[{t}]\nstrategy = \"router\"\n\n[{t}.intent]\nkind = \"rules\"\ndefault = \"general\"\n\
                 rules = [{{ route = \"greeting\", any = [\"hello\", \"hi\"] }}]\n\n\
                 [{t}.routes.greeting]\nhandler = \"template\"\ntemplate = \"Hello! How can we help?\"\n\n\
                 [{t}.routes.general]\nhandler = \"model\"\nprovider = \"{p}\"\nmodel = \"gpt-4o-mini\"\n"
            )
        }
        "pipeline" => {
            let w = whisper.ok_or_else(|| {
                target(
                    &key,
                    "a pipeline template needs a Whisper [local.NAME] first",
                )
            })?;
            let mut s = format!(
                "[{t}]\nstrategy = \"pipeline\"\n\n[[{t}.stages]]\nname = \"transcribe\"\nkind = \"transcribe\"\nlocal = \"{w}\"\n"
            );
            if let Some(p) = &provider {
                s += &format!(
                    "\n[[{t}.stages]]\nname = \"summary\"\nkind = \"summarize\"\ntiers = [{{ provider = \"{p}\", model = \"gpt-4o-mini\" }}]\n"
                );
            }
            s
        }
        other => {
            return Err(target(
                key,
                format!("no template `{other}`: cascade, router or pipeline"),
            ));
        }
    };
    let mut whole = doc.to_string();
    if !whole.ends_with('\n') {
        whole.push('\n');
    }
    whole.push('\n');
    whole.push_str(&text);
    *doc = whole
        .parse()
        .map_err(|e| EditError::Parse(format!("the {template} template"), e))?;
    Ok(())
}

/// The folder that keeps every version of `path`.
pub fn history_dir(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".history");
    PathBuf::from(s)
}

/// `path`'s history folder, made (owner-only, 0700) if it is not there.
fn history_folder(path: &Path) -> Result<PathBuf, EditError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = history_dir(path);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| EditError::Write {
            path: dir.display().to_string(),
            source,
        })?;
    Ok(dir)
}

/// One kept version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    pub number: u32,
    pub version: String,
    /// When it was kept (unix milliseconds).
    pub saved_ms: i64,
    pub bytes: u64,
}

fn numbered(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let n = p
                .file_name()?
                .to_str()?
                .strip_suffix(".toml")?
                .parse::<u32>()
                .ok()?;
            Some((n, p))
        })
        .collect();
    out.sort();
    out
}

/// Every kept version of `path`, oldest first.
pub fn history(path: &Path) -> Vec<HistoryEntry> {
    numbered(&history_dir(path))
        .into_iter()
        .filter_map(|(number, p)| {
            let bytes = std::fs::read(&p).ok()?;
            let meta = std::fs::metadata(&p).ok()?;
            let saved_ms = meta.modified().ok().map(crate::ledger::millis).unwrap_or(0);
            Some(HistoryEntry {
                number,
                version: version_of(&bytes),
                saved_ms,
                bytes: bytes.len() as u64,
            })
        })
        .collect()
}

/// The text of kept version `number`.
pub fn version_text(path: &Path, number: u32) -> Result<String, EditError> {
    let p = history_dir(path).join(format!("{number:06}.toml"));
    std::fs::read_to_string(&p).map_err(|_| EditError::NoVersion(number))
}

/// Keep `bytes` as the next numbered version, unless the newest kept one
/// is the same.
fn keep(path: &Path, bytes: &[u8]) -> Result<u32, EditError> {
    let dir = history_folder(path)?;
    let kept = numbered(&dir);
    if let Some((n, p)) = kept.last()
        && std::fs::read(p).is_ok_and(|b| b == bytes)
    {
        return Ok(*n);
    }
    let n = kept.last().map_or(1, |(n, _)| n + 1);
    write_atomic(&dir.join(format!("{n:06}.toml")), bytes)?;
    Ok(n)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EditError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.new-{}", std::process::id()));
    let werr = |source| EditError::Write {
        path: path.display().to_string(),
        source,
    };
    let done = (|| -> std::io::Result<()> {
        use std::io::Write;
        // A new file (a kept version) is the owner's alone; a replaced
        // one keeps its mode.
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?
        };
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        std::fs::rename(&tmp, path)
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.map_err(werr)
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Saved {
    pub version: String,
    /// The history number the new text is kept under.
    pub number: u32,
    /// The text the file had before (to put back if the engine cannot start).
    #[serde(skip)]
    pub previous: Vec<u8>,
}

/// Validate `text` as `triage config check` does, against `path`'s folder.
pub fn check(path: &Path, text: &str) -> Result<Config, EditError> {
    let base = path.parent().unwrap_or(Path::new("."));
    Config::from_toml(text, &path.display().to_string(), base).map_err(EditError::Invalid)
}

/// Replace `path` with `text` when the file is still at version `expected`
/// and `text` validates; both the old and the new text are kept in the
/// history. Nothing is written when either check fails.
pub fn save(path: &Path, expected: &str, text: &str) -> Result<Saved, EditError> {
    let current = std::fs::read(path).map_err(|source| EditError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let current_version = version_of(&current);
    if current_version != expected {
        return Err(EditError::Conflict {
            current: current_version,
        });
    }
    check(path, text)?;
    keep(path, &current)?;
    write_atomic(path, text.as_bytes())?;
    let number = keep(path, text.as_bytes())?;
    Ok(Saved {
        version: version_of(text.as_bytes()),
        number,
        previous: current,
    })
}

/// Put `previous` back after a save whose engine could not start.
pub fn restore(path: &Path, previous: &[u8]) -> Result<(), EditError> {
    write_atomic(path, previous)
}

/// A line diff of `old` and `new` (`' '`, `'-'`, `'+'` and the line), by
/// longest common subsequence; files too long for that are shown as all
/// removed then all added.
pub fn diff(old: &str, new: &str) -> Vec<(char, String)> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        return a
            .iter()
            .map(|l| ('-', (*l).to_owned()))
            .chain(b.iter().map(|l| ('+', (*l).to_owned())))
            .collect();
    }
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push((' ', a[i].to_owned()));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Removals before additions, as `diff -u` shows them.
            out.push(('-', a[i].to_owned()));
            i += 1;
        } else {
            out.push(('+', b[j].to_owned()));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CASCADE: &str = r#"# top comment
[local.tox]
model = "toxicity"

[providers.openai]
kind = "openai"
api_key_env = "UNSET_KEY_FOR_EDIT_TEST"

[tasks.m]
strategy = "cascade"
kind = "moderation"
labels = ["toxic"]

# the local tier
[[tasks.m.tiers]]
name = "local"
local = "tox"
lo = 0.2 # calibrated
hi = 0.8

[[tasks.m.tiers]]
name = "mid"
provider = "openai"
model = "omni-moderation-latest"
operation = "moderation"
lo = 0.3
hi = 0.7

[[tasks.m.tiers]]
name = "llm"
provider = "openai"
model = "gpt-4o-mini"
"#;

    fn band(text: &str) -> Edit {
        let _ = text;
        Edit::SetBand {
            task: "m".into(),
            tier: 0,
            lo: 0.1,
            hi: 0.9,
        }
    }

    #[test]
    fn a_band_edit_keeps_comments_and_the_rest_of_the_file() {
        let out = apply(CASCADE, &[band(CASCADE)]).unwrap();
        assert!(out.contains("lo = 0.1 # calibrated"), "{out}");
        assert!(out.contains("hi = 0.9"), "{out}");
        assert!(out.contains("# the local tier"));
        assert!(out.contains("# top comment"));
        let d = diff(CASCADE, &out);
        let changed: Vec<_> = d.iter().filter(|(c, _)| *c != ' ').collect();
        assert_eq!(changed.len(), 4, "{changed:?}");
    }

    #[test]
    fn moving_a_tier_swaps_the_tables_in_place() {
        let out = apply(
            CASCADE,
            &[Edit::MoveTier {
                task: "m".into(),
                from: 1,
                to: 0,
            }],
        )
        .unwrap();
        let mid = out.find("name = \"mid\"").unwrap();
        let local = out.find("name = \"local\"").unwrap();
        assert!(mid < local, "{out}");
        let doc: toml::Table = toml::from_str(&out).unwrap();
        let names: Vec<_> = doc["tasks"]["m"]["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["mid", "local", "llm"]);
    }

    fn tier_names(text: &str) -> Vec<String> {
        let doc: toml::Table = toml::from_str(text).unwrap();
        doc["tasks"]["m"]["tiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn add_tier(at: Option<usize>, lo: Option<f64>, hi: Option<f64>) -> Edit {
        Edit::AddTier {
            task: "m".into(),
            name: "extra".into(),
            provider: Some("openai".into()),
            model: Some("omni-moderation-latest".into()),
            local: None,
            lo,
            hi,
            at,
        }
    }

    #[test]
    fn a_tier_is_added_before_the_last_and_validated() {
        let out = apply(CASCADE, &[add_tier(Some(2), Some(0.25), Some(0.75))]).unwrap();
        assert_eq!(tier_names(&out), ["local", "mid", "extra", "llm"]);
        // Written between the tables it sits between, comments kept.
        let extra = out.find("name = \"extra\"").unwrap();
        assert!(out.find("name = \"mid\"").unwrap() < extra, "{out}");
        assert!(extra < out.find("name = \"llm\"").unwrap(), "{out}");
        assert!(out.contains("lo = 0.2 # calibrated") && out.contains("# the local tier"));
        let c = Config::from_toml(&out, "t", Path::new(".")).unwrap();
        let crate::config::Strategy::Cascade(m) = &c.tasks["m"].strategy else {
            panic!("not a cascade")
        };
        assert_eq!(m.tiers[2].band, Some((0.25, 0.75)));
        // First place: after the task's header, before the old first tier.
        let out = apply(CASCADE, &[add_tier(Some(0), Some(0.1), Some(0.9))]).unwrap();
        assert_eq!(tier_names(&out), ["extra", "local", "mid", "llm"]);
        // At the end, the old last tier has no band: the validator names it.
        let out = apply(CASCADE, &[add_tier(None, None, None)]).unwrap();
        assert_eq!(tier_names(&out), ["local", "mid", "llm", "extra"]);
        let ConfigError::Invalid { problems, .. } =
            Config::from_toml(&out, "t", Path::new(".")).unwrap_err()
        else {
            panic!("not a validation error")
        };
        assert!(
            problems
                .iter()
                .any(|p| p.key.starts_with("tasks.m.tiers[2]")),
            "{problems:?}"
        );
        // Without a band before the last: the new tier is named.
        let out = apply(CASCADE, &[add_tier(Some(1), None, None)]).unwrap();
        let ConfigError::Invalid { problems, .. } =
            Config::from_toml(&out, "t", Path::new(".")).unwrap_err()
        else {
            panic!("not a validation error")
        };
        assert!(
            problems
                .iter()
                .any(|p| p.key.starts_with("tasks.m.tiers[1]")),
            "{problems:?}"
        );
        let e = apply(CASCADE, &[add_tier(Some(4), None, None)]).unwrap_err();
        assert!(e.to_string().contains("tasks.m.tiers"), "{e}");
    }

    #[test]
    fn unknown_targets_are_named() {
        let e = apply(
            CASCADE,
            &[Edit::SetBand {
                task: "m".into(),
                tier: 7,
                lo: 0.1,
                hi: 0.9,
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("tasks.m.tiers[7]"), "{e}");
        let e = apply(
            CASCADE,
            &[Edit::RemoveTier {
                task: "nope".into(),
                tier: 0,
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("tasks.nope"), "{e}");
    }

    #[test]
    fn templates_make_tasks_that_validate_or_say_what_is_missing() {
        let out = apply(
            CASCADE,
            &[
                Edit::AddTask {
                    name: "c2".into(),
                    template: "cascade".into(),
                },
                Edit::AddTask {
                    name: "r2".into(),
                    template: "router".into(),
                },
            ],
        )
        .unwrap();
        let c = Config::from_toml(&out, "t", Path::new(".")).unwrap();
        assert!(c.tasks.contains_key("c2") && c.tasks.contains_key("r2"));
        let e = apply(
            CASCADE,
            &[Edit::AddTask {
                name: "p".into(),
                template: "pipeline".into(),
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("Whisper"), "{e}");
    }

    #[test]
    fn save_refuses_a_stale_version_and_an_invalid_text_and_keeps_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, CASCADE).unwrap();
        let v0 = version_of(CASCADE.as_bytes());
        // An invalid band (lo above hi) changes nothing.
        let bad = apply(
            CASCADE,
            &[Edit::SetBand {
                task: "m".into(),
                tier: 0,
                lo: 0.9,
                hi: 0.1,
            }],
        )
        .unwrap();
        let e = save(&path, &v0, &bad).unwrap_err();
        let EditError::Invalid(ConfigError::Invalid { problems, .. }) = &e else {
            panic!("{e:?}")
        };
        assert!(
            problems[0].key.starts_with("tasks.m.tiers[0]"),
            "{problems:?}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), CASCADE);
        assert!(history(&path).is_empty());
        // A good one is saved; both versions are kept.
        let good = apply(CASCADE, &[band(CASCADE)]).unwrap();
        let saved = save(&path, &v0, &good).unwrap();
        assert_eq!(saved.number, 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
        let h = history(&path);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].version, v0);
        assert_eq!(h[1].version, saved.version);
        assert_eq!(version_text(&path, 1).unwrap(), CASCADE);
        // A second browser still holding v0 is refused; the file stays.
        let e = save(&path, &v0, CASCADE).unwrap_err();
        assert!(matches!(e, EditError::Conflict { .. }), "{e:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
        // Rolling back is a save of an old version's text.
        let back = save(&path, &saved.version, &version_text(&path, 1).unwrap()).unwrap();
        assert_eq!(back.number, 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), CASCADE);
    }
}

/// One change to the config file, as the audit trail keeps it
/// (`FILE.history/audit.jsonl`, one JSON object a line, owner-only).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// `save`, `rollback`, `reload (SIGHUP)`.
    pub action: String,
    /// The key's name over TCP; `socket uid N pid P`; `signal`.
    pub who: String,
    /// The peer's address, `unix socket`, or `local`.
    pub from: String,
    /// The kept version the change made current, where there is one.
    pub number: Option<u32>,
    pub version: String,
    /// The change, `+`/`-` lines against the text before (at most 400).
    pub diff: Vec<String>,
}

/// The most diff lines an audit entry keeps.
const AUDIT_DIFF_LINES: usize = 400;

/// What changed the config, for [`record_change`].
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub action: &'a str,
    pub who: &'a str,
    pub from: &'a str,
    /// The kept version the change made current, where there is one.
    pub number: Option<u32>,
}

/// Append `change` to `path`'s audit trail, now, with `after`'s version and
/// its diff from `before`; the entry as written.
pub fn record_change(
    path: &Path,
    change: Change<'_>,
    before: &str,
    after: &str,
) -> Result<AuditEntry, EditError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let entry = AuditEntry {
        at_ms: crate::ledger::millis(std::time::SystemTime::now()),
        action: change.action.to_owned(),
        who: change.who.to_owned(),
        from: change.from.to_owned(),
        number: change.number,
        version: version_of(after.as_bytes()),
        diff: diff(before, after)
            .into_iter()
            .filter(|(op, _)| *op != ' ')
            .take(AUDIT_DIFF_LINES)
            .map(|(op, line)| format!("{op}{line}"))
            .collect(),
    };
    let dir = history_folder(path)?;
    let werr = |source| EditError::Write {
        path: dir.display().to_string(),
        source,
    };
    let line = serde_json::to_string(&entry).unwrap_or_default();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(dir.join("audit.jsonl"))
        .and_then(|mut f| writeln!(f, "{line}"))
        .map_err(werr)?;
    Ok(entry)
}

/// Every change the audit trail holds, oldest first.
pub fn audit_trail(path: &Path) -> Vec<AuditEntry> {
    std::fs::read_to_string(history_dir(path).join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
