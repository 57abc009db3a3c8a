//! Speech-to-text with the real Whisper tiny.en weights: word error rate on
//! the development clips, audio formats and rates, broken input, concurrency.

use std::path::Path;
use std::sync::Arc;
use triage_speech::{self as speech, AudioError, TranscribeOptions, WhisperEngine};

const NUMBERS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// Lower case, no punctuation, hyphens split words, small numbers spelled out
/// (the references are written that way).
fn normalise(text: &str) -> Vec<String> {
    let cleaned: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '\'' {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned
        .split_whitespace()
        .map(|w| w.trim_matches('\'').to_owned())
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse::<usize>()
                .ok()
                .and_then(|n| NUMBERS.get(n))
                .map(|s| (*s).to_owned())
                .unwrap_or(w)
        })
        .collect()
}

/// Word-level edit distance.
fn edits(reference: &[String], hypothesis: &[String]) -> usize {
    let mut prev: Vec<usize> = (0..=hypothesis.len()).collect();
    for (i, r) in reference.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, h) in hypothesis.iter().enumerate() {
            let sub = prev[j] + usize::from(r != h);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[hypothesis.len()]
}

fn engine() -> Option<Arc<WhisperEngine>> {
    let model = crate::common::whisper_model()?;
    match WhisperEngine::load(&model, 2, triage_local::DeviceSpec::Cpu) {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => panic!("the Whisper model must load: {e}"),
    }
}

fn transcribe_file(engine: &WhisperEngine, path: &Path) -> anyhow::Result<triage_core::Transcript> {
    let ext = path.extension().and_then(|e| e.to_str());
    let pcm = speech::decode(std::fs::read(path)?, ext, Some(600.0))?;
    Ok(engine.transcribe(&pcm.samples, &TranscribeOptions::default(), None)?)
}

/// Word errors, reference words and clips of `engine` over the development
/// clips (those named in `only`, when given).
fn development_errors(
    engine: &WhisperEngine,
    shared: &Path,
    only: Option<&[&str]>,
) -> anyhow::Result<(usize, usize, usize)> {
    let dir = shared.join("data/speech");
    let manifest = std::fs::read_to_string(dir.join("manifest.jsonl"))?;
    let (mut errors, mut words, mut clips) = (0usize, 0usize, 0usize);
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let name = v["audio"].as_str().unwrap_or_default();
        if only.is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let audio = dir.join(name);
        let t = transcribe_file(engine, &audio)?;
        let reference = normalise(v["text"].as_str().unwrap_or_default());
        let hypothesis = normalise(&t.text);
        let e = edits(&reference, &hypothesis);
        eprintln!(
            "{:>3}/{:<3} {}: {}",
            e,
            reference.len(),
            audio.display(),
            t.text
        );
        assert!(!t.no_speech && t.confidence > 0.0 && t.confidence <= 1.0);
        assert!(
            t.segments
                .iter()
                .all(|s| s.start <= s.end && s.end <= t.duration_s + 0.01)
        );
        errors += e;
        words += reference.len();
        clips += 1;
    }
    Ok((errors, words, clips))
}

#[test]
fn word_error_rate_on_the_development_clips_is_at_most_ten_percent() -> anyhow::Result<()> {
    let (Some(engine), Some(shared)) = (engine(), crate::common::shared()) else {
        return Ok(());
    };
    let (errors, words, clips) = development_errors(&engine, &shared, None)?;
    assert_eq!(clips, 13);
    let wer = errors as f64 / words.max(1) as f64;
    eprintln!("WER {:.2}% ({errors}/{words} words, 13 clips)", wer * 100.0);
    assert!(wer <= 0.10, "WER {wer}");
    Ok(())
}

