//! Status events: the generators' reports applied to a task as a state machine, one
//! transaction per event, recording in the same transaction the webhook events they
//! cause. An event counts only for the
//! task's current attempt and never after a terminal state; a non-terminal event must
//! also carry a sequence number above the last one applied. Everything else is a
//! duplicate or stale and is dropped. That is what gives every task exactly one terminal
//! state and no progress after it.
//!
//! A terminal event skips the sequence check on purpose: a generator that takes over a
//! job from a lost one may number its events from the start again, and its outcome must
//! still count. The first terminal event of an attempt wins; any later one is dropped.

use anyhow::Context;
use chrono::Utc;
use conduit_core::{
    messages::{StatusEvent, StatusKind},
    payload::{CompletedPayload, FailedPayload, ProgressPayload, WebhookPayload},
};
use deadpool_postgres::Pool;

use super::{
    secrets::{KeySecrets, SECRETS_OF_TASK_KEY},
    stream,
    task::{TaskRow, TaskStatus, TASK_COLUMNS},
    webhooks,
};
use crate::links::VideoLinks;

/// Why an event was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drop {
    UnknownTask,
    OtherAttempt,
    AfterTerminal,
    Duplicate,
}

impl Drop {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Drop::UnknownTask => "unknown_task",
            Drop::OtherAttempt => "other_attempt",
            Drop::AfterTerminal => "after_terminal",
            Drop::Duplicate => "duplicate_or_stale",
        }
    }
}

/// The state-machine rule: may `event` change a task that is `status` at `attempt`
/// with `last_seq` applied?
pub(super) fn judge(
    status: TaskStatus,
    attempt: i32,
    last_seq: i64,
    event: &StatusEvent,
) -> Result<(), Drop> {
    if event.attempt != attempt {
        return Err(Drop::OtherAttempt);
    }
    if status.is_terminal() {
        return Err(Drop::AfterTerminal);
    }
    if !event.kind.is_terminal() && i64::try_from(event.seq).unwrap_or(i64::MAX) <= last_seq {
        return Err(Drop::Duplicate);
    }
    Ok(())
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// `recorded`: the status event recorded a task event (for the stream, maybe
    /// a webhook).
    Applied {
        recorded: bool,
    },
    Dropped(Drop),
}

/// Text from another service, made storable: PostgreSQL text cannot hold NUL, and an
/// event that can never be stored would otherwise come back forever.
fn storable(text: &str) -> String {
    text.replace('\0', "")
}

