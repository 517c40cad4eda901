//! Liveness of a process's long-running loops. Each consumer loop (and the API's outbox
//! relay) holds a [`Heartbeat`] and beats whenever it handled a delivery or, with
//! nothing to do, on an idle tick while its channel is usable. A loop that is gone
//! (its channel dead, its connection never recovering, its task ended) stops beating;
//! once one has been silent longer than the stall grace, `/healthz` answers 503 so a
//! liveness probe restarts the process. Idle is not stalled: an idle loop keeps ticking.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

/// How often a loop with nothing to do beats. Far below any sensible stall grace.
pub const IDLE_TICK: Duration = Duration::from_secs(1);

/// The heartbeats of one process. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: Instant,
    beats: Mutex<Vec<Registered>>,
}

struct Registered {
    name: String,
    /// Milliseconds since `epoch` of the last beat.
    last: Arc<AtomicU64>,
    retired: Arc<std::sync::atomic::AtomicBool>,
}

/// One loop's heartbeat. Dropping it does not unregister it: a loop whose task died
/// must show as stalled. A loop that ends on purpose calls [`Heartbeat::retire`].
pub struct Heartbeat {
    epoch: Instant,
    last: Arc<AtomicU64>,
    retired: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                beats: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl Health {
    /// Registers a loop, counted as having just beaten.
    pub fn heartbeat(&self, name: impl Into<String>) -> Heartbeat {
        let last = Arc::new(AtomicU64::new(millis_since(self.inner.epoch)));
        let retired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut beats = self
            .inner
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        beats.retain(|b| !b.retired.load(Ordering::Relaxed));
        beats.push(Registered {
            name: name.into(),
            last: last.clone(),
            retired: retired.clone(),
        });
        Heartbeat {
            epoch: self.inner.epoch,
            last,
            retired,
        }
    }

    /// The loops silent for longer than `grace`, with how long each has been silent.
    pub fn stalled(&self, grace: Duration) -> Vec<(String, Duration)> {
        let now = millis_since(self.inner.epoch);
        let beats = self
            .inner
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        beats
            .iter()
            .filter(|b| !b.retired.load(Ordering::Relaxed))
            .filter_map(|b| {
                let silent =
                    Duration::from_millis(now.saturating_sub(b.last.load(Ordering::Relaxed)));
                (silent > grace).then(|| (b.name.clone(), silent))
            })
            .collect()
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last.store(millis_since(self.epoch), Ordering::Relaxed);
    }

    /// The loop ended on purpose (shutdown): it no longer counts.
    pub fn retire(self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_loop_is_stalled_and_a_beating_or_retired_one_is_not() {
        let health = Health::default();
        let beating = health.heartbeat("beating");
        let silent = health.heartbeat("silent");
        let retired = health.heartbeat("retired");
        retired.retire();
        std::thread::sleep(Duration::from_millis(60));
        beating.beat();
        let stalled = health.stalled(Duration::from_millis(40));
        let names: Vec<&str> = stalled.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["silent"]);
        assert!(stalled[0].1 >= Duration::from_millis(60));
        silent.beat();
        assert!(health.stalled(Duration::from_millis(40)).is_empty());
    }

    #[test]
    fn a_dropped_heartbeat_still_counts() {
        let health = Health::default();
        drop(health.heartbeat("dead task"));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(health.stalled(Duration::from_millis(10)).len(), 1);
    }
}
