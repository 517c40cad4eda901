//! Batch delivery (`webhook_batch`): events of one API key for the same URL, headers and
//! batch settings go out together, one POST of
//! `{"webhook_type":"batch","timestamp":...,"events":[{"webhook_id","payload"}...]}`.
//!
//! # Forming a batch without holding state that can be lost
//!
//! An event's delivery is acknowledged only once the outcome of the batch that carried it
//! is durable, so a batch being formed lives in unacknowledged deliveries: a crash hands
//! them back to the queue and they are batched again (under a new batch `webhook-id`;
//! the events keep theirs). The first event of a group makes its handler the batch's
//! leader: it waits until the batch is full (`max_events`, or the 1 MiB body budget) or
//! `max_wait_ms` passed, takes the events that joined, sends them, and answers every
//! handler with the same disposition. A batch can hold no more events than the consumer
//! has deliveries in flight (its prefetch and concurrency).
//!
//! Batches of one group are sent one after the other (a per-group send lock), so a
//! task's events reach the receiver in order within one sender process. Several sender
//! replicas each form their own batches from the events the broker hands them.
//!
//! # Retries
//!
//! A failed batch is retried on its own schedule, the longest (largest total delay)
//! among its events' schedules, as a [`WebhookBatch`] message in the wait queues. Like a
//! single progress webhook, a progress event is attempted once: a retried batch carries
//! only the terminal events, under the same batch `webhook-id`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use conduit_core::{
    messages::{
        AttemptOutcome, BatchSettings, BatchedEvent, DeliveryState, PreviousSecret, WebhookBatch,
        WebhookDelivery, SCHEMA_VERSION,
    },
    payload::WebhookEvent,
    time::{format_millis, now_millis},
    topology::{route, wait_bucket_for, Topology},
    Disposition, Outgoing,
};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use uuid::Uuid;

use super::{
    busy_park, classify, signing_keys, truncate, Attempt, Deliverer, Response, MAX_BODY_BYTES,
    SLOT_PATIENCE, SLOT_STALL,
};
use crate::{
    metrics::outcome,
    retry::{random_fraction, NextAttempt, RetryLadder},
};

/// Room in a body for everything but the events: `{"webhook_type":"batch",
/// "timestamp":"...","events":[]}` with margin.
const ENVELOPE_BYTES: usize = 128;
/// The events of one batch together take at most this many bytes of its body.
pub(crate) const EVENTS_BUDGET: usize = MAX_BODY_BYTES - ENVELOPE_BYTES;

/// What makes events share batches: one key (its secrets), one target, one setting.
#[derive(Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    url: String,
    headers: BTreeMap<String, String>,
    secret: String,
    previous: Option<PreviousSecret>,
    settings: BatchSettings,
}

impl GroupKey {
    fn of(d: &WebhookDelivery, settings: BatchSettings) -> Self {
        Self {
            url: d.url.clone(),
            headers: d.headers.clone(),
            secret: d.secret.clone(),
            previous: d.previous_secret.clone(),
            settings,
        }
    }
}

/// An event waiting in a forming batch, and how to answer its handler.
struct Held {
    delivery: WebhookDelivery,
    done: oneshot::Sender<Disposition>,
}

/// A batch being formed.
#[derive(Default)]
struct Forming {
    state: Mutex<FormingState>,
    /// Wakes the leader early: the batch is full.
    full: Notify,
}

#[derive(Default)]
struct FormingState {
    held: Vec<Held>,
    bytes: usize,
    /// Taken by its leader or full: joins go to a new batch.
    closed: bool,
}

#[derive(Default)]
struct Group {
    forming: Option<Arc<Forming>>,
    /// Held while one of the group's batches is being sent.
    sending: Arc<tokio::sync::Mutex<()>>,
}

/// The groups of this process with a batch forming or being sent.
#[derive(Default)]
pub(super) struct Batcher {
    groups: Mutex<HashMap<GroupKey, Group>>,
}

/// The bytes one event adds to a batch body: `{"webhook_id":"...","payload":...},`.
fn entry_bytes(d: &WebhookDelivery) -> usize {
    r#"{"webhook_id":"","payload":},"#.len() + d.webhook_id.len() + d.body.len()
}

