//! One delivery attempt, start to finish: wait until due (in the broker's wait queues),
//! take the task's and the host's slots, sign, POST, read at most 64 KiB of the answer,
//! decide the outcome, and make the follow-up durable (outcome for the delivery log,
//! next attempt in a wait queue, or the dead-letter queue) before the message is acked.
//!
//! # Ordering of a task's webhooks
//!
//! The API's ledger hands the sender at most one webhook per task at a time: it releases
//! a task's next webhook only when this one's final outcome (delivered, failed, dropped)
//! is recorded. So a task's webhooks reach the receiver in event order whatever the
//! number of sender replicas, and nothing here depends on it. Within one process a
//! terminal delivery is also remembered ([`FinishedTasks`]) so a progress webhook that
//! still turns up later (a redelivery after a crash) is dropped instead of sent.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use chrono::{DateTime, Utc};
use conduit_core::{
    config::RetrySchedule,
    messages::{
        AttemptOutcome, DeliveryState, PreviousSecret, WebhookBatch, WebhookDelivery,
        SCHEMA_VERSION,
    },
    payload::WebhookEvent,
    time::now_millis,
    topology::{route, wait_bucket_for, Topology, WAIT_BUCKETS},
    Broker, Disposition, Incoming, Outgoing, Settings, Target,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use url::Url;
use uuid::Uuid;

use crate::{
    guard::{refusal_in, Refusal, TargetGuard},
    limits::{Busy, KeyedLimiter},
    metrics::{outcome, Metrics},
    retry::{honours_retry_after, parse_retry_after, random_fraction, NextAttempt, RetryLadder},
    signing::{signature_header, SigningKey},
};

#[path = "batch.rs"]
mod batch;

/// Largest body sent; a larger one fails without a request.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most of a receiver's answer read before the connection is dropped.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The `User-Agent` of every webhook request.
pub const USER_AGENT_VALUE: &str = "Conduit-LLM/1.0";
/// A delivery waits in-process for its task's or host's slot while those slots turn over
/// (a busy receiver), but once they stand still this long (a hanging one) it is parked in
/// a wait queue instead, so a hanging host never holds the process's global slots.
const SLOT_STALL: Duration = Duration::from_millis(100);
/// Longest in-process wait for a slot, however busy the host.
const SLOT_PATIENCE: Duration = Duration::from_secs(2);
/// Shortest and longest park of a delivery whose host or task is busy. In between, the
/// park is the shortest wait bucket at least as long as the slots have been stuck, so
/// deliveries behind a receiver that hangs for its whole timeout come back once or
/// twice, not every few seconds: each return costs the broker a consume, a publish and
/// an ack, and with hundreds of deliveries a second parked behind one hanging host that
/// traffic would crowd out every healthy host's deliveries.
const BUSY_PARK_MIN: Duration = WAIT_BUCKETS[1];
const BUSY_PARK_MAX: Duration = Duration::from_secs(30);
/// How long an attempt in flight may finish once shutdown began before it is handed
/// back to the queue (the consumer's drain grace is longer).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Terminal deliveries remembered for dropping late progress webhooks.
const FINISHED_CAPACITY: usize = 100_000;
const FINISHED_TTL: Duration = Duration::from_secs(3_600);

/// The sender's delivery logic, shared by every concurrent handler.
pub struct Deliverer {
    broker: Broker,
    http: reqwest::Client,
    guard: TargetGuard,
    /// The operator's schedule, for events whose task brought none of its own.
    ladder: RetryLadder,
    batches: batch::Batcher,
    hosts: KeyedLimiter<String>,
    tasks: KeyedLimiter<Uuid>,
    finished: FinishedTasks,
    metrics: Metrics,
}

/// What one attempt came to.
#[derive(Debug)]
enum Response {
    /// The receiver answered with a status.
    Answered {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: a transport error, a timeout, or the guard refused the address dialled.
    Failed { error: String, refused: bool },
    /// Nothing was sent and nothing ever will be (body too large, unusable secret).
    Unsendable { error: String },
}

struct Attempt {
    attempted_at: DateTime<Utc>,
    duration: Duration,
    response: Response,
}

impl Deliverer {
    pub fn new(settings: &Settings, broker: Broker, metrics: Metrics) -> anyhow::Result<Self> {
        let guard = TargetGuard::new(settings.webhooks.allow_private_targets);
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would be the address dialled, and the guard would judge it instead
            // of the receiver.
            .no_proxy()
            .connect_timeout(Duration::from_secs(
                settings.webhooks.connect_timeout_seconds,
            ))
            .timeout(settings.webhook_timeout())
            .pool_max_idle_per_host(settings.webhooks.per_host_concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        if let Some(resolver) = guard.resolver() {
            builder = builder.dns_resolver(resolver);
        }
        let http = builder.build()?;
        Ok(Self {
            broker,
            http,
            guard,
            ladder: RetryLadder::new(settings.webhooks.retry_schedule.clone()),
            batches: batch::Batcher::default(),
            hosts: KeyedLimiter::new(settings.webhooks.per_host_concurrency),
            tasks: KeyedLimiter::new(1),
            finished: FinishedTasks::default(),
            metrics,
        })
    }

    /// Handles one message of the webhooks queue.
    pub async fn handle(&self, incoming: Incoming, shutdown: CancellationToken) -> Disposition {
        let delivery = match serde_json::from_slice::<WebhookDelivery>(&incoming.body) {
            Ok(d) if d.v <= SCHEMA_VERSION => d,
            Ok(d) => {
                return self
                    .dead_letter_raw(incoming.body, &format!("unknown schema version {}", d.v))
                    .await
            }
            Err(err) => {
                // Not an event: a batch waiting for its next attempt, or garbage.
                return match serde_json::from_slice::<WebhookBatch>(&incoming.body) {
                    Ok(b) if b.v <= SCHEMA_VERSION => self.handle_batch(b, shutdown).await,
                    _ => self.dead_letter_raw(incoming.body, &err.to_string()).await,
                };
            }
        };
        if let Some(settings) = delivery.batch {
            let span = tracing::info_span!(
                "webhook_batched",
                task_id = %delivery.task_id,
                webhook_id = %delivery.webhook_id,
                event = delivery.event.as_str(),
            );
            return self
                .batches
                .add(self, delivery, settings, shutdown)
                .instrument(span)
                .await;
        }
        let span = tracing::info_span!(
            "webhook",
            task_id = %delivery.task_id,
            webhook_id = %delivery.webhook_id,
            event = delivery.event.as_str(),
            attempt = delivery.attempts_made + 1,
        );
        self.process(delivery, shutdown).instrument(span).await
    }

    async fn process(&self, d: WebhookDelivery, shutdown: CancellationToken) -> Disposition {
        if let Some(not_before) = self.due_at(&d) {
            let remaining = (not_before - Utc::now()).to_std().unwrap_or_default();
            if let Some(bucket) = wait_bucket_for(remaining) {
                return self.park(&d, bucket, "scheduled").await;
            }
            if !remaining.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(remaining) => {}
                    () = shutdown.cancelled() => return Disposition::Requeue,
                }
            }
        }

        let task_slot = match self
            .tasks
            .acquire(d.task_id, SLOT_STALL, SLOT_PATIENCE)
            .await
        {
            Ok(slot) => slot,
            Err(busy) => return self.park(&d, busy_park(busy), "task_busy").await,
        };
        if d.event == WebhookEvent::Progress && self.finished.supersedes(d.task_id, d.occurred_at) {
            self.metrics.superseded.inc();
            debug!("progress webhook dropped: the task's terminal webhook was delivered");
            let outcome = self.outcome(
                &d,
                now_millis(),
                Duration::ZERO,
                None,
                Some("not sent: the task's terminal webhook was already delivered".into()),
                DeliveryState::Dropped,
                None,
            );
            drop(task_slot);
            return self.commit(&d, outcome, None).await;
        }

        let attempt = match self.prepare(&d) {
            Err(response) => Attempt {
                attempted_at: now_millis(),
                duration: Duration::ZERO,
                response,
            },
            Ok((url, keys)) => {
                let host_slot = match self
                    .hosts
                    .acquire(host_key(&url), SLOT_STALL, SLOT_PATIENCE)
                    .await
                {
                    Ok(slot) => slot,
                    Err(busy) => {
                        drop(task_slot);
                        return self.park(&d, busy_park(busy), "host_busy").await;
                    }
                };
                let attempt = self.send(&d, url, &keys, &shutdown).await;
                match &attempt {
                    // No answer: the host is no less stuck than before this request.
                    Some(Attempt {
                        response: Response::Failed { .. },
                        ..
                    })
                    | None => host_slot.release_stuck(),
                    Some(_) => drop(host_slot),
                }
                match attempt {
                    Some(a) => a,
                    // Shutdown interrupted the request: another process tries again.
                    None => return Disposition::Requeue,
                }
            }
        };
        let (outcome, follow_up) = self.decide(&d, &attempt);
        if d.event.is_terminal()
            && matches!(
                outcome.state,
                DeliveryState::Delivered | DeliveryState::Dropped
            )
        {
            self.finished.remember(d.task_id, d.occurred_at);
        }
        drop(task_slot);
        self.commit(&d, outcome, follow_up).await
    }

    /// When `d` may be attempted: its `not_before`, or for the first attempt of a
    /// terminal event the schedule's first delay after the event (usually zero).
    fn due_at(&self, d: &WebhookDelivery) -> Option<DateTime<Utc>> {
        if d.not_before.is_some() || d.attempts_made > 0 || !d.event.is_terminal() {
            return d.not_before;
        }
        let first = self
            .ladder_for(d.retry.as_ref())
            .first_delay()
            .filter(|delay| !delay.is_zero())?;
        chrono::Duration::from_std(first)
            .ok()
            .map(|delay| d.occurred_at + delay)
    }

    /// The task's own schedule, or the operator's.
    fn ladder_for(&self, own: Option<&RetrySchedule>) -> RetryLadder {
        own.map_or_else(|| self.ladder.clone(), |s| RetryLadder::new(s.clone()))
    }

    /// The URL (checked by the guard) and signing keys, or why nothing can be sent.
    fn prepare(&self, d: &WebhookDelivery) -> Result<(Url, Vec<SigningKey>), Response> {
        if d.body.len() > MAX_BODY_BYTES {
            return Err(Response::Unsendable {
                error: format!(
                    "payload of {} bytes is larger than 1 MiB; not sent",
                    d.body.len()
                ),
            });
        }
        let keys = signing_keys(&d.secret, d.previous_secret.as_ref())?;
        let url = self.checked_url(&d.url)?;
        Ok((url, keys))
    }

    /// `raw` if the guard lets it through.
    fn checked_url(&self, raw: &str) -> Result<Url, Response> {
        self.guard.check_url(raw).map_err(|refusal| match refusal {
            Refusal::BadUrl => Response::Unsendable {
                error: refusal.to_string(),
            },
            _ => Response::Failed {
                error: refusal.to_string(),
                refused: true,
            },
        })
    }

    /// Makes the HTTP request; `None` when shutdown cut it short.
    async fn send(
        &self,
        d: &WebhookDelivery,
        url: Url,
        keys: &[SigningKey],
        shutdown: &CancellationToken,
    ) -> Option<Attempt> {
        // A `video_url` in the body that would not last the URL lifetime from this
        // attempt on is signed afresh, however late the attempt is.
        let body = match &d.video_link {
            Some(link) => link.refresh(&d.body, d.task_id, now_millis()),
            None => d.body.clone(),
        };
        self.post(url, &d.headers, &d.webhook_id, keys, &body, shutdown)
            .await
    }

    /// Signs and POSTs `body` as message `id`; `None` when shutdown cut it short.
    async fn post(
        &self,
        url: Url,
        custom: &BTreeMap<String, String>,
        id: &str,
        keys: &[SigningKey],
        body: &str,
        shutdown: &CancellationToken,
    ) -> Option<Attempt> {
        let attempted_at = now_millis();
        let timestamp = attempted_at.timestamp();
        let signature = signature_header(keys, id, timestamp, body);
        let headers = request_headers(custom, id, timestamp, &signature);
        let started = Instant::now();
        let _in_flight = InFlight::new(&self.metrics);
        let host = url.host_str().unwrap_or_default().to_owned();
        let request = self
            .http
            .post(url)
            .headers(headers)
            .body(body.to_owned())
            .send();
        let span = tracing::info_span!(
            "webhook attempt",
            otel.name = "webhook POST",
            otel.kind = "client",
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
            server.address = %host,
        );
        let response = tokio::select! {
            r = exchange(request).instrument(span.clone()) => r,
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                info!("shutdown interrupted a webhook attempt; handing it back");
                return None;
            }
        };
        if let Response::Answered { status, .. } = &response {
            span.record("http.response.status_code", *status);
        }
        Some(Attempt {
            attempted_at,
            duration: started.elapsed(),
            response,
        })
    }

    /// The outcome of an attempt and the message that carries the event further (its
    /// next attempt, or the dead-letter queue).
    fn decide(&self, d: &WebhookDelivery, a: &Attempt) -> (AttemptOutcome, Option<Outgoing>) {
        let (status, error, retry_after, label) = classify(&a.response);
        self.metrics.attempts.with_label_values(&[label]).inc();
        if !matches!(a.response, Response::Unsendable { .. }) {
            self.metrics
                .attempt_duration
                .with_label_values(&[label])
                .observe(a.duration.as_secs_f64());
        }
        let made = d.attempts_made.saturating_add(1);
        let (state, next_at, follow_up) = match label {
            outcome::DELIVERED => {
                let latency = (Utc::now() - d.occurred_at).to_std().unwrap_or_default();
                self.metrics
                    .event_to_delivery
                    .with_label_values(&[d.event.as_str()])
                    .observe(latency.as_secs_f64());
                (DeliveryState::Delivered, None, None)
            }
            outcome::DROPPED => (DeliveryState::Dropped, None, None),
            _ if !d.event.is_terminal() => (DeliveryState::Failed, None, None),
            _ if matches!(a.response, Response::Unsendable { .. }) => {
                (DeliveryState::Failed, None, Some(self.dead(d, made)))
            }
            _ => match self
                .ladder_for(d.retry.as_ref())
                .next(made, random_fraction(), retry_after)
            {
                NextAttempt::After(delay) => {
                    // Counted from the end of this attempt.
                    let due = now_millis()
                        + chrono::Duration::from_std(delay)
                            .unwrap_or_else(|_| chrono::TimeDelta::zero());
                    let mut next = d.clone();
                    next.attempts_made = made;
                    next.not_before = Some(due);
                    (
                        DeliveryState::Pending,
                        Some(due),
                        Some(self.later(&next, delay)),
                    )
                }
                NextAttempt::Exhausted => (DeliveryState::Failed, None, Some(self.dead(d, made))),
            },
        };
        match state {
            DeliveryState::Delivered => debug!(status, "webhook delivered"),
            DeliveryState::Pending => {
                info!(status, error, "webhook attempt failed; retrying later")
            }
            _ => info!(
                status,
                error,
                state = state.as_str(),
                "webhook attempt finished"
            ),
        }
        let outcome = self.outcome(d, a.attempted_at, a.duration, status, error, state, next_at);
        (outcome, follow_up.flatten())
    }

    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        d: &WebhookDelivery,
        attempted_at: DateTime<Utc>,
        duration: Duration,
        status_code: Option<u16>,
        error: Option<String>,
        state: DeliveryState,
        next_attempt_at: Option<DateTime<Utc>>,
    ) -> AttemptOutcome {
        AttemptOutcome {
            v: SCHEMA_VERSION,
            webhook_id: d.webhook_id.clone(),
            task_id: d.task_id,
            event: d.event,
            attempt: d.attempts_made.saturating_add(1),
            attempted_at,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            status_code,
            error: error.map(|e| truncate(e, 1_000)),
            state,
            next_attempt_at,
        }
    }

    /// The next attempt, parked in the wait queue that fits its delay.
    fn later(&self, next: &WebhookDelivery, delay: Duration) -> Option<Outgoing> {
        let route = match wait_bucket_for(delay) {
            Some(bucket) => Topology::wait_route(bucket),
            // Due within the smallest bucket: straight back, the consumer sleeps the rest.
            None => route::WEBHOOKS.to_owned(),
        };
        self.message(&route, next)
    }

    fn dead(&self, d: &WebhookDelivery, made: u32) -> Option<Outgoing> {
        self.metrics.dead_lettered.inc();
        warn!(
            attempts = made,
            "webhook schedule exhausted; moved to the dead-letter queue"
        );
        let mut dead = d.clone();
        dead.attempts_made = made;
        dead.not_before = None;
        self.message(route::DEAD_WEBHOOKS, &dead)
    }

    fn message(&self, route: &str, d: &WebhookDelivery) -> Option<Outgoing> {
        match Outgoing::json(route, d) {
            Ok(m) => Some(m.for_task(d.task_id).with_message_id(d.webhook_id.clone())),
            Err(err) => {
                warn!(error = %format!("{err:#}"), "cannot serialise a webhook delivery");
                None
            }
        }
    }

    /// Parks `d` unchanged in the wait queue of `bucket`; it comes back to the webhooks
    /// queue when the bucket's TTL expires and is looked at again.
    async fn park(&self, d: &WebhookDelivery, bucket: Duration, reason: &str) -> Disposition {
        self.metrics.parked.with_label_values(&[reason]).inc();
        let Some(message) = self.message(&Topology::wait_route(bucket), d) else {
            return Disposition::Reject;
        };
        self.publish_all(&[message]).await
    }

    /// Publishes the outcome and the follow-up, then lets the message go.
    async fn commit(
        &self,
        d: &WebhookDelivery,
        outcome: AttemptOutcome,
        follow_up: Option<Outgoing>,
    ) -> Disposition {
        let mut messages = Vec::with_capacity(2);
        match Outgoing::json(route::OUTCOMES, &outcome) {
            Ok(m) => messages.push(
                m.for_task(d.task_id)
                    .with_message_id(format!("{}.{}", outcome.webhook_id, outcome.attempt)),
            ),
            Err(err) => warn!(error = %format!("{err:#}"), "cannot serialise an attempt outcome"),
        }
        messages.extend(follow_up);
        self.publish_all(&messages).await
    }

    /// Publishes with confirms, retrying briefly; the delivery is acked only once all of
    /// it is durable, and otherwise goes back to the queue (a duplicate attempt is
    /// harmless, a lost retry is not).
    async fn publish_all(&self, messages: &[Outgoing]) -> Disposition {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=4 {
            match self.broker.publish_batch(messages).await {
                Ok(()) => return Disposition::Ack,
                Err(err) if attempt < 4 => {
                    debug!(error = %format!("{err:#}"), "publish failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "cannot publish the delivery's follow-up; handing it back");
                }
            }
        }
        Disposition::Requeue
    }

    /// Keeps a message that is not a delivery this build understands, for an operator.
    async fn dead_letter_raw(&self, body: Vec<u8>, why: &str) -> Disposition {
        warn!(
            reason = why,
            "unreadable webhook delivery; moved to the dead-letter queue"
        );
        let message = Outgoing {
            target: Target::Queue(route::DEAD_WEBHOOKS.into()),
            body,
            task_id: None,
            message_id: None,
            traceparent: None,
        };
        match self.publish_all(&[message]).await {
            Disposition::Ack => Disposition::Ack,
            _ => Disposition::Reject,
        }
    }
}

