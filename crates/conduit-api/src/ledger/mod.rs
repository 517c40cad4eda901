//! The task ledger: the one owner of task state. It owns the `tasks`, `outbox`,
//! `idempotency_keys`, `webhook_events` and `webhook_attempts` tables and every
//! transition of a task: submit (group-committed, [`submits`]), status events from the
//! generators ([`events`]), cancel and retry ([`lifecycle`]), webhook events, attempt
//! outcomes and redelivery ([`webhooks`]), and the outbox that carries each change to
//! RabbitMQ ([`outbox`]). Every SQL statement that writes those tables lives in this
//! module, once.
//!
//! The ledger knows nothing of HTTP: routes and broker consumers call it and turn a
//! [`LedgerError`] into their own answer.

mod events;
mod lifecycle;
mod outbox;
mod secrets;
mod stream;
mod submits;
mod task;
mod webhooks;

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use conduit_core::{
    messages::{AttemptOutcome, StatusEvent},
    Broker,
};
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

pub(crate) use events::Applied;
pub(crate) use outbox::OutboxRelay;
pub(crate) use secrets::KeySecrets;
pub(crate) use stream::{Only, StreamEvent, StreamSequencer, Terminal, RESUME_WINDOW};
pub(crate) use submits::SubmitWriter;
pub(crate) use task::{IdempotencyClaim, NewTask, TaskRow, TaskStatus, WebhookEvents};
pub(crate) use webhooks::{DeliveryRecord, Redelivered};

use crate::{db::is_unavailable, links::VideoLinks, metrics::Metrics};

/// Why the ledger refused or could not do something.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LedgerError {
    /// No such task, or another key's task.
    #[error("no such task")]
    NotFound,
    #[error("the task is already {}", .0.as_str())]
    AlreadyTerminal(TaskStatus),
    #[error("the task is {} and cannot be retried", .0.as_str())]
    NotRetryable(TaskStatus),
    #[error("the task has no terminal webhook")]
    NoTerminalWebhook,
    #[error("the Idempotency-Key was used with another request")]
    IdempotencyKeyReused,
    /// The page cursor is not one of the owner's tasks.
    #[error("the page cursor names no task of this key")]
    UnknownCursor,
    /// The database cannot be reached right now; trying again later may work.
    #[error("the database is unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("ledger failure")]
    Internal(#[source] anyhow::Error),
}

impl LedgerError {
    /// True when the database is away, rather than the request being refused.
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(self, LedgerError::Unavailable(_))
    }
}

impl From<anyhow::Error> for LedgerError {
    fn from(err: anyhow::Error) -> Self {
        if is_unavailable(&err) {
            LedgerError::Unavailable(err)
        } else {
            LedgerError::Internal(err)
        }
    }
}

impl From<deadpool_postgres::PoolError> for LedgerError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        LedgerError::Unavailable(anyhow::Error::from(err).context("taking a database connection"))
    }
}

/// What a submit led to.
#[derive(Debug)]
pub(crate) enum Submitted {
    Created(TaskRow),
    /// The same Idempotency-Key and body were seen before: this is that task.
    Replayed(TaskRow),
}

/// Which of a key's tasks to list.
#[derive(Debug, Clone)]
pub(crate) struct TaskPage {
    pub(crate) status: Option<TaskStatus>,
    pub(crate) limit: i64,
    /// The last task of the previous page.
    pub(crate) after: Option<Uuid>,
}

/// The one owner of task state. Cheap to share behind an `Arc`.
pub(crate) struct TaskLedger {
    pool: Pool,
    links: VideoLinks,
    metrics: Metrics,
    /// Wakes the outbox relay right after a commit wrote outbox rows.
    outbox_ready: Arc<Notify>,
    /// Wakes the stream sequencer right after a commit recorded stream events.
    stream_ready: Arc<Notify>,
    submits: submits::SubmitQueue,
    /// The relay's broker, for cancels published before the cancel is answered.
    broker: std::sync::OnceLock<Broker>,
}