/// The batch body as sent at `now`: each payload exactly as its single webhook's body
/// at that moment (a `video_url` in it freshly signed).
pub(crate) fn batch_body(
    formed_at: &chrono::DateTime<Utc>,
    events: &[BatchedEvent],
    now: chrono::DateTime<Utc>,
) -> String {
    let mut body = String::with_capacity(
        ENVELOPE_BYTES
            + events
                .iter()
                .map(|e| e.body.len() + e.webhook_id.len() + 32)
                .sum::<usize>(),
    );
    body.push_str(r#"{"webhook_type":"batch","timestamp":""#);
    body.push_str(&format_millis(formed_at));
    body.push_str(r#"","events":["#);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r#"{"webhook_id":"#);
        body.push_str(&serde_json::Value::String(e.webhook_id.clone()).to_string());
        body.push_str(r#","payload":"#);
        body.push_str(&e.payload_at(now));
        body.push('}');
    }
    body.push_str("]}");
    body
}

/// A fresh batch `webhook-id`.
fn new_batch_id() -> String {
    format!("msg_{}", Uuid::now_v7().simple())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Undoes a leadership cut short (the handler's future dropped before it took its
/// batch): the batch is closed and its events' handlers told to hand them back.
struct Leadership<'a> {
    batcher: &'a Batcher,
    key: GroupKey,
    forming: Arc<Forming>,
    armed: bool,
}

impl Leadership<'_> {
    /// Closes the batch and takes its events.
    fn take(&mut self) -> Vec<Held> {
        self.armed = false;
        {
            let mut groups = lock(&self.batcher.groups);
            if let Some(group) = groups.get_mut(&self.key) {
                if group
                    .forming
                    .as_ref()
                    .is_some_and(|f| Arc::ptr_eq(f, &self.forming))
                {
                    group.forming = None;
                }
            }
        }
        let mut state = lock(&self.forming.state);
        state.closed = true;
        std::mem::take(&mut state.held)
    }
}

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Dropping the events' answer channels makes their handlers requeue them.
            drop(self.take());
        }
    }
}

impl Batcher {
    /// Adds `d` to its group's forming batch (or starts one and leads it) and answers
    /// once the batch's outcome is durable.
    pub(super) async fn add(
        &self,
        deliverer: &Deliverer,
        d: WebhookDelivery,
        settings: BatchSettings,
        shutdown: CancellationToken,
    ) -> Disposition {
        let key = GroupKey::of(&d, settings);
        let max_events = usize::try_from(settings.max_events.max(1)).unwrap_or(usize::MAX);
        let bytes = entry_bytes(&d);
        let (done, answer) = oneshot::channel();
        let mut held = Some(Held { delivery: d, done });
        let lead = {
            let mut groups = lock(&self.groups);
            let group = groups.entry(key.clone()).or_default();
            if let Some(forming) = &group.forming {
                let mut state = lock(&forming.state);
                let fits = state.bytes + bytes <= EVENTS_BUDGET;
                if !state.closed && state.held.len() < max_events && fits {
                    state.held.extend(held.take());
                    state.bytes += bytes;
                }
                if held.is_some() || state.held.len() >= max_events {
                    state.closed = true;
                    forming.full.notify_one();
                }
            }
            if group
                .forming
                .as_ref()
                .is_some_and(|f| lock(&f.state).closed)
            {
                group.forming = None;
            }
            held.map(|held| {
                let forming = Arc::new(Forming::default());
                {
                    let mut state = lock(&forming.state);
                    state.held.push(held);
                    state.bytes = bytes;
                    state.closed = max_events <= 1;
                }
                if max_events > 1 {
                    group.forming = Some(forming.clone());
                }
                (forming, group.sending.clone())
            })
        };
        if let Some((forming, sending)) = lead {
            self.lead(deliverer, key, forming, sending, settings, &shutdown)
                .await;
        }
        answer.await.unwrap_or(Disposition::Requeue)
    }

    /// Waits for the batch to fill or its time to pass, sends it after the group's
    /// earlier batches, and answers every handler.
    async fn lead(
        &self,
        deliverer: &Deliverer,
        key: GroupKey,
        forming: Arc<Forming>,
        sending: Arc<tokio::sync::Mutex<()>>,
        settings: BatchSettings,
        shutdown: &CancellationToken,
    ) {
        let mut leadership = Leadership {
            batcher: self,
            key: key.clone(),
            forming: forming.clone(),
            armed: true,
        };
        let full = lock(&forming.state).closed;
        if !full {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(settings.max_wait_ms)) => {}
                () = forming.full.notified() => {}
                () = shutdown.cancelled() => {}
            }
        }
        let held = leadership.take();
        let send_turn = sending.lock().await;
        let disposition = if shutdown.is_cancelled() {
            Disposition::Requeue
        } else {
            let events: Vec<WebhookDelivery> = held.iter().map(|h| h.delivery.clone()).collect();
            let span = tracing::info_span!("webhook_batch", events = events.len());
            deliverer
                .deliver_formed(events, shutdown)
                .instrument(span)
                .await
        };
        for h in held {
            let _ = h.done.send(disposition);
        }
        drop(send_turn);
        drop(sending);
        let mut groups = lock(&self.groups);
        if let Some(group) = groups.get(&key) {
            if group.forming.is_none() && Arc::strong_count(&group.sending) == 1 {
                groups.remove(&key);
            }
        }
    }
}

