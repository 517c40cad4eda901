//! What this process knows of the lifecycle stream, and which attempts it runs. The
//! stream (`{ns}.lifecycle`) is the durable record: it holds every cancel, every
//! attempt checkpoint and every generator's marks for days, and each generator reads it
//! from its first retained record whenever its consumer opens. What is kept here is only
//! a cache of that record, rebuilt at every start, so a generator started after a cancel
//! knows it as well as one that ran when it was sent.
//!
//! Before an attempt starts, the worker publishes a mark and waits to read it back
//! ([`Lifecycle::mark`]): everything published to the stream before the mark (the
//! task's cancel, the checkpoint a crashed run left) has then been read. A cancel that
//! arrives for a running attempt stops it at once; both sides take the same lock, so a
//! cancel racing a job's start is never lost.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Instant,
};

use conduit_core::{
    messages::{ControlMessage, JobCheckpoint},
    topology::LIFECYCLE_RETENTION,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Key = (Uuid, i32);

#[derive(Clone, Default)]
pub struct Lifecycle {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    running: HashMap<Key, Running>,
    /// Cancelled attempts, with when this process read the cancel.
    cancelled: HashMap<Key, Instant>,
    /// Checkpoints of attempts not known to be finished.
    checkpoints: HashMap<Key, (Instant, JobCheckpoint)>,
    /// Marks this process published and waits to read back.
    marks: HashMap<Uuid, oneshot::Sender<()>>,
    last_pruned: Option<Instant>,
}

struct Running {
    token: CancellationToken,
    by_user: Arc<AtomicBool>,
}

/// A running attempt; unregisters itself when dropped.
pub struct Registration {
    lifecycle: Lifecycle,
    key: Key,
    by_user: Arc<AtomicBool>,
}

impl Registration {
    /// True once a user cancel reached this attempt.
    pub fn cancelled_by_user(&self) -> bool {
        self.by_user.load(Ordering::SeqCst)
    }

    /// The flag [`Registration::cancelled_by_user`] reads, for closures that outlive
    /// a borrow of the registration.
    pub fn by_user_flag(&self) -> Arc<AtomicBool> {
        self.by_user.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.lifecycle.lock().running.remove(&self.key);
    }
}

impl Lifecycle {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep using them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in one record of the stream. Returns whether it was a cancel of an attempt
    /// running here.
    pub fn apply(&self, record: ControlMessage, now: Instant) -> bool {
        let mut state = self.lock();
        state.prune(now);
        match record {
            ControlMessage::Cancel {
                task_id, attempt, ..
            } => {
                let key = (task_id, attempt);
                state.cancelled.entry(key).or_insert(now);
                state.checkpoints.remove(&key);
                match state.running.get(&key) {
                    Some(running) => {
                        running.by_user.store(true, Ordering::SeqCst);
                        running.token.cancel();
                        true
                    }
                    None => false,
                }
            }
            ControlMessage::Checkpoint {
                task_id,
                attempt,
                checkpoint,
                ..
            } => {
                let key = (task_id, attempt);
                if !state.cancelled.contains_key(&key) {
                    let merged = newest(
                        state.checkpoints.remove(&key).map(|(_, c)| c),
                        Some(checkpoint),
                    );
                    if let Some(merged) = merged {
                        state.checkpoints.insert(key, (now, merged));
                    }
                }
                false
            }
            ControlMessage::Finished {
                task_id, attempt, ..
            } => {
                state.checkpoints.remove(&(task_id, attempt));
                false
            }
            ControlMessage::Mark { id, .. } => {
                if let Some(waiter) = state.marks.remove(&id) {
                    let _ = waiter.send(());
                }
                false
            }
        }
    }

    /// Waits for the mark `id` to be read back from the stream.
    pub fn mark(&self, id: Uuid) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().marks.insert(id, tx);
        rx
    }

    /// Stops waiting for a mark that will not be published.
    pub fn forget_mark(&self, id: Uuid) {
        self.lock().marks.remove(&id);
    }

    /// Registers a starting attempt whose work stops when `token` fires; `None` when the
    /// attempt was cancelled.
    pub fn start(
        &self,
        task_id: Uuid,
        attempt: i32,
        token: CancellationToken,
    ) -> Option<Registration> {
        let key = (task_id, attempt);
        let mut state = self.lock();
        if state.cancelled.contains_key(&key) {
            return None;
        }
        let by_user = Arc::new(AtomicBool::new(false));
        state.running.insert(
            key,
            Running {
                token,
                by_user: by_user.clone(),
            },
        );
        Some(Registration {
            lifecycle: self.clone(),
            key,
            by_user,
        })
    }

    /// The checkpoint an earlier run of the attempt left on the stream.
    pub fn checkpoint(&self, task_id: Uuid, attempt: i32) -> Option<JobCheckpoint> {
        self.lock()
            .checkpoints
            .get(&(task_id, attempt))
            .map(|(_, c)| c.clone())
    }

    #[cfg(test)]
    fn is_cancelled(&self, task_id: Uuid, attempt: i32) -> bool {
        self.lock().cancelled.contains_key(&(task_id, attempt))
    }
}