/// `triage models quantize`'s q8_0 and q5_1 copies of tiny.en load in
/// whisper.cpp and transcribe two development clips (49 words) with at
/// most [`QUANT_EXTRA_ERRORS`] more word errors than the f16 model. Two
/// clips, not all 13: three models over every clip took minutes in a debug
/// build; the full comparison is in docs/benchmarks.md (`scripts/bench/whisper.sh`).
#[test]
fn quantised_models_keep_the_word_error_rate_of_the_f16_model() -> anyhow::Result<()> {
    use triage_tools::whisper_quantize::{QuantType, quantize_ggml};
    let (Some(model), Some(shared)) = (crate::common::whisper_model(), crate::common::shared())
    else {
        return Ok(());
    };
    let clips: &[&str] = &["librivox_ss01_0870.wav", "ljspeech_LJ001-0001.wav"];
    let f16 = WhisperEngine::load(&model, 2, triage_local::DeviceSpec::Cpu)?;
    let (base, words, n) = development_errors(&f16, &shared, Some(clips))?;
    assert_eq!(n, 2);
    drop(f16);
    let dir = tempfile::tempdir()?;
    for ty in [QuantType::Q8_0, QuantType::Q5_1] {
        let out = dir.path().join(format!("ggml-model-{ty}.bin"));
        let report = quantize_ggml(&model, &out, ty)?;
        let engine = WhisperEngine::load(&out, 2, triage_local::DeviceSpec::Cpu)?;
        let (errors, _, _) = development_errors(&engine, &shared, Some(clips))?;
        eprintln!(
            "{ty}: {errors} word errors vs f16 {base} in {words} words, {} MB",
            report.bytes_out / 1_000_000
        );
        assert!(
            errors <= base + QUANT_EXTRA_ERRORS,
            "{ty}: {errors} vs f16 {base}"
        );
    }
    Ok(())
}

/// Word errors a quantised model may add on the two clips (one word in 49:
/// two WER points on so few words).
const QUANT_EXTRA_ERRORS: usize = 1;

fn write_wav(path: &Path, samples: &[f32], rate: u32, channels: u16) -> anyhow::Result<()> {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)?;
    for s in samples {
        w.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16)?;
    }
    w.finalize()?;
    Ok(())
}

#[test]
fn stereo_48khz_gives_the_same_words_as_the_16khz_original() -> anyhow::Result<()> {
    let (Some(engine), Some(shared)) = (engine(), crate::common::shared()) else {
        return Ok(());
    };
    let clip = shared.join("data/speech/librivox_ss01_0880.wav");
    let pcm = speech::decode(std::fs::read(&clip)?, Some("wav"), None)?;
    // Linear interpolation to 48 kHz, the same signal on both channels.
    let up: Vec<f32> = (0..pcm.samples.len() * 3)
        .flat_map(|i| {
            let (k, f) = (i / 3, (i % 3) as f32 / 3.0);
            let a = pcm.samples[k];
            let b = *pcm.samples.get(k + 1).unwrap_or(&a);
            let v = a + (b - a) * f;
            [v, v]
        })
        .collect();
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("stereo48k.wav");
    write_wav(&path, &up, 48_000, 2)?;
    let decoded = speech::decode(std::fs::read(&path)?, Some("wav"), None)?;
    assert_eq!((decoded.source_rate, decoded.source_channels), (48_000, 2));
    assert!((decoded.duration_s() - pcm.duration_s()).abs() < 0.05);
    let original = transcribe_file(&engine, &clip)?;
    let converted = transcribe_file(&engine, &path)?;
    let (a, b) = (normalise(&original.text), normalise(&converted.text));
    assert!(edits(&a, &b) <= 1, "{a:?} vs {b:?}");
    Ok(())
}