impl Deliverer {
    /// Handles a batch back from the wait queues for its next attempt.
    pub(super) async fn handle_batch(
        &self,
        b: WebhookBatch,
        shutdown: CancellationToken,
    ) -> Disposition {
        let span = tracing::info_span!(
            "webhook_batch",
            batch_id = %b.batch_id,
            events = b.events.len(),
            attempt = b.attempts_made + 1,
        );
        self.attempt_batch(b, Vec::new(), &shutdown)
            .instrument(span)
            .await
    }

    /// Sends a freshly formed batch: superseded progress events are left out, the rest go
    /// out in one POST (an event too large for any batch fails on its own).
    async fn deliver_formed(
        &self,
        mut events: Vec<WebhookDelivery>,
        shutdown: &CancellationToken,
    ) -> Disposition {
        // A task's events in the order they happened; the sort is stable.
        events.sort_by_key(|d| d.occurred_at);
        let mut last_of_task: HashMap<Uuid, usize> = HashMap::new();
        for (i, d) in events.iter().enumerate() {
            last_of_task.insert(d.task_id, i);
        }
        let mut settled = Vec::new();
        let mut keep = Vec::with_capacity(events.len());
        for (i, d) in events.iter().enumerate() {
            let later_in_batch = last_of_task.get(&d.task_id).is_some_and(|last| *last > i);
            if d.event == WebhookEvent::Progress
                && (later_in_batch || self.finished.supersedes(d.task_id, d.occurred_at))
            {
                self.metrics.superseded.inc();
                let why = "not sent: superseded by a later event of its task";
                settled.extend(self.outcome_message(&self.outcome(
                    d,
                    now_millis(),
                    Duration::ZERO,
                    None,
                    Some(why.into()),
                    DeliveryState::Dropped,
                    None,
                )));
                continue;
            }
            if entry_bytes(d) > EVENTS_BUDGET {
                let error = format!(
                    "payload of {} bytes does not fit a 1 MiB batch; not sent",
                    d.body.len()
                );
                let made = d.attempts_made.saturating_add(1);
                let failed = self.outcome(
                    d,
                    now_millis(),
                    Duration::ZERO,
                    None,
                    Some(error),
                    DeliveryState::Failed,
                    None,
                );
                settled.extend(self.outcome_message(&failed));
                if d.event.is_terminal() {
                    settled.extend(self.dead(d, made));
                }
                continue;
            }
            keep.push(d);
        }
        let Some(first) = keep.first() else {
            return self.publish_all(&settled).await;
        };
        let retry = keep
            .iter()
            .map(|d| self.ladder_for(d.retry.as_ref()).schedule().clone())
            .max_by_key(conduit_core::config::RetrySchedule::total)
            .unwrap_or_else(|| self.ladder.schedule().clone());
        let formed_at = now_millis();
        let first_delay = retry.delay_before(1).unwrap_or_default();
        let batch = WebhookBatch {
            v: SCHEMA_VERSION,
            batch_id: new_batch_id(),
            url: first.url.clone(),
            headers: first.headers.clone(),
            secret: first.secret.clone(),
            previous_secret: first.previous_secret.clone(),
            retry,
            formed_at,
            events: keep
                .iter()
                .map(|d| BatchedEvent {
                    webhook_id: d.webhook_id.clone(),
                    task_id: d.task_id,
                    event: d.event,
                    body: d.body.clone(),
                    occurred_at: d.occurred_at,
                    video_link: d.video_link.clone(),
                })
                .collect(),
            attempts_made: 0,
            not_before: (!first_delay.is_zero())
                .then(|| chrono::Duration::from_std(first_delay).ok())
                .flatten()
                .map(|delay| formed_at + delay),
        };
        debug!(batch_id = %batch.batch_id, events = batch.events.len(), "batch formed");
        self.attempt_batch(batch, settled, shutdown).await
    }