/// The wait queue for a delivery whose slots are stuck: the shortest bucket at least as
/// long as they have been stuck (a host stuck for a while is likely stuck for as long
/// again), between [`BUSY_PARK_MIN`] and [`BUSY_PARK_MAX`].
fn busy_park(busy: Busy) -> Duration {
    let stalled = busy.stalled_for.clamp(BUSY_PARK_MIN, BUSY_PARK_MAX);
    WAIT_BUCKETS
        .iter()
        .copied()
        .find(|bucket| *bucket >= stalled)
        .unwrap_or(BUSY_PARK_MAX)
        .min(BUSY_PARK_MAX)
}

/// What a response says: its status, error, honoured `Retry-After` and metrics label.
fn classify(response: &Response) -> (Option<u16>, Option<String>, Option<Duration>, &'static str) {
    match response {
        Response::Answered {
            status,
            retry_after,
        } => {
            let label = match status {
                200..=299 => outcome::DELIVERED,
                410 => outcome::DROPPED,
                _ => outcome::FAILED,
            };
            let honoured = retry_after.filter(|_| honours_retry_after(*status));
            (Some(*status), None, honoured, label)
        }
        Response::Failed { error, refused } => {
            let label = if *refused {
                outcome::REFUSED
            } else {
                outcome::FAILED
            };
            (None, Some(error.clone()), None, label)
        }
        Response::Unsendable { error } => (None, Some(error.clone()), None, outcome::FAILED),
    }
}