#[test]
fn broken_and_degenerate_audio_never_panics() -> anyhow::Result<()> {
    let Some(engine) = engine() else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;

    // Zero-length file.
    assert!(matches!(
        speech::decode(Vec::new(), Some("wav"), None),
        Err(AudioError::Empty)
    ));

    // Truncated WAV header.
    let good = tmp.path().join("good.wav");
    write_wav(&good, &vec![0.1; 16_000], 16_000, 1)?;
    let bytes = std::fs::read(&good)?;
    let err = speech::decode(bytes[..20].to_vec(), Some("wav"), None).err();
    assert!(err.is_some(), "a 20-byte WAV must be refused");

    // Random bytes named .mp3.
    let noise: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let err = speech::decode(noise, Some("mp3"), None).err();
    assert!(err.is_some(), "random bytes are not audio");
    eprintln!(
        "random .mp3: {}",
        err.map(|e| e.to_string()).unwrap_or_default()
    );

    // 0.1 s clip: an answer, maybe empty, never an error.
    let t = engine.transcribe(&vec![0.05; 1_600], &TranscribeOptions::default(), None)?;
    assert!(t.duration_s < 0.2);

    // Five minutes of silence: no speech, no hallucinated text.
    let silence = tmp.path().join("silence.wav");
    write_wav(&silence, &vec![0.0; 16_000 * 300], 16_000, 1)?;
    let t = transcribe_file(&engine, &silence)?;
    assert!(
        t.no_speech && t.text.is_empty() && t.confidence == 0.0,
        "{t:?}"
    );
    assert!((t.duration_s - 300.0).abs() < 0.01);

    // Over the duration limit: a typed error before any decoding work.
    let err = speech::decode(std::fs::read(&silence)?, Some("wav"), Some(60.0)).err();
    assert!(matches!(err, Some(AudioError::TooLong { .. })), "{err:?}");
    Ok(())
}

#[test]
fn a_short_clip_is_not_stuck_behind_a_long_one() -> anyhow::Result<()> {
    let (Some(engine), Some(shared)) = (engine(), crate::common::shared()) else {
        return Ok(());
    };
    let dir = shared.join("data/speech");
    // One long file (all clips end to end) and one short clip, on two threads
    // sharing the same loaded model.
    let mut long = Vec::new();
    for name in [
        "librivox_ss01_0870.wav",
        "librivox_ss01_0890.wav",
        "librivox_ss01_0920.wav",
        "librivox_ss01_0930.wav",
    ] {
        long.extend(speech::decode(std::fs::read(dir.join(name))?, Some("wav"), None)?.samples);
    }
    let short =
        speech::decode(std::fs::read(dir.join("goforward.wav"))?, Some("wav"), None)?.samples;
    let e2 = engine.clone();
    let long_job = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let r = e2.transcribe(&long, &TranscribeOptions::default(), None);
        (r, t0.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t0 = std::time::Instant::now();
    let short_t = engine.transcribe(&short, &TranscribeOptions::default(), None)?;
    let short_elapsed = t0.elapsed();
    let (long_t, long_elapsed) = long_job
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?;
    let long_t = long_t?;
    assert!(
        normalise(&short_t.text).contains(&"forward".to_owned()),
        "{}",
        short_t.text
    );
    assert!(long_t.text.split_whitespace().count() > 30);
    // The short clip finished while the long one was still running.
    assert!(
        short_elapsed < long_elapsed,
        "short {short_elapsed:?} vs long {long_elapsed:?}"
    );
    Ok(())
}

#[test]
fn every_supported_container_and_codec_decodes_and_transcribes() -> anyhow::Result<()> {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio");
    let engine = engine();
    for (file, rate, channels) in [
        ("goforward-44k-stereo.flac", 44_100, 2),
        ("goforward-22k.mp3", 22_050, 1),
        ("goforward-48k-stereo.ogg", 48_000, 2),
        ("goforward-44k.m4a", 44_100, 1),
        ("goforward-8k.aac", 8_000, 1),
    ] {
        let path = dir.join(file);
        let ext = path.extension().and_then(|e| e.to_str());
        let pcm = speech::decode(std::fs::read(&path)?, ext, None)?;
        assert_eq!(
            (pcm.source_rate, pcm.source_channels),
            (rate, channels),
            "{file}"
        );
        // 2.79 s of speech; lossy codecs add priming and padding frames (raw ADTS at 8 kHz: 0.15 s).
        assert!(
            (pcm.duration_s() - 2.79).abs() < 0.2,
            "{file}: {} s",
            pcm.duration_s()
        );
        if let Some(engine) = &engine {
            let t = engine.transcribe(&pcm.samples, &TranscribeOptions::default(), None)?;
            let words = normalise(&t.text);
            assert!(words.contains(&"forward".to_owned()), "{file}: {}", t.text);
        }
    }
    Ok(())
}

/// Mutation fuzzing of the decoder: real files of every format with bytes
/// flipped, cut or repeated must give samples or a typed error, never a panic.
#[test]
fn corrupted_files_of_every_format_never_panic() -> anyhow::Result<()> {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()).map(str::to_owned) else {
            continue;
        };
        if ext == "md" {
            continue;
        }
        let original = std::fs::read(&path)?;
        for round in 0..40 {
            let mut bytes = original.clone();
            match round % 4 {
                0 => {
                    for _ in 0..(1 + next() % 64) {
                        let i = (next() as usize) % bytes.len();
                        bytes[i] ^= (next() & 0xff) as u8 | 1;
                    }
                }
                1 => bytes.truncate((next() as usize) % bytes.len()),
                2 => {
                    let i = (next() as usize) % bytes.len();
                    let chunk = bytes[i..].iter().take(512).copied().collect::<Vec<u8>>();
                    bytes.splice(i..i, chunk);
                }
                _ => {
                    // Corrupt the header region specifically.
                    for b in bytes.iter_mut().take(64) {
                        *b = (next() & 0xff) as u8;
                    }
                }
            }
            let result = std::panic::catch_unwind(|| speech::decode(bytes, Some(&ext), Some(60.0)));
            let outcome = match result {
                Err(_) => panic!("{}: round {round}: the decoder panicked", path.display()),
                Ok(Ok(_)) => "decoded".to_owned(),
                Ok(Err(e)) => format!("{e:?}")
                    .split([' ', '{', '('])
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            };
            *outcomes.entry(outcome).or_default() += 1;
        }
    }
    eprintln!("{outcomes:?}");
    assert!(
        outcomes.len() > 1,
        "mutations should produce both decodes and errors: {outcomes:?}"
    );
    Ok(())
}

