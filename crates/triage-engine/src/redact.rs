//! PII redaction before text leaves for a cloud tier: regexes (emails, phone
//! numbers, card numbers checked with Luhn) and NER spans are replaced by
//! placeholders such as `[EMAIL_1]`, which are put back in the answer.

use regex::Regex;
use std::sync::LazyLock;

/// What a task redacts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redaction {
    pub email: bool,
    pub phone: bool,
    pub card: bool,
    /// A `[local.NAME]` NER specialist and the entity types it redacts.
    pub ner_specialist: Option<String>,
    pub ner_types: Vec<String>,
}

impl Redaction {
    /// Parse a task's `redact = [...]`: `email`, `phone`, `card`,
    /// `ner:TYPE` (specialist `ner`) or `ner:SPECIALIST:TYPE`.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut r = Redaction::default();
        for item in items {
            match item.as_str() {
                "email" => r.email = true,
                "phone" => r.phone = true,
                "card" => r.card = true,
                other => {
                    let parts: Vec<&str> = other.split(':').collect();
                    let (specialist, ty) = match parts.as_slice() {
                        ["ner", ty] => ("ner", *ty),
                        ["ner", sp, ty] => (*sp, *ty),
                        _ => return Err(format!("unknown redaction `{other}`")),
                    };
                    if let Some(existing) = &r.ner_specialist
                        && existing != specialist
                    {
                        return Err("all ner: redactions must use the same specialist".into());
                    }
                    r.ner_specialist = Some(specialist.to_owned());
                    r.ner_types.push(ty.to_owned());
                }
            }
        }
        Ok(r)
    }

    pub fn is_empty(&self) -> bool {
        !self.email && !self.phone && !self.card && self.ner_specialist.is_none()
    }
}

static EMAIL: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}").ok());
static CARD: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"\b(?:\d[ -]?){12,18}\d\b").ok());
static PHONE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}[ .-]?\d{3,4}[ .-]?\d{3,4}\b")
        .ok()
});

fn luhn(digits: &str) -> bool {
    let ds: Vec<u32> = digits.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&ds.len()) {
        return false;
    }
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A span to replace: byte offsets into the text and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub kind: String,
}

/// The placeholders of one redacted text and what they stand for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restorer {
    pub pairs: Vec<(String, String)>,
}

