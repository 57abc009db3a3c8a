//! Limits on what one request may ask for and on how many wait: body sizes,
//! inputs per request, audio length, transcription admission, and the
//! per-key token bucket (`governor`).

use crate::error::ApiError;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Limits on what a request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub moderation_body_bytes: usize,
    /// Largest audio upload, spooled to disk as it arrives (over it: 413
    /// naming the limit).
    pub audio_upload_bytes: u64,
    /// Where uploads are spooled; `None`: the system's temporary folder.
    pub spool_dir: Option<std::path::PathBuf>,
    pub max_inputs: usize,
    pub max_audio_s: f64,
    /// Transcriptions decoded at once; more wait, and past `audio_queue` are refused.
    pub audio_parallel: usize,
    pub audio_queue: usize,
    /// After SIGTERM: how long in-flight requests, jobs and the ledgers'
    /// last commits may take before the process exits anyway.
    pub drain_timeout: Duration,
    /// Timeouts and connection caps at the HTTP edge.
    pub edge: crate::edge::EdgeLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            moderation_body_bytes: 1 << 20,
            // Two hours of 16-bit 44.1 kHz stereo WAV is 1.27 GB.
            audio_upload_bytes: 2u64 << 30,
            spool_dir: None,
            max_inputs: 256,
            max_audio_s: 4.0 * 3600.0,
            audio_parallel: 2,
            audio_queue: 16,
            drain_timeout: Duration::from_secs(30),
            edge: crate::edge::EdgeLimits::default(),
        }
    }
}

/// Per-key token buckets: a key with `rpm` requests per minute may burst
/// `rpm` requests, then one every `60 / rpm` seconds.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// One limiter per (key name, rpm); as many as there are keys.
    buckets: Mutex<HashMap<(String, u32), Arc<DefaultDirectRateLimiter>>>,
}

impl RateLimits {
    /// Take one request from `key`'s bucket; `Err(seconds)` until the next one.
    pub fn take(&self, key: &str, rpm: u32) -> Result<(), u64> {
        let per_minute = NonZeroU32::new(rpm).unwrap_or(NonZeroU32::MIN);
        let limiter = {
            let Ok(mut buckets) = self.buckets.lock() else {
                return Ok(());
            };
            buckets
                .entry((key.to_owned(), rpm))
                .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_minute(per_minute))))
                .clone()
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Transcription admission: `audio_parallel` decode at once, up to
/// `audio_queue` more wait; past that a request is refused at once.
#[derive(Debug)]
pub struct AudioAdmission {
    slots: Arc<tokio::sync::Semaphore>,
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    /// Places held per TCP key: one key may hold at most half the line, so
    /// one caller's stalled uploads cannot lock the others out.
    by_key: PerKey,
}

/// Places held per key.
type PerKey = Arc<Mutex<HashMap<String, usize>>>;

/// A request admitted for transcription; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    admitted: Arc<AtomicUsize>,
    key: Option<(PerKey, String)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        if let Some((by_key, key)) = &self.key
            && let Ok(mut map) = by_key.lock()
            && let Some(n) = map.get_mut(key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(key);
            }
        }
    }
}

impl AudioAdmission {
    pub fn new(limits: &Limits) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(limits.audio_parallel.max(1))),
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: limits.audio_parallel.max(1) + limits.audio_queue,
            by_key: Arc::default(),
        }
    }

    /// Take a place in line, or 429 when the line is full.
    pub fn admit(&self) -> Result<Admitted, ApiError> {
        self.admit_as(None)
    }

    /// The most places one TCP key may hold at once: half the line.
    pub fn per_key(&self) -> usize {
        (self.capacity / 2).max(1)
    }

    /// [`Self::admit`] for a TCP key (`None`: the unix socket): 429 also
    /// when the key already holds [`Self::per_key`] places.
    pub fn admit_as(&self, key: Option<&str>) -> Result<Admitted, ApiError> {
        let key = match key {
            Some(k) => {
                let mut map = self
                    .by_key
                    .lock()
                    .map_err(|_| ApiError::Internal("admission poisoned"))?;
                let held = map.entry(k.to_owned()).or_insert(0);
                if *held >= self.per_key() {
                    return Err(ApiError::Overloaded { retry_after_s: 5 });
                }
                *held += 1;
                Some((self.by_key.clone(), k.to_owned()))
            }
            None => None,
        };
        let before = self.admitted.fetch_add(1, Ordering::AcqRel);
        let admitted = Admitted {
            admitted: self.admitted.clone(),
            key,
        };
        if before >= self.capacity {
            return Err(ApiError::Overloaded { retry_after_s: 5 });
        }
        Ok(admitted)
    }

    /// Wait (bounded) for a decoding slot.
    pub async fn slot(
        &self,
        wait: Duration,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(ApiError::Overloaded { retry_after_s: 5 }),
        }
    }

    /// A slot for a job, waiting as long as it takes (jobs are bounded by the job store).
    pub async fn job_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_holds_at_most_half_the_audio_line() {
        let line = AudioAdmission::new(&Limits {
            audio_parallel: 2,
            audio_queue: 6,
            ..Limits::default()
        });
        assert_eq!(line.per_key(), 4);
        let held: Vec<_> = (0..4)
            .map(|_| line.admit_as(Some("greedy")).unwrap())
            .collect();
        assert!(line.admit_as(Some("greedy")).is_err());
        // Another key, and the socket, still get in.
        let other = line.admit_as(Some("admin")).unwrap();
        let socket = line.admit().unwrap();
        drop(held);
        // Places come back when the uploads end.
        assert!(line.admit_as(Some("greedy")).is_ok());
        drop((other, socket));
    }

    #[test]
    fn a_key_gets_its_burst_then_waits() {
        let limits = RateLimits::default();
        for _ in 0..3 {
            assert_eq!(limits.take("k", 3), Ok(()));
        }
        // 3 per minute: the next token comes in at most 20 s.
        let wait = limits.take("k", 3).err();
        assert!(wait.is_some_and(|s| (1..=20).contains(&s)), "{wait:?}");
        // Another key has its own bucket.
        assert_eq!(limits.take("other", 3), Ok(()));
    }
}
