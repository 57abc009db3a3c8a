//! Transcript formats: SubRip, WebVTT and plain text (JSON comes from serde).

use triage_core::{Transcript, Word};

/// Every word of the transcript in order (OpenAI's top-level `words`).
pub fn words(t: &Transcript) -> Vec<&Word> {
    t.segments
        .iter()
        .flat_map(|s| s.words.iter().flatten())
        .collect()
}

fn timestamp(seconds: f64, decimal: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{decimal}{ms:03}")
}

/// A cue's text, `Speaker 1: ` first when the speaker is known.
fn cue(s: &triage_core::TranscriptSegment) -> String {
    match &s.speaker {
        Some(who) => format!("{who}: {}", s.text),
        None => s.text.clone(),
    }
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
                cue(s)
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
            cue(s)
        ));
    }
    out
}

/// Plain text: one line, or one line per speaker turn when speakers are known.
pub fn txt(t: &Transcript) -> String {
    if t.segments.iter().all(|s| s.speaker.is_none()) {
        return format!("{}\n", t.text);
    }
    let mut out = String::new();
    let mut last: Option<&str> = None;
    for s in &t.segments {
        let who = s.speaker.as_deref().unwrap_or("Speaker ?");
        if last == Some(who) {
            out.push(' ');
        } else {
            if last.is_some() {
                out.push('\n');
            }
            out.push_str(who);
            out.push_str(": ");
        }
        out.push_str(&s.text);
        last = Some(who);
    }
    out.push('\n');
    out
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
            words: None,
            speaker: None,
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
    fn speakers_label_cues_and_turns() {
        let mut t = transcript();
        t.segments[0].speaker = Some("Speaker 1".into());
        t.segments[1].speaker = Some("Speaker 2".into());
        assert!(srt(&t).contains("00:00:01,500\nSpeaker 1: Hello there.\n"));
        assert!(vtt(&t).contains("01:02:05.500\nSpeaker 2: General Kenobi.\n"));
        assert_eq!(
            txt(&t),
            "Speaker 1: Hello there.\nSpeaker 2: General Kenobi.\n"
        );
    }

    #[test]
    fn vtt_has_a_header_and_uses_dots() {
        let v = vtt(&transcript());
        assert!(v.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n"));
        assert!(v.contains("01:02:03.250 --> 01:02:05.500\nGeneral Kenobi."));
    }
}