/// How long a cancel waits for its direct publish before answering anyway (the outbox
/// publishes it in any case).
const CANCEL_PUBLISH_PATIENCE: Duration = Duration::from_secs(5);

impl TaskLedger {
    /// A ledger over `pool`, and the group-commit writer its submits go through (run it
    /// with [`SubmitWriter::run`]); `writers` batches may be committing at once.
    pub(crate) fn new(
        pool: Pool,
        links: VideoLinks,
        metrics: Metrics,
        writers: usize,
    ) -> (Self, SubmitWriter) {
        let (submits, writer) = submits::channel(pool.clone(), metrics.clone(), writers);
        let ledger = Self {
            pool,
            links,
            metrics,
            outbox_ready: Arc::new(Notify::new()),
            stream_ready: Arc::new(Notify::new()),
            submits,
            broker: std::sync::OnceLock::new(),
        };
        (ledger, writer)
    }

    fn wake_relay(&self) {
        self.outbox_ready.notify_one();
    }

    fn wake_sequencer(&self) {
        self.stream_ready.notify_one();
    }

    /// Writes a new task and its job; answers once the commit holding it is durable.
    pub(crate) async fn submit(&self, new: NewTask) -> Result<Submitted, LedgerError> {
        let submitted = self.submits.submit(new).await?;
        if matches!(submitted, Submitted::Created(_)) {
            self.wake_relay();
        }
        Ok(submitted)
    }

    /// The owner's task, or `None` for an unknown id or another key's task alike.
    pub(crate) async fn get(
        &self,
        key_id: Uuid,
        task_id: Uuid,
    ) -> Result<Option<TaskRow>, LedgerError> {
        let client = self.pool.get().await?;
        Ok(lifecycle::get(&client, key_id, task_id).await?)
    }

    /// A page of the owner's tasks, newest first, and whether more exist.
    pub(crate) async fn list(
        &self,
        key_id: Uuid,
        page: &TaskPage,
    ) -> Result<(Vec<TaskRow>, bool), LedgerError> {
        let client = self.pool.get().await?;
        lifecycle::list(&client, key_id, page).await
    }

    /// The storage key of a completed task's video (any key's: the caller checked a
    /// signed URL).
    pub(crate) async fn completed_video_key(
        &self,
        task_id: Uuid,
    ) -> Result<Option<String>, LedgerError> {
        let client = self.pool.get().await?;
        Ok(lifecycle::completed_video_key(&client, task_id).await?)
    }

    /// The `video_url` of a completed task as of now.
    pub(crate) async fn video_url(&self, task: &TaskRow) -> Result<Option<String>, LedgerError> {
        match (&task.status, &task.video_key, task.completed_at) {
            (TaskStatus::Completed, Some(_), Some(done)) => {
                Ok(Some(self.links.url_for(task.id, done, Utc::now())))
            }
            _ => Ok(None),
        }
    }

    /// Cancels a pending or processing task. The cancel is on the lifecycle stream
    /// before this answers (unless the broker is away; the outbox carries it then), so
    /// no generator starts the attempt after the client was told it is cancelled.
    pub(crate) async fn cancel(&self, key_id: Uuid, task_id: Uuid) -> Result<TaskRow, LedgerError> {
        let task = lifecycle::cancel(&self.pool, key_id, task_id).await?;
        self.wake_relay();
        self.wake_sequencer();
        if let Some(broker) = self.broker.get() {
            let message = lifecycle::cancel_message(&task)?;
            match tokio::time::timeout(CANCEL_PUBLISH_PATIENCE, broker.publish(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    warn!(%task_id, error = %format!("{err:#}"), "could not publish the cancel at once; the outbox will")
                }
                Err(_) => {
                    warn!(%task_id, "the cancel's publish was not confirmed in time; the outbox will publish it")
                }
            }
        }
        Ok(task)
    }

