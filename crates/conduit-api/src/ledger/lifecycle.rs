//! Reading tasks, and the two transitions a client asks for: cancel and retry. Each
//! transition locks the task's row, checks the state machine, and writes the row, the
//! messages for other services and the webhook event in one transaction.

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{
    messages::{ControlMessage, SCHEMA_VERSION},
    payload::{FailedPayload, WebhookEvent, WebhookPayload, CANCELLED_ERROR},
    time::now_millis,
    Outgoing,
};
use deadpool_postgres::{GenericClient, Pool};
use uuid::Uuid;

use super::{
    outbox,
    secrets::{KeySecrets, SECRETS_OF_TASK_KEY},
    stream,
    task::{job_outgoing, TaskRow, TaskStatus, TASK_COLUMNS},
    webhooks, LedgerError, TaskPage,
};

/// The owner's task, or `None` for an unknown id or another key's task alike.
pub(super) async fn get(
    client: &impl GenericClient,
    key_id: Uuid,
    task_id: Uuid,
) -> anyhow::Result<Option<TaskRow>> {
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
    row.as_ref().map(TaskRow::from_row).transpose()
}

/// The storage key of `task_id`'s video, while the task is completed.
pub(super) async fn completed_video_key(
    client: &impl GenericClient,
    task_id: Uuid,
) -> anyhow::Result<Option<String>> {
    let stmt = client
        .prepare_cached("SELECT video_key FROM tasks WHERE id = $1 AND status = 'completed'")
        .await
        .context("preparing video look-up")?;
    Ok(client
        .query_opt(&stmt, &[&task_id])
        .await
        .context("looking up the video")?
        .and_then(|r| r.get(0)))
}

/// A page of the owner's tasks, newest first; the extra row says whether more exist.
pub(super) async fn list(
    client: &impl GenericClient,
    key_id: Uuid,
    page: &TaskPage,
) -> Result<(Vec<TaskRow>, bool), LedgerError> {
    let cursor = match page.after {
        None => None,
        Some(id) => {
            let row = client
                .query_opt(
                    "SELECT created_at FROM tasks WHERE id = $1 AND api_key_id = $2",
                    &[&id, &key_id],
                )
                .await
                .context("reading the page cursor")?
                .ok_or(LedgerError::UnknownCursor)?;
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
    let status = page.status.map(TaskStatus::as_str);
    let rows = client
        .query(
            &stmt,
            &[&key_id, &status, &cursor_at, &cursor_id, &(page.limit + 1)],
        )
        .await
        .context("listing tasks")?;
    let mut tasks = rows
        .iter()
        .map(TaskRow::from_row)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let has_more = tasks.len() as i64 > page.limit;
    tasks.truncate(usize::try_from(page.limit).unwrap_or(0));
    Ok((tasks, has_more))
}

/// Locks the owner's task for a transition; also returns its key's webhook secret.
async fn lock_own(
    tx: &deadpool_postgres::Transaction<'_>,
    key_id: Uuid,
    task_id: Uuid,
) -> Result<(TaskRow, KeySecrets), LedgerError> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS}, {SECRETS_OF_TASK_KEY}
             FROM tasks t WHERE id = $1 AND api_key_id = $2 FOR UPDATE"
        ))
        .await
        .context("preparing task lock")?;
    let row = tx
        .query_opt(&stmt, &[&task_id, &key_id])
        .await
        .context("locking the task")?
        .ok_or(LedgerError::NotFound)?;
    let secrets = KeySecrets::from_row(&row)?;
    Ok((TaskRow::from_row(&row)?, secrets))
}

/// Cancels a pending or processing task: the row, the generators' cancel and the
/// cancelled webhook, all in one transaction.
pub(super) async fn cancel(
    pool: &Pool,
    key_id: Uuid,
    task_id: Uuid,
) -> Result<TaskRow, LedgerError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.context("starting cancel")?;
    let (task, secrets) = lock_own(&tx, key_id, task_id).await?;
    if task.status.is_terminal() {
        return Err(LedgerError::AlreadyTerminal(task.status));
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
    outbox::enqueue(&tx, &cancel_message(&task)?).await?;
    let payload = WebhookPayload::Failed(FailedPayload::cancelled(
        task.id,
        now,
        task.model.clone(),
        task.prompt.clone(),
    ));
    let event_id = stream::new_event_id();
    if task.wants(WebhookEvent::Cancelled) {
        webhooks::record_event(&tx, &task, &secrets, &event_id, &payload, now, None).await?;
    }
    stream::record(&tx, &task, &event_id, &payload, now).await?;
    tx.commit().await.context("committing cancel")?;
    Ok(task)
}

/// The cancel of `task`'s current attempt, for every generator and the lifecycle stream.
pub(super) fn cancel_message(task: &TaskRow) -> anyhow::Result<Outgoing> {
    let cancel = ControlMessage::Cancel {
        v: SCHEMA_VERSION,
        task_id: task.id,
        attempt: task.attempt,
    };
    Ok(Outgoing::control(&cancel)?
        .for_task(task.id)
        .with_message_id(format!("{}:{}:cancel", task.id, task.attempt)))
}

/// Runs a failed or cancelled task again as a new attempt.
pub(super) async fn retry(
    pool: &Pool,
    key_id: Uuid,
    task_id: Uuid,
) -> Result<TaskRow, LedgerError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.context("starting retry")?;
    let (task, _) = lock_own(&tx, key_id, task_id).await?;
    if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
        return Err(LedgerError::NotRetryable(task.status));
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
