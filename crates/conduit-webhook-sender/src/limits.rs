//! Keyed slots: at most `n` holders per key (a host's concurrent requests, a task's one
//! delivery at a time). A key's entry lives only while someone holds or waits for it, so
//! the map never grows with the number of hosts or tasks ever seen.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    per_key: usize,
    slots: Mutex<HashMap<K, Arc<Semaphore>>>,
}

/// A held slot; dropping it frees the slot (and the key's entry once unused).
pub struct Slot<K: Hash + Eq + Clone> {
    permit: Option<OwnedSemaphorePermit>,
    key: K,
    owner: Arc<Inner<K>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(per_key: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                per_key: per_key.max(1),
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Takes a slot of `key`, waiting at most `wait`; `None` when the key stayed full.
    pub async fn acquire(&self, key: K, wait: Duration) -> Option<Slot<K>> {
        let semaphore = {
            let mut slots = lock(&self.inner.slots);
            slots
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.inner.per_key)))
                .clone()
        };
        let permit = match semaphore.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => tokio::time::timeout(wait, semaphore.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok),
        };
        drop(semaphore);
        match permit {
            Some(permit) => Some(Slot {
                permit: Some(permit),
                key,
                owner: self.inner.clone(),
            }),
            None => {
                self.inner.forget_if_unused(&key);
                None
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
    fn forget_if_unused(&self, key: &K) {
        let mut slots = lock(&self.slots);
        // Holders and waiters each own a clone; only the map's own reference left means
        // nobody needs the entry. Checked under the lock, so no one can clone it meanwhile.
        if slots.get(key).is_some_and(|s| Arc::strong_count(s) == 1) {
            slots.remove(key);
        }
    }
}

impl<K: Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        drop(self.permit.take());
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

    #[tokio::test]
    async fn limits_each_key_and_cleans_up() {
        let limiter = KeyedLimiter::new(2);
        let a1 = limiter.acquire("a", Duration::ZERO).await.unwrap();
        let a2 = limiter.acquire("a", Duration::ZERO).await.unwrap();
        assert!(limiter
            .acquire("a", Duration::from_millis(20))
            .await
            .is_none());
        let b = limiter.acquire("b", Duration::ZERO).await.unwrap();
        assert_eq!(limiter.tracked_keys(), 2);
        drop(a1);
        let a3 = limiter.acquire("a", Duration::ZERO).await.unwrap();
        drop((a2, a3, b));
        assert_eq!(limiter.tracked_keys(), 0);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_when_freed() {
        let limiter = Arc::new(KeyedLimiter::new(1));
        let held = limiter.acquire(7u32, Duration::ZERO).await.unwrap();
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(7, Duration::from_secs(5)).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(limiter.tracked_keys(), 0);
    }
}
