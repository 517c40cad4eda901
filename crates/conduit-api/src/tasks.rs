//! The `tasks` table: a task's row, its status machine, and the storage side of submit,
//! look-up, listing, cancel and retry. Every change that must reach another service
//! writes its outbox rows in the same transaction.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{
    messages::{ControlMessage, JobMessage, RenderSpec, SCHEMA_VERSION},
    payload::{FailedPayload, WebhookEvent, WebhookPayload, CANCELLED_ERROR},
    time::now_millis,
    topology::route,
    Outgoing,
};
use deadpool_postgres::{GenericClient, Pool};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::{
    auth::Caller,
    domain::{GenerationRequest, WebhookEvents},
    error::ApiError,
    outbox, webhooks,
};

/// Idempotency keys are honoured for this long.
pub const IDEMPOTENCY_WINDOW_HOURS: i32 = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Pending,
        TaskStatus::Processing,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Processing => "processing",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// One row of `tasks`.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub id: Uuid,
    pub api_key_id: Uuid,
    pub attempt: i32,
    pub status: TaskStatus,
    pub progress: i16,
    pub message: Option<String>,
    pub eta_seconds: Option<i64>,
    pub model: String,
    pub provider: String,
    pub upstream_model: Option<String>,
    pub prompt: String,
    pub duration: i32,
    pub width: i32,
    pub height: i32,
    pub fps: i32,
    pub seed: Option<i64>,
    pub webhook_url: Option<String>,
    pub webhook_headers: BTreeMap<String, String>,
    pub webhook_events: WebhookEvents,
    pub video_key: Option<String>,
    pub generation_duration_seconds: Option<f64>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub last_seq: i64,
    /// The first frame of an image-to-video task (`image_url` as submitted). Not among
    /// [`TASK_COLUMNS`]: only a query that adds `image_url` fills it in.
    pub image_url: Option<String>,
}

pub const TASK_COLUMNS: &str = "id, api_key_id, attempt, status, progress, message, eta_seconds, \
     model, provider, upstream_model, prompt, duration, width, height, fps, seed, webhook_url, \
     webhook_headers, webhook_events, video_key, generation_duration_seconds, error, created_at, \
     updated_at, completed_at, last_seq";

impl TaskRow {
    pub fn from_row(row: &Row) -> anyhow::Result<Self> {
        let status: String = row.try_get("status")?;
        let headers: serde_json::Value = row.try_get("webhook_headers")?;
        let events: Vec<String> = row.try_get("webhook_events")?;
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
    pub fn job(&self) -> JobMessage {
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
        }
    }

    /// Rough time to finish, for `estimated_completion_time`: queueing plus rendering.
    pub fn estimated_seconds(&self) -> i64 {
        15 + i64::from(self.duration) * 5
    }

    /// True when the task's webhook subscription covers `event`.
    pub fn wants(&self, event: WebhookEvent) -> bool {
        self.webhook_url.is_some() && self.webhook_events.contains(event)
    }
}

fn job_outgoing(job: &JobMessage) -> anyhow::Result<Outgoing> {
    Ok(Outgoing::json(route::JOBS, job)?
        .for_task(job.task_id)
        .with_message_id(format!("{}:{}", job.task_id, job.attempt)))
}

/// What a submit led to.
#[derive(Debug)]
pub enum Submitted {
    Created(TaskRow),
    /// The same Idempotency-Key and body were seen before: this is that task.
    Replayed(TaskRow),
}

/// An Idempotency-Key presented with a submit, scoped to the caller's API key.
#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub key: String,
    /// [`GenerationRequest::fingerprint`] of the body, to tell a retry from a reuse.
    pub fingerprint: [u8; 32],
}

/// A validated submit, ready to be written: the new task, its job, and the
/// Idempotency-Key if one was sent.
#[derive(Debug, Clone)]
pub struct NewSubmit {
    pub task: TaskRow,
    pub job: Outgoing,
    pub claim: Option<IdempotencyClaim>,
}

