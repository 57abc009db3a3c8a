//! Transcript formats: SubRip, WebVTT and plain text (JSON comes from serde).

use triage_core::Transcript;

fn timestamp(seconds: f64, decimal: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{decimal}{ms:03}")
}

/// SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`.
pub fn srt(t: &Transcript) -> String {
    t.segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "{}\n{} --> {}\n{}\n\n",
                i + 1,
                timestamp(s.start, ','),
                timestamp(s.end, ','),
                s.text
            )
        })
        .collect()
}

/// WebVTT: a header, then cues with `.` before the milliseconds.
pub fn vtt(t: &Transcript) -> String {
    let mut out = String::from("WEBVTT\n\n");
    for s in &t.segments {
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            timestamp(s.start, '.'),
            timestamp(s.end, '.'),
            s.text
        ));
    }
    out
}

/// Plain text, one line.
pub fn txt(t: &Transcript) -> String {
    format!("{}\n", t.text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_core::TranscriptSegment;

    fn transcript() -> Transcript {
        let seg = |start, end, text: &str| TranscriptSegment {
            start,
            end,
            text: text.into(),
            avg_logprob: -0.2,
            no_speech_prob: 0.01,
            tokens: None,
        };
        Transcript {
            text: "Hello there. General Kenobi.".into(),
            language: "en".into(),
            duration_s: 3725.5,
            confidence: 0.9,
            no_speech: false,
            segments: vec![
                seg(0.0, 1.5, "Hello there."),
                seg(3723.25, 3725.5, "General Kenobi."),
            ],
        }
    }

    #[test]
    fn srt_numbers_cues_and_uses_commas() {
        assert_eq!(
            srt(&transcript()),
            "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:02:03,250 --> 01:02:05,500\nGeneral Kenobi.\n\n"
        );
    }

    #[test]
    fn vtt_has_a_header_and_uses_dots() {
        let v = vtt(&transcript());
        assert!(v.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n"));
        assert!(v.contains("01:02:03.250 --> 01:02:05.500\nGeneral Kenobi."));
    }
}
