//! The task ledger: the only writer of a task's state after submit. It applies the
//! generators' status events as a state machine, one transaction per event, and in the
//! same transaction records the webhook events they cause. An event counts only for the
//! task's current attempt and never after a terminal state; a non-terminal event must
//! also carry a sequence number above the last one applied. Everything else is a
//! duplicate or stale and is dropped. That is what gives every task exactly one terminal
//! state and no progress after it.
//!
//! A terminal event skips the sequence check on purpose: a generator that takes over a
//! job from a lost one may number its events from the start again, and its outcome must
//! still count. The first terminal event of an attempt wins; any later one is dropped.
//!
//! The same module records the webhook senders' attempt outcomes into the delivery log.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chrono::Utc;
use conduit_core::{
    messages::{AttemptOutcome, StatusEvent, StatusKind, SCHEMA_VERSION},
    payload::{CompletedPayload, FailedPayload, ProgressPayload, WebhookEvent, WebhookPayload},
    topology::route,
    ConsumeLimits, Disposition, Incoming, Source,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::{
    error::is_unavailable,
    state::AppState,
    tasks::{TaskRow, TaskStatus, TASK_COLUMNS},
    webhooks,
};

/// Why an event was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    UnknownTask,
    OtherAttempt,
    AfterTerminal,
    Duplicate,
}

impl Drop {
    fn as_str(self) -> &'static str {
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
pub fn judge(
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
pub enum Applied {
    Applied { webhook: bool },
    Dropped(Drop),
}

/// Text from another service, made storable: PostgreSQL text cannot hold NUL, and an
/// event that can never be stored would otherwise come back forever.
fn storable(text: &str) -> String {
    text.replace('\0', "")
}

/// Applies one status event in one transaction.
pub async fn apply(state: &AppState, event: &StatusEvent) -> anyhow::Result<Applied> {
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
    let mut client = state
        .pool
        .get()
        .await
        .context("connecting to the database")?;
    let tx = client
        .transaction()
        .await
        .context("starting ledger transaction")?;
    let lock = tx
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS}, (SELECT webhook_secret FROM api_keys k WHERE k.id = t.api_key_id) AS secret
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
    let secret: String = row.try_get("secret")?;
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
            task.wants(WebhookEvent::Progress).then(|| {
                WebhookPayload::Progress(ProgressPayload::new(
                    task.id,
                    at,
                    percent,
                    message.clone(),
                    *eta_seconds,
                ))
            })
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
            if task.wants(WebhookEvent::Completed) {
                let url = state
                    .links
                    .url_for(task.id, video_key, at, Utc::now())
                    .await?;
                Some(WebhookPayload::Completed(CompletedPayload::new(
                    task.id,
                    at,
                    url,
                    *generation_duration_seconds,
                    made_by,
                    task.prompt.clone(),
                )))
            } else {
                None
            }
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
            task.wants(WebhookEvent::Failed).then(|| {
                WebhookPayload::Failed(FailedPayload::failed(
                    task.id,
                    at,
                    error.clone(),
                    task.model.clone(),
                    task.prompt.clone(),
                ))
            })
        }
    };
    if let Some(payload) = &payload {
        webhooks::record_event(&tx, &task, &secret, payload, at).await?;
    }
    tx.commit().await.context("committing ledger transaction")?;
    Ok(Applied::Applied {
        webhook: payload.is_some(),
    })
}

/// Retries `work` while the database is away (keeping the delivery unacknowledged) and
/// a few times on other errors, then hands the delivery back.
async fn with_retries<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut work: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0;
    loop {
        match work().await {
            Ok(v) => return Some(v),
            Err(err) => {
                let transient = is_unavailable(&err);
                failures += 1;
                warn!(error = %format!("{err:#}"), transient, "{what} failed");
                if !transient && failures >= 3 {
                    return None;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn on_status(
    state: Arc<AppState>,
    incoming: Incoming,
    shutdown: CancellationToken,
) -> Disposition {
    let event: StatusEvent = match serde_json::from_slice(&incoming.body) {
        Ok(e) => e,
        Err(err) => {
            warn!(error = %err, "unreadable status event; rejecting it");
            return Disposition::Reject;
        }
    };
    if event.v > SCHEMA_VERSION {
        warn!(
            v = event.v,
            "status event of an unknown schema version; rejecting it"
        );
        return Disposition::Reject;
    }
    let span = tracing::info_span!("status_event", task_id = %event.task_id, attempt = event.attempt, seq = event.seq);
    async {
        let Some(applied) = with_retries("applying a status event", &shutdown, || {
            apply(&state, &event)
        })
        .await
        else {
            return Disposition::Requeue;
        };
        match applied {
            Applied::Applied { webhook } => {
                state
                    .metrics
                    .ledger_events
                    .with_label_values(&["applied"])
                    .inc();
                if webhook {
                    state.wake_relay();
                }
                if event.kind.is_terminal() {
                    info!("task reached its terminal state");
                }
            }
            Applied::Dropped(why) => {
                state
                    .metrics
                    .ledger_events
                    .with_label_values(&[why.as_str()])
                    .inc();
                debug!(reason = why.as_str(), "dropped status event");
            }
        }
        Disposition::Ack
    }
    .instrument(span)
    .await
}

async fn on_outcome(
    state: Arc<AppState>,
    incoming: Incoming,
    shutdown: CancellationToken,
) -> Disposition {
    let outcome: AttemptOutcome = match serde_json::from_slice(&incoming.body) {
        Ok(o) => o,
        Err(err) => {
            warn!(error = %err, "unreadable webhook outcome; rejecting it");
            return Disposition::Reject;
        }
    };
    if outcome.v > SCHEMA_VERSION {
        return Disposition::Reject;
    }
    let span = tracing::info_span!("webhook_outcome", task_id = %outcome.task_id, webhook_id = %outcome.webhook_id);
    async {
        let pool = state.pool.clone();
        match with_retries("recording a webhook outcome", &shutdown, || {
            let pool = pool.clone();
            let outcome = outcome.clone();
            async move { webhooks::record_outcome(&pool, &outcome).await }
        })
        .await
        {
            Some(_) => {
                state
                    .metrics
                    .webhook_outcomes
                    .with_label_values(&[outcome.state.as_str()])
                    .inc();
                Disposition::Ack
            }
            None => Disposition::Requeue,
        }
    }
    .instrument(span)
    .await
}

/// Each consumer may hold a quarter of the pool, so a burst of events never starves the
/// HTTP handlers of connections.
fn limits(state: &AppState) -> ConsumeLimits {
    let concurrency = (state.settings.database.pool_size / 4).max(1);
    ConsumeLimits {
        prefetch: state
            .settings
            .amqp
            .prefetch
            .min(u16::try_from(concurrency * 4).unwrap_or(u16::MAX))
            .max(1),
        concurrency,
    }
}

/// Consumes status events until `shutdown`.
pub async fn run_status_consumer(
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let broker = state.broker.clone();
    let limits = limits(&state);
    broker
        .consume(
            Source::Queue(route::STATUS.into()),
            limits,
            shutdown,
            move |incoming, token| on_status(state.clone(), incoming, token),
        )
        .await
}

/// Consumes webhook attempt outcomes until `shutdown`.
pub async fn run_outcome_consumer(
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let broker = state.broker.clone();
    let limits = limits(&state);
    broker
        .consume(
            Source::Queue(route::OUTCOMES.into()),
            limits,
            shutdown,
            move |incoming, token| on_outcome(state.clone(), incoming, token),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
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