impl NewSubmit {
    /// Builds the pending task (a fresh id, attempt 1) and its job message.
    pub fn new(
        caller: &Caller,
        request: &GenerationRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Self, ApiError> {
        let now = now_millis();
        let task = TaskRow {
            id: Uuid::now_v7(),
            api_key_id: caller.key_id,
            attempt: 1,
            status: TaskStatus::Pending,
            progress: 0,
            message: None,
            eta_seconds: None,
            model: request.model.id.clone(),
            provider: request.model.provider.clone(),
            upstream_model: request.model.upstream_model.clone(),
            prompt: request.prompt.as_str().to_owned(),
            duration: i32::try_from(request.duration).unwrap_or(i32::MAX),
            width: i32::try_from(request.size.width).unwrap_or(i32::MAX),
            height: i32::try_from(request.size.height).unwrap_or(i32::MAX),
            fps: i32::try_from(request.fps).unwrap_or(i32::MAX),
            seed: request.seed,
            webhook_url: request.webhook_url.as_ref().map(|u| u.as_str().to_owned()),
            webhook_headers: request.webhook_headers.as_map().clone(),
            webhook_events: request.webhook_events.clone(),
            video_key: None,
            generation_duration_seconds: None,
            error: None,
            created_at: now,
            updated_at: now,
            completed_at: None,
            last_seq: -1,
            image_url: request.image_url.as_ref().map(|i| i.as_str().to_owned()),
        };
        let job = job_outgoing(&task.job())?;
        let claim = idempotency_key.map(|key| IdempotencyClaim {
            key: key.to_owned(),
            fingerprint: request.fingerprint(),
        });
        Ok(Self { task, job, claim })
    }
}

/// The claim of an Idempotency-Key: inserts the key for this task, or takes over a row
/// older than the window; returns a row only when this submit now owns the key.
pub(crate) const CLAIM_SQL: &str =
    "INSERT INTO idempotency_keys (api_key_id, key, request_hash, task_id, created_at)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (api_key_id, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, task_id = EXCLUDED.task_id,
            created_at = EXCLUDED.created_at
        WHERE idempotency_keys.created_at < EXCLUDED.created_at - make_interval(hours => $6)
     RETURNING task_id";

/// Writes one submit on its own: the task and its job in one statement (one round trip,
/// atomic), or in one transaction with the Idempotency-Key. The group-commit writer
/// ([`crate::submits`]) uses this for a submit that cannot share a batch.
pub async fn submit_one(pool: &Pool, submit: &NewSubmit) -> Result<Submitted, ApiError> {
    let NewSubmit { task, job, claim } = submit;
    let mut client = pool.get().await?;
    let Some(claim) = claim else {
        insert_task_with_job(&client, task, job).await?;
        return Ok(Submitted::Created(task.clone()));
    };
    let tx = client.transaction().await.context("starting submit")?;
    let stmt = tx
        .prepare_cached(CLAIM_SQL)
        .await
        .context("preparing idempotency claim")?;
    let claimed = tx
        .query_opt(
            &stmt,
            &[
                &task.api_key_id,
                &claim.key,
                &claim.fingerprint.as_slice(),
                &task.id,
                &task.created_at,
                &IDEMPOTENCY_WINDOW_HOURS,
            ],
        )
        .await
        .context("claiming the idempotency key")?;
    if claimed.is_some() {
        insert_task_with_job(&tx, task, job).await?;
        tx.commit().await.context("committing submit")?;
        return Ok(Submitted::Created(task.clone()));
    }
    let row = tx
        .query_one(
            "SELECT request_hash, task_id FROM idempotency_keys WHERE api_key_id = $1 AND key = $2",
            &[&task.api_key_id, &claim.key],
        )
        .await
        .context("reading the idempotency key")?;
    let hash: Vec<u8> = row.get(0);
    if hash != claim.fingerprint {
        return Err(ApiError::IdempotencyKeyReused);
    }
    let task_id: Uuid = row.get(1);
    let existing = get(&tx, task.api_key_id, task_id)
        .await?
        .context("an idempotency key names a task that does not exist")?;
    tx.commit().await.context("ending submit")?;
    Ok(Submitted::Replayed(existing))
}

async fn insert_task_with_job(
    client: &impl GenericClient,
    task: &TaskRow,
    job: &Outgoing,
) -> Result<(), ApiError> {
    let stmt = client
        .prepare_cached(
            "WITH task AS (
                 INSERT INTO tasks (id, api_key_id, attempt, status, model, provider, upstream_model,
                     prompt, duration, width, height, fps, seed, webhook_url, webhook_headers,
                     webhook_events, created_at, updated_at, image_url)
                 VALUES ($1, $2, 1, 'pending', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15, $19))
             INSERT INTO outbox (target, route, body, task_id, message_id)
             VALUES ('queue', $16, $17, $1, $18)",
        )
        .await
        .context("preparing task insert")?;
    let headers =
        serde_json::to_value(&task.webhook_headers).context("encoding webhook headers")?;
    let events = task.webhook_events.names();
    client
        .execute(
            &stmt,
            &[
                &task.id,
                &task.api_key_id,
                &task.model,
                &task.provider,
                &task.upstream_model,
                &task.prompt,
                &task.duration,
                &task.width,
                &task.height,
                &task.fps,
                &task.seed,
                &task.webhook_url,
                &headers,
                &events,
                &task.created_at,
                &route::JOBS,
                &job.body,
                &job.message_id,
                &task.image_url,
            ],
        )
        .await
        .context("inserting the task and its job")?;
    Ok(())
}

/// The caller's task, or `None` for an unknown id or another key's task alike.
pub async fn get(
    client: &impl GenericClient,
    key_id: Uuid,
    task_id: Uuid,
) -> Result<Option<TaskRow>, ApiError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND api_key_id = $2"
        ))
        .await
        .context("preparing task look-up")?;
    let row = client
        .query_opt(&stmt, &[&task_id, &key_id])
        .await
        .context("looking up the task")?;
    Ok(row.as_ref().map(TaskRow::from_row).transpose()?)
}

