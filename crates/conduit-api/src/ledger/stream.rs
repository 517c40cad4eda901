//! The stream side of the ledger: every event a webhook would carry is kept in
//! `stream_events` for every task (with or without `webhook_url`, whatever its
//! `webhook_events`), in the caller's transaction; the [`StreamSequencer`] numbers the
//! committed events afterwards and queues them for the stream fanout. The reads the
//! real-time stream needs (the head, an event's position, a page of history) live here
//! too.
//!
//! An event transaction only inserts its row, with no position: it waits for no other
//! event, of its key or any other. The sequencer, one at a time across every API process
//! (it holds the single `stream_head` row until it commits), gives the committed rows
//! without a position the next numbers in `seq` order and commits them with the new head
//! and their outbox messages. Positions are therefore dense and become visible in order:
//! whoever sees position N may rely on every position up to N being committed, so "after
//! event X" is exactly "position above X's", and resume has no gaps or repeats.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{
    messages::SCHEMA_VERSION,
    payload::{WebhookEvent, WebhookPayload},
};
use deadpool_postgres::{GenericClient, Pool};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use super::{task::TaskRow, LedgerError, TaskLedger};
use crate::metrics::Metrics;

/// How far back `resume_after` may reach.
pub(crate) const RESUME_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Progress events are forgotten this long after they happened (terminal ones stay).
const PROGRESS_RETENTION: &str = "25 hours";

/// A fresh event id: `msg_` and a time-ordered UUID, the same shape as every
/// `webhook-id`.
pub(crate) fn new_event_id() -> String {
    format!("msg_{}", Uuid::now_v7().simple())
}

/// One committed event, as the stream fanout carries it between API processes and as
/// history is read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StreamEvent {
    pub(crate) v: u16,
    /// The event id (the webhook's `webhook-id` when it is also sent as a webhook).
    pub(crate) event_id: String,
    pub(crate) api_key_id: Uuid,
    /// Dense across all keys, numbered after commit (see the module's comment).
    pub(crate) position: i64,
    pub(crate) task_id: Uuid,
    pub(crate) attempt: i32,
    pub(crate) event: WebhookEvent,
    /// The exact webhook payload JSON.
    pub(crate) body: String,
}

impl StreamEvent {
    fn from_row(row: &Row) -> anyhow::Result<Self> {
        let event: String = row.try_get("event")?;
        Ok(Self {
            v: SCHEMA_VERSION,
            event_id: row.try_get("event_id")?,
            api_key_id: row.try_get("api_key_id")?,
            position: row.try_get("position")?,
            task_id: row.try_get("task_id")?,
            attempt: row.try_get("attempt")?,
            event: WebhookEvent::parse(&event)
                .with_context(|| format!("unknown stream event {event:?} in the database"))?,
            body: row.try_get("body")?,
        })
    }
}

const EVENT_COLUMNS: &str = "event_id, api_key_id, position, task_id, attempt, event, body";

