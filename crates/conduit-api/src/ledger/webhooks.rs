//! The webhook side of the ledger: recording an event (a `webhook_events` row plus the
//! delivery in the outbox, in the caller's transaction), the delivery log read back
//! from attempt outcomes, and redelivery of a task's latest terminal webhook.
//!
//! # One webhook per task in flight
//!
//! A task's webhooks reach its receiver in the order their events happened, whatever
//! the number of sender replicas, because the ledger releases a task's next webhook only
//! once the previous one is settled. An event recorded while another of the same task is
//! `pending` (queued or being attempted) is stored as `held`, without a delivery; the
//! outcome that settles the pending one (delivered, failed, dropped) releases the oldest
//! held event into the outbox in the same transaction. Progress that piles up meanwhile
//! is coalesced: a newer event marks the held progress `skipped` (never sent). Both
//! writers take the task's row lock first, so a release and a new event of one task
//! never interleave. In the delivery log `held` reads as `pending` and `skipped` as
//! `dropped`.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{
    messages::{AttemptOutcome, DeliveryState, VideoLinkSigner, WebhookDelivery, SCHEMA_VERSION},
    payload::{WebhookEvent, WebhookPayload},
    time::now_millis,
    topology::route,
    Outgoing,
};
use deadpool_postgres::{GenericClient, Pool};
use uuid::Uuid;

use super::{
    outbox,
    secrets::{KeySecrets, SECRETS_OF_TASK_KEY},
    task::TaskRow,
    LedgerError,
};
use crate::links::VideoLinks;

fn delivery_outgoing(d: &WebhookDelivery) -> anyhow::Result<Outgoing> {
    Ok(Outgoing::json(route::WEBHOOKS, d)?
        .for_task(d.task_id)
        .with_message_id(d.webhook_id.clone()))
}

/// Records one webhook event of `task` under `webhook_id` (the event's id, shared with
/// the stream) and queues its delivery. The caller has checked that the task subscribes
/// to the event.
pub(super) async fn record_event(
    client: &impl GenericClient,
    task: &TaskRow,
    secrets: &KeySecrets,
    webhook_id: &str,
    payload: &WebhookPayload,
    occurred_at: DateTime<Utc>,
    video_link: Option<VideoLinkSigner>,
) -> anyhow::Result<String> {
    let url = task
        .webhook_url
        .clone()
        .context("recording a webhook for a task without webhook_url")?;
    let delivery = WebhookDelivery {
        v: SCHEMA_VERSION,
        webhook_id: webhook_id.to_owned(),
        task_id: task.id,
        event: payload.event(),
        url,
        headers: task.webhook_headers.clone(),
        secret: secrets.current.clone(),
        body: payload.to_body(),
        occurred_at,
        attempts_made: 0,
        not_before: None,
        retry: task.webhook_retry.clone(),
        batch: task.webhook_batch,
        previous_secret: secrets.previous.clone(),
        video_link,
    };
    // The caller holds the task's row lock (see the module doc).
    let busy = client
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM webhook_events WHERE task_id = $1 AND status = 'pending')",
        )
        .await
        .context("preparing the in-flight check")?;
    let busy: bool = client
        .query_one(&busy, &[&task.id])
        .await
        .context("checking for a webhook in flight")?
        .get(0);
    if busy {
        // Only the newest event of a pile-up waits: held progress is superseded.
        let skip = client
            .prepare_cached(
                "UPDATE webhook_events SET status = 'skipped', next_attempt_at = NULL
                 WHERE task_id = $1 AND status = 'held' AND event = 'progress'",
            )
            .await
            .context("preparing the progress skip")?;
        client
            .execute(&skip, &[&task.id])
            .await
            .context("skipping superseded progress")?;
    }
    let stmt = client
        .prepare_cached(
            "INSERT INTO webhook_events (webhook_id, task_id, attempt, event, status, body, url,
                 headers, occurred_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, CASE WHEN $9::boolean THEN 'held' ELSE 'pending' END,
                     $5, $6, $7, $8::timestamptz, CASE WHEN $9::boolean THEN NULL ELSE $8::timestamptz END)",
        )
        .await
        .context("preparing webhook event insert")?;
    let headers = serde_json::to_value(&delivery.headers).context("encoding webhook headers")?;
    client
        .execute(
            &stmt,
            &[
                &delivery.webhook_id,
                &task.id,
                &task.attempt,
                &delivery.event.as_str(),
                &delivery.body,
                &delivery.url,
                &headers,
                &occurred_at,
                &busy,
            ],
        )
        .await
        .context("recording the webhook event")?;
    if !busy {
        outbox::enqueue(client, &delivery_outgoing(&delivery)?).await?;
    }
    Ok(delivery.webhook_id)
}

