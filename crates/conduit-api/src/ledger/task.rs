//! A task as the ledger keeps it: its row in `tasks`, its status, the events its
//! webhook subscribes to, and the job message of its current attempt.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{
    config::RetrySchedule,
    messages::{BatchSettings, JobMessage, RenderSpec, SCHEMA_VERSION},
    payload::WebhookEvent,
    topology::route,
    Outgoing,
};
use tokio_postgres::Row;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub(crate) const ALL: [TaskStatus; 5] = [
        TaskStatus::Pending,
        TaskStatus::Processing,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Processing => "processing",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// One row of `tasks`.
#[derive(Debug, Clone)]
pub(crate) struct TaskRow {
    pub(crate) id: Uuid,
    pub(crate) api_key_id: Uuid,
    pub(crate) attempt: i32,
    pub(crate) status: TaskStatus,
    pub(crate) progress: i16,
    pub(crate) message: Option<String>,
    pub(crate) eta_seconds: Option<i64>,
    pub(crate) model: String,
    pub(crate) provider: String,
    pub(crate) upstream_model: Option<String>,
    pub(crate) prompt: String,
    pub(crate) duration: i32,
    pub(crate) width: i32,
    pub(crate) height: i32,
    pub(crate) fps: i32,
    pub(crate) seed: Option<i64>,
    pub(crate) webhook_url: Option<String>,
    pub(crate) webhook_headers: BTreeMap<String, String>,
    pub(crate) webhook_events: WebhookEvents,
    /// The task's own retry schedule for terminal webhooks (`webhook_retry`).
    pub(crate) webhook_retry: Option<RetrySchedule>,
    /// Batch delivery of the task's webhooks (`webhook_batch`).
    pub(crate) webhook_batch: Option<BatchSettings>,
    pub(crate) video_key: Option<String>,
    pub(crate) generation_duration_seconds: Option<f64>,
    pub(crate) error: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    pub(crate) last_seq: i64,
    /// The first frame of an image-to-video task (`image_url` as submitted). Not among
    /// [`TASK_COLUMNS`]: only a query that adds `image_url` fills it in.
    pub(crate) image_url: Option<String>,
}

pub(super) const TASK_COLUMNS: &str =
    "id, api_key_id, attempt, status, progress, message, eta_seconds, \
     model, provider, upstream_model, prompt, duration, width, height, fps, seed, webhook_url, \
     webhook_headers, webhook_events, video_key, generation_duration_seconds, error, created_at, \
     updated_at, completed_at, last_seq, webhook_retry, webhook_batch";

impl TaskRow {
    pub(crate) fn from_row(row: &Row) -> anyhow::Result<Self> {
        let status: String = row.try_get("status")?;
        let headers: serde_json::Value = row.try_get("webhook_headers")?;
        let events: Vec<String> = row.try_get("webhook_events")?;
        let retry: Option<String> = row.try_get("webhook_retry")?;
        let batch: Option<serde_json::Value> = row.try_get("webhook_batch")?;
        Ok(Self {
            id: row.try_get("id")?,
            api_key_id: row.try_get("api_key_id")?,
            attempt: row.try_get("attempt")?,
            status: TaskStatus::parse(&status)
                .with_context(|| format!("unknown task status {status:?} in the database"))?,
            progress: row.try_get("progress")?,
            message: row.try_get("message")?,
            eta_seconds: row.try_get("eta_seconds")?,
            model: row.try_get("model")?,
            provider: row.try_get("provider")?,
            upstream_model: row.try_get("upstream_model")?,
            prompt: row.try_get("prompt")?,
            duration: row.try_get("duration")?,
            width: row.try_get("width")?,
            height: row.try_get("height")?,
            fps: row.try_get("fps")?,
            seed: row.try_get("seed")?,
            webhook_url: row.try_get("webhook_url")?,
            webhook_headers: serde_json::from_value(headers).unwrap_or_default(),
            webhook_events: WebhookEvents::from_names(&events),
            webhook_retry: retry
                .map(|r| RetrySchedule::parse(&r))
                .transpose()
                .map_err(|e| anyhow::anyhow!("stored webhook_retry: {e}"))?,
            webhook_batch: batch
                .map(serde_json::from_value)
                .transpose()
                .context("stored webhook_batch")?,
            video_key: row.try_get("video_key")?,
            generation_duration_seconds: row.try_get("generation_duration_seconds")?,
            error: row.try_get("error")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            completed_at: row.try_get("completed_at")?,
            last_seq: row.try_get("last_seq")?,
            // Read only where a job is built (retry): a data URI can be megabytes, and
            // the ledger and the task views have no use for it.
            image_url: row.try_get("image_url").ok().flatten(),
        })
    }

    /// The job message of the task's current attempt.
    pub(crate) fn job(&self) -> JobMessage {
        JobMessage {
            v: SCHEMA_VERSION,
            task_id: self.id,
            attempt: self.attempt,
            model: self.model.clone(),
            provider: self.provider.clone(),
            upstream_model: self.upstream_model.clone(),
            prompt: self.prompt.clone(),
            spec: RenderSpec {
                duration_seconds: u32::try_from(self.duration).unwrap_or(1),
                width: u32::try_from(self.width).unwrap_or(64),
                height: u32::try_from(self.height).unwrap_or(64),
                fps: u32::try_from(self.fps).unwrap_or(1),
                seed: self.seed,
            },
            submitted_at: self.updated_at,
            image_url: self.image_url.clone(),
            checkpoint: None,
        }
    }

    /// Rough time to finish, for `estimated_completion_time`: queueing plus rendering.
    pub(crate) fn estimated_seconds(&self) -> i64 {
        15 + i64::from(self.duration) * 5
    }

    /// True when the task's webhook subscription covers `event`.
    pub(crate) fn wants(&self, event: WebhookEvent) -> bool {
        self.webhook_url.is_some() && self.webhook_events.contains(event)
    }
}

/// The job message of `job`, ready for the outbox.
pub(super) fn job_outgoing(job: &JobMessage) -> anyhow::Result<Outgoing> {
    Ok(Outgoing::json(route::JOBS, job)?
        .for_task(job.task_id)
        .with_message_id(job.message_id()))
}

/// The webhook events a task subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebhookEvents(BTreeSet<WebhookEvent>);

impl Default for WebhookEvents {
    fn default() -> Self {
        Self(WebhookEvent::ALL.into_iter().collect())
    }
}

impl FromIterator<WebhookEvent> for WebhookEvents {
    fn from_iter<I: IntoIterator<Item = WebhookEvent>>(events: I) -> Self {
        Self(events.into_iter().collect())
    }
}

impl WebhookEvents {
    pub(crate) fn contains(&self, event: WebhookEvent) -> bool {
        self.0.contains(&event)
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.0.iter().map(|e| e.as_str().to_owned()).collect()
    }

    pub(crate) fn from_names(names: &[String]) -> Self {
        names
            .iter()
            .filter_map(|n| WebhookEvent::parse(n))
            .collect()
    }
}

/// An Idempotency-Key presented with a submit, scoped to the caller's API key.
#[derive(Debug, Clone)]
pub(crate) struct IdempotencyClaim {
    pub(crate) key: String,
    /// A fingerprint of the request body, to tell a retry from a reuse.
    pub(crate) fingerprint: [u8; 32],
}

/// A validated submit, ready to be written: the new task (a fresh id, attempt 1,
/// pending), its job, and the Idempotency-Key if one was sent.
#[derive(Debug, Clone)]
pub(crate) struct NewTask {
    pub(crate) task: TaskRow,
    pub(crate) job: Outgoing,
    pub(crate) claim: Option<IdempotencyClaim>,
}

impl NewTask {
    pub(crate) fn new(task: TaskRow, claim: Option<IdempotencyClaim>) -> anyhow::Result<Self> {
        let job = job_outgoing(&task.job())?;
        Ok(Self { task, job, claim })
    }
}
