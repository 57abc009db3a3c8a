//! Any audio file in, 16 kHz mono f32 out: symphonia probes and decodes (WAV,
//! FLAC, MP3, Ogg/Vorbis, AAC in ADTS or MP4/M4A, Matroska/WebM), channels
//! are averaged, and rubato's FFT resampler converts the rate.

use std::io::Cursor;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

/// Whisper's input rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// Why a file could not be turned into samples.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("the audio file is empty (0 bytes)")]
    Empty,
    #[error("unsupported or unrecognised audio format{}", hint.as_ref().map(|h| format!(" (file extension `{h}`)")).unwrap_or_default())]
    Unsupported {
        hint: Option<String>,
        #[source]
        source: SymError,
    },
    #[error("the file has no audio track")]
    NoAudioTrack,
    #[error("the audio track uses a codec this build cannot decode")]
    UnsupportedCodec(#[source] SymError),
    #[error("the audio data is broken after {decoded_s:.2} s")]
    Corrupt {
        decoded_s: f64,
        #[source]
        source: SymError,
    },
    #[error("the file decodes to no samples")]
    NoSamples,
    #[error("the audio is {duration_s:.1} s long, over the limit of {limit_s:.1} s")]
    TooLong { duration_s: f64, limit_s: f64 },
    #[error("resampling from {from} Hz failed")]
    Resample {
        from: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Decoded, resampled audio.
#[derive(Debug, Clone)]
pub struct Pcm {
    /// 16 kHz mono samples in [-1, 1].
    pub samples: Vec<f32>,
    /// What the file was: rate and channels before conversion.
    pub source_rate: u32,
    pub source_channels: usize,
}

impl Pcm {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / f64::from(SAMPLE_RATE)
    }
}

/// Decode `bytes`; `extension` helps the probe (e.g. "mp3"); `limit_s` bounds
/// the decoded duration (checked while decoding, so a huge file stops early).
pub fn decode(
    bytes: Vec<u8>,
    extension: Option<&str>,
    limit_s: Option<f64>,
) -> Result<Pcm, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let mut hint = Hint::new();
    if let Some(ext) = extension {
        hint.with_extension(ext);
    }
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let unsupported = |source: SymError| AudioError::Unsupported {
        hint: extension.map(str::to_owned),
        source,
    };
    let mut format = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(unsupported)?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or(AudioError::NoAudioTrack)?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .cloned()
        .ok_or(AudioError::NoAudioTrack)?;
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(AudioError::UnsupportedCodec)?;

    let mut rate = params.sample_rate.unwrap_or(0);
    let mut channels = 0usize;
    let mut mono: Vec<f32> = Vec::new();
    let mut interleaved: Vec<f32> = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // A cut-off file ends with an unexpected EOF: keep what decoded.
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(corrupt(&mono, rate, e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            // One bad packet in a long stream is skipped, as players do.
            Err(SymError::DecodeError(_)) => continue,
            Err(e) => return Err(corrupt(&mono, rate, e)),
        };
        let spec = buf.spec();
        rate = spec.rate();
        channels = spec.channels().count().max(1);
        interleaved.clear();
        buf.copy_to_vec_interleaved(&mut interleaved);
        mono.extend(
            interleaved
                .chunks(channels)
                .map(|frame| frame.iter().sum::<f32>() / channels as f32),
        );
        if let Some(limit) = limit_s
            && rate > 0
            && mono.len() as f64 / f64::from(rate) > limit
        {
            return Err(AudioError::TooLong {
                duration_s: mono.len() as f64 / f64::from(rate),
                limit_s: limit,
            });
        }
    }
    if mono.is_empty() || rate == 0 {
        return Err(AudioError::NoSamples);
    }
    let samples = resample(&mono, rate)?;
    Ok(Pcm {
        samples,
        source_rate: rate,
        source_channels: channels,
    })
}

fn corrupt(decoded: &[f32], rate: u32, e: SymError) -> AudioError {
    let decoded_s = if rate > 0 {
        decoded.len() as f64 / f64::from(rate)
    } else {
        0.0
    };
    AudioError::Corrupt {
        decoded_s,
        source: e,
    }
}

/// Resample mono audio to 16 kHz.
pub fn resample(mono: &[f32], from: u32) -> Result<Vec<f32>, AudioError> {
    use rubato::audioadapter_buffers::direct::SequentialSliceOfVecs;
    use rubato::{Fft, FixedSync, Resampler};
    if from == SAMPLE_RATE {
        return Ok(mono.to_vec());
    }
    let err =
        |e: Box<dyn std::error::Error + Send + Sync>| AudioError::Resample { from, source: e };
    let mut resampler = Fft::<f32>::new(
        from as usize,
        SAMPLE_RATE as usize,
        1024,
        1,
        FixedSync::Input,
    )
    .map_err(|e| err(Box::new(e)))?;
    let input = vec![mono.to_vec()];
    let input = SequentialSliceOfVecs::new(&input, 1, mono.len()).map_err(|e| err(Box::new(e)))?;
    let needed = resampler.process_all_needed_output_len(mono.len());
    let mut out = vec![vec![0f32; needed]];
    let mut output =
        SequentialSliceOfVecs::new_mut(&mut out, 1, needed).map_err(|e| err(Box::new(e)))?;
    let (_, produced) = resampler
        .process_all_into_buffer(&input, &mut output, mono.len(), None)
        .map_err(|e| err(Box::new(e)))?;
    let mut samples = out.into_iter().next().unwrap_or_default();
    samples.truncate(produced);
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_keeps_duration_and_pitch() -> Result<(), AudioError> {
        // One second of 440 Hz at 48 kHz.
        let tone: Vec<f32> = (0..48_000)
            .map(|i| (i as f32 * 440.0 * std::f32::consts::TAU / 48_000.0).sin())
            .collect();
        let out = resample(&tone, 48_000)?;
        assert!(
            (out.len() as i64 - 16_000).abs() <= 16,
            "{} samples",
            out.len()
        );
        // Zero crossings of a 440 Hz tone in 1 s: about 880.
        let crossings = out
            .windows(2)
            .filter(|w| w[0].signum() != w[1].signum())
            .count();
        assert!((860..=900).contains(&crossings), "{crossings} crossings");
        Ok(())
    }

    #[test]
    fn empty_and_garbage_input_are_typed_errors() {
        assert!(matches!(
            decode(Vec::new(), Some("wav"), None),
            Err(AudioError::Empty)
        ));
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let err = decode(garbage, Some("mp3"), None).err();
        assert!(
            matches!(
                err,
                Some(
                    AudioError::Unsupported { .. }
                        | AudioError::NoSamples
                        | AudioError::Corrupt { .. }
                )
            ),
            "{err:?}"
        );
    }
}