    /// One attempt of batch `b` (or its park until due); `settled` are messages about
    /// events already decided, published with the attempt's own.
    async fn attempt_batch(
        &self,
        b: WebhookBatch,
        settled: Vec<Outgoing>,
        shutdown: &CancellationToken,
    ) -> Disposition {
        if let Some(not_before) = b.not_before {
            let remaining = (not_before - Utc::now()).to_std().unwrap_or_default();
            if let Some(bucket) = wait_bucket_for(remaining) {
                return self.park_batch(&b, bucket, "scheduled", settled).await;
            }
            if !remaining.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(remaining) => {}
                    () = shutdown.cancelled() => return Disposition::Requeue,
                }
            }
        }
        // Links in the events that would not last the URL lifetime from this attempt
        // on are signed afresh.
        let body = batch_body(&b.formed_at, &b.events, now_millis());
        let prepared = if body.len() > MAX_BODY_BYTES {
            Err(Response::Unsendable {
                error: format!(
                    "batch of {} bytes is larger than 1 MiB; not sent",
                    body.len()
                ),
            })
        } else {
            signing_keys(&b.secret, b.previous_secret.as_ref())
                .and_then(|keys| Ok((self.checked_url(&b.url)?, keys)))
        };
        let attempt = match prepared {
            Err(response) => Attempt {
                attempted_at: now_millis(),
                duration: Duration::ZERO,
                response,
            },
            Ok((url, keys)) => {
                let host = super::host_key(&url);
                let host_slot = match self.hosts.acquire(host, SLOT_STALL, SLOT_PATIENCE).await {
                    Ok(slot) => slot,
                    Err(busy) => {
                        return self
                            .park_batch(&b, busy_park(busy), "host_busy", settled)
                            .await
                    }
                };
                let attempt = self
                    .post(url, &b.headers, &b.batch_id, &keys, &body, shutdown)
                    .await;
                match &attempt {
                    Some(Attempt {
                        response: Response::Failed { .. },
                        ..
                    })
                    | None => host_slot.release_stuck(),
                    Some(_) => drop(host_slot),
                }
                match attempt {
                    Some(a) => a,
                    None => return Disposition::Requeue,
                }
            }
        };
        let mut messages = settled;
        messages.extend(self.decide_batch(&b, &attempt));
        self.publish_all(&messages).await
    }

    /// The outcome of every event of the batch after `a`, and the batch's next attempt
    /// or dead letter.
    fn decide_batch(&self, b: &WebhookBatch, a: &Attempt) -> Vec<Outgoing> {
        let (status, error, retry_after, label) = classify(&a.response);
        self.metrics.attempts.with_label_values(&[label]).inc();
        let made = b.attempts_made.saturating_add(1);
        let mut messages = Vec::with_capacity(b.events.len() + 1);
        let mut record = |e: &BatchedEvent, state: DeliveryState, next_at| {
            let o = AttemptOutcome {
                v: SCHEMA_VERSION,
                webhook_id: e.webhook_id.clone(),
                task_id: e.task_id,
                event: e.event,
                attempt: made,
                attempted_at: a.attempted_at,
                duration_ms: u64::try_from(a.duration.as_millis()).unwrap_or(u64::MAX),
                status_code: status,
                error: error.clone().map(|e| truncate(e, 1_000)),
                state,
                next_attempt_at: next_at,
            };
            messages.extend(self.outcome_message(&o));
        };
        match label {
            outcome::DELIVERED | outcome::DROPPED => {
                let delivered = label == outcome::DELIVERED;
                let state = if delivered {
                    DeliveryState::Delivered
                } else {
                    DeliveryState::Dropped
                };
                for e in &b.events {
                    if delivered {
                        let latency = (Utc::now() - e.occurred_at).to_std().unwrap_or_default();
                        self.metrics
                            .event_to_delivery
                            .with_label_values(&[e.event.as_str()])
                            .observe(latency.as_secs_f64());
                    }
                    if e.event.is_terminal() {
                        self.finished.remember(e.task_id, e.occurred_at);
                    }
                    record(e, state, None);
                }
                debug!(status, state = state.as_str(), "batch attempt finished");
                return messages;
            }
            _ => {}
        }
        let terminal: Vec<BatchedEvent> = b
            .events
            .iter()
            .filter(|e| e.event.is_terminal())
            .cloned()
            .collect();
        for e in b.events.iter().filter(|e| !e.event.is_terminal()) {
            record(e, DeliveryState::Failed, None);
        }
        if terminal.is_empty() {
            info!(
                status,
                error, "batch attempt failed; it held only progress events"
            );
            return messages;
        }
        let mut next = b.clone();
        next.events = terminal;
        next.attempts_made = made;
        let unsendable = matches!(a.response, Response::Unsendable { .. });
        let step = if unsendable {
            NextAttempt::Exhausted
        } else {
            RetryLadder::new(b.retry.clone()).next(made, random_fraction(), retry_after)
        };
        match step {
            NextAttempt::After(delay) => {
                let due = now_millis()
                    + chrono::Duration::from_std(delay)
                        .unwrap_or_else(|_| chrono::TimeDelta::zero());
                next.not_before = Some(due);
                for e in &next.events {
                    record(e, DeliveryState::Pending, Some(due));
                }
                info!(status, error, "batch attempt failed; retrying later");
                let route = match wait_bucket_for(delay) {
                    Some(bucket) => Topology::wait_route(bucket),
                    None => route::WEBHOOKS.to_owned(),
                };
                messages.extend(batch_message(&route, &next));
            }
            NextAttempt::Exhausted => {
                for e in &next.events {
                    record(e, DeliveryState::Failed, None);
                }
                self.metrics.dead_lettered.inc();
                warn!(
                    attempts = made,
                    "batch schedule exhausted; moved to the dead-letter queue"
                );
                next.not_before = None;
                messages.extend(batch_message(route::DEAD_WEBHOOKS, &next));
            }
        }
        messages
    }

    /// Parks batch `b` unchanged in the wait queue of `bucket`.
    async fn park_batch(
        &self,
        b: &WebhookBatch,
        bucket: Duration,
        reason: &str,
        mut settled: Vec<Outgoing>,
    ) -> Disposition {
        self.metrics.parked.with_label_values(&[reason]).inc();
        let Some(message) = batch_message(&Topology::wait_route(bucket), b) else {
            return Disposition::Requeue;
        };
        settled.push(message);
        self.publish_all(&settled).await
    }

    fn outcome_message(&self, o: &AttemptOutcome) -> Option<Outgoing> {
        match Outgoing::json(route::OUTCOMES, o) {
            Ok(m) => Some(
                m.for_task(o.task_id)
                    .with_message_id(format!("{}.{}", o.webhook_id, o.attempt)),
            ),
            Err(err) => {
                warn!(error = %format!("{err:#}"), "cannot serialise an attempt outcome");
                None
            }
        }
    }
}

