//! The transactional outbox. Whatever must reach RabbitMQ because of a state change is
//! written to `outbox` in the same transaction as the change; the relay publishes it
//! afterwards with publisher confirms and only then deletes it. A broker outage
//! therefore delays messages and never loses them, and never fails a request.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use conduit_core::{telemetry, Broker, Outgoing, Target};
use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::metrics::Metrics;

/// Rows published per transaction.
const BATCH: i64 = 500;
/// Poll interval when nobody wakes the relay (other API replicas write rows too).
const POLL: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the backlog gauges are refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

/// Adds a message to the outbox inside the caller's transaction.
pub(super) async fn enqueue(client: &impl GenericClient, message: &Outgoing) -> anyhow::Result<()> {
    let (target, route) = match &message.target {
        Target::Queue(route) => ("queue", route.as_str()),
        Target::Control => ("control", ""),
        Target::Stream => ("stream", ""),
    };
    let stmt = client
        .prepare_cached(
            "INSERT INTO outbox (target, route, body, task_id, message_id, traceparent) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await
        .context("preparing outbox insert")?;
    client
        .execute(
            &stmt,
            &[
                &target,
                &route,
                &message.body,
                &message.task_id,
                &message.message_id,
                &message.traceparent,
            ],
        )
        .await
        .context("writing to the outbox")?;
    Ok(())
}

/// Publishes outbox rows until `shutdown` fires.
pub(crate) struct OutboxRelay {
    pub(super) pool: Pool,
    pub(super) broker: Broker,
    pub(super) wake: Arc<Notify>,
    pub(super) metrics: Metrics,
}

impl OutboxRelay {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        // Beats after every pass that published or found nothing to publish; silent
        // while the broker is unusable or publishing fails, so `/healthz` sees a relay
        // that stopped publishing.
        let heartbeat = self.broker.health().heartbeat("outbox relay");
        let mut backoff = Duration::from_millis(100);
        let mut last_gauge = tokio::time::Instant::now() - GAUGE_EVERY;
        loop {
            if last_gauge.elapsed() >= GAUGE_EVERY {
                last_gauge = tokio::time::Instant::now();
                if let Err(err) = self.refresh_gauges().await {
                    debug!(error = %format!("{err:#}"), "could not read the outbox backlog");
                }
            }
            let outcome = if self.broker.is_ready() {
                self.publish_once().await
            } else {
                Ok(0)
            };
            let ready = outcome.is_ok() && self.broker.is_ready();
            if ready {
                heartbeat.beat();
            }
            let pause = match outcome {
                Ok(n) if n as i64 >= BATCH => Duration::ZERO,
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    POLL
                }
                Err(err) => {
                    self.metrics.outbox_publish_failures.inc();
                    warn!(error = %format!("{err:#}"), retry_in_ms = backoff.as_millis() as u64, "outbox relay could not publish; rows stay for the next try");
                    let pause = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    pause
                }
            };
            if pause.is_zero() {
                if shutdown.is_cancelled() {
                    heartbeat.retire();
                    return;
                }
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => {
                    heartbeat.retire();
                    return;
                }
            }
        }
    }

    /// Publishes one batch; returns how many rows it published.
    async fn publish_once(&self) -> anyhow::Result<usize> {
        let mut client = self
            .pool
            .get()
            .await
            .context("connecting to the database")?;
        let tx = client.transaction().await.context("starting relay batch")?;
        // Taking the rows is deleting them: the delete holds their row locks, so other
        // relays skip them, and it only counts once the publish is confirmed and the
        // transaction commits. Rolled back (a failed publish, a crash), they stay.
        // `= ANY(ARRAY(...))` keeps the delete on the primary key: an `IN (subquery)`
        // may be planned as a hash join over a sequential scan of a table that, between
        // vacuums, is mostly dead rows.
        let stmt = tx
            .prepare_cached(
                "DELETE FROM outbox WHERE id = ANY(ARRAY(
                     SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED))
                 RETURNING id, target, route, body, task_id, message_id, traceparent",
            )
            .await
            .context("preparing outbox take")?;
        let mut rows = tx
            .query(&stmt, &[&BATCH])
            .await
            .context("taking rows from the outbox")?;
        if rows.is_empty() {
            return Ok(0);
        }
        // RETURNING has no order; publish in the order the rows were written.
        rows.sort_by_key(|row| row.get::<_, i64>(0));
        let mut messages = Vec::with_capacity(rows.len());
        // One producer span per traced row, child of the request or event that wrote it;
        // they end once the batch is confirmed.
        let mut spans = Vec::new();
        for row in &rows {
            let target: String = row.get(1);
            let route: String = row.get(2);
            let task_id = row.get::<_, Option<Uuid>>(4);
            let mut traceparent: Option<String> = row.get(6);
            if let Some(stored) = traceparent.take() {
                let span = tracing::info_span!(
                    "outbox publish",
                    otel.name = %format!("{route} publish"),
                    otel.kind = "producer",
                    task_id = %task_id.map(|t| t.to_string()).unwrap_or_default(),
                    trace_id = tracing::field::Empty,
                );
                telemetry::continue_trace(&span, Some(&stored));
                traceparent = telemetry::traceparent_of(&span).or(Some(stored));
                spans.push(span);
            }
            messages.push(Outgoing {
                target: match target.as_str() {
                    "control" => Target::Control,
                    "stream" => Target::Stream,
                    _ => Target::Queue(route),
                },
                body: row.get(3),
                task_id,
                message_id: row.get(5),
                traceparent,
            });
        }
        self.broker
            .publish_batch(&messages)
            .await
            .context("publishing outbox batch")?;
        // A crash between the confirm and this commit republishes the batch; consumers
        // drop duplicates (jobs by attempt, status by sequence, webhooks by id).
        tx.commit().await.context("committing relay batch")?;
        drop(spans);
        self.metrics.outbox_published.inc_by(messages.len() as u64);
        Ok(messages.len())
    }

    async fn refresh_gauges(&self) -> anyhow::Result<()> {
        let client = self
            .pool
            .get()
            .await
            .context("connecting to the database")?;
        let row = client
            .query_one(
                "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::bigint, 0) FROM outbox",
                &[],
            )
            .await
            .context("measuring the outbox")?;
        self.metrics.outbox_depth.set(row.get(0));
        self.metrics.outbox_oldest_age_seconds.set(row.get(1));
        Ok(())
    }
}
