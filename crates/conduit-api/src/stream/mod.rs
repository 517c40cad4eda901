//! The real-time stream: Server-Sent Events for one task ([`sse`]) and a WebSocket for
//! every task of a key ([`ws`]), both fed by the [`StreamHub`] of this process.
//!
//! Live events reach every API process: the ledger's stream sequencer numbers each
//! committed event and puts it in the outbox for the `{ns}.stream` fanout, and each
//! process binds one exclusive, auto-delete queue to it and hands every event to the
//! connections of its key here. History comes from the ledger (`stream_events`), where
//! events are numbered densely after they commit, one numbering across every key, and
//! become visible in that order (see `ledger/stream.rs`). A connection registers with
//! the hub *before* it reads the stream's head position and history, so an event
//! numbered after that read is published after the registration and arrives live; an
//! event at or below the position already handled is a duplicate and is dropped; an
//! event above the next one expected means the ones between (already committed,
//! positions being dense) are read from the database first. Whenever this process's
//! queue is (re)bound, every connection reads what it may have missed meanwhile. Each
//! connection has a small bounded channel: a client too slow to keep up is
//! disconnected, never buffered without bound.

pub(crate) mod sse;
pub(crate) mod ws;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use conduit_core::{Broker, ConsumeLimits, Disposition, Source};
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::ledger::{LedgerError, Only, StreamEvent, TaskLedger};

/// Live events a connection may have waiting before it counts as too slow.
const CONNECTION_BUFFER: usize = 256;
/// History rows read per query.
const PAGE: i64 = 500;

/// The stream's metrics, registered beside the API's own.
#[derive(Clone)]
pub(crate) struct StreamMetrics {
    connections: IntGaugeVec,
    events_sent: IntCounterVec,
    slow_disconnects: IntCounterVec,
    received: IntCounter,
}

impl StreamMetrics {
    pub(crate) fn register(registry: &Registry) -> anyhow::Result<Self> {
        let connections = IntGaugeVec::new(
            Opts::new(
                "conduit_api_stream_connections",
                "Open stream connections of this process, by kind (sse, websocket)",
            ),
            &["kind"],
        )?;
        let events_sent = IntCounterVec::new(
            Opts::new(
                "conduit_api_stream_events_sent_total",
                "Events sent to stream clients, by kind and source (live, history)",
            ),
            &["kind", "source"],
        )?;
        let slow_disconnects = IntCounterVec::new(
            Opts::new(
                "conduit_api_stream_slow_disconnects_total",
                "Stream clients disconnected because they read too slowly, by kind",
            ),
            &["kind"],
        )?;
        let received = IntCounter::new(
            "conduit_api_stream_fanout_received_total",
            "Events this process took from its queue on the stream fanout",
        )?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(events_sent.clone()))?;
        registry.register(Box::new(slow_disconnects.clone()))?;
        registry.register(Box::new(received.clone()))?;
        // Every series exists from the start at 0, so dashboards and alerts see it
        // before the first stream client.
        for kind in ["sse", "websocket"] {
            connections.with_label_values(&[kind]);
            slow_disconnects.with_label_values(&[kind]);
            for source in ["live", "history"] {
                events_sent.with_label_values(&[kind, source]);
            }
        }
        Ok(Self {
            connections,
            events_sent,
            slow_disconnects,
            received,
        })
    }
}

struct Slot {
    id: u64,
    tx: mpsc::Sender<Arc<StreamEvent>>,
    slow: CancellationToken,
}

/// This process's live events, handed to the connections of each key.
pub(crate) struct StreamHub {
    keys: Mutex<HashMap<Uuid, Vec<Slot>>>,
    next_id: AtomicU64,
    /// Bumped each time this process's fanout queue is (re)bound.
    epoch: watch::Sender<u64>,
    pub(crate) metrics: StreamMetrics,
}

