//! End to end: `examples/meeting-notes.toml` with real Whisper (tiny.en from
//! ../shared), the real NER specialist, llama-server (SmolLM2) for the
//! summary and OpenAI's wire format served locally for the escalated one.

use crate::support::llama::LlamaServer;
use crate::support::openai::{FakeOpenAi, Reply};
use crate::support::*;
use triage_engine::config::{StageKind, Strategy};
use triage_engine::{Config, Engine, Input, Overrides};

fn clip() -> Input {
    // "and mister john dashwood had then leisure to consider how much there
    // might be prudently in his power to do for them" (LibriVox, 7.1 s).
    let path = shared().join("data/speech/librivox_ss01_0870.wav");
    Input::Audio {
        bytes: std::fs::read(&path).unwrap(),
        file_name: Some("librivox_ss01_0870.wav".into()),
    }
}

fn config(dir: &tempfile::TempDir, min_confidence: f64) -> Config {
    let mut config = example("meeting-notes.toml", dir);
    config.local.get_mut("whisper").unwrap().model = shared()
        .join("models/whisper-tiny.en/ggml-model-f16.bin")
        .display()
        .to_string();
    let Strategy::Pipeline(p) = &mut config.tasks.get_mut("meeting_notes").unwrap().strategy else {
        panic!()
    };
    for s in &mut p.stages {
        if let StageKind::Summarize {
            min_transcript_confidence,
            ..
        } = &mut s.kind
        {
            *min_transcript_confidence = Some(min_confidence);
        }
    }
    config
}

#[tokio::test]
async fn audio_to_transcript_summary_people_and_action_items() {
    let dir = tempfile::tempdir().unwrap();
    // None only when TRIAGE_SKIP_LLAMA=1.
    let Some(llama) = tokio::task::spawn_blocking(LlamaServer::start)
        .await
        .unwrap()
    else {
        return;
    };
    let fake = FakeOpenAi::start(vec![]).await;
    let mut config = config(&dir, 0.0);
    point(&mut config, "openai", &fake.base_url);
    config
        .providers
        .get_mut("local-llm")
        .unwrap()
        .config
        .base_url = llama.base_url();
    let engine = Engine::new(config).await.unwrap();
    let e = engine
        .execute("meeting_notes", clip(), &Overrides::default())
        .await
        .unwrap();
    let transcript = e.answer.to_json()["transcript"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(
        transcript.contains("dashwood") && transcript.contains("leisure"),
        "{transcript}"
    );
    assert!(
        !e.answer.to_json()["summary"]
            .as_str()
            .unwrap()
            .trim()
            .is_empty()
    );
    let answer = e.answer.to_json();
    let people = answer["people"].as_array().unwrap();
    assert!(
        people
            .iter()
            .any(|p| p.as_str().unwrap().contains("Dashwood")),
        "{people:?}"
    );
    assert!(
        e.answer.to_json()["organisations"].is_array()
            && e.answer.to_json()["action_items"].is_array()
    );
    assert_eq!(
        decisions(&e.trace),
        vec![
            ("transcribe".into(), "ran".into()),
            ("summary".into(), "accepted".into()),
            ("entities".into(), "ran".into()),
            ("action_items".into(), "ran".into())
        ]
    );
    assert!(
        e.trace
            .answered_by()
            .unwrap()
            .model
            .starts_with("local-llm/")
    );
    assert!(fake.seen().chats.is_empty());
    assert_costs_add_up(&e.trace);
    // The all-LLM path would have paid for hosted transcription at least.
    assert!(
        e.trace.all_llm_cost_usd >= 0.006 * 7.0 / 60.0,
        "{}",
        e.trace.all_llm_cost_usd
    );
}

#[tokio::test]
async fn low_transcript_confidence_escalates_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![Reply::Chat {
        content: "Mr. John Dashwood considers what he can do for them.".into(),
        prompt_tokens: 60,
        completion_tokens: 12,
    }])
    .await;
    // No transcript reaches confidence 1.01: the stronger model answers.
    let mut config = config(&dir, 1.01);
    point(&mut config, "openai", &fake.base_url);
    let engine = Engine::new(config).await.unwrap();
    let e = engine
        .execute("meeting_notes", clip(), &Overrides::default())
        .await
        .unwrap();
    let summary_tier = e.trace.tiers.iter().find(|t| t.tier == "summary").unwrap();
    assert!(
        summary_tier.model.starts_with("openai/"),
        "{summary_tier:?}"
    );
    assert!(
        summary_tier.reason.contains("transcript confidence"),
        "{}",
        summary_tier.reason
    );
    assert_eq!(
        e.answer.to_json()["summary"],
        "Mr. John Dashwood considers what he can do for them."
    );
    let expected = 60.0 * 2.5 / 1e6 + 12.0 * 10.0 / 1e6;
    assert!((summary_tier.cost_usd - expected).abs() < 1e-12);
    assert_costs_add_up(&e.trace);
}