impl Restorer {
    /// Put the originals back wherever a placeholder appears.
    pub fn restore(&self, text: &str) -> String {
        let mut out = text.to_owned();
        // Longest placeholder first so `[PER_10]` is not hit by `[PER_1]`.
        let mut pairs: Vec<&(String, String)> = self.pairs.iter().collect();
        pairs.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for (placeholder, original) in pairs {
            out = out.replace(placeholder.as_str(), original);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Find the regex spans `r` asks for in `text`.
pub fn regex_spans(r: &Redaction, text: &str) -> Vec<Span> {
    let mut spans = Vec::new();
    if r.email
        && let Some(re) = EMAIL.as_ref()
    {
        spans.extend(re.find_iter(text).map(|m| Span {
            start: m.start(),
            end: m.end(),
            kind: "EMAIL".into(),
        }));
    }
    if r.card
        && let Some(re) = CARD.as_ref()
    {
        spans.extend(
            re.find_iter(text)
                .filter(|m| luhn(m.as_str()))
                .map(|m| Span {
                    start: m.start(),
                    end: m.end(),
                    kind: "CARD".into(),
                }),
        );
    }
    if r.phone
        && let Some(re) = PHONE.as_ref()
    {
        spans.extend(
            re.find_iter(text)
                .filter(|m| m.as_str().chars().filter(char::is_ascii_digit).count() >= 8)
                .map(|m| Span {
                    start: m.start(),
                    end: m.end(),
                    kind: "PHONE".into(),
                }),
        );
    }
    spans
}

/// Replace `spans` (possibly overlapping; earlier and longer win) by
/// numbered placeholders. The same original gets the same placeholder.
pub fn apply(text: &str, mut spans: Vec<Span>) -> (String, Restorer) {
    spans.retain(|s| {
        s.start < s.end
            && s.end <= text.len()
            && text.is_char_boundary(s.start)
            && text.is_char_boundary(s.end)
    });
    spans.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    // Overlapping spans merge into one (kind of the first): skipping the
    // second would leave the part of it outside the first in clear.
    let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        match merged.last_mut() {
            Some(last) if s.start < last.end => last.end = last.end.max(s.end),
            _ => merged.push(s),
        }
    }
    let spans = merged;
    let mut out = String::with_capacity(text.len());
    let mut restorer = Restorer::default();
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    let mut at = 0;
    for s in spans {
        if s.start < at {
            continue;
        }
        out.push_str(&text[at..s.start]);
        let original = &text[s.start..s.end];
        let placeholder = match restorer.pairs.iter().find(|(_, o)| o == original) {
            Some((p, _)) => p.clone(),
            None => {
                // A placeholder must not already occur in the text, or
                // restoring would turn the user's own "[EMAIL_1]" into the
                // address.
                let n = counts.entry(s.kind.clone()).or_insert(0);
                let mut p;
                loop {
                    *n += 1;
                    p = format!("[{}_{}]", s.kind, n);
                    if !text.contains(&p) {
                        break;
                    }
                }
                restorer.pairs.push((p.clone(), original.to_owned()));
                p
            }
        };
        out.push_str(&placeholder);
        at = s.end;
    }
    out.push_str(&text[at..]);
    (out, restorer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Redaction {
        Redaction::parse(&["email".into(), "phone".into(), "card".into()]).unwrap()
    }

    #[test]
    fn replaces_and_restores_regex_pii() {
        let text = "Mail jane.doe@example.com or call +1 415-555-0132; card 4111 1111 1111 1111, again jane.doe@example.com";
        let (red, restorer) = apply(text, regex_spans(&all(), text));
        assert_eq!(
            red,
            "Mail [EMAIL_1] or call [PHONE_1]; card [CARD_1], again [EMAIL_1]"
        );
        assert_eq!(
            restorer.restore("Reply sent to [EMAIL_1] about [CARD_1]"),
            "Reply sent to jane.doe@example.com about 4111 1111 1111 1111"
        );
    }

    #[test]
    fn card_numbers_need_a_valid_checksum() {
        let text = "order 4111 1111 1111 1112 and 4111111111111111";
        let spans = regex_spans(&Redaction::parse(&["card".into()]).unwrap(), text);
        assert_eq!(spans.len(), 1);
        assert_eq!(&text[spans[0].start..spans[0].end], "4111111111111111");
    }

    #[test]
    fn short_numbers_are_not_phones() {
        let text = "My order #12345 hasn't arrived";
        assert!(regex_spans(&all(), text).is_empty());
    }

    #[test]
    fn parses_ner_specs_and_rejects_unknown_ones() {
        let r = Redaction::parse(&["ner:PER".into(), "ner:ORG".into()]).unwrap();
        assert_eq!(r.ner_specialist.as_deref(), Some("ner"));
        assert_eq!(r.ner_types, vec!["PER", "ORG"]);
        assert!(Redaction::parse(&["ssn".into()]).is_err());
        assert!(Redaction::parse(&["ner:a:PER".into(), "ner:b:ORG".into()]).is_err());
    }

    #[test]
    fn overlapping_spans_merge() {
        let spans = vec![
            Span {
                start: 0,
                end: 4,
                kind: "PER".into(),
            },
            Span {
                start: 0,
                end: 9,
                kind: "PER".into(),
            },
            Span {
                start: 5,
                end: 9,
                kind: "ORG".into(),
            },
        ];
        let (red, r) = apply("Jane Doe! hi", spans);
        assert_eq!(red, "[PER_1] hi");
        assert_eq!(r.restore(&red), "Jane Doe! hi");
    }
}