impl StreamHub {
    pub(crate) fn new(metrics: StreamMetrics) -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            epoch: watch::Sender::new(0),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<Slot>>> {
        // The map stays consistent even if a holder panicked.
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a connection for `key_id`'s events.
    pub(crate) fn subscribe(self: &Arc<Self>, key_id: Uuid) -> Subscription {
        let (tx, rx) = mpsc::channel(CONNECTION_BUFFER);
        let slow = CancellationToken::new();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut epoch = self.epoch.subscribe();
        epoch.mark_unchanged();
        self.lock().entry(key_id).or_default().push(Slot {
            id,
            tx,
            slow: slow.clone(),
        });
        Subscription {
            hub: self.clone(),
            key_id,
            id,
            rx,
            slow,
            epoch,
        }
    }

    /// Hands `event` to every connection of its key; a connection whose buffer is full
    /// is told it is too slow and gets nothing more.
    pub(crate) fn dispatch(&self, event: StreamEvent) {
        let event = Arc::new(event);
        let mut keys = self.lock();
        let Some(slots) = keys.get_mut(&event.api_key_id) else {
            return;
        };
        slots.retain(|slot| match slot.tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                slot.slow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if slots.is_empty() {
            keys.remove(&event.api_key_id);
        }
    }

    fn unsubscribe(&self, key_id: Uuid, id: u64) {
        let mut keys = self.lock();
        if let Some(slots) = keys.get_mut(&key_id) {
            slots.retain(|s| s.id != id);
            if slots.is_empty() {
                keys.remove(&key_id);
            }
        }
    }

    /// Consumes this process's queue on the stream fanout until `stop`.
    pub(crate) async fn run(self: Arc<Self>, broker: Broker, stop: CancellationToken) {
        let opened = Arc::new(Notify::new());
        let bumper = {
            let hub = self.clone();
            let opened = opened.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = opened.notified() => {
                            debug!("stream fanout queue bound; connections catch up");
                            hub.epoch.send_modify(|e| *e += 1);
                        }
                        () = stop.cancelled() => return,
                    }
                }
            })
        };
        let hub = self.clone();
        let limits = ConsumeLimits {
            prefetch: 1000,
            // One at a time keeps the order the broker delivered in.
            concurrency: 1,
        };
        let consumed = broker
            .consume_signalling(
                Source::EventFanout,
                limits,
                stop,
                Some(opened),
                move |incoming, _| {
                    let hub = hub.clone();
                    async move {
                        hub.metrics.received.inc();
                        match serde_json::from_slice::<StreamEvent>(&incoming.body) {
                            Ok(event) => hub.dispatch(event),
                            Err(err) => warn!(error = %err, "unreadable stream event; skipped"),
                        }
                        Disposition::Ack
                    }
                },
            )
            .await;
        if let Err(err) = consumed {
            warn!(error = %format!("{err:#}"), "stream fanout consumer stopped");
        }
        bumper.abort();
    }
}

/// One connection's registration with the hub; dropping it unregisters.
pub(crate) struct Subscription {
    hub: Arc<StreamHub>,
    key_id: Uuid,
    id: u64,
    rx: mpsc::Receiver<Arc<StreamEvent>>,
    /// Cancelled when the hub found this connection's buffer full.
    slow: CancellationToken,
    epoch: watch::Receiver<u64>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.key_id, self.id);
    }
}

/// Which of the key's tasks a connection follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Follow {
    All,
    Tasks(Vec<Uuid>),
}

impl Follow {
    fn wants(&self, task_id: Uuid) -> bool {
        match self {
            Follow::All => true,
            Follow::Tasks(tasks) => tasks.contains(&task_id),
        }
    }

    fn only(&self) -> Only<'_> {
        match self {
            Follow::All => Only::All,
            Follow::Tasks(tasks) => Only::Tasks(tasks),
        }
    }
}

/// What a connection waits for next.
pub(crate) enum Wake {
    /// Events to send, in order (history that filled a gap, then the live one).
    Events(Vec<Arc<StreamEvent>>),
    /// The hub found the buffer full: the client reads too slowly.
    Slow,
    /// This process's fanout queue was rebound: read what may have been missed.
    CatchUp,
}

/// The ordering, de-duplication and gap-filling state of one connection.
pub(crate) struct Follower {
    ledger: Arc<TaskLedger>,
    sub: Subscription,
    pub(crate) key_id: Uuid,
    pub(crate) follow: Follow,
    /// The stream position handled last (sent, not followed, or another key's).
    pub(crate) cursor: i64,
    /// A live event taken from the channel whose ordering was interrupted (the caller's
    /// `select!` dropped [`Follower::next`] while it read history): handled first next
    /// time, so nothing taken is lost.
    pending: Option<Arc<StreamEvent>>,
}