/// One attempt in the delivery log.
#[derive(Debug, Clone)]
pub(crate) struct AttemptRecord {
    pub(crate) attempt: i32,
    pub(crate) attempted_at: DateTime<Utc>,
    pub(crate) status_code: Option<i32>,
    pub(crate) error: Option<String>,
    pub(crate) duration_ms: i64,
}

/// One event in the delivery log.
#[derive(Debug, Clone)]
pub(crate) struct DeliveryRecord {
    pub(crate) webhook_id: String,
    pub(crate) event: WebhookEvent,
    /// `pending`, `delivered`, `failed` or `dropped`.
    pub(crate) status: String,
    /// When the next attempt is due, while pending.
    pub(crate) next_attempt_at: Option<DateTime<Utc>>,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) url: String,
    pub(crate) attempts: Vec<AttemptRecord>,
}

/// What a redelivery queued.
#[derive(Debug, Clone)]
pub(crate) struct Redelivered {
    pub(crate) webhook_id: String,
    pub(crate) event: WebhookEvent,
}

/// The delivery log of `task_id`, oldest event first.
pub(super) async fn delivery_log(
    client: &impl GenericClient,
    task_id: Uuid,
) -> anyhow::Result<Vec<DeliveryRecord>> {
    let events = client
        .query(
            "SELECT webhook_id, event, status, next_attempt_at, occurred_at, url
             FROM webhook_events WHERE task_id = $1 ORDER BY occurred_at, created_at, webhook_id",
            &[&task_id],
        )
        .await
        .context("reading webhook events")?;
    let ids: Vec<String> = events.iter().map(|r| r.get(0)).collect();
    let attempts = client
        .query(
            "SELECT webhook_id, attempt, attempted_at, status_code, error, duration_ms
             FROM webhook_attempts WHERE webhook_id = ANY($1) ORDER BY attempted_at, attempt",
            &[&ids],
        )
        .await
        .context("reading webhook attempts")?;
    let mut by_id: HashMap<String, Vec<AttemptRecord>> = HashMap::new();
    for a in &attempts {
        by_id.entry(a.get(0)).or_default().push(AttemptRecord {
            attempt: a.get(1),
            attempted_at: a.get(2),
            status_code: a.get(3),
            error: a.get(4),
            duration_ms: a.get(5),
        });
    }
    let mut log = Vec::with_capacity(events.len());
    for r in &events {
        let id: String = r.get(0);
        let event: String = r.get(1);
        // Waiting behind the task's previous webhook is pending to a reader; a
        // superseded progress event that was never sent is dropped.
        let status = match r.get::<_, String>(2).as_str() {
            "held" => "pending".to_owned(),
            "skipped" => "dropped".to_owned(),
            other => other.to_owned(),
        };
        let next: Option<DateTime<Utc>> = r.get(3);
        log.push(DeliveryRecord {
            event: WebhookEvent::parse(&event)
                .with_context(|| format!("unknown webhook event {event:?} in the database"))?,
            next_attempt_at: next.filter(|_| status == "pending"),
            occurred_at: r.get(4),
            url: r.get(5),
            attempts: by_id.remove(&id).unwrap_or_default(),
            webhook_id: id,
            status,
        });
    }
    Ok(log)
}