/// The Silero VAD model (`TRIAGE_VAD_MODEL`, which scripts/test sets from
/// scripts/fetch-silero-vad).
fn vad_model() -> Option<std::path::PathBuf> {
    crate::common::model_from_env(
        "TRIAGE_VAD_MODEL",
        "VAD model",
        "run scripts/fetch-silero-vad",
    )
}

fn engine_with_vad() -> Option<Arc<WhisperEngine>> {
    let (model, vad) = (crate::common::whisper_model()?, vad_model()?);
    match WhisperEngine::load(&model, 2, triage_local::DeviceSpec::Cpu)
        .and_then(|e| e.with_vad(&vad))
    {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => panic!("Whisper with VAD must load: {e}"),
    }
}

/// Low white noise (about -40 dBFS), well above digital silence.
fn low_noise(seconds: usize) -> Vec<f32> {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    (0..16_000 * seconds)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        })
        .collect()
}

#[test]
fn thirty_seconds_of_low_noise_is_no_text_with_and_without_vad() -> anyhow::Result<()> {
    let Some(plain) = engine() else {
        return Ok(());
    };
    let noise = low_noise(30);
    assert!(noise.iter().any(|s| s.abs() > 0.005), "not digital silence");
    // Without VAD whisper.cpp answers `[BLANK_AUDIO]`: a marker, not words.
    let t = plain.transcribe(&noise, &TranscribeOptions::default(), None)?;
    eprintln!("no VAD: {t:?}");
    assert_eq!(t.text, "", "{t:?}");
    assert!(t.segments.iter().all(|s| !s.text.contains('[')), "{t:?}");
    if let Some(vad) = engine_with_vad() {
        let t = vad.transcribe(&noise, &TranscribeOptions::default(), None)?;
        assert!(t.text.is_empty() && t.no_speech, "{t:?}");
    }
    Ok(())
}

