//! One thread budget for the whole process: the async runtime's workers,
//! the compute pool the encoders run on (rayon, which the `gemm` kernels and
//! our layers share) and whisper.cpp's threads are sized together from one
//! number of cores, instead of each taking every core for itself.

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
    /// - async workers: one per four cores, at least one;
    /// - the rest goes to compute; with Whisper, half of it (rounded down)
    ///   to whisper.cpp and the other half to the encoders.
    ///
    /// The three never add up to more than `cores`, except where there are
    /// fewer cores than pools (one core; two cores with Whisper): each pool
    /// then gets the one thread it cannot do without.
    pub fn split(cores: usize, whisper: bool) -> Self {
        let cores = cores.max(1);
        let async_workers = (cores / 4).max(1);
        let left = cores.saturating_sub(async_workers).max(1);
        let (compute, whisper_threads) = if whisper {
            let w = (left / 2).max(1);
            ((left - w).max(1), w)
        } else {
            (left, 0)
        };
        Self {
            cores,
            async_workers,
            compute,
            whisper: whisper_threads,
        }
    }

    /// Threads the split starts in all.
    pub fn total(&self) -> usize {
        self.async_workers + self.compute + self.whisper
    }

    /// The cores this process may use.
    pub fn available_cores() -> usize {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_never_exceeds_the_cores_when_each_pool_can_have_one() {
        for cores in 1..=512 {
            for whisper in [false, true] {
                let b = ThreadBudget::split(cores, whisper);
                let pools = 2 + usize::from(whisper);
                assert!(b.async_workers >= 1 && b.compute >= 1, "{b:?}");
                assert_eq!(b.whisper >= 1, whisper, "{b:?}");
                if cores >= pools {
                    // Every core used, none twice.
                    assert_eq!(b.total(), cores, "{b:?}");
                } else {
                    assert_eq!(b.total(), pools, "{b:?}: one thread per pool");
                }
            }
        }
    }

    #[test]
    fn two_cores_without_whisper_give_one_async_worker_and_one_compute_thread() {
        let b = ThreadBudget::split(2, false);
        assert_eq!((b.async_workers, b.compute, b.whisper), (1, 1, 0));
        let b = ThreadBudget::split(8, true);
        assert_eq!((b.async_workers, b.compute, b.whisper), (2, 3, 3));
        let b = ThreadBudget::split(16, false);
        assert_eq!((b.async_workers, b.compute, b.whisper), (4, 12, 0));
    }
}
