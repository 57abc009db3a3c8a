//! PII redaction before text leaves for a cloud tier: patterns (e-mails,
//! phone numbers, cards, IBANs, national ids, IP addresses; each with its
//! own check, in `patterns.rs`) and NER spans are replaced by placeholders
//! such as `[EMAIL_1]`, which are put back in the answer. The patterns read
//! Unicode digits and full-width characters as ASCII.

mod patterns;

#[cfg(test)]
use patterns::Normalized;

/// What a task redacts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redaction {
    pub email: bool,
    pub phone: bool,
    pub card: bool,
    /// IBANs whose mod-97 check holds.
    pub iban: bool,
    /// US SSNs, Spanish DNI/NIE, UK NINO, French NIR, Dutch BSN, German tax
    /// ids, Polish PESEL, Belgian national numbers (each checked).
    pub national_id: bool,
    /// IPv4 and IPv6 addresses.
    pub ip: bool,
    /// A `[local.NAME]` NER specialist and the entity types it redacts.
    pub ner_specialist: Option<String>,
    pub ner_types: Vec<String>,
}

impl Redaction {
    /// Parse a task's `redact = [...]`: `email`, `phone`, `card`, `iban`,
    /// `national_id`, `ip`, `ner:TYPE` (specialist `ner`) or
    /// `ner:SPECIALIST:TYPE`.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut r = Redaction::default();
        for item in items {
            match item.as_str() {
                "email" => r.email = true,
                "phone" => r.phone = true,
                "card" => r.card = true,
                "iban" => r.iban = true,
                "national_id" => r.national_id = true,
                "ip" => r.ip = true,
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
        !self.email
            && !self.phone
            && !self.card
            && !self.iban
            && !self.national_id
            && !self.ip
            && self.ner_specialist.is_none()
    }
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

/// Find the pattern spans `r` asks for in `text` (byte ranges of `text`;
/// the patterns run on its ASCII reading).
pub fn regex_spans(r: &Redaction, text: &str) -> Vec<Span> {
    use patterns::*;
    let n = Normalized::new(text);
    let t = n.text.as_str();
    let mut spans = Vec::new();
    let mut push = |start: usize, end: usize, kind: &str| {
        let (start, end) = n.original(start, end);
        spans.push(Span {
            start,
            end,
            kind: kind.to_owned(),
        });
    };
    let each = |re: &Option<regex::Regex>| -> Vec<regex::Match<'_>> {
        re.as_ref()
            .map(|re| re.find_iter(t).collect())
            .unwrap_or_default()
    };
    if r.email {
        for m in each(&EMAIL).into_iter().chain(each(&EMAIL_SPELLED)) {
            push(m.start(), m.end(), "EMAIL");
        }
    }
    if r.card {
        for m in each(&CARD).into_iter().filter(|m| luhn(m.as_str())) {
            push(m.start(), m.end(), "CARD");
        }
    }
    if r.iban {
        for m in each(&IBAN) {
            if let Some(len) = iban_prefix(m.as_str()) {
                push(m.start(), m.start() + len, "IBAN");
            }
        }
    }
    if r.ip {
        for m in each(&IPV4) {
            push(m.start(), m.end(), "IP");
        }
        for m in each(&IPV6) {
            let s = m.as_str().trim_end_matches('.');
            if s.matches(':').count() >= 2 && s.parse::<std::net::Ipv6Addr>().is_ok() {
                push(m.start(), m.start() + s.len(), "IP");
            }
        }
    }
    if r.national_id {
        if let Some(re) = SSN.as_ref() {
            for c in re.captures_iter(t) {
                if ssn_valid(&c[1], &c[2], &c[3])
                    && let Some(m) = c.get(0)
                {
                    push(m.start(), m.end(), "NATIONAL_ID");
                }
            }
        }
        if let Some(re) = DNI.as_ref() {
            for c in re.captures_iter(t) {
                let prefix = c.get(1).map_or("", |m| m.as_str());
                if dni_valid(prefix, &c[2], &c[3])
                    && let Some(m) = c.get(0)
                {
                    push(m.start(), m.end(), "NATIONAL_ID");
                }
            }
        }
        if let Some(re) = NINO.as_ref() {
            for c in re.captures_iter(t) {
                if nino_valid(&c[1])
                    && let Some(m) = c.get(0)
                {
                    push(m.start(), m.end(), "NATIONAL_ID");
                }
            }
        }
        if let Some(re) = NIR.as_ref() {
            for c in re.captures_iter(t) {
                let number = format!("{}{}{}{}{}{}", &c[1], &c[2], &c[3], &c[4], &c[5], &c[6]);
                if nir_valid(&number, &c[7])
                    && let Some(m) = c.get(0)
                {
                    push(m.start(), m.end(), "NATIONAL_ID");
                }
            }
        }
        if let Some(re) = PERSONNUMMER.as_ref() {
            for c in re.captures_iter(t) {
                if personnummer_valid(&c[1], &c[2])
                    && let Some(m) = c.get(0)
                {
                    push(m.start(), m.end(), "NATIONAL_ID");
                }
            }
        }
        for m in each(&CODICE_FISCALE) {
            push(m.start(), m.end(), "NATIONAL_ID");
        }
        for m in each(&DIGIT_ID) {
            let digits: Vec<u32> = m.as_str().chars().filter_map(|c| c.to_digit(10)).collect();
            if digit_id_valid(&digits) {
                push(m.start(), m.end(), "NATIONAL_ID");
            }
        }
    }
    if r.phone {
        for m in each(&PHONE).into_iter().filter(|m| is_phone(m.as_str())) {
            push(m.start(), m.end(), "PHONE");
        }
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

    /// Every kind, in several languages and scripts (`tests/fixtures/
    /// redaction/corpus.jsonl`): no secret, and no run of 3 or more of its
    /// digits, is left in the redacted text; texts marked `keep` (dates,
    /// prices, versions, times) are left as they are.
    #[test]
    fn the_corpus_leaves_nothing_in_clear_and_keeps_what_is_not_pii() {
        let every = Redaction::parse(
            &["email", "phone", "card", "iban", "national_id", "ip"].map(String::from),
        )
        .unwrap();
        let corpus = include_str!("../../../../tests/fixtures/redaction/corpus.jsonl");
        let mut checked = 0;
        for line in corpus.lines().filter(|l| !l.trim().is_empty()) {
            let entry: serde_json::Value = serde_json::from_str(line).unwrap();
            let text = entry["text"].as_str().unwrap();
            let (red, restorer) = apply(text, regex_spans(&every, text));
            assert_eq!(restorer.restore(&red), text, "restoring {text}");
            if entry["keep"] == true {
                assert_eq!(red, text, "redacted what is not PII");
                continue;
            }
            let plain = Normalized::new(&red).text;
            for secret in entry["secrets"].as_array().unwrap() {
                let secret = secret.as_str().unwrap();
                assert!(!red.contains(secret), "{secret} left in: {red}");
                let digits = Normalized::new(secret).text;
                for group in digits.split(|c: char| !c.is_ascii_alphanumeric()) {
                    if group.len() >= 3 && group.chars().all(|c| c.is_ascii_digit()) {
                        assert!(!plain.contains(group), "{group} of {secret} left in: {red}");
                    }
                }
                checked += 1;
            }
        }
        assert!(checked >= 40, "{checked}");
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