/// Applies one status event in one transaction.
pub(super) async fn apply(
    pool: &Pool,
    links: &VideoLinks,
    event: &StatusEvent,
) -> anyhow::Result<Applied> {
    let event = &StatusEvent {
        kind: match &event.kind {
            StatusKind::Processing { message } => StatusKind::Processing {
                message: storable(message),
            },
            StatusKind::Progress {
                percent,
                message,
                eta_seconds,
            } => StatusKind::Progress {
                percent: *percent,
                message: storable(message),
                eta_seconds: *eta_seconds,
            },
            StatusKind::Completed {
                video_key,
                generation_duration_seconds,
                model,
            } => StatusKind::Completed {
                video_key: storable(video_key),
                generation_duration_seconds: *generation_duration_seconds,
                model: model.as_deref().map(storable),
            },
            StatusKind::Failed { error } => StatusKind::Failed {
                error: storable(error),
            },
        },
        ..event.clone()
    };
    let mut client = pool.get().await.context("connecting to the database")?;
    let tx = client
        .transaction()
        .await
        .context("starting ledger transaction")?;
    let lock = tx
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS}, {SECRETS_OF_TASK_KEY}
             FROM tasks t WHERE id = $1 FOR UPDATE"
        ))
        .await
        .context("preparing ledger lock")?;
    let Some(row) = tx
        .query_opt(&lock, &[&event.task_id])
        .await
        .context("locking the task")?
    else {
        return Ok(Applied::Dropped(Drop::UnknownTask));
    };
    let task = TaskRow::from_row(&row)?;
    let secrets = KeySecrets::from_row(&row)?;
    if let Err(drop) = judge(task.status, task.attempt, task.last_seq, event) {
        return Ok(Applied::Dropped(drop));
    }
    let seq = i64::try_from(event.seq)
        .unwrap_or(i64::MAX)
        .max(task.last_seq);
    let at = event.at;
    // `updated_at` is this process's clock; the event's own time (`at`) is what the
    // webhook payloads and `completed_at` report.
    let now = conduit_core::time::now_millis();
    let payload = match &event.kind {
        StatusKind::Processing { message } => {
            tx.execute(
                "UPDATE tasks SET status = 'processing', message = $2, last_seq = $3, updated_at = $4
                 WHERE id = $1",
                &[&task.id, message, &seq, &now],
            )
            .await
            .context("marking the task processing")?;
            None
        }
        StatusKind::Progress {
            percent,
            message,
            eta_seconds,
        } => {
            let percent = (*percent).min(100);
            let eta = eta_seconds.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
            tx.execute(
                "UPDATE tasks SET status = 'processing', progress = $2, message = $3, eta_seconds = $4,
                     last_seq = $5, updated_at = $6
                 WHERE id = $1",
                &[&task.id, &i16::from(percent), message, &eta, &seq, &now],
            )
            .await
            .context("recording progress")?;
            Some(WebhookPayload::Progress(ProgressPayload::new(
                task.id,
                at,
                percent,
                message.clone(),
                *eta_seconds,
            )))
        }
        StatusKind::Completed {
            video_key,
            generation_duration_seconds,
            model: fallback,
        } => {
            // A fallback model that made the video is named in the message and the
            // webhook's `model`; the task keeps the model it was submitted for.
            let made_by = fallback
                .clone()
                .filter(|m| *m != task.model)
                .unwrap_or_else(|| task.model.clone());
            let message = if made_by == task.model {
                "Video generation completed".to_owned()
            } else {
                format!(
                    "Video generation completed by fallback model {made_by} ({} was unavailable)",
                    task.model
                )
            };
            tx.execute(
                "UPDATE tasks SET status = 'completed', progress = 100, eta_seconds = NULL,
                     message = $7,
                     video_key = $2, generation_duration_seconds = $3, completed_at = $4,
                     last_seq = $5, updated_at = $6
                 WHERE id = $1",
                &[
                    &task.id,
                    video_key,
                    generation_duration_seconds,
                    &at,
                    &seq,
                    &now,
                    &message,
                ],
            )
            .await
            .context("completing the task")?;
            let url = links.url_for(task.id, at, Utc::now());
            Some(WebhookPayload::Completed(CompletedPayload::new(
                task.id,
                at,
                url,
                *generation_duration_seconds,
                made_by,
                task.prompt.clone(),
            )))
        }
        StatusKind::Failed { error } => {
            tx.execute(
                "UPDATE tasks SET status = 'failed', eta_seconds = NULL, error = $2, completed_at = $3,
                     message = 'Video generation failed',
                     last_seq = $4, updated_at = $5
                 WHERE id = $1",
                &[&task.id, error, &at, &seq, &now],
            )
            .await
            .context("failing the task")?;
            Some(WebhookPayload::Failed(FailedPayload::failed(
                task.id,
                at,
                error.clone(),
                task.model.clone(),
                task.prompt.clone(),
            )))
        }
    };
    // Every event a webhook would carry goes to the stream, whatever the task's
    // webhook settings; the webhook, when the task wants it, shares the event's id.
    if let Some(payload) = &payload {
        let event_id = stream::new_event_id();
        if task.wants(payload.event()) {
            let video_link = match payload {
                WebhookPayload::Completed(done) => {
                    Some(links.signer(task.id, done.video_url.clone()))
                }
                _ => None,
            };
            webhooks::record_event(&tx, &task, &secrets, &event_id, payload, at, video_link)
                .await?;
        }
        stream::record(&tx, &task, &event_id, payload, at).await?;
    }
    tx.commit().await.context("committing ledger transaction")?;
    Ok(Applied::Applied {
        recorded: payload.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_core::messages::SCHEMA_VERSION;
    use uuid::Uuid;

    fn event(attempt: i32, seq: u64) -> StatusEvent {
        StatusEvent {
            v: SCHEMA_VERSION,
            task_id: Uuid::nil(),
            attempt,
            seq,
            at: conduit_core::time::now_millis(),
            kind: StatusKind::Processing {
                message: "m".into(),
            },
        }
    }

    #[test]
    fn accepts_the_next_event_of_the_current_attempt() {
        assert_eq!(judge(TaskStatus::Pending, 1, -1, &event(1, 0)), Ok(()));
        assert_eq!(judge(TaskStatus::Processing, 1, 3, &event(1, 4)), Ok(()));
        assert_eq!(judge(TaskStatus::Processing, 1, 3, &event(1, 10)), Ok(()));
    }

    #[test]
    fn drops_duplicates_and_stale_events() {
        assert_eq!(
            judge(TaskStatus::Processing, 1, 3, &event(1, 3)),
            Err(Drop::Duplicate)
        );
        assert_eq!(
            judge(TaskStatus::Processing, 1, 3, &event(1, 2)),
            Err(Drop::Duplicate)
        );
    }

    #[test]
    fn a_terminal_event_counts_whatever_its_sequence() {
        let mut done = event(1, 1);
        done.kind = StatusKind::Failed {
            error: "lost".into(),
        };
        assert_eq!(judge(TaskStatus::Processing, 1, 7, &done), Ok(()));
        assert_eq!(
            judge(TaskStatus::Failed, 1, 7, &done),
            Err(Drop::AfterTerminal)
        );
        assert_eq!(
            judge(TaskStatus::Processing, 2, 7, &done),
            Err(Drop::OtherAttempt)
        );
    }

    #[test]
    fn drops_events_of_other_attempts() {
        assert_eq!(
            judge(TaskStatus::Pending, 2, -1, &event(1, 9)),
            Err(Drop::OtherAttempt)
        );
        assert_eq!(
            judge(TaskStatus::Pending, 1, -1, &event(2, 0)),
            Err(Drop::OtherAttempt)
        );
    }

    #[test]
    fn terminal_is_final() {
        for s in [
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ] {
            assert_eq!(judge(s, 1, 3, &event(1, 4)), Err(Drop::AfterTerminal));
        }
    }
}
