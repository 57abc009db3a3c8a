//! Randomised inputs through tokenize → window → batch → model: arbitrary
//! bytes (read as the HTTP layer reads them, lossily), arbitrary Unicode
//! (controls, combining marks, zero-width and right-to-left characters,
//! emoji, CJK), empty and blank texts, binary-looking text and very long
//! texts. Every input gets an answer or a typed error; windows never exceed
//! the model's length, cover every token, and their number grows only
//! linearly with the text; entity spans index the input. A seeded generator,
//! so a failure repeats.

use crate::common::model_dir;
use candle_core::Device;
use std::time::Duration;
use triage_core::Aggregation;
use triage_local::tokenize::EncodedText;
use triage_local::{BatchConfig, LocalError, LocalModel, ModelHandle};

/// xorshift64*: small, seeded, good enough to pick cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const RANGES: &[(u32, u32)] = &[
    (0x00, 0x1f),       // controls, NUL included
    (0x20, 0x7e),       // ASCII
    (0x7f, 0x9f),       // DEL and C1 controls
    (0xa0, 0x24f),      // Latin-1 and extensions
    (0x300, 0x36f),     // combining marks
    (0x590, 0x6ff),     // Hebrew, Arabic
    (0x200b, 0x200f),   // zero-width and direction marks
    (0x2028, 0x202e),   // separators and embeddings
    (0x4e00, 0x4fff),   // CJK
    (0xfe00, 0xfe0f),   // variation selectors
    (0xfff0, 0xffff),   // specials, noncharacters
    (0x1f300, 0x1f6ff), // emoji
    (0xe0000, 0xe007f), // tags
    (0x10fff0, 0x10ffff),
];

fn random_unicode(rng: &mut Rng, len: usize) -> String {
    (0..len)
        .filter_map(|_| {
            let (lo, hi) = RANGES[rng.below(RANGES.len())];
            char::from_u32(lo + rng.below((hi - lo + 1) as usize) as u32)
        })
        .collect()
}