/// Records `payload` of `task` under `event_id` for the stream, in the caller's
/// transaction; the sequencer numbers and publishes it once that commits.
pub(super) async fn record(
    client: &impl GenericClient,
    task: &TaskRow,
    event_id: &str,
    payload: &WebhookPayload,
    occurred_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let insert = client
        .prepare_cached(
            "INSERT INTO stream_events (event_id, api_key_id, task_id, attempt, event, body,
                 occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .context("preparing stream event insert")?;
    client
        .execute(
            &insert,
            &[
                &event_id,
                &task.api_key_id,
                &task.id,
                &task.attempt,
                &payload.event().as_str(),
                &payload.to_body(),
                &occurred_at,
            ],
        )
        .await
        .context("recording the stream event")?;
    Ok(())
}

/// Events numbered per sequencer transaction.
const SEQUENCE_BATCH: i64 = 1000;
/// How often the sequencer looks without being woken: events committed by a process
/// that died before numbering them, or woken in another process that is busy.
const SEQUENCE_POLL: Duration = Duration::from_millis(250);
const SEQUENCE_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the backlog gauge is refreshed.
const SEQUENCE_GAUGE_EVERY: Duration = Duration::from_secs(5);

/// Numbers committed stream events and queues them for the fanout, until stopped.
pub(crate) struct StreamSequencer {
    pub(super) pool: Pool,
    pub(super) wake: Arc<Notify>,
    pub(super) relay: Arc<Notify>,
    pub(super) metrics: Metrics,
}

impl StreamSequencer {
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut last_gauge = tokio::time::Instant::now() - SEQUENCE_GAUGE_EVERY;
        loop {
            if last_gauge.elapsed() >= SEQUENCE_GAUGE_EVERY {
                last_gauge = tokio::time::Instant::now();
                if let Err(err) = self.refresh_gauge().await {
                    debug!(error = %format!("{err:#}"), "could not count the events waiting to be numbered");
                }
            }
            let pause = match self.sequence_once().await {
                Ok(n) if n as i64 >= SEQUENCE_BATCH => Duration::ZERO,
                Ok(n) => {
                    if n > 0 {
                        self.relay.notify_one();
                    }
                    backoff = Duration::from_millis(100);
                    SEQUENCE_POLL
                }
                Err(err) => {
                    warn!(error = %format!("{err:#}"), retry_in_ms = backoff.as_millis() as u64, "could not number stream events; they wait for the next try");
                    let pause = backoff;
                    backoff = (backoff * 2).min(SEQUENCE_MAX_BACKOFF);
                    pause
                }
            };
            if pause.is_zero() {
                self.relay.notify_one();
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn refresh_gauge(&self) -> anyhow::Result<()> {
        let client = self
            .pool
            .get()
            .await
            .context("connecting to the database")?;
        let row = client
            .query_one(
                "SELECT count(*) FROM stream_events WHERE position IS NULL",
                &[],
            )
            .await
            .context("counting the events waiting to be numbered")?;
        self.metrics.stream_unnumbered.set(row.get(0));
        Ok(())
    }

    /// Numbers one batch; returns how many events it numbered.
    async fn sequence_once(&self) -> anyhow::Result<usize> {
        let mut client = self
            .pool
            .get()
            .await
            .context("connecting to the database")?;
        // Most looks find nothing: answer those without a transaction or a lock.
        let waiting = client
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM stream_events WHERE position IS NULL)")
            .await
            .context("preparing stream backlog check")?;
        let any: bool = client
            .query_one(&waiting, &[])
            .await
            .context("looking for events to number")?
            .get(0);
        if !any {
            return Ok(0);
        }
        let tx = client
            .transaction()
            .await
            .context("starting stream sequencing")?;
        // Held until commit: sequencers of every process take turns, and each one's
        // statements below see what the previous one committed.
        let head: i64 = tx
            .query_one("SELECT position FROM stream_head FOR UPDATE", &[])
            .await
            .context("locking the stream head")?
            .get(0);
        let number = tx
            .prepare_cached(
                "WITH waiting AS (
                     SELECT seq, $2::bigint + row_number() OVER (ORDER BY seq) AS position
                     FROM stream_events WHERE position IS NULL ORDER BY seq LIMIT $1)
                 UPDATE stream_events e SET position = w.position FROM waiting w
                 WHERE e.seq = w.seq
                 RETURNING e.event_id, e.api_key_id, e.position, e.task_id, e.attempt, e.event,
                     e.body",
            )
            .await
            .context("preparing stream numbering")?;
        let rows = tx
            .query(&number, &[&SEQUENCE_BATCH, &head])
            .await
            .context("numbering stream events")?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut events = rows
            .iter()
            .map(StreamEvent::from_row)
            .collect::<anyhow::Result<Vec<_>>>()?;
        // RETURNING has no order; the outbox publishes in the order rows are written.
        events.sort_by_key(|e| e.position);
        let new_head = head + events.len() as i64;
        let mut bodies = Vec::with_capacity(events.len());
        let mut task_ids = Vec::with_capacity(events.len());
        let mut message_ids = Vec::with_capacity(events.len());
        for event in &events {
            bodies.push(serde_json::to_vec(event).context("serialising stream event")?);
            task_ids.push(event.task_id);
            message_ids.push(event.event_id.as_str());
        }
        let queue = tx
            .prepare_cached(
                "WITH head AS (UPDATE stream_head SET position = $4)
                 INSERT INTO outbox (target, route, body, task_id, message_id)
                 SELECT 'stream', '', body, task_id, message_id
                 FROM unnest($1::bytea[], $2::uuid[], $3::text[]) WITH ORDINALITY
                     AS m (body, task_id, message_id, n)
                 ORDER BY n",
            )
            .await
            .context("preparing stream outbox insert")?;
        tx.execute(&queue, &[&bodies, &task_ids, &message_ids, &new_head])
            .await
            .context("queueing numbered stream events")?;
        tx.commit()
            .await
            .context("committing numbered stream events")?;
        Ok(events.len())
    }
}

/// Where a task attempt's terminal event stands in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Terminal {
    /// None recorded (the task ended before the stream existed).
    Unrecorded,
    /// Committed, not numbered yet: it is still to come live.
    Unnumbered,
    At(i64),
}

/// Which of a key's events a reader wants.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Only<'a> {
    All,
    Tasks(&'a [Uuid]),
}