#[test]
fn vad_skips_silence_and_keeps_times_on_the_audio_clock() -> anyhow::Result<()> {
    let (Some(engine), Some(shared)) = (engine_with_vad(), crate::common::shared()) else {
        return Ok(());
    };
    let dir = shared.join("data/speech");
    let a = speech::decode(std::fs::read(dir.join("goforward.wav"))?, Some("wav"), None)?.samples;
    let b = speech::decode(
        std::fs::read(dir.join("librivox_ss01_0870.wav"))?,
        Some("wav"),
        None,
    )?
    .samples;
    // a, 40 s of low noise, b: the second clip starts at len(a) + 40 s.
    let gap = low_noise(40);
    let b_start = (a.len() + gap.len()) as f64 / 16_000.0;
    let audio: Vec<f32> = [a.as_slice(), &gap, &b].concat();
    let opts = TranscribeOptions {
        word_timestamps: true,
        ..TranscribeOptions::default()
    };
    let t = engine.transcribe(&audio, &opts, None)?;
    eprintln!("{t:#?}");
    let words = normalise(&t.text);
    assert!(words.contains(&"forward".to_owned()), "{}", t.text);
    assert!(words.contains(&"dashwood".to_owned()), "{}", t.text);
    // Nothing is said in the gap.
    for s in &t.segments {
        assert!(
            s.end <= a.len() as f64 / 16_000.0 + 1.0 || s.start >= b_start - 1.0,
            "a segment in the gap: {s:?}"
        );
    }
    let dashwood = t
        .segments
        .iter()
        .flat_map(|s| s.words.iter().flatten())
        .find(|w| w.word.to_lowercase().contains("dashwood"))
        .ok_or_else(|| anyhow::anyhow!("no word `Dashwood`"))?;
    assert!(dashwood.start >= b_start - 0.5, "{dashwood:?} vs {b_start}");
    Ok(())
}

