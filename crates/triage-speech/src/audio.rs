//! Any audio file in, 16 kHz mono f32 out: symphonia probes and decodes (WAV,
//! FLAC, MP3, Ogg/Vorbis, AAC in ADTS or MP4/M4A, Matroska/WebM), channels
//! are averaged, and rubato's FFT resampler converts the rate.

use std::io::Cursor;
use std::path::Path;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;

/// Whisper's input rate.
pub const SAMPLE_RATE: u32 = 16_000;

/// Why a file could not be turned into samples.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("the audio file is empty (0 bytes)")]
    Empty,
    #[error("cannot read the audio file")]
    Io(#[source] std::io::Error),
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
    /// A two-channel file's channels apart, at 16 kHz, when asked for
    /// ([`DecodeOptions::keep_channels`]): one speaker per channel.
    pub channels: Option<[Vec<f32>; 2]>,
}

impl Pcm {
    pub fn duration_s(&self) -> f64 {
        self.samples.len() as f64 / f64::from(SAMPLE_RATE)
    }
}

/// How to decode.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeOptions {
    /// Longest decoded duration accepted, checked while decoding.
    pub limit_s: Option<f64>,
    /// Keep a stereo file's two channels apart as well as the mix.
    pub keep_channels: bool,
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
    decode_source(
        Box::new(Cursor::new(bytes)),
        extension,
        DecodeOptions {
            limit_s,
            keep_channels: false,
        },
    )
}

/// Decode a file as it is read (the file is never in memory whole); the
/// samples are mixed and resampled to 16 kHz packet by packet.
pub fn decode_file(
    path: &Path,
    extension: Option<&str>,
    opts: DecodeOptions,
) -> Result<Pcm, AudioError> {
    let file = std::fs::File::open(path).map_err(AudioError::Io)?;
    if file.metadata().map_err(AudioError::Io)?.len() == 0 {
        return Err(AudioError::Empty);
    }
    decode_source(Box::new(file), extension, opts)
}

/// Check that a file is audio this build can decode (format and codec from
/// its header), without decoding it: for refusing a broken upload at once.
pub fn probe_file(path: &Path, extension: Option<&str>) -> Result<(), AudioError> {
    let file = std::fs::File::open(path).map_err(AudioError::Io)?;
    if file.metadata().map_err(AudioError::Io)?.len() == 0 {
        return Err(AudioError::Empty);
    }
    open(Box::new(file), extension).map(|_| ())
}

struct Opened {
    format: Box<dyn symphonia::core::formats::FormatReader>,
    decoder: Box<dyn symphonia::core::codecs::audio::AudioDecoder>,
    track_id: u32,
    /// Samples per channel the container says the track has, when it says.
    frames: Option<u64>,
    /// The rate the container declares (decoded buffers may differ: HE-AAC).
    declared_rate: Option<u32>,
    declared_channels: Option<usize>,
}

fn open(source: Box<dyn MediaSource>, extension: Option<&str>) -> Result<Opened, AudioError> {
    let mut hint = Hint::new();
    if let Some(ext) = extension {
        hint.with_extension(ext);
    }
    let mss = MediaSourceStream::new(source, Default::default());
    let unsupported = |source: SymError| AudioError::Unsupported {
        hint: extension.map(str::to_owned),
        source,
    };
    let format = symphonia::default::get_probe()
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
    let frames = track.num_frames;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .cloned()
        .ok_or(AudioError::NoAudioTrack)?;
    let decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(AudioError::UnsupportedCodec)?;
    Ok(Opened {
        format,
        decoder,
        track_id,
        frames,
        declared_rate: params.sample_rate,
        declared_channels: params.channels.as_ref().map(|c| c.count()),
    })
}

/// A file decoded as it is read, handing out 16 kHz mono samples block by
/// block: memory stays at one block however long the recording is.
pub struct AudioStream {
    opened: Opened,
    opts: DecodeOptions,
    rate: u32,
    channels: usize,
    to16k: Option<To16k>,
    interleaved: Vec<f32>,
    ended: bool,
}

impl std::fmt::Debug for AudioStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioStream")
            .field("rate", &self.rate)
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

impl AudioStream {
    /// Open a file; its header is read and checked, nothing is decoded yet.
    pub fn open_file(
        path: &Path,
        extension: Option<&str>,
        opts: DecodeOptions,
    ) -> Result<Self, AudioError> {
        let file = std::fs::File::open(path).map_err(AudioError::Io)?;
        if file.metadata().map_err(AudioError::Io)?.len() == 0 {
            return Err(AudioError::Empty);
        }
        Self::new(Box::new(file), extension, opts)
    }

    fn new(
        source: Box<dyn MediaSource>,
        extension: Option<&str>,
        opts: DecodeOptions,
    ) -> Result<Self, AudioError> {
        Ok(Self {
            opened: open(source, extension)?,
            opts,
            rate: 0,
            channels: 0,
            to16k: None,
            interleaved: Vec::new(),
            ended: false,
        })
    }

