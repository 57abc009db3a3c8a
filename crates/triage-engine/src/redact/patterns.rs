//! The patterns behind `redact = [...]`'s regex kinds, each with the check
//! that keeps it from redacting what only looks like one (Luhn for cards,
//! mod-97 for IBANs, the national ids' own check digits). They run on a
//! normalised copy of the text ([`Normalized`]): Unicode digits (full-width,
//! Arabic-Indic, Devanagari, ...) read as ASCII digits, full-width letters
//! and punctuation as ASCII, and the spaces and dashes people type between
//! digit groups as ` ` and `-`, one character for one, so a span found in
//! the copy is a span of the original.

use regex::Regex;
use std::sync::LazyLock;

/// `text` with every character replaced by its ASCII reading where it has
/// one, and the byte offset in `text` of every character of the copy.
pub(crate) struct Normalized {
    pub text: String,
    /// `offsets[i]`: the original byte offset of the copy's byte `i` (set at
    /// character starts, and at `text.len()`).
    offsets: Vec<usize>,
}

/// The zero of every run of ten Unicode decimal digits triage reads
/// (besides ASCII): Arabic-Indic, Extended Arabic-Indic, NKo, Devanagari,
/// Bengali, Gurmukhi, Gujarati, Oriya, Tamil, Telugu, Kannada, Malayalam,
/// Sinhala, Thai, Lao, Tibetan, Myanmar, Khmer, Mongolian, full-width, and
/// the mathematical digits.
const DIGIT_ZEROS: [u32; 26] = [
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66,
    0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x17E0, 0x1810, 0xFF10, 0x1D7CE, 0x1D7D8, 0x1D7E2,
    0x1D7EC, 0x1D7F6, 0x1090,
];

fn ascii_reading(c: char) -> char {
    let cp = c as u32;
    if c.is_ascii() {
        return c;
    }
    for zero in DIGIT_ZEROS {
        if (zero..zero + 10).contains(&cp) {
            return char::from(b'0' + (cp - zero) as u8);
        }
    }
    match cp {
        // Full-width ASCII (！ to ～).
        0xFF01..=0xFF5E => char::from_u32(cp - 0xFEE0).unwrap_or(c),
        // Spaces: no-break, thin, figure, ideographic, ...
        0x00A0 | 0x2000..=0x200A | 0x202F | 0x205F | 0x3000 => ' ',
        // Hyphens and dashes.
        0x2010..=0x2015 | 0x2212 | 0xFE63 => '-',
        // Full stops: one-dot leader, ideographic, half-width ideographic.
        0x2024 | 0x3002 | 0xFF61 => '.',
        _ => c,
    }
}

impl Normalized {
    pub fn new(text: &str) -> Self {
        let mut out = String::with_capacity(text.len());
        let mut offsets = Vec::with_capacity(text.len() + 1);
        for (i, c) in text.char_indices() {
            let r = ascii_reading(c);
            let start = out.len();
            out.push(r);
            offsets.extend(std::iter::repeat_n(i, out.len() - start));
        }
        offsets.push(text.len());
        Self { text: out, offsets }
    }

    /// The original byte range of the copy's `start..end`.
    pub fn original(&self, start: usize, end: usize) -> (usize, usize) {
        (self.offsets[start], self.offsets[end])
    }
}

fn re(pattern: &str) -> Option<Regex> {
    match Regex::new(pattern) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(pattern, error = %e, "a redaction pattern does not compile");
            None
        }
    }
}

/// An e-mail address, the domain in any script (IDN).
pub(crate) static EMAIL: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"[\p{L}\p{N}._%+-]+@[\p{L}\p{N}-]+(?:\.[\p{L}\p{N}-]+)*\.\p{L}{2,}"));

/// An address written to dodge filters: `jane at example dot com`,
/// `jane[at]example[dot]com`, `jane (at) example.com`.
pub(crate) static EMAIL_SPELLED: LazyLock<Option<Regex>> = LazyLock::new(|| {
    let at = r"(?:\s*[\[\(\{<]\s*(?:at|@)\s*[\]\)\}>]\s*|\s+at\s+)";
    let dot = r"(?:\s*[\[\(\{<]\s*(?:dot|\.)\s*[\]\)\}>]\s*|\s+dot\s+|\.)";
    re(&format!(
        r"(?i)[\p{{L}}\p{{N}}._%+-]+{at}[\p{{L}}\p{{N}}-]+(?:{dot}[\p{{L}}\p{{N}}-]+)*{dot}\p{{L}}{{2,6}}\b"
    ))
});