/// Sends the task's latest terminal webhook again: same `webhook-id`, fresh schedule.
pub(super) async fn redeliver(
    pool: &Pool,
    links: &VideoLinks,
    key_id: Uuid,
    task_id: Uuid,
) -> Result<Redelivered, LedgerError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.context("starting redelivery")?;
    let task = tx
        .query_opt(
            &format!(
                "SELECT t.webhook_retry, t.webhook_batch, {SECRETS_OF_TASK_KEY}
                 FROM tasks t WHERE t.id = $1 AND t.api_key_id = $2"
            ),
            &[&task_id, &key_id],
        )
        .await
        .context("looking up the task")?
        .ok_or(LedgerError::NotFound)?;
    let options = TaskOptions::from_row(task_id, &task)?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT {STORED_EVENT} FROM webhook_events
                 WHERE task_id = $1 AND event IN ('completed', 'failed', 'cancelled')
                 ORDER BY attempt DESC, occurred_at DESC, created_at DESC LIMIT 1 FOR UPDATE"
            ),
            &[&task_id],
        )
        .await
        .context("finding the latest terminal webhook")?
        .ok_or(LedgerError::NoTerminalWebhook)?;
    let delivery = options.delivery_of(&row, links)?;
    let event = delivery.event;
    queue_stored(&tx, &delivery).await?;
    tx.commit().await.context("committing redelivery")?;
    Ok(Redelivered {
        webhook_id: delivery.webhook_id,
        event,
    })
}

/// The columns of a stored event that [`TaskOptions::delivery_of`] reads.
const STORED_EVENT: &str = "webhook_id, event, body, url, headers, occurred_at";

/// What a stored event is sent with today: the task's delivery options and its key's
/// secrets (a redelivery or a released event is sent as the task asks now).
struct TaskOptions {
    task_id: Uuid,
    retry: Option<conduit_core::config::RetrySchedule>,
    batch: Option<conduit_core::messages::BatchSettings>,
    secrets: KeySecrets,
}

impl TaskOptions {
    /// From a row of `t.webhook_retry, t.webhook_batch, {SECRETS_OF_TASK_KEY}`.
    fn from_row(task_id: Uuid, row: &tokio_postgres::Row) -> anyhow::Result<Self> {
        let retry: Option<String> = row.get(0);
        let batch: Option<serde_json::Value> = row.get(1);
        Ok(Self {
            task_id,
            retry: retry
                .map(|r| conduit_core::config::RetrySchedule::parse(&r))
                .transpose()
                .map_err(|e| anyhow::anyhow!("stored webhook_retry: {e}"))?,
            batch: batch
                .map(serde_json::from_value)
                .transpose()
                .context("stored webhook_batch")?,
            secrets: KeySecrets::from_row(row)?,
        })
    }

    /// The delivery of a stored event (a row of [`STORED_EVENT`]), from its first attempt.
    fn delivery_of(
        &self,
        row: &tokio_postgres::Row,
        links: &VideoLinks,
    ) -> anyhow::Result<WebhookDelivery> {
        let event_name: String = row.get(1);
        let event = WebhookEvent::parse(&event_name)
            .with_context(|| format!("unknown webhook event {event_name:?} in the database"))?;
        let headers: serde_json::Value = row.get(4);
        let body: String = row.get(2);
        // A completed event's link is signed afresh by the sender at each attempt.
        let video_link = (event == WebhookEvent::Completed)
            .then(|| serde_json::from_str::<serde_json::Value>(&body).ok())
            .flatten()
            .and_then(|v| v.get("video_url")?.as_str().map(str::to_owned))
            .map(|url| links.signer(self.task_id, url));
        Ok(WebhookDelivery {
            v: SCHEMA_VERSION,
            webhook_id: row.get(0),
            task_id: self.task_id,
            event,
            url: row.get(3),
            headers: serde_json::from_value::<BTreeMap<String, String>>(headers)
                .unwrap_or_default(),
            secret: self.secrets.current.clone(),
            body,
            occurred_at: row.get(5),
            attempts_made: 0,
            not_before: None,
            retry: self.retry.clone(),
            batch: self.batch,
            previous_secret: self.secrets.previous.clone(),
            video_link,
        })
    }
}