    /// How long the container says the audio is, when it says.
    pub fn duration_hint_s(&self) -> Option<f64> {
        let rate = self.opened.declared_rate.filter(|r| *r > 0)?;
        self.opened.frames.map(|n| n as f64 / f64::from(rate))
    }

    /// How many channels the container declares, when it does.
    pub fn declared_channels(&self) -> Option<usize> {
        self.opened.declared_channels
    }

    /// Seconds of input decoded so far.
    pub fn decoded_s(&self) -> f64 {
        self.to16k.as_ref().map_or(0.0, To16k::input_s)
    }

    /// Decode one packet into the resampler; `false` at the end of the input.
    fn pump(&mut self) -> Result<bool, AudioError> {
        let packet = match self.opened.format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(false),
            // A cut-off file ends with an unexpected EOF: keep what decoded.
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(false);
            }
            Err(e) => return Err(corrupt(self.to16k.as_ref(), e)),
        };
        if packet.track_id != self.opened.track_id {
            return Ok(true);
        }
        let buf = match self.opened.decoder.decode(&packet) {
            Ok(b) => b,
            // One bad packet in a long stream is skipped, as players do.
            Err(SymError::DecodeError(_)) => return Ok(true),
            Err(e) => return Err(corrupt(self.to16k.as_ref(), e)),
        };
        let spec = buf.spec();
        if self.rate == 0 {
            self.rate = spec.rate();
        }
        if spec.rate() != self.rate || self.rate == 0 {
            // A stream that changes rate mid-way is not something a
            // recording does; refuse rather than resample it wrongly.
            return Err(corrupt(
                self.to16k.as_ref(),
                SymError::Unsupported("the sample rate changes within the stream"),
            ));
        }
        let channels = spec.channels().count().max(1);
        if self.channels != 0 && channels != self.channels {
            return Err(corrupt(
                self.to16k.as_ref(),
                SymError::Unsupported("the channel count changes within the stream"),
            ));
        }
        self.channels = channels;
        let keep = self.opts.keep_channels && channels == 2;
        let s = match &mut self.to16k {
            Some(s) => s,
            None => self.to16k.insert(To16k::new(self.rate, keep)?),
        };
        self.interleaved.clear();
        buf.copy_to_vec_interleaved(&mut self.interleaved);
        s.push(&self.interleaved, channels)?;
        if let Some(limit) = self.opts.limit_s
            && s.input_s() > limit
        {
            return Err(AudioError::TooLong {
                duration_s: s.input_s(),
                limit_s: limit,
            });
        }
        Ok(true)
    }

    /// The next block of at least `min` 16 kHz mono samples (the last one
    /// may be shorter); `None` after the end. The first call on a file with
    /// no samples is [`AudioError::NoSamples`].
    pub fn next_block(&mut self, min: usize) -> Result<Option<Vec<f32>>, AudioError> {
        loop {
            if let Some(s) = &mut self.to16k
                && s.out[0].len() >= min.max(1)
            {
                return Ok(Some(s.take_mono()));
            }
            if self.ended {
                return Ok(None);
            }
            if !self.pump()? {
                self.ended = true;
                let Some(s) = &mut self.to16k else {
                    return Err(AudioError::NoSamples);
                };
                if s.frames_in == 0 {
                    return Err(AudioError::NoSamples);
                }
                s.finish()?;
                let rest = s.take_mono();
                return Ok(Some(rest).filter(|r| !r.is_empty()));
            }
        }
    }

    /// Decode the rest whole.
    fn into_pcm(mut self) -> Result<Pcm, AudioError> {
        while self.pump()? {}
        let Some(mut s) = self.to16k.take() else {
            return Err(AudioError::NoSamples);
        };
        if s.frames_in == 0 {
            return Err(AudioError::NoSamples);
        }
        s.finish()?;
        let mut out = std::mem::take(&mut s.out);
        let samples = out.remove(0);
        let channels = <[Vec<f32>; 2]>::try_from(out).ok();
        Ok(Pcm {
            samples,
            source_rate: self.rate,
            source_channels: self.channels,
            channels,
        })
    }
}

fn decode_source(
    source: Box<dyn MediaSource>,
    extension: Option<&str>,
    opts: DecodeOptions,
) -> Result<Pcm, AudioError> {
    AudioStream::new(source, extension, opts)?.into_pcm()
}

fn corrupt(stream: Option<&To16k>, e: SymError) -> AudioError {
    AudioError::Corrupt {
        decoded_s: stream.map_or(0.0, To16k::input_s),
        source: e,
    }
}

/// Mixes frames to mono (and keeps two channels apart when asked) and
/// resamples them to 16 kHz as they come, so only 16 kHz samples are kept.
struct To16k {
    rate: u32,
    /// `None` when the input is already 16 kHz.
    resampler: Option<rubato::Fft<f32>>,
    /// Input not yet resampled: one Vec per output channel (mix, then left, right).
    pending: Vec<Vec<f32>>,
    out: Vec<Vec<f32>>,
    scratch: Vec<Vec<f32>>,
    /// Output frames still to drop: the resampler's delay.
    trim: usize,
    frames_in: u64,
    /// Output frames already handed out by [`To16k::take_mono`].
    taken: usize,
}

