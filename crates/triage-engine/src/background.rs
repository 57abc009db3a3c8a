//! Work an engine starts that outlives the request that caused it (shadow
//! calls to the next tier): counted, so shutdown can wait for it within its
//! deadline instead of cutting a call that is already billed.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// A count of running background tasks; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Background {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    running: AtomicUsize,
    idle: Notify,
    /// To cut tasks off at a shutdown deadline; finished ones are pruned.
    handles: Mutex<Vec<AbortHandle>>,
}

/// Decrements the count when the task ends, however it ends.
struct Running(Arc<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Background {
    /// Run `task` on the tokio runtime, counted until it finishes.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.inner.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(self.inner.clone());
        let handle = tokio::spawn(async move {
            let _running = running;
            // Declared after the guard so it is dropped first: a call cut
            // off records its attempt before the count goes down.
            let task = task;
            task.await;
        });
        let mut handles = self
            .inner
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        handles.retain(|h| !h.is_finished());
        handles.push(handle.abort_handle());
    }

    /// Cut every running task off (their attempts are recorded as
    /// cancelled as they drop).
    pub fn abort_all(&self) {
        let handles = self
            .inner
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for h in handles.iter() {
            h.abort();
        }
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.inner.running.load(Ordering::Acquire)
    }

    /// Wait until no task is running.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_every_task() {
        let bg = Background::default();
        bg.idle().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        bg.spawn(async move {
            let _ = rx.await;
        });
        bg.spawn(async {});
        assert!(
            tokio::time::timeout(Duration::from_millis(50), bg.idle())
                .await
                .is_err()
        );
        assert!(bg.running() >= 1);
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), bg.idle())
            .await
            .unwrap();
        assert_eq!(bg.running(), 0);
        // A task cut off ends and is no longer counted.
        bg.spawn(std::future::pending());
        assert_eq!(bg.running(), 1);
        bg.abort_all();
        tokio::time::timeout(Duration::from_secs(5), bg.idle())
            .await
            .unwrap();
    }
}