/// Marks a stored event pending again and queues its delivery.
async fn queue_stored(
    client: &impl GenericClient,
    delivery: &WebhookDelivery,
) -> anyhow::Result<()> {
    client
        .execute(
            "UPDATE webhook_events SET status = 'pending', next_attempt_at = $2 WHERE webhook_id = $1",
            &[&delivery.webhook_id, &now_millis()],
        )
        .await
        .context("queueing a stored webhook")?;
    outbox::enqueue(client, &delivery_outgoing(delivery)?).await
}

/// Releases the oldest held event of the task whose webhook `webhook_id` just settled.
/// The caller holds the task's row lock.
async fn release_next(
    client: &impl GenericClient,
    options: &TaskOptions,
    links: &VideoLinks,
) -> anyhow::Result<()> {
    let next = client
        .query_opt(
            &format!(
                "SELECT {STORED_EVENT} FROM webhook_events
                 WHERE task_id = $1 AND status = 'held'
                 ORDER BY occurred_at, created_at, webhook_id LIMIT 1"
            ),
            &[&options.task_id],
        )
        .await
        .context("finding the task's next held webhook")?;
    if let Some(row) = next {
        let delivery = options.delivery_of(&row, links)?;
        queue_stored(client, &delivery).await?;
    }
    Ok(())
}

/// Records one attempt outcome. Idempotent: a duplicate outcome changes nothing, and an
/// outcome older than the one already applied never overwrites the event's state.
///
/// An outcome that settles the event (anything but `pending`) releases the task's next
/// held webhook in the same transaction (module doc).
pub(super) async fn record_outcome(
    pool: &Pool,
    links: &VideoLinks,
    outcome: &AttemptOutcome,
) -> anyhow::Result<bool> {
    let mut client = pool.get().await.context("connecting to the database")?;
    if outcome.state == DeliveryState::Pending {
        return write_outcome(&client, outcome).await;
    }
    let tx = client
        .transaction()
        .await
        .context("starting the outcome transaction")?;
    let task = tx
        .query_opt(
            &format!(
                "SELECT t.webhook_retry, t.webhook_batch, {SECRETS_OF_TASK_KEY}, t.id AS task_id
                 FROM tasks t
                 WHERE t.id = (SELECT task_id FROM webhook_events WHERE webhook_id = $1)
                 FOR UPDATE OF t"
            ),
            &[&outcome.webhook_id],
        )
        .await
        .context("locking the webhook's task")?;
    let applied = write_outcome(&tx, outcome).await?;
    if let (true, Some(task)) = (applied, task) {
        let task_id: Uuid = task.try_get("task_id").context("reading the task id")?;
        release_next(&tx, &TaskOptions::from_row(task_id, &task)?, links).await?;
    }
    tx.commit().await.context("committing the outcome")?;
    Ok(applied)
}

async fn write_outcome(
    client: &impl GenericClient,
    outcome: &AttemptOutcome,
) -> anyhow::Result<bool> {
    let stmt = client
        .prepare_cached(
            "WITH attempt AS (
                 INSERT INTO webhook_attempts (webhook_id, attempt, attempted_at, status_code, error, duration_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT DO NOTHING
                 RETURNING 1)
             UPDATE webhook_events SET status = $7, next_attempt_at = $8, last_attempt_at = $3
             WHERE webhook_id = $1 AND EXISTS (SELECT 1 FROM attempt)
               AND (last_attempt_at IS NULL OR last_attempt_at <= $3)",
        )
        .await
        .context("preparing outcome insert")?;
    let attempt = i32::try_from(outcome.attempt).unwrap_or(i32::MAX);
    let status_code = outcome.status_code.map(i32::from);
    let duration = i64::try_from(outcome.duration_ms).unwrap_or(i64::MAX);
    // PostgreSQL text cannot hold NUL; a receiver's error text might.
    let error = outcome.error.as_deref().map(|e| e.replace('\0', ""));
    let n = client
        .execute(
            &stmt,
            &[
                &outcome.webhook_id,
                &attempt,
                &outcome.attempted_at,
                &status_code,
                &error,
                &duration,
                &outcome.state.as_str(),
                &outcome.next_attempt_at,
            ],
        )
        .await
        .context("recording the attempt outcome")?;
    Ok(n > 0)
}