    /// Runs a failed or cancelled task again as a new attempt.
    pub(crate) async fn retry(&self, key_id: Uuid, task_id: Uuid) -> Result<TaskRow, LedgerError> {
        let task = lifecycle::retry(&self.pool, key_id, task_id).await?;
        self.wake_relay();
        Ok(task)
    }

    /// Applies a generator's status event.
    pub(crate) async fn apply_status(&self, event: &StatusEvent) -> Result<Applied, LedgerError> {
        let applied = events::apply(&self.pool, &self.links, event).await?;
        if matches!(applied, Applied::Applied { recorded: true }) {
            self.wake_relay();
            self.wake_sequencer();
        }
        Ok(applied)
    }

    /// Records a webhook sender's attempt outcome in the delivery log; false when it was
    /// a duplicate or older than what is recorded.
    pub(crate) async fn record_outcome(
        &self,
        outcome: &AttemptOutcome,
    ) -> Result<bool, LedgerError> {
        Ok(webhooks::record_outcome(&self.pool, &self.links, outcome).await?)
    }

    /// The delivery log of the owner's task.
    pub(crate) async fn delivery_log(
        &self,
        key_id: Uuid,
        task_id: Uuid,
    ) -> Result<Vec<DeliveryRecord>, LedgerError> {
        let client = self.pool.get().await?;
        if lifecycle::get(&client, key_id, task_id).await?.is_none() {
            return Err(LedgerError::NotFound);
        }
        Ok(webhooks::delivery_log(&client, task_id).await?)
    }

    /// Sends the owner's task's latest terminal webhook again.
    pub(crate) async fn redeliver(
        &self,
        key_id: Uuid,
        task_id: Uuid,
    ) -> Result<Redelivered, LedgerError> {
        let redelivered = webhooks::redeliver(&self.pool, &self.links, key_id, task_id).await?;
        self.wake_relay();
        Ok(redelivered)
    }

    /// The webhook signing secrets of key `key_id`.
    pub(crate) async fn webhook_secrets(&self, key_id: Uuid) -> Result<KeySecrets, LedgerError> {
        let client = self.pool.get().await?;
        secrets::get(&client, key_id).await
    }

    /// Gives key `key_id` a new webhook signing secret; the old one is signed with too
    /// for `overlap_seconds`.
    pub(crate) async fn rotate_webhook_secret(
        &self,
        key_id: Uuid,
        overlap_seconds: u32,
    ) -> Result<KeySecrets, LedgerError> {
        let client = self.pool.get().await?;
        secrets::rotate(&client, key_id, overlap_seconds).await
    }

    /// The relay that publishes this ledger's outbox through `broker`.
    pub(crate) fn relay(&self, broker: Broker) -> OutboxRelay {
        let _ = self.broker.set(broker.clone());
        OutboxRelay {
            pool: self.pool.clone(),
            broker,
            wake: self.outbox_ready.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The sequencer that numbers this ledger's stream events and queues them for the
    /// stream fanout.
    pub(crate) fn stream_sequencer(&self) -> StreamSequencer {
        StreamSequencer {
            pool: self.pool.clone(),
            wake: self.stream_ready.clone(),
            relay: self.outbox_ready.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// True while the database answers within `timeout`.
    pub(crate) async fn reachable(&self, timeout: Duration) -> bool {
        let ping = async {
            let client = self.pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        };
        matches!(tokio::time::timeout(timeout, ping).await, Ok(Some(_)))
    }

    /// Forgets Idempotency-Keys older than their window, every ten minutes until `stop`.
    pub(crate) async fn forget_old_idempotency_keys(&self, stop: CancellationToken) {
        loop {
            if let Err(err) = submits::forget_old_keys(&self.pool).await {
                warn!(error = %format!("{err:#}"), "could not forget old idempotency keys");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(600)) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}