#[test]
fn words_are_ordered_inside_their_segments_and_make_up_the_text() -> anyhow::Result<()> {
    let (Some(engine), Some(shared)) = (engine(), crate::common::shared()) else {
        return Ok(());
    };
    let path = shared.join("data/speech/librivox_ss01_0890.wav");
    let pcm = speech::decode(std::fs::read(&path)?, Some("wav"), None)?;
    let opts = TranscribeOptions {
        word_timestamps: true,
        ..TranscribeOptions::default()
    };
    let t = engine.transcribe(&pcm.samples, &opts, None)?;
    let mut last_end = 0.0;
    let mut all = Vec::new();
    for s in &t.segments {
        let words = s
            .words
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no words"))?;
        assert!(!words.is_empty());
        for w in words {
            assert!(
                s.start <= w.start && w.start <= w.end && w.end <= s.end,
                "{w:?} in {s:?}"
            );
            assert!(w.start >= last_end - 1e-9, "{w:?} before {last_end}");
            assert!((0.0..=1.0).contains(&w.probability), "{w:?}");
            assert!(!w.word.contains(' ') && !w.word.is_empty(), "{w:?}");
            last_end = w.end;
        }
        let joined = words
            .iter()
            .map(|w| w.word.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(joined, s.text);
        all.extend(words.iter().map(|w| w.word.clone()));
    }
    assert_eq!(all.join(" "), t.text);
    assert!(all.len() > 10, "{}", t.text);
    // The last word ends near the end of the speech, not at 0.
    assert!(last_end > pcm.duration_s() * 0.5, "{last_end}");
    Ok(())
}

#[test]
fn one_speaker_per_channel_gets_speaker_labels() -> anyhow::Result<()> {
    let (Some(engine), Some(shared)) = (engine(), crate::common::shared()) else {
        return Ok(());
    };
    let dir = shared.join("data/speech");
    let a = speech::decode(std::fs::read(dir.join("goforward.wav"))?, Some("wav"), None)?.samples;
    let b = speech::decode(std::fs::read(dir.join("cards_001.wav"))?, Some("wav"), None)?.samples;
    // Left speaks first, then right answers after a pause. (With each
    // microphone also hearing the other at 10 %, whisper merges the faint
    // copy and the own speech into one segment and the per-segment loudness
    // check keeps it: not handled yet.)
    let pause = 16_000;
    let len = a.len() + pause + b.len();
    let mut left = vec![0f32; len];
    let mut right = vec![0f32; len];
    for (i, s) in a.iter().enumerate() {
        left[i] += s;
    }
    for (i, s) in b.iter().enumerate() {
        right[a.len() + pause + i] += s;
    }
    let interleaved: Vec<f32> = left
        .iter()
        .zip(&right)
        .flat_map(|(l, r)| [*l, *r])
        .collect();
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("two-speakers.wav");
    write_wav(&path, &interleaved, 16_000, 2)?;
    let pcm = speech::decode_file(
        &path,
        Some("wav"),
        speech::DecodeOptions {
            limit_s: None,
            keep_channels: true,
        },
    )?;
    assert!(pcm.channels.as_ref().is_some_and(speech::channels_apart));
    let t = engine.transcribe_pcm(&pcm, &TranscribeOptions::default(), None)?;
    eprintln!("{t:#?}");
    let speakers: Vec<&str> = t
        .segments
        .iter()
        .filter_map(|s| s.speaker.as_deref())
        .collect();
    assert_eq!(
        speakers.len(),
        t.segments.len(),
        "every segment is labelled"
    );
    assert_eq!(speakers.first(), Some(&"Speaker 1"));
    assert_eq!(speakers.last(), Some(&"Speaker 2"));
    let first: Vec<String> = t
        .segments
        .iter()
        .filter(|s| s.speaker.as_deref() == Some("Speaker 1"))
        .flat_map(|s| normalise(&s.text))
        .collect();
    assert!(first.contains(&"forward".to_owned()), "{first:?}");
    // Speaker 1's words are not also given to speaker 2.
    assert!(
        t.segments
            .iter()
            .filter(|s| s.speaker.as_deref() == Some("Speaker 2"))
            .all(|s| !normalise(&s.text).contains(&"forward".to_owned())),
        "{t:#?}"
    );
    let srt = speech::format::srt(&t);
    assert!(
        srt.contains("Speaker 1: ") && srt.contains("Speaker 2: "),
        "{srt}"
    );
    // A mono file of the same mix has no speakers.
    let mono = engine.transcribe(&pcm.samples, &TranscribeOptions::default(), None)?;
    assert!(mono.segments.iter().all(|s| s.speaker.is_none()));
    Ok(())
}

#[test]
fn decoding_a_file_streams_to_the_same_samples_as_decoding_bytes() -> anyhow::Result<()> {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio");
    for file in [
        "goforward-44k-stereo.flac",
        "goforward-22k.mp3",
        "goforward-8k.aac",
    ] {
        let path = dir.join(file);
        let ext = path.extension().and_then(|e| e.to_str());
        let from_bytes = speech::decode(std::fs::read(&path)?, ext, None)?;
        let from_file = speech::decode_file(&path, ext, speech::DecodeOptions::default())?;
        assert_eq!(from_bytes.samples, from_file.samples, "{file}");
        let expected = (from_bytes.duration_s() * 16_000.0) as usize;
        assert!(from_file.samples.len().abs_diff(expected) <= 1);
    }
    // The limit is checked while reading a file too.
    let err = speech::decode_file(
        &dir.join("goforward-22k.mp3"),
        Some("mp3"),
        speech::DecodeOptions {
            limit_s: Some(1.0),
            keep_channels: false,
        },
    )
    .err();
    assert!(matches!(err, Some(AudioError::TooLong { .. })), "{err:?}");
    Ok(())
}

/// VAD chunks decoded side by side on two states (one thread each) give
/// the transcript the chunks give one after another, in time order.
#[test]
fn chunks_decoded_in_parallel_give_the_sequential_transcript() -> anyhow::Result<()> {
    let (Some(model), Some(vad), Some(shared)) = (
        crate::common::whisper_model(),
        vad_model(),
        crate::common::shared(),
    ) else {
        return Ok(());
    };
    // Clips with a second of silence between them, repeated past 40 s, so
    // VAD packs the speech into more than one chunk.
    let dir = shared.join("data/speech");
    let mut audio = Vec::new();
    for clip in [
        "ljspeech_LJ001-0001.wav",
        "librivox_ss01_0870.wav",
        "ljspeech_LJ001-0003.wav",
        "librivox_ss01_0920.wav",
    ]
    .iter()
    .cycle()
    {
        let pcm = speech::decode(std::fs::read(dir.join(clip))?, Some("wav"), None)?;
        audio.extend_from_slice(&pcm.samples);
        audio.extend(std::iter::repeat_n(0f32, 16_000));
        if audio.len() > 16_000 * 40 {
            break;
        }
    }
    let opts = TranscribeOptions::default();
    let load = || WhisperEngine::load(&model, 2, triage_local::DeviceSpec::Cpu)?.with_vad(&vad);
    let sequential = load()?.transcribe(&audio, &opts, None)?;
    let parallel_engine = load()?.with_parallel_chunks(2);
    let progress = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = progress.clone();
    let cb: Box<dyn FnMut(i32) + Send> = Box::new(move |p| seen.lock().unwrap().push(p));
    let parallel = parallel_engine.transcribe(&audio, &opts, Some(cb))?;
    assert!(!sequential.text.is_empty());
    assert_eq!(parallel.text, sequential.text);
    assert!(
        parallel
            .segments
            .windows(2)
            .all(|w| w[0].start <= w[1].start),
        "{:?}",
        parallel.segments
    );
    let progress = progress.lock().unwrap();
    assert!(progress.last().is_some_and(|p| *p > 50), "{progress:?}");
    Ok(())
}

/// Resemblyzer's speaker encoder (`TRIAGE_SPEAKER_MODEL`, which scripts/test
/// sets from scripts/fetch-speaker-model).
fn speaker_model() -> Option<std::path::PathBuf> {
    crate::common::model_from_env(
        "TRIAGE_SPEAKER_MODEL",
        "speaker model",
        "run scripts/fetch-speaker-model",
    )
}

#[test]
fn the_speaker_encoder_matches_resemblyzer_in_pytorch() -> anyhow::Result<()> {
    let (Some(model), Some(shared)) = (speaker_model(), crate::common::shared()) else {
        return Ok(());
    };
    let encoder = speech::SpeakerEncoder::load(&model)?;
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference/speaker.json"),
    )?)?;
    let clips = fixture["clips"].as_array().expect("clips");
    assert_eq!(clips.len(), 4);
    let mut wavs = Vec::new();
    for clip in clips {
        let file = clip["file"].as_str().expect("file");
        let bytes = std::fs::read(shared.join("data/speech").join(file))?;
        wavs.push(speech::decode(bytes, Some("wav"), None)?.samples);
    }
    let refs: Vec<&[f32]> = wavs.iter().map(Vec::as_slice).collect();
    let embeddings = encoder.embed(&refs)?;
    for ((clip, got), wav) in clips.iter().zip(&embeddings).zip(&wavs) {
        let want: Vec<f32> = serde_json::from_value(clip["embedding"].clone())?;
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{}: embedding differs by {worst}",
            clip["file"]
        );
        // The mel front end on its own, on the first frames (the clip with
        // its volume raised as the reference did, unpadded: the first
        // frames do not reach the end).
        let want_mel: Vec<Vec<f32>> = serde_json::from_value(clip["mel_head"].clone())?;
        let got_mel = encoder.mel(&speech::speaker::louder(wav));
        for (g, w) in got_mel.iter().zip(&want_mel) {
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                    "{}: mel {a} vs {b}",
                    clip["file"]
                );
            }
        }
    }
    Ok(())
}