fn random_bytes(rng: &mut Rng, len: usize) -> String {
    let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn cases(rng: &mut Rng) -> Vec<String> {
    let mut out = vec![
        String::new(),
        " ".into(),
        "\n\t\r ".repeat(50),
        "\u{0}".repeat(300),
        "\u{200b}".repeat(1000),
        "\u{fffd}".repeat(700),
        "a".repeat(5000), // one word far longer than any WordPiece token
        "Angela Merkel met Emmanuel Macron in Paris. ".repeat(120),
        "%PDF-1.4\n\u{0}\u{1}\u{2}\u{7f}\u{ff}binary\u{0}".repeat(40),
    ];
    for i in 0..60 {
        let len = [0, 1, 3, 17, 80, 400, 2000][i % 7];
        out.push(if i % 2 == 0 {
            random_unicode(rng, len)
        } else {
            random_bytes(rng, len)
        });
    }
    out
}

fn check_windows(text: &str, enc: &EncodedText, max_length: usize, stride: usize) {
    let chars = text.chars().count();
    assert!(!enc.windows.is_empty(), "no window for {text:?}");
    for w in &enc.windows {
        assert!(w.len() <= max_length, "a window of {} tokens", w.len());
        assert_eq!(w.ids.len(), w.offsets.len());
        assert_eq!(w.ids.len(), w.special.len());
        for &(s, e) in &w.offsets {
            assert!(s <= e && e <= chars, "offset {s}..{e} past {chars} chars");
        }
    }
    // Linear in the text: each window advances by at least room − stride tokens.
    let room = max_length.saturating_sub(2).max(1);
    let step = room.saturating_sub(stride).max(1);
    assert!(
        enc.windows.len() <= enc.input_tokens / step + 2,
        "{} windows for {} tokens",
        enc.windows.len(),
        enc.input_tokens
    );
    // No token falls between two windows: each window starts at or before
    // the point where the previous one ended (they overlap by the stride).
    let body = |w: &triage_local::tokenize::Encoded| -> Vec<(usize, usize)> {
        w.offsets
            .iter()
            .zip(&w.special)
            .filter(|(_, s)| !**s)
            .map(|(o, _)| *o)
            .collect()
    };
    for pair in enc.windows.windows(2) {
        let (a, b) = (body(&pair[0]), body(&pair[1]));
        if let (Some(last), Some(first)) = (a.last(), b.first()) {
            assert!(
                first.0 <= last.0,
                "a gap between windows: {last:?} then {first:?}"
            );
        }
    }
}

#[test]
fn the_tokenizer_windows_any_text_within_bounds() -> anyhow::Result<()> {
    let model = LocalModel::load(&model_dir("bert-token"), "fuzz", &Device::Cpu)?;
    let tok = &model.tokenizer;
    let mut rng = Rng(0x5eed_0001);
    for text in cases(&mut rng) {
        let enc = tok.encode(&text, true)?;
        check_windows(&text, &enc, tok.max_length, tok.stride);
        let first = tok.encode(&text, false)?;
        assert_eq!(first.windows.len(), 1);
        assert_eq!(first.truncated, enc.windows.len() > 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_text_through_the_batching_worker_is_answered_or_refused_with_a_kind()
-> anyhow::Result<()> {
    let limit = 3000;
    let config = BatchConfig {
        max_wait: Duration::from_millis(5),
        max_input_tokens: limit,
        ..BatchConfig::default()
    };
    let classifier = ModelHandle::spawn(
        LocalModel::load(
            &model_dir("distilbert-seq-multilabel"),
            "fuzz-cls",
            &Device::Cpu,
        )?,
        config,
    )?;
    let tagger = ModelHandle::spawn(
        LocalModel::load(&model_dir("bert-token"), "fuzz-tag", &Device::Cpu)?,
        config,
    )?;
    let mut rng = Rng(0x5eed_0002);
    let mut texts = cases(&mut rng);
    // Over the limit by tokens, and by far.
    texts.push("word ".repeat(limit + 10));
    texts.push("x".repeat(100 * limit * 5));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, text) in texts.into_iter().enumerate() {
        let (c, t) = (classifier.clone(), tagger.clone());
        tasks.spawn(async move {
            let classified = c.classify(&text, i % 2 == 0).await;
            let tagged = t.tag(&text, Aggregation::Simple).await;
            (text, classified, tagged)
        });
    }
    let (mut answered, mut refused) = (0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (text, classified, tagged) = joined?;
        let chars = text.chars().count();
        match classified {
            Ok(c) => {
                answered += 1;
                assert!(c.windows >= 1);
                for s in &c.scores {
                    assert!(
                        (0.0..=1.0).contains(&s.score),
                        "score {} for {text:?}",
                        s.score
                    );
                }
            }
            Err(LocalError::InputTooLong {
                tokens, limit: l, ..
            }) => {
                refused += 1;
                assert_eq!(l, limit);
                assert!(tokens > limit);
            }
            Err(e) => panic!(
                "classify {:?}…: {e:?}",
                text.chars().take(40).collect::<String>()
            ),
        }
        match tagged {
            Ok(t) => {
                for e in &t.entities {
                    assert!(
                        e.start < e.end && e.end <= chars,
                        "span {}..{} of {chars}",
                        e.start,
                        e.end
                    );
                    let slice: String = text.chars().skip(e.start).take(e.end - e.start).collect();
                    assert_eq!(slice, e.text);
                }
            }
            Err(LocalError::InputTooLong { .. }) => {}
            Err(e) => panic!(
                "tag {:?}…: {e:?}",
                text.chars().take(40).collect::<String>()
            ),
        }
    }
    assert!(answered >= 60, "{answered} answered");
    assert_eq!(refused, 2, "exactly the two over-limit texts are refused");
    assert!(classifier.is_alive() && tagger.is_alive());
    Ok(())
}