/// Sends the request and reads at most [`MAX_RESPONSE_BYTES`] of the answer.
async fn exchange(
    request: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
) -> Response {
    let mut response = match request.await {
        Ok(r) => r,
        Err(err) => return transport_failure(err),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut read = 0;
    // The answer's content is ignored; reading some of it lets a well-behaved receiver
    // finish its write, and the cap keeps a hostile one from streaming for ever.
    while read < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => break,
        }
    }
    Response::Answered {
        status,
        retry_after,
    }
}

fn transport_failure(err: reqwest::Error) -> Response {
    let err = err.without_url();
    if let Some(refusal) = refusal_in(&err) {
        return Response::Failed {
            error: refusal.to_string(),
            refused: true,
        };
    }
    let error = if err.is_timeout() {
        "timed out".to_owned()
    } else {
        error_chain(&err)
    };
    Response::Failed {
        error,
        refused: false,
    }
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The request headers: the task's own headers verbatim, then the ones Conduit sets
/// (which win over a same-named custom header the API should have refused anyway).
fn request_headers(
    custom: &BTreeMap<String, String>,
    id: &str,
    timestamp: i64,
    signature: &str,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(custom.len() + 5);
    for (name, value) in custom {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                headers.append(n, v);
            }
            _ => warn!(header = %name, "skipping a custom header that is not valid HTTP"),
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    headers.insert(
        HeaderName::from_static("webhook-timestamp"),
        HeaderValue::from(timestamp),
    );
    let signed: [(HeaderName, &str); 2] = [
        (HeaderName::from_static("webhook-id"), id),
        (HeaderName::from_static("webhook-signature"), signature),
    ];
    for (name, value) in signed {
        match HeaderValue::from_str(value) {
            Ok(v) => {
                headers.insert(name, v);
            }
            Err(_) => warn!(header = %name, "skipping a header that is not valid HTTP"),
        }
    }
    headers
}

/// The signing keys of an attempt made now: the secret, then the previous one while its
/// overlap lasts (an unusable previous secret is left out rather than failing the event).
fn signing_keys(
    secret: &str,
    previous: Option<&PreviousSecret>,
) -> Result<Vec<SigningKey>, Response> {
    let key = SigningKey::parse(secret).map_err(|e| Response::Unsendable {
        error: e.to_string(),
    })?;
    let mut keys = vec![key];
    if let Some(p) = previous.filter(|p| p.expires_at > Utc::now()) {
        match SigningKey::parse(&p.secret) {
            Ok(old) => keys.push(old),
            Err(_) => {
                warn!("the previous signing secret is unusable; signing with the new one only")
            }
        }
    }
    Ok(keys)
}

/// The per-host concurrency key: host and port.
fn host_key(url: &Url) -> String {
    format!(
        "{}:{}",
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(0)
    )
}

struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// Tasks whose terminal webhook was delivered recently, with the time of that event.
/// Bounded in size and age: a progress webhook arrives late by seconds or minutes, not
/// hours.
#[derive(Default)]
pub struct FinishedTasks {
    inner: Mutex<Finished>,
}

#[derive(Default)]
struct Finished {
    by_task: HashMap<Uuid, (DateTime<Utc>, Instant)>,
    order: VecDeque<(Uuid, Instant)>,
}

impl FinishedTasks {
    pub fn remember(&self, task_id: Uuid, terminal_at: DateTime<Utc>) {
        let now = Instant::now();
        let mut f = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.by_task.insert(task_id, (terminal_at, now));
        f.order.push_back((task_id, now));
        while let Some(&(id, at)) = f.order.front() {
            if f.order.len() <= FINISHED_CAPACITY && at.elapsed() < FINISHED_TTL {
                break;
            }
            f.order.pop_front();
            // Only the newest entry of a task is the live one.
            if f.by_task.get(&id).is_some_and(|(_, t)| *t == at) {
                f.by_task.remove(&id);
            }
        }
    }

    /// True when a progress event of `task_id` that happened at `progress_at` belongs to
    /// a run whose terminal webhook was delivered. A later run of the task (after an
    /// explicit retry) has later events and still goes out.
    pub fn supersedes(&self, task_id: Uuid, progress_at: DateTime<Utc>) -> bool {
        let f = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.by_task
            .get(&task_id)
            .is_some_and(|(terminal_at, remembered)| {
                remembered.elapsed() < FINISHED_TTL && progress_at <= *terminal_at
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> WebhookDelivery {
        WebhookDelivery {
            v: SCHEMA_VERSION,
            webhook_id: "msg_1".into(),
            task_id: Uuid::new_v4(),
            event: WebhookEvent::Completed,
            url: "https://example.com/hook".into(),
            headers: BTreeMap::from([
                ("Authorization".into(), "Bearer x".into()),
                ("User-Agent".into(), "spoofed".into()),
            ]),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            body: "{}".into(),
            occurred_at: now_millis(),
            attempts_made: 0,
            not_before: None,
            retry: None,
            batch: None,
            previous_secret: None,
            video_link: None,
        }
    }

    #[test]
    fn conduit_headers_win_and_custom_ones_pass() {
        let d = delivery();
        let h = request_headers(&d.headers, &d.webhook_id, 1_614_265_330, "v1,abc");
        assert_eq!(h["authorization"], "Bearer x");
        assert_eq!(h["user-agent"], USER_AGENT_VALUE);
        assert_eq!(h.get_all("user-agent").iter().count(), 1);
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["webhook-id"], "msg_1");
        assert_eq!(h["webhook-timestamp"], "1614265330");
        assert_eq!(h["webhook-signature"], "v1,abc");
    }

    #[test]
    fn finished_tasks_drop_only_older_progress() {
        let f = FinishedTasks::default();
        let task = Uuid::new_v4();
        let terminal = now_millis();
        assert!(!f.supersedes(task, terminal));
        f.remember(task, terminal);
        assert!(f.supersedes(task, terminal - chrono::Duration::seconds(1)));
        assert!(f.supersedes(task, terminal));
        assert!(!f.supersedes(task, terminal + chrono::Duration::seconds(1)));
        assert!(!f.supersedes(Uuid::new_v4(), terminal));
    }

    #[test]
    fn host_keys_include_the_port() {
        let u = Url::parse("https://Example.com/x").unwrap();
        assert_eq!(host_key(&u), "example.com:443");
        let u = Url::parse("http://127.0.0.1:8080/x").unwrap();
        assert_eq!(host_key(&u), "127.0.0.1:8080");
    }

    #[test]
    fn parks_longer_behind_a_longer_stall() {
        let park = |ms| {
            busy_park(Busy {
                stalled_for: Duration::from_millis(ms),
            })
        };
        assert_eq!(park(100), Duration::from_millis(250));
        assert_eq!(park(250), Duration::from_millis(250));
        assert_eq!(park(400), Duration::from_secs(1));
        assert_eq!(park(1_200), Duration::from_secs(5));
        assert_eq!(park(7_000), Duration::from_secs(30));
        assert_eq!(park(29_000), Duration::from_secs(30));
        assert_eq!(park(3_600_000), Duration::from_secs(30));
    }

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }
}