pub(crate) static CARD: LazyLock<Option<Regex>> = LazyLock::new(|| re(r"\b(?:\d[ -]?){12,18}\d\b"));

/// Digit groups with the separators phone numbers are written with
/// (`+49 171 1234567`, `0171/1234567`, `(030) 123 45 67`, `555-0132`).
pub(crate) static PHONE: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"(?:\+ ?)?\(?\d{1,15}\)?(?:[ ./-]{1,2}\(?\d{1,15}\)?)*"));

/// Dates and times that phone-like digit groups must not be taken for.
static DATE: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})$"));

pub(crate) static IBAN: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"(?i)\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]){11,32}"));

pub(crate) static IPV4: LazyLock<Option<Regex>> = LazyLock::new(|| {
    re(r"\b(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}\b")
});

/// Candidates for IPv6 (checked by parsing): hex groups and colons, at
/// least two of them, with an optional dotted IPv4 tail.
pub(crate) static IPV6: LazyLock<Option<Regex>> = LazyLock::new(|| {
    re(r"(?i)(?:[0-9a-f]{0,4}:){2,7}(?:[0-9a-f]{1,4}|:|(?:\d{1,3}\.){3}\d{1,3})?")
});

/// US social security numbers, written with dashes or spaces.
pub(crate) static SSN: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"\b(\d{3})[- ](\d{2})[- ](\d{4})\b"));
/// Spanish DNI (8 digits and a letter) and NIE (X, Y or Z, 7 digits, letter).
pub(crate) static DNI: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"(?i)\b(?:([XYZ])[- ]?)?(\d{7,8})[- ]?([A-Z])\b"));
/// Swedish personnummer (`YYMMDD-XXXX`, or with the century), Luhn-checked.
pub(crate) static PERSONNUMMER: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"\b(?:\d{2})?(\d{6})[-+ ]?(\d{4})\b"));
/// Italian codice fiscale: its fixed shape of letters and digits (the
/// check letter is not verified).
pub(crate) static CODICE_FISCALE: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"(?i)\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b"));
/// UK National Insurance numbers (`QQ 12 34 56 C`).
pub(crate) static NINO: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"(?i)\b([A-Z]{2}) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])\b"));
/// French NIR (social security number): 13 digits and a 2-digit key,
/// usually grouped `1 85 05 78 006 084 36`; Corsica's 2A/2B departments.
pub(crate) static NIR: LazyLock<Option<Regex>> = LazyLock::new(|| {
    re(r"(?i)\b([12]) ?(\d{2}) ?(\d{2}) ?(\d{2}|2A|2B) ?(\d{3}) ?(\d{3}) ?(\d{2})\b")
});
/// Runs of 9 to 11 digits (with optional separators) that the national ids
/// with check digits are looked for in: the Dutch BSN (9), the German
/// tax id (11), the Polish PESEL (11), the Belgian national number (11).
pub(crate) static DIGIT_ID: LazyLock<Option<Regex>> =
    LazyLock::new(|| re(r"\b\d(?:[ .-]?\d){8,10}\b"));

pub(crate) fn luhn(digits: &str) -> bool {
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

/// A Swedish personnummer: the Luhn check over its ten digits, and a
/// plausible month and day.
pub(crate) fn personnummer_valid(date: &str, serial: &str) -> bool {
    let month: u32 = date.get(2..4).and_then(|m| m.parse().ok()).unwrap_or(0);
    let day: u32 = date.get(4..6).and_then(|d| d.parse().ok()).unwrap_or(0);
    // Day + 60 is a coordination number.
    if !(1..=12).contains(&month) || !(1..=31).contains(&(day % 60)) || day == 60 {
        return false;
    }
    let digits: Vec<u32> = format!("{date}{serial}")
        .chars()
        .filter_map(|c| c.to_digit(10))
        .collect();
    let sum: u32 = digits
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let x = if i % 2 == 0 { d * 2 } else { d };
            if x > 9 { x - 9 } else { x }
        })
        .sum();
    digits.len() == 10 && sum.is_multiple_of(10)
}

