//! Which task attempts this process runs, and which were cancelled. A cancel that
//! arrives for a running attempt stops it at once; one that arrives first is remembered
//! (bounded, for an hour) so the job is skipped when it is delivered. Both sides take
//! the same lock, so a cancel racing a job's start is never lost.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Key = (Uuid, i32);

const REMEMBER: Duration = Duration::from_secs(3600);
const MAX_REMEMBERED: usize = 100_000;

#[derive(Clone, Default)]
pub struct CancelRegistry {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    running: HashMap<Key, Running>,
    cancelled: HashSet<Key>,
    order: VecDeque<(Instant, Key)>,
}

struct Running {
    token: CancellationToken,
    by_user: Arc<std::sync::atomic::AtomicBool>,
}

/// A running attempt; unregisters itself when dropped.
pub struct Registration {
    registry: CancelRegistry,
    key: Key,
    by_user: Arc<std::sync::atomic::AtomicBool>,
}

impl Registration {
    /// True once a user cancel reached this attempt.
    pub fn cancelled_by_user(&self) -> bool {
        self.by_user.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().running.remove(&self.key);
    }
}

impl CancelRegistry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep using them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a starting attempt whose work stops when `token` fires; `None` when the
    /// attempt was already cancelled.
    pub fn start(
        &self,
        task_id: Uuid,
        attempt: i32,
        token: CancellationToken,
    ) -> Option<Registration> {
        let key = (task_id, attempt);
        let mut state = self.lock();
        if state.cancelled.contains(&key) {
            return None;
        }
        let by_user = Arc::new(std::sync::atomic::AtomicBool::new(false));
        state.running.insert(
            key,
            Running {
                token,
                by_user: by_user.clone(),
            },
        );
        Some(Registration {
            registry: self.clone(),
            key,
            by_user,
        })
    }

    /// Cancels the attempt if it runs here and remembers it in any case. Returns whether
    /// it was running.
    pub fn cancel(&self, task_id: Uuid, attempt: i32, now: Instant) -> bool {
        let key = (task_id, attempt);
        let mut state = self.lock();
        state.forget_old(now);
        if state.cancelled.insert(key) {
            state.order.push_back((now, key));
        }
        match state.running.get(&key) {
            Some(running) => {
                running
                    .by_user
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                running.token.cancel();
                true
            }
            None => false,
        }
    }

    #[cfg(test)]
    fn is_cancelled(&self, task_id: Uuid, attempt: i32) -> bool {
        self.lock().cancelled.contains(&(task_id, attempt))
    }
}

impl State {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, key)) = self.order.front().copied() {
            let expired = now.saturating_duration_since(at) > REMEMBER;
            if !expired && self.order.len() < MAX_REMEMBERED {
                break;
            }
            self.order.pop_front();
            self.cancelled.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_stops_a_running_attempt_only() {
        let r = CancelRegistry::default();
        let id = Uuid::new_v4();
        let token = CancellationToken::new();
        let reg = r.start(id, 1, token.clone()).expect("not cancelled");
        assert!(!r.cancel(id, 2, Instant::now()));
        assert!(!token.is_cancelled());
        assert!(r.cancel(id, 1, Instant::now()));
        assert!(token.is_cancelled());
        assert!(reg.cancelled_by_user());
    }

    #[test]
    fn a_cancel_before_the_start_skips_the_attempt() {
        let r = CancelRegistry::default();
        let id = Uuid::new_v4();
        assert!(!r.cancel(id, 1, Instant::now()));
        assert!(r.start(id, 1, CancellationToken::new()).is_none());
        assert!(r.start(id, 2, CancellationToken::new()).is_some());
    }

    #[test]
    fn finished_attempts_unregister() {
        let r = CancelRegistry::default();
        let id = Uuid::new_v4();
        let token = CancellationToken::new();
        drop(r.start(id, 1, token.clone()));
        assert!(!r.cancel(id, 1, Instant::now()));
        assert!(!token.is_cancelled());
    }

    #[test]
    fn remembered_cancels_expire_after_an_hour() {
        let r = CancelRegistry::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let t0 = Instant::now();
        r.cancel(a, 1, t0);
        r.cancel(b, 1, t0 + REMEMBER + Duration::from_secs(1));
        assert!(!r.is_cancelled(a, 1));
        assert!(r.is_cancelled(b, 1));
    }
}
