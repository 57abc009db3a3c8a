//! One thread budget for the whole process: the async runtime's workers,
//! the compute pool the encoders run on (rayon, which the `gemm` kernels and
//! our layers share) and whisper.cpp's threads are sized together from one
//! number of cores, instead of each taking every core for itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How a number of cores is split. See [`ThreadBudget::split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadBudget {
    /// The cores the split is for (`--threads`, else the machine's).
    pub cores: usize,
    /// tokio worker threads: HTTP, JSON and short tokenization, mostly waiting.
    pub async_workers: usize,
    /// The encoders' compute pool (`RAYON_NUM_THREADS`).
    pub compute: usize,
    /// whisper.cpp threads per transcription.
    pub whisper: usize,
}

impl ThreadBudget {
    /// Split `cores` (at least 1) between the async workers, the encoders
    /// and, when a Whisper specialist is loaded, whisper.cpp:
    ///
    /// - async workers: a core of their own per four cores, and at least
    ///   two threads (one on a single core). They parse requests, run
    ///   rules, templates and the ledger's bookkeeping, and wait on sockets;
    ///   long texts are tokenized elsewhere. On fewer than four cores they
    ///   share the cores with the compute rather than take one of two or
    ///   three from it; a second thread there lets requests that need no
    ///   model use both cores (one thread held a rule task to one core:
    ///   35k requests/s against 50k with two, 2026-12-08).
    /// - compute: the rest. The encoders' pool has that many threads, and
    ///   whisper.cpp's threads come out of the same cores: while a
    ///   transcription decodes, the encoders use only what it leaves
    ///   (see [`CoreShare`]), so busy compute threads never outnumber the
    ///   compute cores.
    /// - whisper: half the compute cores (at least one) per transcription.
    pub fn split(cores: usize, whisper: bool) -> Self {
        let cores = cores.max(1);
        let own = cores / 4;
        let async_workers = own.max(cores.min(2));
        let compute = cores - own;
        Self {
            cores,
            async_workers,
            compute,
            whisper: if whisper { (compute / 2).max(1) } else { 0 },
        }
    }

    /// The split for a one-shot command (`transcribe`, `moderate`, `eval`…):
    /// its one async worker only waits for the compute to finish, so every
    /// core goes to the compute pool, which whisper.cpp uses in turn when
    /// the command transcribes (the two never run at once there).
    pub fn one_shot(cores: usize) -> Self {
        let cores = cores.max(1);
        Self {
            cores,
            async_workers: 1,
            compute: cores,
            whisper: cores,
        }
    }

    /// Compute threads that can be busy at once: the compute cores (whisper
    /// takes its threads out of them).
    pub fn busy_at_most(&self) -> usize {
        self.compute
    }

    /// The cores this process may use.
    pub fn available_cores() -> usize {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
}

/// The compute cores shared by the encoders and whisper.cpp: a
/// transcription holds its threads' worth while it decodes, and an encoder
/// pass runs on what is free (at least one thread, its own).
#[derive(Debug)]
pub struct CoreShare {
    cores: usize,
    busy: AtomicUsize,
}

impl CoreShare {
    pub fn new(cores: usize) -> Arc<Self> {
        Arc::new(Self {
            cores: cores.max(1),
            busy: AtomicUsize::new(0),
        })
    }

    /// Threads an encoder pass may use now.
    pub fn free(&self) -> usize {
        self.cores
            .saturating_sub(self.busy.load(Ordering::Relaxed))
            .max(1)
    }

    /// Take `threads` cores until the guard is dropped.
    pub fn hold(self: &Arc<Self>, threads: usize) -> CoreHold {
        self.busy.fetch_add(threads, Ordering::Relaxed);
        CoreHold {
            share: self.clone(),
            threads,
        }
    }
}

/// Cores held by a transcription; given back on drop.
#[derive(Debug)]
pub struct CoreHold {
    share: Arc<CoreShare>,
    threads: usize,
}

impl Drop for CoreHold {
    fn drop(&mut self) {
        self.share.busy.fetch_sub(self.threads, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_threads_never_exceed_the_cores() {
        for cores in 1..=512 {
            for whisper in [false, true] {
                let b = ThreadBudget::split(cores, whisper);
                assert!(b.async_workers >= 1 && b.compute >= 1, "{b:?}");
                assert_eq!(b.whisper >= 1, whisper, "{b:?}");
                assert!(b.whisper <= b.compute, "{b:?}");
                assert!(b.busy_at_most() <= cores, "{b:?}");
                // A core of their own per four; below four they share.
                assert_eq!(b.compute, cores - cores / 4, "{b:?}");
                assert!(b.async_workers >= cores.min(2), "{b:?}");
            }
        }
    }

    #[test]
    fn a_transcription_takes_its_threads_out_of_the_encoders_share() {
        let share = CoreShare::new(2);
        assert_eq!(share.free(), 2);
        let hold = share.hold(1);
        assert_eq!(share.free(), 1);
        let second = share.hold(2);
        assert_eq!(share.free(), 1, "an encoder pass always has its own thread");
        drop((hold, second));
        assert_eq!(share.free(), 2);
    }

    #[test]
    fn a_one_shot_command_computes_on_every_core() {
        let b = ThreadBudget::one_shot(2);
        assert_eq!((b.async_workers, b.compute, b.whisper), (1, 2, 2));
        assert_eq!(ThreadBudget::one_shot(0).compute, 1);
    }

    #[test]
    fn two_cores_compute_on_both_and_whisper_takes_one() {
        let b = ThreadBudget::split(2, false);
        assert_eq!((b.async_workers, b.compute, b.whisper), (2, 2, 0));
        let b = ThreadBudget::split(2, true);
        assert_eq!((b.async_workers, b.compute, b.whisper), (2, 2, 1));
        let b = ThreadBudget::split(1, true);
        assert_eq!((b.async_workers, b.compute, b.whisper), (1, 1, 1));
        let b = ThreadBudget::split(4, false);
        assert_eq!((b.async_workers, b.compute, b.whisper), (2, 3, 0));
        let b = ThreadBudget::split(8, true);
        assert_eq!((b.async_workers, b.compute, b.whisper), (2, 6, 3));
        let b = ThreadBudget::split(16, false);
        assert_eq!((b.async_workers, b.compute, b.whisper), (4, 12, 0));
    }
}