/// Of two checkpoints of one attempt, the one that knows more: an upstream job beats
/// none; the first start is the earliest either saw.
pub fn newest(a: Option<JobCheckpoint>, b: Option<JobCheckpoint>) -> Option<JobCheckpoint> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(a), Some(b)) => Some(JobCheckpoint {
            first_started_at: a.first_started_at.min(b.first_started_at),
            upstream: b.upstream.or(a.upstream),
        }),
    }
}

impl State {
    /// Forgets what the stream itself no longer holds, at most once a minute.
    fn prune(&mut self, now: Instant) {
        if self
            .last_pruned
            .is_some_and(|at| now.saturating_duration_since(at).as_secs() < 60)
        {
            return;
        }
        self.last_pruned = Some(now);
        let old = |at: &Instant| now.saturating_duration_since(*at) > LIFECYCLE_RETENTION;
        self.cancelled.retain(|_, at| !old(at));
        self.checkpoints.retain(|_, (at, _)| !old(at));
    }
}

#[cfg(test)]
mod tests {
    use conduit_core::messages::{UpstreamJob, SCHEMA_VERSION};

    use super::*;

    fn cancel(task_id: Uuid, attempt: i32) -> ControlMessage {
        ControlMessage::Cancel {
            v: SCHEMA_VERSION,
            task_id,
            attempt,
        }
    }

    #[test]
    fn cancel_stops_a_running_attempt_only() {
        let l = Lifecycle::default();
        let id = Uuid::new_v4();
        let token = CancellationToken::new();
        let reg = l.start(id, 1, token.clone()).expect("not cancelled");
        assert!(!l.apply(cancel(id, 2), Instant::now()));
        assert!(!token.is_cancelled());
        assert!(l.apply(cancel(id, 1), Instant::now()));
        assert!(token.is_cancelled());
        assert!(reg.cancelled_by_user());
    }

    #[test]
    fn a_cancel_before_the_start_skips_the_attempt() {
        let l = Lifecycle::default();
        let id = Uuid::new_v4();
        assert!(!l.apply(cancel(id, 1), Instant::now()));
        assert!(l.is_cancelled(id, 1));
        assert!(l.start(id, 1, CancellationToken::new()).is_none());
        assert!(l.start(id, 2, CancellationToken::new()).is_some());
    }

    #[test]
    fn finished_attempts_unregister() {
        let l = Lifecycle::default();
        let id = Uuid::new_v4();
        let token = CancellationToken::new();
        drop(l.start(id, 1, token.clone()));
        assert!(!l.apply(cancel(id, 1), Instant::now()));
        assert!(!token.is_cancelled());
    }

    #[test]
    fn checkpoints_merge_and_go_with_the_attempt() {
        let l = Lifecycle::default();
        let id = Uuid::new_v4();
        let t0 = chrono::Utc::now();
        let started = JobCheckpoint {
            first_started_at: t0,
            upstream: None,
        };
        let submitted = JobCheckpoint {
            first_started_at: t0 + chrono::Duration::seconds(5),
            upstream: Some(UpstreamJob::new("minimax", "up-1")),
        };
        for checkpoint in [started, submitted] {
            l.apply(
                ControlMessage::Checkpoint {
                    v: SCHEMA_VERSION,
                    task_id: id,
                    attempt: 1,
                    checkpoint,
                },
                Instant::now(),
            );
        }
        let known = l.checkpoint(id, 1).expect("checkpoint");
        assert_eq!(known.first_started_at, t0);
        assert_eq!(known.upstream.map(|u| u.id).as_deref(), Some("up-1"));
        assert_eq!(l.checkpoint(id, 2), None);
        l.apply(
            ControlMessage::Finished {
                v: SCHEMA_VERSION,
                task_id: id,
                attempt: 1,
            },
            Instant::now(),
        );
        assert_eq!(l.checkpoint(id, 1), None);
    }

    #[test]
    fn a_mark_wakes_its_waiter() {
        let l = Lifecycle::default();
        let id = Uuid::new_v4();
        let mut rx = l.mark(id);
        assert!(rx.try_recv().is_err());
        l.apply(
            ControlMessage::Mark {
                v: SCHEMA_VERSION,
                id,
            },
            Instant::now(),
        );
        assert!(rx.try_recv().is_ok());
    }
}
