//! The stream side of the ledger: every event a webhook would carry is kept in
//! `stream_events` for every task (with or without `webhook_url`, whatever its
//! `webhook_events`), numbered densely per API key in commit order, and put in the outbox
//! for the stream fanout, all in the caller's transaction. The reads the real-time
//! stream needs (the key's head, an event's position, a page of history) live here too.
//!
//! The position comes from `stream_positions`, whose row for the key stays locked until
//! the transaction commits: position N+1 can only be taken once N is committed, and a
//! rollback gives its number back. Every transaction that records an event holds its
//! task's row lock first and the key's position lock last, so they cannot deadlock.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{
    messages::SCHEMA_VERSION,
    payload::{WebhookEvent, WebhookPayload},
    Outgoing, Target,
};
use deadpool_postgres::GenericClient;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use super::{outbox, task::TaskRow, LedgerError, TaskLedger};

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
    /// Dense per key, in commit order.
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

/// Records `payload` of `task` under `event_id` and queues it for the stream fanout.
/// Call it last before committing: from here on the key's position row stays locked.
pub(super) async fn record(
    client: &impl GenericClient,
    task: &TaskRow,
    event_id: &str,
    payload: &WebhookPayload,
    occurred_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let next = client
        .prepare_cached(
            "INSERT INTO stream_positions (api_key_id, position) VALUES ($1, 1)
             ON CONFLICT (api_key_id) DO UPDATE SET position = stream_positions.position + 1
             RETURNING position",
        )
        .await
        .context("preparing stream position")?;
    let position: i64 = client
        .query_one(&next, &[&task.api_key_id])
        .await
        .context("taking the next stream position")?
        .get(0);
    let event = StreamEvent {
        v: SCHEMA_VERSION,
        event_id: event_id.to_owned(),
        api_key_id: task.api_key_id,
        position,
        task_id: task.id,
        attempt: task.attempt,
        event: payload.event(),
        body: payload.to_body(),
    };
    let insert = client
        .prepare_cached(
            "INSERT INTO stream_events (event_id, api_key_id, position, task_id, attempt, event,
                 body, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await
        .context("preparing stream event insert")?;
    client
        .execute(
            &insert,
            &[
                &event.event_id,
                &event.api_key_id,
                &event.position,
                &event.task_id,
                &event.attempt,
                &event.event.as_str(),
                &event.body,
                &occurred_at,
            ],
        )
        .await
        .context("recording the stream event")?;
    let message = Outgoing {
        target: Target::Stream,
        body: serde_json::to_vec(&event).context("serialising stream event")?,
        task_id: Some(task.id),
        message_id: Some(event.event_id.clone()),
    };
    outbox::enqueue(client, &message).await
}

/// Which of a key's events a reader wants.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Only<'a> {
    All,
    Tasks(&'a [Uuid]),
}

impl TaskLedger {
    /// The position of the key's latest committed event (0 before the first).
    pub(crate) async fn stream_head(&self, key_id: Uuid) -> Result<i64, LedgerError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached("SELECT position FROM stream_positions WHERE api_key_id = $1")
            .await
            .context("preparing stream head")?;
        let row = client
            .query_opt(&stmt, &[&key_id])
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
                 WHERE event_id = $1 AND api_key_id = $2 AND ($3::uuid IS NULL OR task_id = $3)"
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

    /// The position of the terminal event of `task_id`'s attempt `attempt`, if recorded.
    pub(crate) async fn stream_terminal_position(
        &self,
        task_id: Uuid,
        attempt: i32,
    ) -> Result<Option<i64>, LedgerError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "SELECT position FROM stream_events
                 WHERE task_id = $1 AND attempt = $2 AND event <> 'progress'
                 ORDER BY position LIMIT 1",
            )
            .await
            .context("preparing terminal event look-up")?;
        let row = client
            .query_opt(&stmt, &[&task_id, &attempt])
            .await
            .context("looking up the terminal event")?;
        Ok(row.map(|r| r.get(0)))
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
                             AND created_at < now() - interval '{PROGRESS_RETENTION}'"
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
