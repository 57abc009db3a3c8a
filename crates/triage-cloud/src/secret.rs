//! API keys are held in a type that never prints its contents, so no log line,
//! error message or `Debug` dump can leak one.

/// A secret string (an API key). `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Read the key from an environment variable; `None` when unset or empty.
    pub fn from_env(var: &str) -> Option<Self> {
        std::env::var(var)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(Self)
    }

    /// The key itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_key() {
        let key = SecretString::new("sk-live-abc123");
        assert_eq!(format!("{key:?} {key}"), "[redacted] [redacted]");
        assert_eq!(key.expose(), "sk-live-abc123");
    }
}

/// `text` with anything that looks like a credential replaced by
/// `[key redacted]`: provider error bodies echo keys, whole or masked
/// (`Incorrect API key provided: sk-fak****8899`), and those messages reach
/// logs and the ledger. A credential is a run of key characters
/// (`[A-Za-z0-9_.*-]`) that starts with a known key prefix, contains a mask
/// (`**`), or is long and mixes letters and digits like a token.
pub fn scrub_secrets(text: &str) -> String {
    const PREFIXES: [&str; 9] = [
        "sk-", "sk_", "rk-", "pk-", "AIza", "xai-", "gsk_", "sess-", "key-",
    ];
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '*' | '.');
    let looks_like_key = |run: &str| {
        let run = run.trim_end_matches('.');
        let prefixed = PREFIXES.iter().any(|p| run.starts_with(p)) && run.len() >= 8;
        let masked = run.contains("**") && run.len() >= 6;
        let tokenish = run.len() >= 32
            && run.chars().any(|c| c.is_ascii_digit())
            && run.chars().any(|c| c.is_ascii_alphabetic())
            && !run.contains('.');
        prefixed || masked || tokenish
    };
    let mut out = String::with_capacity(text.len());
    let mut run_start: Option<usize> = None;
    let flush = |out: &mut String, run: &str| {
        if looks_like_key(run) {
            out.push_str("[key redacted]");
            // Keep a sentence's final full stop.
            if run.ends_with('.') {
                out.push('.');
            }
        } else {
            out.push_str(run);
        }
    };
    for (i, c) in text.char_indices() {
        if is_key_char(c) {
            run_start.get_or_insert(i);
            continue;
        }
        if let Some(s) = run_start.take() {
            flush(&mut out, &text[s..i]);
        }
        out.push(c);
    }
    if let Some(s) = run_start {
        flush(&mut out, &text[s..]);
    }
    out
}

#[cfg(test)]
mod scrub_tests {
    use super::scrub_secrets;

    #[test]
    fn keys_whole_or_masked_are_scrubbed_and_prose_is_kept() {
        assert_eq!(
            scrub_secrets(
                "Incorrect API key provided: sk-fak****8899. You can find your API key at https://platform.openai.com/account/api-keys."
            ),
            "Incorrect API key provided: [key redacted]. You can find your API key at https://platform.openai.com/account/api-keys."
        );
        assert_eq!(
            scrub_secrets("key sk-proj-abcdefghijklmnop1234 and AIzaSyA1234567890abcdefg rejected"),
            "key [key redacted] and [key redacted] rejected"
        );
        assert_eq!(
            scrub_secrets("token 0123456789abcdef0123456789abcdef01 is bad"),
            "token [key redacted] is bad"
        );
        let prose = "The model `gpt-4o-mini` does not exist (HTTP 404); retry in 2.5 s.";
        assert_eq!(scrub_secrets(prose), prose);
        assert_eq!(scrub_secrets("héllo wörld"), "héllo wörld");
    }
}
