//! The live audit's answer cache: one JSON line per answer in
//! `DIR/TASK.jsonl`, keyed by the hosted path the answer came from and the
//! input, so a rerun of `triage audit --live` or `triage calibrate` on the
//! same data calls nothing.
//!
//! One cache type serves every kind of record (a moderation cascade's
//! escalated answer, a router or pipeline item's outcome, a hosted tier's
//! scores for calibration): each record type says where its key lives. A
//! line that does not parse as the record type asked for is skipped, so
//! records of other kinds sharing the file, and a line cut short by an
//! interrupted run, cost nothing but a fresh call.

use crate::audit::AuditError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A record kept in the cache: it carries its own key.
pub trait Cached: Serialize + DeserializeOwned {
    /// The hosted path (tiers and models) the record's answer came from.
    fn path(&self) -> &str;
    /// The input it answers (the text, or an audio file's identity).
    fn input(&self) -> &str;
}

#[derive(Debug)]
pub struct AnswerCache<R> {
    file: PathBuf,
    records: HashMap<(String, String), R>,
}

impl<R: Cached> AnswerCache<R> {
    /// The cache file of `task` in `dir`.
    pub fn file_of(dir: &Path, task: &str) -> PathBuf {
        dir.join(format!("{task}.jsonl"))
    }

    /// Open (creating `dir` if needed) and read every record of type `R`.
    pub fn open(dir: &Path, task: &str) -> Result<Self, AuditError> {
        let file = Self::file_of(dir, task);
        let io = |source| AuditError::Cache {
            path: file.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut records = HashMap::new();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for r in text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<R>(l).ok())
                {
                    records.insert((r.path().to_owned(), r.input().to_owned()), r);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        Ok(Self { file, records })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn get(&self, path: &str, input: &str) -> Option<&R> {
        self.records.get(&(path.to_owned(), input.to_owned()))
    }

    /// Append `record` to the file (one line, written whole) and keep it.
    pub fn put(&mut self, record: R) -> Result<(), AuditError> {
        let io = |source| AuditError::Cache {
            path: self.file.display().to_string(),
            source,
        };
        let mut line = serde_json::to_string(&record).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .map_err(io)?;
        f.write_all(line.as_bytes()).map_err(io)?;
        self.records.insert(
            (record.path().to_owned(), record.input().to_owned()),
            record,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct A {
        path: String,
        text: String,
        answer: u32,
    }
    impl Cached for A {
        fn path(&self) -> &str {
            &self.path
        }
        fn input(&self) -> &str {
            &self.text
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct B {
        path: String,
        input: String,
        other: String,
    }
    impl Cached for B {
        fn path(&self) -> &str {
            &self.path
        }
        fn input(&self) -> &str {
            &self.input
        }
    }

    #[test]
    fn records_survive_a_reopen_and_other_kinds_and_torn_lines_are_skipped() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut a = AnswerCache::<A>::open(dir.path(), "t")?;
        a.put(A {
            path: "p".into(),
            text: "hello".into(),
            answer: 7,
        })?;
        let mut b = AnswerCache::<B>::open(dir.path(), "t")?;
        assert!(
            b.get("p", "hello").is_none(),
            "read a record of another kind"
        );
        b.put(B {
            path: "p".into(),
            input: "hello".into(),
            other: "x".into(),
        })?;
        // An interrupted run leaves half a line.
        let file = AnswerCache::<A>::file_of(dir.path(), "t");
        let mut f = std::fs::OpenOptions::new().append(true).open(&file)?;
        f.write_all(b"{\"path\": \"p\", \"text\": \"cut")?;
        drop(f);
        let a = AnswerCache::<A>::open(dir.path(), "t")?;
        assert_eq!(a.get("p", "hello").map(|r| r.answer), Some(7));
        assert!(a.get("q", "hello").is_none() && a.get("p", "cut").is_none());
        let b = AnswerCache::<B>::open(dir.path(), "t")?;
        assert_eq!(b.get("p", "hello").map(|r| r.other.as_str()), Some("x"));
        assert_eq!(std::fs::read_to_string(&file)?.lines().count(), 3);
        Ok(())
    }
}