impl To16k {
    fn new(rate: u32, keep_channels: bool) -> Result<Self, AudioError> {
        use rubato::{Fft, FixedSync, Resampler};
        let n = if keep_channels { 3 } else { 1 };
        let resampler = if rate == SAMPLE_RATE {
            None
        } else {
            Some(
                Fft::<f32>::new(
                    rate as usize,
                    SAMPLE_RATE as usize,
                    1024,
                    n,
                    FixedSync::Input,
                )
                .map_err(|e| AudioError::Resample {
                    from: rate,
                    source: Box::new(e),
                })?,
            )
        };
        let (trim, max_out) = resampler
            .as_ref()
            .map_or((0, 0), |r| (r.output_delay(), r.output_frames_max()));
        Ok(Self {
            rate,
            resampler,
            pending: vec![Vec::new(); n],
            out: vec![Vec::new(); n],
            scratch: vec![vec![0f32; max_out]; n],
            trim,
            frames_in: 0,
            taken: 0,
        })
    }

    /// Hand out the mono samples ready so far (a stream block); channels
    /// kept apart are not streamed and are dropped.
    fn take_mono(&mut self) -> Vec<f32> {
        for other in self.out.iter_mut().skip(1) {
            other.clear();
        }
        let block = std::mem::take(&mut self.out[0]);
        self.taken += block.len();
        block
    }

    fn input_s(&self) -> f64 {
        self.frames_in as f64 / f64::from(self.rate.max(1))
    }

    fn push(&mut self, interleaved: &[f32], channels: usize) -> Result<(), AudioError> {
        let frames = interleaved.len() / channels;
        self.frames_in += frames as u64;
        let target = if self.resampler.is_some() {
            &mut self.pending
        } else {
            &mut self.out
        };
        for frame in interleaved.chunks_exact(channels) {
            target[0].push(frame.iter().sum::<f32>() / channels as f32);
            if target.len() == 3 {
                target[1].push(frame[0]);
                target[2].push(frame[1]);
            }
        }
        self.drain()
    }

    /// Resample every full chunk of pending input.
    fn drain(&mut self) -> Result<(), AudioError> {
        use rubato::Resampler;
        use rubato::audioadapter_buffers::direct::SequentialSliceOfVecs;
        let Some(resampler) = &mut self.resampler else {
            return Ok(());
        };
        let from = self.rate;
        let err =
            |e: Box<dyn std::error::Error + Send + Sync>| AudioError::Resample { from, source: e };
        let n = self.pending.len();
        loop {
            let need = resampler.input_frames_next();
            if self.pending[0].len() < need {
                return Ok(());
            }
            let input =
                SequentialSliceOfVecs::new(&self.pending, n, need).map_err(|e| err(Box::new(e)))?;
            let max_out = self.scratch[0].len();
            let mut output = SequentialSliceOfVecs::new_mut(&mut self.scratch, n, max_out)
                .map_err(|e| err(Box::new(e)))?;
            let (used, produced) = resampler
                .process_into_buffer(&input, &mut output, None)
                .map_err(|e| err(Box::new(e)))?;
            let skip = self.trim.min(produced);
            self.trim -= skip;
            for (out, got) in self.out.iter_mut().zip(&self.scratch) {
                out.extend_from_slice(&got[skip..produced]);
            }
            for p in &mut self.pending {
                p.drain(..used.max(1).min(p.len()));
            }
        }
    }

    /// Flush the rest of the input and the resampler's delayed tail into
    /// `out` with silence, trimmed to the input's length.
    fn finish(&mut self) -> Result<(), AudioError> {
        use rubato::Resampler;
        let expected =
            (self.frames_in as f64 * f64::from(SAMPLE_RATE) / f64::from(self.rate)).ceil() as usize;
        let already = self.taken;
        // The delay is a few chunks; the bound only guards against a
        // resampler that stops producing.
        for _ in 0..64 {
            let Some(need) = self.resampler.as_ref().map(|r| r.input_frames_next()) else {
                break;
            };
            if already + self.out[0].len() >= expected {
                break;
            }
            let have = self.pending[0].len();
            let padded = (have / need + 1) * need;
            for p in &mut self.pending {
                p.resize(padded, 0.0);
            }
            self.drain()?;
        }
        let keep = expected.saturating_sub(already);
        for out in &mut self.out {
            out.truncate(keep);
            out.shrink_to_fit();
        }
        Ok(())
    }
}

/// Resample mono audio to 16 kHz.
pub fn resample(mono: &[f32], from: u32) -> Result<Vec<f32>, AudioError> {
    if from == SAMPLE_RATE {
        return Ok(mono.to_vec());
    }
    let mut stream = To16k::new(from, false)?;
    for block in mono.chunks(4096) {
        stream.push(block, 1)?;
    }
    stream.finish()?;
    Ok(stream.take_mono())
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