/// A page of the caller's tasks, newest first; the extra row says whether more exist.
pub async fn list(
    client: &impl GenericClient,
    key_id: Uuid,
    status: Option<TaskStatus>,
    limit: i64,
    after: Option<Uuid>,
) -> Result<(Vec<TaskRow>, bool), ApiError> {
    let cursor = match after {
        None => None,
        Some(id) => {
            let row = client
                .query_opt(
                    "SELECT created_at FROM tasks WHERE id = $1 AND api_key_id = $2",
                    &[&id, &key_id],
                )
                .await
                .context("reading the page cursor")?
                .ok_or_else(|| {
                    crate::error::FieldError::invalid(
                        "after",
                        "after must be the id of one of your tasks",
                    )
                })?;
            Some((row.get::<_, DateTime<Utc>>(0), id))
        }
    };
    let (cursor_at, cursor_id) = cursor.unzip();
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks
             WHERE api_key_id = $1
               AND ($2::text IS NULL OR status = $2)
               AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
             ORDER BY created_at DESC, id DESC
             LIMIT $5"
        ))
        .await
        .context("preparing task listing")?;
    let status = status.map(TaskStatus::as_str);
    let rows = client
        .query(
            &stmt,
            &[&key_id, &status, &cursor_at, &cursor_id, &(limit + 1)],
        )
        .await
        .context("listing tasks")?;
    let mut tasks = rows
        .iter()
        .map(TaskRow::from_row)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let has_more = tasks.len() as i64 > limit;
    tasks.truncate(usize::try_from(limit).unwrap_or(0));
    Ok((tasks, has_more))
}

async fn lock_own(
    tx: &deadpool_postgres::Transaction<'_>,
    key_id: Uuid,
    task_id: Uuid,
) -> Result<TaskRow, ApiError> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND api_key_id = $2 FOR UPDATE"
        ))
        .await
        .context("preparing task lock")?;
    let row = tx
        .query_opt(&stmt, &[&task_id, &key_id])
        .await
        .context("locking the task")?
        .ok_or_else(ApiError::not_found_task)?;
    Ok(TaskRow::from_row(&row)?)
}

/// Cancels a pending or processing task: the row, the generators' cancel and the
/// cancelled webhook, all in one transaction.
pub async fn cancel(pool: &Pool, caller: &Caller, task_id: Uuid) -> Result<TaskRow, ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.context("starting cancel")?;
    let task = lock_own(&tx, caller.key_id, task_id).await?;
    if task.status.is_terminal() {
        return Err(ApiError::InvalidOperation(format!(
            "The task is already {} and cannot be cancelled",
            task.status.as_str()
        )));
    }
    let now = now_millis();
    let row = tx
        .query_one(
            &format!(
                "UPDATE tasks SET status = 'cancelled', error = $2, completed_at = $3, updated_at = $3,
                     eta_seconds = NULL, message = 'Video generation cancelled'
                 WHERE id = $1 RETURNING {TASK_COLUMNS}"
            ),
            &[&task.id, &CANCELLED_ERROR, &now],
        )
        .await
        .context("marking the task cancelled")?;
    let task = TaskRow::from_row(&row)?;
    let cancel = ControlMessage::Cancel {
        v: SCHEMA_VERSION,
        task_id: task.id,
        attempt: task.attempt,
    };
    outbox::enqueue(
        &tx,
        &Outgoing::control(&cancel)?
            .for_task(task.id)
            .with_message_id(format!("{}:{}:cancel", task.id, task.attempt)),
    )
    .await?;
    if task.wants(WebhookEvent::Cancelled) {
        let payload = WebhookPayload::Failed(FailedPayload::cancelled(
            task.id,
            now,
            task.model.clone(),
            task.prompt.clone(),
        ));
        webhooks::record_event(&tx, &task, &caller.webhook_secret, &payload, now).await?;
    }
    tx.commit().await.context("committing cancel")?;
    Ok(task)
}

/// Runs a failed or cancelled task again as a new attempt.
pub async fn retry(pool: &Pool, caller: &Caller, task_id: Uuid) -> Result<TaskRow, ApiError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.context("starting retry")?;
    let task = lock_own(&tx, caller.key_id, task_id).await?;
    if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
        return Err(ApiError::InvalidOperation(format!(
            "Only failed or cancelled tasks can be retried; this one is {}",
            task.status.as_str()
        )));
    }
    let now = now_millis();
    let row = tx
        .query_one(
            &format!(
                "UPDATE tasks SET attempt = attempt + 1, status = 'pending', progress = 0,
                     message = NULL, eta_seconds = NULL, video_key = NULL,
                     generation_duration_seconds = NULL, error = NULL, completed_at = NULL,
                     last_seq = -1, updated_at = $2
                 WHERE id = $1 RETURNING {TASK_COLUMNS}, image_url"
            ),
            &[&task.id, &now],
        )
        .await
        .context("resetting the task for a new attempt")?;
    let task = TaskRow::from_row(&row)?;
    outbox::enqueue(&tx, &job_outgoing(&task.job())?).await?;
    tx.commit().await.context("committing retry")?;
    Ok(task)
}
