//! Keyed slots: at most `n` holders per key (a host's concurrent requests, a task's one
//! delivery at a time). A key's entry lives only while someone holds or waits for it, so
//! the map never grows with the number of hosts or tasks ever seen.
//!
//! A waiter keeps waiting while the key's slots are turning over (a busy but healthy
//! receiver) and gives up soon when they are stuck (a hanging one), so the caller can
//! park its delivery instead of holding a global slot behind a receiver that hangs.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    per_key: usize,
    epoch: Instant,
    slots: Mutex<HashMap<K, Arc<Entry>>>,
}

struct Entry {
    semaphore: Arc<Semaphore>,
    /// Milliseconds since the limiter's epoch when a slot of this key was last freed (or
    /// the entry was created).
    released_at: AtomicU64,
}

/// The key's slots stayed full and did not move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// How long no slot of the key was freed: the longer, the longer a caller may wait
    /// elsewhere before trying again.
    pub stalled_for: Duration,
}

/// A held slot; dropping it frees the slot (and the key's entry once unused).
pub struct Slot<K: Hash + Eq + Clone> {
    permit: Option<OwnedSemaphorePermit>,
    /// Whether freeing this slot shows the key is moving (false after a timeout).
    progressed: bool,
    entry: Option<Arc<Entry>>,
    key: K,
    owner: Arc<Inner<K>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(per_key: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                per_key: per_key.max(1),
                epoch: Instant::now(),
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Takes a slot of `key`. Waits in steps of `stall`: while some slot of the key was
    /// freed within the last step the key is moving and the wait goes on, up to
    /// `patience` in all; a key whose slots did not move for a whole step gives `None`.
    pub async fn acquire(
        &self,
        key: K,
        stall: Duration,
        patience: Duration,
    ) -> Result<Slot<K>, Busy> {
        let entry = {
            let mut slots = lock(&self.inner.slots);
            slots
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Entry {
                        semaphore: Arc::new(Semaphore::new(self.inner.per_key)),
                        released_at: AtomicU64::new(self.inner.millis_now()),
                    })
                })
                .clone()
        };
        let started = Instant::now();
        let stall_ms = u64::try_from(stall.as_millis()).unwrap_or(u64::MAX);
        let stalled = |entry: &Entry| {
            self.inner
                .millis_now()
                .saturating_sub(entry.released_at.load(Ordering::Relaxed))
                > stall_ms
        };
        let mut permit = entry.semaphore.clone().try_acquire_owned().ok();
        // A key already known to be stuck is not waited for at all: the caller parks at
        // once instead of holding its slot for a step.
        if permit.is_none() && !stalled(&entry) {
            loop {
                permit = tokio::time::timeout(stall, entry.semaphore.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok);
                if permit.is_some() || stalled(&entry) || started.elapsed() >= patience {
                    break;
                }
            }
        }
        match permit {
            Some(permit) => Ok(Slot {
                permit: Some(permit),
                progressed: true,
                entry: Some(entry),
                key,
                owner: self.inner.clone(),
            }),
            None => {
                let stalled_ms = self
                    .inner
                    .millis_now()
                    .saturating_sub(entry.released_at.load(Ordering::Relaxed));
                drop(entry);
                self.inner.forget_if_unused(&key);
                Err(Busy {
                    stalled_for: Duration::from_millis(stalled_ms),
                })
            }
        }
    }

    /// Keys with an entry (held or awaited).
    #[cfg(test)]
    pub fn tracked_keys(&self) -> usize {
        lock(&self.inner.slots).len()
    }
}

impl<K: Hash + Eq> Inner<K> {
    fn millis_now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn forget_if_unused(&self, key: &K) {
        let mut slots = lock(&self.slots);
        // Holders and waiters each own a clone; only the map's own reference left means
        // nobody needs the entry. Checked under the lock, so no one can clone it meanwhile.
        if slots.get(key).is_some_and(|s| Arc::strong_count(s) == 1) {
            slots.remove(key);
        }
    }
}

impl<K: Hash + Eq + Clone> Slot<K> {
    /// Frees the slot without counting it as progress: a request that timed out or got
    /// no answer says the key is still stuck, so waiters keep parking.
    pub fn release_stuck(mut self) {
        self.progressed = false;
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            if self.progressed {
                entry
                    .released_at
                    .store(self.owner.millis_now(), Ordering::Relaxed);
            }
            drop(self.permit.take());
            drop(entry);
        }
        self.owner.forget_if_unused(&self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent even if a holder panicked; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_millis(30);
    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn limits_each_key_and_cleans_up() {
        let limiter = KeyedLimiter::new(2);
        let a1 = limiter.acquire("a", STALL, PATIENCE).await.unwrap();
        let a2 = limiter.acquire("a", STALL, PATIENCE).await.unwrap();
        // Both slots held and nothing moving: give up after one step...
        let busy = limiter.acquire("a", STALL, PATIENCE).await.err().unwrap();
        assert!(busy.stalled_for >= STALL);
        // ...and at once now that the key is known to be stuck.
        let at_once = futures::FutureExt::now_or_never(limiter.acquire("a", STALL, PATIENCE));
        assert!(matches!(at_once, Some(Err(_))));
        let b = limiter.acquire("b", STALL, PATIENCE).await.unwrap();
        assert_eq!(limiter.tracked_keys(), 2);
        drop(a1);
        let a3 = limiter.acquire("a", STALL, PATIENCE).await.unwrap();
        drop((a2, a3, b));
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[tokio::test]
    async fn a_slot_freed_without_progress_leaves_the_key_stuck() {
        let limiter = KeyedLimiter::new(2);
        let a = limiter.acquire("h", STALL, PATIENCE).await.unwrap();
        let b = limiter.acquire("h", STALL, PATIENCE).await.unwrap();
        tokio::time::sleep(STALL * 2).await;
        // A timed-out request frees its slot, but the host is still stuck: with the
        // slots full again, the next caller is told at once.
        a.release_stuck();
        let c = limiter.acquire("h", STALL, PATIENCE).await.unwrap();
        let told = futures::FutureExt::now_or_never(limiter.acquire("h", STALL, PATIENCE));
        assert!(matches!(told, Some(Err(_))));
        // An answered request shows it moving: the next caller waits for a slot.
        drop(c);
        let d = limiter.acquire("h", STALL, PATIENCE).await.unwrap();
        let waits = futures::FutureExt::now_or_never(limiter.acquire("h", STALL, PATIENCE));
        assert!(waits.is_none(), "a moving key is waited for");
        drop((b, d));
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_when_freed() {
        let limiter = Arc::new(KeyedLimiter::new(1));
        let held = limiter.acquire(7u32, STALL, PATIENCE).await.unwrap();
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                limiter
                    .acquire(7, Duration::from_secs(5), PATIENCE)
                    .await
                    .is_ok()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[tokio::test]
    async fn keeps_waiting_while_the_key_turns_over() {
        let limiter = Arc::new(KeyedLimiter::new(1));
        // A busy but moving key: its one slot is taken and freed every 10 ms for 300 ms.
        let churn = {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let end = Instant::now() + Duration::from_millis(300);
                while Instant::now() < end {
                    if let Ok(slot) = limiter.acquire("k", STALL, PATIENCE).await {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        drop(slot);
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Waiting far longer than one step is fine as long as the key moves.
        let got = limiter.acquire("k", STALL, PATIENCE).await;
        assert!(got.is_ok());
        drop(got);
        churn.await.unwrap();
    }
}
