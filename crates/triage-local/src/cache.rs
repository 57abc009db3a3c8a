//! A bounded cache of recent classification answers for repeat traffic
//! (the same tweet, the same boilerplate), so a text seen again is answered
//! without a forward pass.
//!
//! Each model's worker handle owns one, so the key's model is implicit; the
//! text part of the key is the model's own tokenization of the text (its
//! token ids): the model normalises text (case for uncased models, runs of
//! spaces, accents, control characters) exactly that way, so two texts share
//! an entry exactly when the model cannot tell them apart. Only texts that
//! fit one window are cached, which bounds a key to the window length.
//! Least recently used entries go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use triage_core::Classification;

/// Hit and miss counts since the cache was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Entries held now.
    pub entries: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// Key → (answer, the stamp of its last use).
    map: HashMap<Vec<u32>, (Classification, u64)>,
    /// Keys by last use, oldest first; an entry whose stamp no longer
    /// matches the map's is a stale copy and is skipped.
    order: VecDeque<(u64, Vec<u32>)>,
    clock: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct ScoreCache {
    capacity: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ScoreCache {
    /// A cache of at most `capacity` answers.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map (every
        // mutation is a single insert or remove), so a poisoned lock is usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached answer for `key`, counting a hit or a miss.
    pub fn get(&self, key: &[u32]) -> Option<Classification> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let found = inner.map.get_mut(key).map(|(answer, stamp)| {
            *stamp = now;
            answer.clone()
        });
        match found {
            Some(answer) => {
                inner.order.push_back((now, key.to_vec()));
                self.compact(&mut inner);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(answer)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Remember `answer` for `key`, evicting the least recently used beyond capacity.
    pub fn insert(&self, key: Vec<u32>, answer: Classification) {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        inner.order.push_back((now, key.clone()));
        inner.map.insert(key, (answer, now));
        while inner.map.len() > self.capacity {
            let Some((stamp, old)) = inner.order.pop_front() else {
                break;
            };
            if inner.map.get(&old).is_some_and(|(_, s)| *s == stamp) {
                inner.map.remove(&old);
            }
        }
        self.compact(&mut inner);
    }

    /// Drop stale copies from the recency queue once they outnumber the
    /// entries, so it stays within twice the capacity.
    fn compact(&self, inner: &mut Inner) {
        if inner.order.len() <= 2 * self.capacity {
            return;
        }
        let Inner { map, order, .. } = inner;
        order.retain(|(stamp, key)| map.get(key).is_some_and(|(_, s)| s == stamp));
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.lock().map.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_core::LabelScore;

    fn answer(score: f32) -> Classification {
        Classification {
            scores: vec![LabelScore {
                label: "offensive".into(),
                score,
            }],
            truncated: false,
            windows: 1,
        }
    }

    #[test]
    fn counts_hits_and_misses_and_evicts_the_least_recently_used() {
        let cache = ScoreCache::new(2);
        assert!(cache.get(&[1, 2]).is_none());
        cache.insert(vec![1, 2], answer(0.1));
        cache.insert(vec![3], answer(0.3));
        assert_eq!(cache.get(&[1, 2]).map(|c| c.scores[0].score), Some(0.1));
        // [3] is now the least recently used: a third entry evicts it.
        cache.insert(vec![4], answer(0.4));
        assert!(cache.get(&[3]).is_none());
        assert!(cache.get(&[1, 2]).is_some());
        assert!(cache.get(&[4]).is_some());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (3, 2, 2));
    }

    #[test]
    fn stays_bounded_under_many_hits_and_inserts() {
        let cache = ScoreCache::new(8);
        for i in 0..10_000u32 {
            cache.insert(vec![i % 50], answer(0.5));
            let _ = cache.get(&[i % 7]);
        }
        let inner = cache.lock();
        assert!(inner.map.len() <= 8);
        assert!(inner.order.len() <= 2 * 8 + 1);
    }
}