/// Samples, and each clip's (start, end) in seconds.
type Conversation = (Vec<f32>, Vec<(f64, f64)>);

/// One mono file: each of `clips` after the other, a second of silence between.
fn mono_conversation(shared: &Path, clips: &[&str]) -> anyhow::Result<Conversation> {
    let mut samples = Vec::new();
    let mut spans = Vec::new();
    for clip in clips {
        let bytes = std::fs::read(shared.join("data/speech").join(clip))?;
        let pcm = speech::decode(bytes, Some("wav"), None)?.samples;
        let start = samples.len() as f64 / 16_000.0;
        samples.extend_from_slice(&pcm);
        spans.push((start, samples.len() as f64 / 16_000.0));
        samples.extend(std::iter::repeat_n(0f32, 16_000));
    }
    Ok((samples, spans))
}

#[test]
fn speakers_in_a_mono_recording_are_told_apart() -> anyhow::Result<()> {
    let (Some(model), Some(vad), Some(speakers), Some(shared)) = (
        crate::common::whisper_model(),
        vad_model(),
        speaker_model(),
        crate::common::shared(),
    ) else {
        return Ok(());
    };
    let engine = WhisperEngine::load(&model, 2, triage_local::DeviceSpec::Cpu)?
        .with_vad(&vad)?
        .with_speakers(&speakers)?;
    // A man (LibriVox) and a woman (LJ Speech) taking turns.
    let clips = [
        "librivox_ss01_0870.wav",
        "ljspeech_LJ001-0001.wav",
        "librivox_ss01_0890.wav",
        "ljspeech_LJ001-0003.wav",
        "librivox_ss01_0920.wav",
    ];
    let (samples, spans) = mono_conversation(&shared, &clips)?;
    let opts = TranscribeOptions {
        word_timestamps: true,
        ..Default::default()
    };
    let t = engine.transcribe(&samples, &opts, None)?;
    // Each clip's segments (by their middle: Whisper's segment edges may
    // reach into the pause) carry one speaker, the turns alternate, and the
    // same voice gets the same label.
    let mut per_clip = Vec::new();
    for (start, end) in &spans {
        let labels: std::collections::BTreeSet<&str> = t
            .segments
            .iter()
            .filter(|s| (*start..*end).contains(&((s.start + s.end) / 2.0)))
            .filter_map(|s| s.speaker.as_deref())
            .collect();
        assert_eq!(labels.len(), 1, "clip {start}-{end}: {labels:?}\n{t:#?}");
        per_clip.push(*labels.iter().next().expect("one label"));
    }
    assert_eq!(
        per_clip,
        [
            "Speaker 1",
            "Speaker 2",
            "Speaker 1",
            "Speaker 2",
            "Speaker 1"
        ],
        "{t:#?}"
    );
    assert!(t.segments.iter().all(|s| s.speaker.is_some()));
    // Words were asked for: kept, inside their segments.
    assert!(
        t.segments
            .iter()
            .all(|s| s.words.as_ref().is_some_and(|w| !w.is_empty()))
    );
    let vtt = speech::format::vtt(&t);
    assert!(vtt.contains("Speaker 2: "), "{vtt}");
    // Without words asked for, segments carry none (they were only needed
    // to place the turns), and the labels are the same.
    let plain = engine.transcribe(&samples, &TranscribeOptions::default(), None)?;
    assert!(plain.segments.iter().all(|s| s.words.is_none()));
    let labels = |t: &triage_core::Transcript| -> Vec<Option<String>> {
        t.segments.iter().map(|s| s.speaker.clone()).collect()
    };
    assert_eq!(labels(&plain), labels(&t));

    // One voice throughout: no labels.
    let (one, _) = mono_conversation(
        &shared,
        &[
            "librivox_ss01_0870.wav",
            "librivox_ss01_0880.wav",
            "librivox_ss01_0890.wav",
            "librivox_ss01_0930.wav",
        ],
    )?;
    let t = engine.transcribe(&one, &TranscribeOptions::default(), None)?;
    assert!(!t.segments.is_empty());
    assert!(t.segments.iter().all(|s| s.speaker.is_none()), "{t:#?}");
    Ok(())
}

#[test]
fn speaker_labels_need_vad_and_a_real_model() {
    let Some(model) = crate::common::whisper_model() else {
        return;
    };
    let engine = WhisperEngine::load(&model, 1, triage_local::DeviceSpec::Cpu).expect("model");
    let tmp = tempfile::tempdir().expect("tmp");
    let missing = tmp.path().join("missing.pt");
    assert!(matches!(
        engine.with_speakers(&missing),
        Err(speech::SpeechError::SpeakersWithoutVad)
    ));
    let Some(vad) = vad_model() else { return };
    let engine = WhisperEngine::load(&model, 1, triage_local::DeviceSpec::Cpu)
        .and_then(|e| e.with_vad(&vad))
        .expect("model");
    // Not a safetensors file: a typed load error naming the file.
    let junk = tmp.path().join("junk.pt");
    std::fs::write(&junk, b"not a checkpoint").expect("write");
    match engine.with_speakers(&junk) {
        Err(e @ speech::SpeechError::LoadSpeaker { .. }) => {
            assert!(e.to_string().contains("junk.pt"), "{e}");
        }
        other => panic!("expected a load error, got {:?}", other.map(|_| ())),
    }
}
