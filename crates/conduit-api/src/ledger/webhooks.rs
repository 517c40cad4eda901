//! The webhook side of the ledger: recording an event (a `webhook_events` row plus the
//! delivery in the outbox, in the caller's transaction), the delivery log read back
//! from attempt outcomes, and redelivery of a task's latest terminal webhook.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{
    messages::{AttemptOutcome, WebhookDelivery, SCHEMA_VERSION},
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
    };
    let stmt = client
        .prepare_cached(
            "INSERT INTO webhook_events (webhook_id, task_id, attempt, event, status, body, url,
                 headers, occurred_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $8, $8)",
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
            ],
        )
        .await
        .context("recording the webhook event")?;
    outbox::enqueue(client, &delivery_outgoing(&delivery)?).await?;
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
        let status: String = r.get(2);
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
    let secrets = KeySecrets::from_row(&task)?;
    let retry: Option<String> = task.get(0);
    let batch: Option<serde_json::Value> = task.get(1);
    let row = tx
        .query_opt(
            "SELECT webhook_id, event, body, url, headers, occurred_at FROM webhook_events
             WHERE task_id = $1 AND event IN ('completed', 'failed', 'cancelled')
             ORDER BY attempt DESC, occurred_at DESC, created_at DESC LIMIT 1 FOR UPDATE",
            &[&task_id],
        )
        .await
        .context("finding the latest terminal webhook")?
        .ok_or(LedgerError::NoTerminalWebhook)?;
    let event_name: String = row.get(1);
    let event = WebhookEvent::parse(&event_name)
        .with_context(|| format!("unknown webhook event {event_name:?} in the database"))?;
    let headers: serde_json::Value = row.get(4);
    let delivery = WebhookDelivery {
        v: SCHEMA_VERSION,
        webhook_id: row.get(0),
        task_id,
        event,
        url: row.get(3),
        headers: serde_json::from_value::<BTreeMap<String, String>>(headers).unwrap_or_default(),
        secret: secrets.current,
        body: row.get(2),
        occurred_at: row.get(5),
        attempts_made: 0,
        not_before: None,
        // Today's options and secrets: a redelivery is sent as the task asks now.
        retry: retry
            .map(|r| conduit_core::config::RetrySchedule::parse(&r))
            .transpose()
            .map_err(|e| anyhow::anyhow!("stored webhook_retry: {e}"))?,
        batch: batch
            .map(serde_json::from_value)
            .transpose()
            .context("stored webhook_batch")?,
        previous_secret: secrets.previous,
    };
    tx.execute(
        "UPDATE webhook_events SET status = 'pending', next_attempt_at = $2 WHERE webhook_id = $1",
        &[&delivery.webhook_id, &now_millis()],
    )
    .await
    .context("resetting the webhook for redelivery")?;
    outbox::enqueue(&tx, &delivery_outgoing(&delivery)?).await?;
    tx.commit().await.context("committing redelivery")?;
    Ok(Redelivered {
        webhook_id: delivery.webhook_id,
        event,
    })
}

/// Records one attempt outcome. Idempotent: a duplicate outcome changes nothing, and an
/// outcome older than the one already applied never overwrites the event's state.
pub(super) async fn record_outcome(pool: &Pool, outcome: &AttemptOutcome) -> anyhow::Result<bool> {
    let client = pool.get().await.context("connecting to the database")?;
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
