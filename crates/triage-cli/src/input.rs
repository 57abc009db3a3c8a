//! Reading the texts a command works on: one positional text, or a JSONL
//! file (`-` for stdin) whose lines are objects with a `text` string. Other
//! fields of a line are passed through to its output line.

use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

/// Why one input line could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("line {line}: not valid UTF-8")]
    InvalidUtf8 { line: usize },
    #[error("line {line}: malformed JSON: {why}")]
    MalformedJson { line: usize, why: String },
    #[error("line {line}: expected a JSON object like {{\"text\": \"...\"}}")]
    NotAnObject { line: usize },
    #[error("line {line}: no string field `text`")]
    MissingText { line: usize },
}

impl LineError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::MalformedJson { .. } => "malformed_json",
            Self::NotAnObject { .. } => "not_an_object",
            Self::MissingText { .. } => "missing_text",
        }
    }

    pub fn line(&self) -> usize {
        match self {
            Self::InvalidUtf8 { line }
            | Self::MalformedJson { line, .. }
            | Self::NotAnObject { line }
            | Self::MissingText { line } => *line,
        }
    }
}

/// One input: its text and the other fields of its line.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub line: usize,
    pub text: String,
    pub extra: Map<String, Value>,
}

/// One JSONL line that holds a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// 1-based line number in the input.
    pub line: usize,
    pub fields: Map<String, Value>,
}

/// Parse JSONL bytes into items, one per non-blank line, in order.
pub fn parse_jsonl(bytes: &[u8]) -> Vec<Result<Item, LineError>> {
    parse_objects(bytes)
        .into_iter()
        .map(|r| r.and_then(|o| into_item(o.line, o.fields)))
        .collect()
}

/// Parse JSONL bytes into objects, one per non-blank line, in order.
pub fn parse_objects(bytes: &[u8]) -> Vec<Result<Object, LineError>> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, raw)| !raw.iter().all(u8::is_ascii_whitespace))
        .map(|(i, raw)| {
            parse_object(i + 1, raw).map(|fields| Object {
                line: i + 1,
                fields,
            })
        })
        .collect()
}

fn parse_object(line: usize, raw: &[u8]) -> Result<Map<String, Value>, LineError> {
    let s = std::str::from_utf8(raw).map_err(|_| LineError::InvalidUtf8 { line })?;
    let value: Value =
        serde_json::from_str(s.trim_end_matches('\r')).map_err(|e| LineError::MalformedJson {
            line,
            why: e.to_string(),
        })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(LineError::NotAnObject { line }),
    }
}

fn into_item(line: usize, mut map: Map<String, Value>) -> Result<Item, LineError> {
    match map.remove("text") {
        Some(Value::String(text)) => Ok(Item {
            line,
            text,
            extra: map,
        }),
        _ => Err(LineError::MissingText { line }),
    }
}

/// Read a whole file, or stdin for `-`.
pub fn read_source(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin().lock().read_to_end(&mut buf)?;
    } else {
        buf = std::fs::read(path)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_keeps_extra_fields() {
        let items = parse_jsonl(b"{\"text\": \"hi\", \"id\": 7}\n\n{\"text\": \"\"}\n");
        assert_eq!(items.len(), 2);
        let first = items[0].as_ref().ok();
        assert_eq!(first.map(|i| i.text.as_str()), Some("hi"));
        assert_eq!(first.and_then(|i| i.extra.get("id")), Some(&Value::from(7)));
        assert_eq!(items[1].as_ref().ok().map(|i| i.line), Some(3));
    }

    #[test]
    fn reports_each_bad_line_with_its_number() {
        let items = parse_jsonl(b"{\"text\": 1}\nnot json\n[1]\n\xff\xfe\n{\"text\":\"ok\"}");
        let errs: Vec<_> = items.iter().filter_map(|r| r.as_ref().err()).collect();
        assert_eq!(
            errs.iter()
                .map(|e| (e.kind(), e.line()))
                .collect::<Vec<_>>(),
            vec![
                ("missing_text", 1),
                ("malformed_json", 2),
                ("not_an_object", 3),
                ("invalid_utf8", 4)
            ]
        );
        assert!(items[4].is_ok());
    }

    /// Random bytes and mutated JSONL never panic, and every non-blank line
    /// gets exactly one result, numbered in order.
    #[test]
    fn random_input_never_panics_and_keeps_line_numbers() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let seed = br#"{"text": "hello \u00e9 world", "id": 1, "nested": {"a": [1, 2.5, null]}}"#;
        for round in 0..2000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                (0..(next() % 200)).map(|_| (next() & 0xff) as u8).collect()
            } else {
                let mut b = seed.to_vec();
                for _ in 0..(1 + next() % 4) {
                    let i = (next() as usize) % b.len();
                    b[i] = (next() & 0xff) as u8;
                }
                b
            };
            bytes.extend(b"\n{\"text\": \"tail\"}\n");
            let items = parse_jsonl(&bytes);
            let expected = bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                .count();
            assert_eq!(items.len(), expected, "round {round}");
            let lines: Vec<usize> = items
                .iter()
                .map(|r| r.as_ref().map(|i| i.line).unwrap_or_else(LineError::line))
                .collect();
            assert!(
                lines.windows(2).all(|w| w[0] < w[1]),
                "round {round}: {lines:?}"
            );
            assert!(matches!(items.last(), Some(Ok(item)) if item.text == "tail"));
        }
    }
}