/// A phone number: 7 to 15 digits (more only when separated); under 10
/// only with a separator or a leading `+`; not a date, an IPv4 address or a
/// decimal number.
pub(crate) fn is_phone(m: &str) -> bool {
    let digits = m.chars().filter(char::is_ascii_digit).count();
    let separated = m
        .chars()
        .any(|c| matches!(c, ' ' | '.' | '/' | '-' | '(' | ')'));
    // Over 15 digits is no single number, but numbers run together (a
    // phone glued to a card): redacted rather than left in clear.
    if digits < 7 || (digits > 15 && !separated) {
        return false;
    }
    if digits < 10 && !separated && !m.starts_with('+') {
        return false;
    }
    if DATE.as_ref().is_some_and(|d| d.is_match(m)) {
        return false;
    }
    let dots = m.matches('.').count();
    if dots == 3 || (dots == 1 && !m.contains([' ', '/', '-', '(', ')'])) {
        // An IPv4 address, or a decimal number such as 1234.5678.
        return false;
    }
    true
}

/// The IBAN at the start of `candidate` (separators allowed between
/// characters): the longest prefix of 15 to 34 characters whose mod-97
/// check holds; its length in `candidate`'s bytes.
pub(crate) fn iban_prefix(candidate: &str) -> Option<usize> {
    let mut compact = String::new();
    let mut ends = Vec::new();
    for (i, c) in candidate.char_indices() {
        if c == ' ' || c == '-' {
            continue;
        }
        compact.push(c.to_ascii_uppercase());
        ends.push(i + c.len_utf8());
    }
    (15..=compact.len().min(34))
        .rev()
        .find(|&n| iban_valid(&compact[..n]))
        .map(|n| ends[n - 1])
}

fn iban_valid(iban: &str) -> bool {
    if iban.len() < 15 || !iban.is_char_boundary(4) {
        return false;
    }
    let rearranged = format!("{}{}", &iban[4..], &iban[..4]);
    let mut rem: u32 = 0;
    for c in rearranged.chars() {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        for d in if v >= 10 {
            vec![v / 10, v % 10]
        } else {
            vec![v]
        } {
            rem = (rem * 10 + d) % 97;
        }
    }
    rem == 1
}