impl TaskLedger {
    /// The position of the latest numbered event, of any key (0 before the first):
    /// every event up to it is committed and readable.
    pub(crate) async fn stream_head(&self) -> Result<i64, LedgerError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT position FROM stream_head")
            .await
            .context("preparing stream head")?;
        let row = client
            .query_opt(&stmt, &[])
            .await
            .context("reading the stream head")?;
        Ok(row.map_or(0, |r| r.get(0)))
    }

    /// The key's event `event_id` (of `task_id` when given), if it exists and happened
    /// no longer than `within` ago.
    pub(crate) async fn stream_event(
        &self,
        key_id: Uuid,
        event_id: &str,
        task_id: Option<Uuid>,
        within: Option<Duration>,
    ) -> Result<Option<StreamEvent>, LedgerError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS}, created_at FROM stream_events
                 WHERE event_id = $1 AND api_key_id = $2 AND ($3::uuid IS NULL OR task_id = $3)
                   AND position IS NOT NULL"
            ))
            .await
            .context("preparing stream event look-up")?;
        let Some(row) = client
            .query_opt(&stmt, &[&event_id, &key_id, &task_id])
            .await
            .context("looking up the stream event")?
        else {
            return Ok(None);
        };
        if let Some(within) = within {
            let at: DateTime<Utc> = row.get("created_at");
            let limit = chrono::Duration::from_std(within).unwrap_or(chrono::Duration::MAX);
            if Utc::now() - at > limit {
                return Ok(None);
            }
        }
        Ok(Some(StreamEvent::from_row(&row)?))
    }

    /// The key's events with `after < position <= upto`, of `only` those tasks, oldest
    /// first, at most `limit`.
    pub(crate) async fn stream_page(
        &self,
        key_id: Uuid,
        after: i64,
        upto: i64,
        only: Only<'_>,
        limit: i64,
    ) -> Result<Vec<StreamEvent>, LedgerError> {
        let client = self.pool.get().await?;
        let rows = match only {
            Only::All => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM stream_events
                         WHERE api_key_id = $1 AND position > $2 AND position <= $3
                         ORDER BY position LIMIT $4"
                    ))
                    .await
                    .context("preparing stream history")?;
                client.query(&stmt, &[&key_id, &after, &upto, &limit]).await
            }
            Only::Tasks(tasks) => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM stream_events
                         WHERE task_id = ANY($5) AND api_key_id = $1
                           AND position > $2 AND position <= $3
                         ORDER BY position LIMIT $4"
                    ))
                    .await
                    .context("preparing stream history")?;
                client
                    .query(&stmt, &[&key_id, &after, &upto, &limit, &tasks])
                    .await
            }
        }
        .context("reading stream history")?;
        Ok(rows
            .iter()
            .map(StreamEvent::from_row)
            .collect::<anyhow::Result<_>>()?)
    }

    /// Whether the terminal event of `task_id`'s attempt `attempt` is recorded, and its
    /// position once it is numbered.
    pub(crate) async fn stream_terminal_position(
        &self,
        task_id: Uuid,
        attempt: i32,
    ) -> Result<Terminal, LedgerError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT position FROM stream_events
                 WHERE task_id = $1 AND attempt = $2 AND event <> 'progress'
                 ORDER BY position NULLS LAST LIMIT 1",
            )
            .await
            .context("preparing terminal event look-up")?;
        let row = client
            .query_opt(&stmt, &[&task_id, &attempt])
            .await
            .context("looking up the terminal event")?;
        Ok(match row {
            None => Terminal::Unrecorded,
            Some(row) => match row.get::<_, Option<i64>>(0) {
                None => Terminal::Unnumbered,
                Some(position) => Terminal::At(position),
            },
        })
    }

    /// Forgets progress events older than the resume window, every ten minutes until
    /// `stop`.
    pub(crate) async fn forget_old_stream_events(&self, stop: CancellationToken) {
        loop {
            let forget = async {
                let client = self.pool.get().await?;
                client
                    .execute(
                        &format!(
                            "DELETE FROM stream_events WHERE event = 'progress'
                             AND position IS NOT NULL AND created_at < now() - interval '{PROGRESS_RETENTION}'"
                        ),
                        &[],
                    )
                    .await
                    .context("forgetting old stream events")?;
                Ok::<_, LedgerError>(())
            };
            if let Err(err) = forget.await {
                warn!(error = %format!("{:#}", anyhow::Error::from(err)), "could not forget old stream events");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(600)) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_look_like_webhook_ids() {
        let id = new_event_id();
        assert!(id.starts_with("msg_"));
        assert_eq!(id.len(), 4 + 32);
        assert_ne!(id, new_event_id());
    }
}