fn batch_message(route: &str, b: &WebhookBatch) -> Option<Outgoing> {
    match Outgoing::json(route, b) {
        Ok(m) => Some(m.with_message_id(b.batch_id.clone())),
        Err(err) => {
            warn!(error = %format!("{err:#}"), "cannot serialise a webhook batch");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_embeds_each_payload_verbatim() {
        let at = now_millis();
        let events = vec![
            BatchedEvent {
                webhook_id: "msg_a".into(),
                task_id: Uuid::nil(),
                event: WebhookEvent::Progress,
                body: r#"{"b": 1,"a":2}"#.into(),
                occurred_at: at,
                video_link: None,
            },
            BatchedEvent {
                webhook_id: "msg_\"b".into(),
                task_id: Uuid::nil(),
                event: WebhookEvent::Completed,
                body: r#"{"x":"y"}"#.into(),
                occurred_at: at,
                video_link: None,
            },
        ];
        let body = batch_body(&at, &events, at);
        assert!(body.contains(r#"{"webhook_id":"msg_a","payload":{"b": 1,"a":2}}"#));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["webhook_type"], "batch");
        assert_eq!(v["timestamp"], format_millis(&at));
        assert_eq!(v["events"][1]["webhook_id"], "msg_\"b");
        assert_eq!(v["events"][1]["payload"]["x"], "y");
        assert!(
            body.len() <= ENVELOPE_BYTES + events.iter().map(|e| e.body.len() + 40).sum::<usize>()
        );
    }

    #[test]
    fn a_stale_video_link_is_signed_afresh_in_a_batch() {
        let task = Uuid::new_v4();
        let base = format!("http://api/v1/videos/files/{task}");
        let key = conduit_core::video_links::task_link_key(b"signing key", task);
        let stale = conduit_core::video_links::link(&base, &key, task, 100);
        let event = BatchedEvent {
            webhook_id: "msg_c".into(),
            task_id: task,
            event: WebhookEvent::Completed,
            body: serde_json::json!({ "video_url": stale }).to_string(),
            occurred_at: now_millis(),
            video_link: Some(conduit_core::messages::VideoLinkSigner::new(
                b"signing key",
                task,
                base.clone(),
                stale.clone(),
                60,
            )),
        };
        let at = chrono::DateTime::from_timestamp(1_000, 0).unwrap();
        let body = batch_body(&at, &[event], at);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["events"][0]["payload"]["video_url"],
            conduit_core::video_links::link(&base, &key, task, 1_061)
        );
    }
}
