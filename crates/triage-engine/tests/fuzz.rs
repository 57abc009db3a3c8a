//! Randomised checks of the parsers that take outside input: mutated config
//! files never panic (they load or give a keyed error), and redaction always
//! restores exactly what it replaced. Seeds are fixed, so a failure repeats.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use triage_engine::Config;
use triage_engine::config::ConfigError;
use triage_engine::redact::{Redaction, apply, regex_spans};

fn examples_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn examples() -> Vec<String> {
    let dir = examples_dir();
    [
        "moderation.toml",
        "support-router.toml",
        "meeting-notes.toml",
    ]
    .iter()
    .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
    .collect()
}

fn mutate(text: &str, rng: &mut StdRng) -> String {
    let mut bytes: Vec<u8> = text.as_bytes().to_vec();
    const PIECES: &[&str] = &[
        "=",
        "[",
        "]",
        "\"",
        "\n",
        "[[tasks.x.tiers]]\n",
        "hi = 2.0\n",
        "lo = -1\n",
        "provider = \"nope\"\n",
        "kind = \"zzz\"\n",
        "0.5",
        "{",
        "}",
        "#",
        "\u{0}",
        "é",
        "strategy = \"router\"\n",
    ];
    for _ in 0..rng.random_range(1..6) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..3) {
            0 => {
                let end = (at + rng.random_range(1..40)).min(bytes.len());
                bytes.drain(at..end);
            }
            1 => {
                let piece = PIECES[rng.random_range(0..PIECES.len())];
                bytes.splice(at..at, piece.bytes());
            }
            _ => {
                // Duplicate a line somewhere else.
                let start = bytes[..at]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |p| p + 1);
                let end = bytes[at..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(bytes.len(), |p| at + p + 1);
                let line = bytes[start..end].to_vec();
                let to = rng.random_range(0..bytes.len());
                bytes.splice(to..to, line);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn mutated_configs_load_or_fail_with_a_message_never_panic() {
    let mut rng = StdRng::seed_from_u64(7);
    let (mut ok, mut parse, mut invalid) = (0, 0, 0);
    for base in examples() {
        for _ in 0..400 {
            let text = mutate(&base, &mut rng);
            match Config::from_toml(&text, "fuzz.toml", &examples_dir()) {
                Ok(_) => ok += 1,
                Err(ConfigError::Parse { .. }) => parse += 1,
                Err(ConfigError::Invalid { problems, .. }) => {
                    invalid += 1;
                    assert!(!problems.is_empty());
                    for p in problems {
                        assert!(
                            !p.key.is_empty() && !p.message.is_empty() && !p.fix.is_empty(),
                            "{p:?}"
                        );
                    }
                }
                Err(ConfigError::Read { .. }) => unreachable!("no file is read"),
            }
        }
    }
    // The mutations reach all three outcomes (otherwise they test little).
    assert!(
        ok > 0 && parse > 0 && invalid > 0,
        "ok {ok}, parse {parse}, invalid {invalid}"
    );
}

#[test]
fn redaction_round_trips_on_random_text() {
    let mut rng = StdRng::seed_from_u64(11);
    let r = Redaction::parse(&["email".into(), "phone".into(), "card".into()]).unwrap();
    const PIECES: &[&str] = &[
        "hello ",
        "order #12345 ",
        "jane.doe@example.com",
        " call +44 20 7946 0958",
        "4111 1111 1111 1111",
        "4111-1111-1111-1112",
        "[EMAIL_1]",
        "ünïcödé ",
        "\n",
        "555-0100 ",
        "a@b.co",
        "  ",
        "💳 ",
        "x@y",
        "(415) 555-2671",
    ];
    let mut replaced = 0;
    for _ in 0..2000 {
        let text: String = (0..rng.random_range(0..12))
            .map(|_| PIECES[rng.random_range(0..PIECES.len())])
            .collect();
        let (red, restorer) = apply(&text, regex_spans(&r, &text));
        assert!(
            !red.contains("jane.doe@example.com") && !red.contains("4111 1111 1111 1111"),
            "{red}"
        );
        assert_eq!(restorer.restore(&red), text, "redacted: {red}");
        replaced += restorer.pairs.len();
    }
    assert!(replaced > 1000);
}