/// A US SSN as the SSA issues them: no area 000, 666 or 9xx, no group 00,
/// no serial 0000.
pub(crate) fn ssn_valid(area: &str, group: &str, serial: &str) -> bool {
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

/// A Spanish DNI or NIE: its letter is the number's remainder mod 23 in
/// `TRWAGMYFPDXBNJZSQVHLCKE` (a NIE's X, Y, Z read as 0, 1, 2).
pub(crate) fn dni_valid(prefix: &str, digits: &str, letter: &str) -> bool {
    let lead = match prefix.to_ascii_uppercase().as_str() {
        "" if digits.len() == 8 => "",
        "X" if digits.len() == 7 => "0",
        "Y" if digits.len() == 7 => "1",
        "Z" if digits.len() == 7 => "2",
        _ => return false,
    };
    let Ok(n) = format!("{lead}{digits}").parse::<u64>() else {
        return false;
    };
    let table = b"TRWAGMYFPDXBNJZSQVHLCKE";
    letter
        .to_ascii_uppercase()
        .as_bytes()
        .first()
        .is_some_and(|l| *l == table[(n % 23) as usize])
}

/// A UK NINO's prefix: neither letter D, F, I, Q, U or V, the second not O,
/// and not BG, GB, KN, NK, NT, TN or ZZ.
pub(crate) fn nino_valid(prefix: &str) -> bool {
    let p = prefix.to_ascii_uppercase();
    let b = p.as_bytes();
    b.len() == 2
        && !b.iter().any(|c| b"DFIQUV".contains(c))
        && b[1] != b'O'
        && !["BG", "GB", "KN", "NK", "NT", "TN", "ZZ"].contains(&p.as_str())
}

/// A French NIR: the key is 97 minus the 13-digit number mod 97 (Corsica's
/// 2A and 2B read as 19 and 18).
pub(crate) fn nir_valid(number: &str, key: &str) -> bool {
    let n = number
        .to_ascii_uppercase()
        .replace("2A", "19")
        .replace("2B", "18");
    let (Ok(n), Ok(k)) = (n.parse::<u64>(), key.parse::<u64>()) else {
        return false;
    };
    97 - n % 97 == k
}

/// The national ids among 9 to 11 bare digits whose check digit holds.
pub(crate) fn digit_id_valid(digits: &[u32]) -> bool {
    match digits.len() {
        9 => bsn_valid(digits),
        11 => steuer_id_valid(digits) || pesel_valid(digits) || belgian_valid(digits),
        _ => false,
    }
}

/// Dutch BSN: the "eleven test" (weights 9..2 and -1), not all zeros.
fn bsn_valid(d: &[u32]) -> bool {
    let sum: i64 = d[..8]
        .iter()
        .zip((2..=9).rev())
        .map(|(&x, w)| i64::from(x) * w)
        .sum::<i64>()
        - i64::from(d[8]);
    sum != 0 && sum % 11 == 0
}

/// German tax id (Steuer-IdNr): first digit not 0, ISO 7064 MOD 11,10
/// check digit.
fn steuer_id_valid(d: &[u32]) -> bool {
    if d[0] == 0 {
        return false;
    }
    let mut product = 10;
    for &x in &d[..10] {
        let mut sum = (x + product) % 10;
        if sum == 0 {
            sum = 10;
        }
        product = (sum * 2) % 11;
    }
    let check = (11 - product) % 10;
    check == d[10]
}

/// Polish PESEL: weights 1,3,7,9 repeated; check = (10 - sum mod 10) mod 10.
fn pesel_valid(d: &[u32]) -> bool {
    const W: [u32; 10] = [1, 3, 7, 9, 1, 3, 7, 9, 1, 3];
    let sum: u32 = d[..10].iter().zip(W).map(|(&x, w)| x * w).sum();
    (10 - sum % 10) % 10 == d[10]
}

/// Belgian national number: the last two digits are 97 minus the first
/// nine mod 97 (for people born from 2000 on, with a 2 put before them).
fn belgian_valid(d: &[u32]) -> bool {
    let first: u64 = d[..9].iter().fold(0, |n, &x| n * 10 + u64::from(x));
    let check = u64::from(d[9] * 10 + d[10]);
    97 - first % 97 == check || 97 - (2_000_000_000 + first) % 97 == check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicode_digits_and_full_width_read_as_ascii_one_char_for_one() {
        let n = Normalized::new("tel ０１７１／１２３ ٤٥٦ – x");
        assert_eq!(n.text, "tel 0171/123 456 - x");
        let (s, e) = n.original(4, 8);
        assert_eq!(&"tel ０１７１／１２３ ٤٥٦ – x"[s..e], "０１７１");
    }

    #[test]
    fn check_digits_of_each_kind() {
        assert!(iban_valid("DE89370400440532013000"));
        assert!(!iban_valid("DE89370400440532013001"));
        assert_eq!(iban_prefix("DE89 3704 0044 0532 0130 00 bitte"), Some(27));
        assert!(ssn_valid("123", "45", "6789") && !ssn_valid("666", "45", "6789"));
        assert!(dni_valid("", "12345678", "Z") && !dni_valid("", "12345678", "A"));
        assert!(dni_valid("X", "1234567", "L"));
        assert!(nino_valid("AB") && !nino_valid("QQ") && !nino_valid("GB"));
        assert!(nir_valid("1850578006084", "91") && !nir_valid("1850578006084", "36"));
        let digits = |s: &str| s.chars().filter_map(|c| c.to_digit(10)).collect::<Vec<_>>();
        assert!(digit_id_valid(&digits("111222333")));
        assert!(digit_id_valid(&digits("44051401359"))); // PESEL
        assert!(digit_id_valid(&digits("86095742719"))); // Steuer-ID
        assert!(digit_id_valid(&digits("85073003328"))); // Belgium
        assert!(!digit_id_valid(&digits("12345678901")));
        assert!(!digit_id_valid(&digits("123456789")));
    }
}