#[tokio::test]
async fn broken_audio_is_a_client_error() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(config(&dir, 0.6)).await.unwrap();
    let bad = Input::Audio {
        bytes: b"RIFF\x00\x00not really audio".to_vec(),
        file_name: Some("x.wav".into()),
    };
    let err = engine
        .execute("meeting_notes", bad, &Overrides::default())
        .await
        .unwrap_err();
    assert!(err.is_client_error(), "{err}");
    let text = engine
        .execute(
            "meeting_notes",
            Input::Text("hello".into()),
            &Overrides::default(),
        )
        .await
        .unwrap_err();
    assert!(text.is_client_error(), "{text}");
}

/// A mono WAV of `clips` (16 kHz mono 16-bit, from ../shared) one after the
/// other with a second of silence between them.
fn mono_wav(clips: &[&str]) -> Vec<u8> {
    let mut pcm = Vec::new();
    for clip in clips {
        let bytes = std::fs::read(shared().join("data/speech").join(clip)).unwrap();
        // The shared clips are plain 44-byte-header PCM WAVs.
        assert_eq!(&bytes[..4], b"RIFF");
        pcm.extend_from_slice(&bytes[44..]);
        pcm.extend(std::iter::repeat_n(0u8, 32_000));
    }
    let mut wav = Vec::with_capacity(44 + pcm.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + pcm.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&16_000u32.to_le_bytes());
    wav.extend_from_slice(&32_000u32.to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(pcm.len() as u32).to_le_bytes());
    wav.extend_from_slice(&pcm);
    wav
}

#[tokio::test]
async fn a_mono_meeting_of_two_voices_is_told_apart_by_speaker() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeOpenAi::start(vec![Reply::Chat {
        content: "Two readers take turns.".into(),
        prompt_tokens: 80,
        completion_tokens: 6,
    }])
    .await;
    // The summary goes to the hosted model (no llama-server needed).
    let mut config = config(&dir, 1.01);
    point(&mut config, "openai", &fake.base_url);
    assert_eq!(
        config.local["whisper"].speaker_model.as_deref(),
        Some("default"),
        "the example labels mono speakers"
    );
    let engine = Engine::new(config).await.unwrap();
    let input = Input::Audio {
        bytes: mono_wav(&[
            "librivox_ss01_0870.wav",
            "ljspeech_LJ001-0001.wav",
            "librivox_ss01_0890.wav",
        ]),
        file_name: Some("meeting.wav".into()),
    };
    let e = engine
        .execute("meeting_notes", input, &Overrides::default())
        .await
        .unwrap();
    let answer = e.answer.to_json();
    let transcript = answer["transcript"].as_str().unwrap();
    let lines: Vec<&str> = transcript.lines().collect();
    assert_eq!(lines.len(), 3, "{transcript}");
    assert!(
        lines[0].starts_with("Speaker 1: ") && lines[0].contains("Dashwood"),
        "{transcript}"
    );
    assert!(
        lines[1].starts_with("Speaker 2: ") && lines[1].contains("Printing"),
        "{transcript}"
    );
    assert!(lines[2].starts_with("Speaker 1: "), "{transcript}");
    // The hosted summary read who said what.
    let prompt = serde_json::to_string(&fake.seen().chats).unwrap();
    assert!(prompt.contains("Speaker 2: "), "{prompt}");
}