impl Follower {
    /// Registers with `hub` for `key_id` at once; call [`Follower::catch_up`] next.
    pub(crate) fn new(
        hub: &Arc<StreamHub>,
        ledger: Arc<TaskLedger>,
        key_id: Uuid,
        follow: Follow,
        cursor: i64,
    ) -> Self {
        Self {
            ledger,
            sub: hub.subscribe(key_id),
            key_id,
            follow,
            cursor,
            pending: None,
        }
    }

    /// Cancelled once the hub finds this connection too slow for its live events.
    pub(crate) fn slow(&self) -> CancellationToken {
        self.sub.slow.clone()
    }

    pub(crate) fn ledger(&self) -> &TaskLedger {
        &self.ledger
    }

    /// The stream's head position right now: events above it are still to come live.
    pub(crate) async fn head(&self) -> Result<i64, LedgerError> {
        self.ledger.stream_head().await
    }

    /// The next page of followed history up to the head, advancing the cursor; empty
    /// once caught up. A connection found slow meanwhile registers again first (it
    /// reads the database, so nothing it missed is lost).
    pub(crate) async fn history_page(
        &mut self,
        upto: i64,
    ) -> Result<Vec<Arc<StreamEvent>>, LedgerError> {
        if self.cursor >= upto {
            return Ok(Vec::new());
        }
        let page = self
            .ledger
            .stream_page(self.key_id, self.cursor, upto, self.follow.only(), PAGE)
            .await?;
        self.cursor = if (page.len() as i64) < PAGE {
            upto
        } else {
            page.last().map_or(upto, |e| e.position)
        };
        Ok(page.into_iter().map(Arc::new).collect())
    }

    /// Registers again after the hub dropped this connection for being slow while it
    /// was reading history. Returns false when it was not slow.
    pub(crate) fn renew_if_slow(&mut self) -> bool {
        if !self.sub.slow.is_cancelled() {
            return false;
        }
        let hub = self.sub.hub.clone();
        self.sub = hub.subscribe(self.key_id);
        true
    }

    /// Waits for the next thing to do. Safe to drop at any await point.
    pub(crate) async fn next(&mut self) -> Result<Wake, LedgerError> {
        loop {
            if let Some(event) = self.pending.clone() {
                let taken = self.take(event).await?;
                self.pending = None;
                if let Some(events) = taken {
                    return Ok(Wake::Events(events));
                }
                continue;
            }
            let event = tokio::select! {
                biased;
                () = self.sub.slow.cancelled() => return Ok(Wake::Slow),
                changed = self.sub.epoch.changed() => {
                    if changed.is_err() {
                        // The hub is gone (shutting down): nothing more will come.
                        std::future::pending::<()>().await;
                    }
                    return Ok(Wake::CatchUp);
                }
                event = self.sub.rx.recv() => match event {
                    Some(event) => event,
                    None => return Ok(Wake::Slow),
                },
            };
            self.pending = Some(event);
        }
    }

    /// Orders one live event: `None` when there is nothing to send for it. The cursor
    /// moves only at the end, so an interrupted call can simply be made again.
    async fn take(
        &mut self,
        event: Arc<StreamEvent>,
    ) -> Result<Option<Vec<Arc<StreamEvent>>>, LedgerError> {
        if event.position <= self.cursor {
            return Ok(None);
        }
        let mut out = Vec::new();
        // Positions are dense and become visible in order: the ones between are
        // committed (those of other keys, or of tasks not followed, are simply not read).
        let upto = event.position - 1;
        let mut at = self.cursor;
        while at < upto {
            let page = self
                .ledger
                .stream_page(self.key_id, at, upto, self.follow.only(), PAGE)
                .await?;
            at = if (page.len() as i64) < PAGE {
                upto
            } else {
                page.last().map_or(upto, |e| e.position)
            };
            out.extend(page.into_iter().map(Arc::new));
        }
        self.cursor = event.position;
        if self.follow.wants(event.task_id) {
            out.push(event);
        }
        Ok((!out.is_empty()).then_some(out))
    }
}
