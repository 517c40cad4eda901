//! Group commit for submits. Every accepted submit costs PostgreSQL a transaction and a
//! WAL flush; under load those per-transaction costs, not the rows, are what the
//! database spends its time on. So handlers do not write a submit themselves: they hand
//! it to the writer and wait. The writer takes whatever submits are waiting (up to
//! [`MAX_BATCH`]) and writes them together, every task and its job in one transaction
//! with multi-row inserts, on at most a few connections at once. Each handler answers
//! only once the transaction holding its submit has committed, so a 202 still means the
//! task and its job are durable.
//!
//! Nothing waits on purpose: a batch is whatever queued up while the previous ones were
//! committing, so a lone submit is written at once and a burst shares commits.
//!
//! One submit never fails another. Idempotency-Keys are claimed in the same transaction
//! (in key order, so two batches take their row locks in one order); a key seen before
//! answers with its task or with a 409 for that submit only; a key that appears twice in
//! one batch, or anything the batch cannot settle, is written on its own right after the
//! batch. If the batch's transaction fails for a reason other than the database being
//! away, each of its submits is written on its own instead, so a bad row fails alone.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};
use uuid::Uuid;

use super::{
    task::{NewTask, TaskRow, TASK_COLUMNS},
    LedgerError, Submitted,
};
use crate::{db::is_unavailable, metrics::Metrics};

/// Idempotency keys are honoured for this long.
pub(crate) const IDEMPOTENCY_WINDOW_HOURS: i32 = 24;

/// Most submits written in one transaction.
pub(crate) const MAX_BATCH: usize = 256;
/// Submits that may wait for the writer before handlers wait to hand theirs over.
const QUEUE: usize = 4 * MAX_BATCH;

/// The handlers' side: hands a submit to the writer and waits for its outcome.
#[derive(Clone)]
pub(crate) struct SubmitQueue {
    tx: mpsc::Sender<Pending>,
}

/// The writer's side, run by [`SubmitWriter::run`].
pub(crate) struct SubmitWriter {
    rx: mpsc::Receiver<Pending>,
    pool: Pool,
    metrics: Metrics,
    /// Batches written at the same time, each on its own connection.
    writers: usize,
}

struct Pending {
    submit: NewTask,
    reply: oneshot::Sender<Result<Submitted, LedgerError>>,
}

/// A queue and its writer; `writers` batches may be committing at once.
pub(super) fn channel(pool: Pool, metrics: Metrics, writers: usize) -> (SubmitQueue, SubmitWriter) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (
        SubmitQueue { tx },
        SubmitWriter {
            rx,
            pool,
            metrics,
            writers: writers.max(1),
        },
    )
}

impl SubmitQueue {
    /// Writes `submit` with whatever else is waiting; returns once its transaction has
    /// committed (or failed).
    pub(super) async fn submit(&self, submit: NewTask) -> Result<Submitted, LedgerError> {
        self.enqueue(submit).await?.outcome().await
    }

    /// Queues `submit` and returns the wait for its outcome.
    pub(crate) async fn enqueue(&self, submit: NewTask) -> Result<Answer, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { submit, reply })
            .await
            .map_err(|_| LedgerError::Unavailable(anyhow!("the submit writer has stopped")))?;
        Ok(Answer(answer))
    }
}

/// The outcome of a queued submit, once its transaction has committed (or failed).
pub(crate) struct Answer(oneshot::Receiver<Result<Submitted, LedgerError>>);

impl Answer {
    pub(crate) async fn outcome(self) -> Result<Submitted, LedgerError> {
        self.0.await.map_err(|_| {
            LedgerError::Unavailable(anyhow!("the submit writer stopped before answering"))
        })?
    }
}

impl SubmitWriter {
    /// Writes batches until `stop` fires, then writes what is still queued, waits for the
    /// batches in flight and returns. Stop it only after the HTTP server has stopped.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.writers));
        let mut stopping = false;
        loop {
            let first = if stopping {
                self.rx.recv().await
            } else {
                tokio::select! {
                    p = self.rx.recv() => p,
                    () = stop.cancelled() => {
                        stopping = true;
                        self.rx.close();
                        continue;
                    }
                }
            };
            let Some(first) = first else { break };
            // Submits keep queueing while every writer is busy; they form the next batch.
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let mut batch = Vec::with_capacity(MAX_BATCH.min(self.rx.len() + 1));
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            self.metrics.submit_batch_size.observe(batch.len() as f64);
            let (pool, span) = (
                self.pool.clone(),
                tracing::info_span!("submit_batch", submits = batch.len()),
            );
            tokio::spawn(
                async move {
                    commit(&pool, batch).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        // Every slot back means every batch in flight has answered.
        let all = u32::try_from(self.writers).unwrap_or(u32::MAX);
        let _ = slots.acquire_many(all).await;
    }
}

/// How one submit of a batch came out.
enum Outcome {
    Created,
    Replayed(Box<TaskRow>),
    Reused,
    /// Not settled in the batch: written on its own afterwards.
    Unsettled,
}

/// Writes one batch and answers each of its submits. A submit is never written any other
/// way: one written on its own (a key that appears twice in the batch, a row the batch
/// could not settle, a batch that failed for a reason other than the database being
/// away) is simply a batch of one, written after the batch it came from.
async fn commit(pool: &Pool, batch: Vec<Pending>) {
    let mut rounds = VecDeque::from([batch]);
    while let Some(round) = rounds.pop_front() {
        // A key that appears twice in one batch cannot be claimed twice in one statement;
        // the later ones are written after the batch, when the first one's claim is visible.
        let mut seen = HashSet::new();
        let (together, again): (Vec<Pending>, Vec<Pending>) = round.into_iter().partition(|p| {
            p.submit
                .claim
                .as_ref()
                .is_none_or(|c| seen.insert((p.submit.task.api_key_id, c.key.clone())))
        });
        if !again.is_empty() {
            rounds.push_front(again);
        }
        let alone = together.len() == 1;
        let submits: Vec<&NewTask> = together.iter().map(|p| &p.submit).collect();
        let written = write_batch(pool, &submits)
            .instrument(tracing::info_span!(
                "submit_batch_write",
                submits = submits.len()
            ))
            .await;
        match written {
            Ok(outcomes) => {
                for (pending, outcome) in together.into_iter().zip(outcomes) {
                    let answer = match outcome {
                        Outcome::Created => Ok(Submitted::Created(pending.submit.task.clone())),
                        Outcome::Replayed(task) => Ok(Submitted::Replayed(*task)),
                        Outcome::Reused => Err(LedgerError::IdempotencyKeyReused),
                        Outcome::Unsettled if alone => Err(LedgerError::Internal(anyhow!(
                            "the Idempotency-Key names a task that does not exist"
                        ))),
                        Outcome::Unsettled => {
                            rounds.push_back(vec![pending]);
                            continue;
                        }
                    };
                    let _ = pending.reply.send(answer);
                }
            }
            Err(err) if is_unavailable(&err) => {
                let message = format!("{err:#}");
                for pending in together {
                    let _ = pending
                        .reply
                        .send(Err(LedgerError::Unavailable(anyhow!("{message}"))));
                }
            }
            Err(err) if alone => {
                if let Some(pending) = together.into_iter().next() {
                    let _ = pending.reply.send(Err(LedgerError::from(err)));
                }
            }
            Err(err) => {
                warn!(error = %format!("{err:#}"), submits = together.len(), "a submit batch failed; writing its submits one by one");
                rounds.extend(together.into_iter().map(|p| vec![p]));
            }
        }
    }
}

/// Writes every submit of `submits` it can settle in one transaction; the outcomes are
/// in the same order.
async fn write_batch(pool: &Pool, submits: &[&NewTask]) -> anyhow::Result<Vec<Outcome>> {
    if submits.is_empty() {
        return Ok(Vec::new());
    }
    let mut client = pool.get().await.context("taking a database connection")?;
    if submits.iter().all(|s| s.claim.is_none()) {
        // One statement is one transaction: no BEGIN or COMMIT round trips.
        insert_tasks_with_jobs(&client, submits).await?;
        return Ok(submits.iter().map(|_| Outcome::Created).collect());
    }
    let tx = client
        .transaction()
        .await
        .context("starting a submit batch")?;
    let mut outcomes = claim_keys(&tx, submits).await?;
    let created: Vec<&NewTask> = submits
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| matches!(o, Outcome::Created))
        .map(|(s, _)| *s)
        .collect();
    insert_tasks_with_jobs(&tx, &created).await?;
    // Replays read their task inside the transaction: the claim's row lock keeps the
    // key (and so the task it names) from changing meanwhile.
    let replays: Vec<Uuid> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Replayed(t) => Some(t.id),
            _ => None,
        })
        .collect();
    if !replays.is_empty() {
        let stmt = tx
            .prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE id = ANY($1)"
            ))
            .await
            .context("preparing the replayed tasks' look-up")?;
        let rows = tx
            .query(&stmt, &[&replays])
            .await
            .context("reading the replayed tasks")?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in &rows {
            let task = TaskRow::from_row(row)?;
            found.insert(task.id, task);
        }
        for (submit, outcome) in submits.iter().zip(outcomes.iter_mut()) {
            if let Outcome::Replayed(placeholder) = outcome {
                *outcome = match found.get(&placeholder.id) {
                    Some(task) if task.api_key_id == submit.task.api_key_id => {
                        Outcome::Replayed(Box::new(task.clone()))
                    }
                    // Written on its own, it reports what is wrong.
                    _ => Outcome::Unsettled,
                };
            }
        }
    }
    tx.commit().await.context("committing a submit batch")?;
    Ok(outcomes)
}

/// Claims the batch's Idempotency-Keys; `Created` for submits without a key or whose
/// key is now theirs, `Replayed` (a placeholder holding only the task id) or `Reused` for
/// keys seen before.
async fn claim_keys(
    tx: &deadpool_postgres::Transaction<'_>,
    submits: &[&NewTask],
) -> anyhow::Result<Vec<Outcome>> {
    let keyed: Vec<&NewTask> = submits
        .iter()
        .filter(|s| s.claim.is_some())
        .copied()
        .collect();
    let mut key_ids = Vec::with_capacity(keyed.len());
    let mut keys = Vec::with_capacity(keyed.len());
    let mut hashes = Vec::with_capacity(keyed.len());
    let mut task_ids = Vec::with_capacity(keyed.len());
    let mut ats = Vec::with_capacity(keyed.len());
    for s in &keyed {
        let Some(claim) = &s.claim else { continue };
        key_ids.push(s.task.api_key_id);
        keys.push(claim.key.as_str());
        hashes.push(claim.fingerprint.as_slice());
        task_ids.push(s.task.id);
        ats.push(s.task.created_at);
    }
    let claimed: HashSet<Uuid> = {
        // Sorted by key, so concurrent batches lock shared keys in the same order.
        let stmt = tx
            .prepare_cached(
                "INSERT INTO idempotency_keys (api_key_id, key, request_hash, task_id, created_at)
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::uuid[], $5::timestamptz[])
                     AS c (api_key_id, key, request_hash, task_id, created_at)
                 ORDER BY api_key_id, key COLLATE \"C\"
                 ON CONFLICT (api_key_id, key) DO UPDATE
                    SET request_hash = EXCLUDED.request_hash, task_id = EXCLUDED.task_id,
                        created_at = EXCLUDED.created_at
                    WHERE idempotency_keys.created_at
                        < EXCLUDED.created_at - make_interval(hours => $6)
                 RETURNING task_id",
            )
            .await
            .context("preparing idempotency claims")?;
        tx.query(
            &stmt,
            &[
                &key_ids,
                &keys,
                &hashes,
                &task_ids,
                &ats,
                &IDEMPOTENCY_WINDOW_HOURS,
            ],
        )
        .await
        .context("claiming idempotency keys")?
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let taken: Vec<&NewTask> = keyed
        .iter()
        .filter(|s| !claimed.contains(&s.task.id))
        .copied()
        .collect();
    // (api key, idempotency key) → (request hash, task id) of each key seen before.
    let mut before: HashMap<(Uuid, &str), (Vec<u8>, Uuid)> = HashMap::new();
    if !taken.is_empty() {
        let ids: Vec<Uuid> = taken.iter().map(|s| s.task.api_key_id).collect();
        let names: Vec<&str> = taken
            .iter()
            .filter_map(|s| s.claim.as_ref().map(|c| c.key.as_str()))
            .collect();
        let stmt = tx
            .prepare_cached(
                "SELECT i.api_key_id, i.key, i.request_hash, i.task_id
                 FROM idempotency_keys i
                 JOIN unnest($1::uuid[], $2::text[]) AS w (api_key_id, key)
                   ON i.api_key_id = w.api_key_id AND i.key = w.key",
            )
            .await
            .context("preparing idempotency key look-up")?;
        for row in tx
            .query(&stmt, &[&ids, &names])
            .await
            .context("reading idempotency keys")?
        {
            let key: String = row.get(1);
            if let Some(name) = names.iter().find(|n| **n == key) {
                before.insert((row.get(0), *name), (row.get(2), row.get(3)));
            }
        }
    }
    Ok(submits
        .iter()
        .map(|s| {
            let Some(claim) = &s.claim else {
                return Outcome::Created;
            };
            if claimed.contains(&s.task.id) {
                return Outcome::Created;
            }
            match before.get(&(s.task.api_key_id, claim.key.as_str())) {
                Some((hash, _)) if hash.as_slice() != claim.fingerprint.as_slice() => {
                    Outcome::Reused
                }
                Some((_, task_id)) => Outcome::Replayed(Box::new(placeholder(*task_id, s))),
                None => Outcome::Unsettled,
            }
        })
        .collect())
}

/// A stand-in carrying only the id of a replayed task until the row is read.
fn placeholder(task_id: Uuid, submit: &NewTask) -> TaskRow {
    TaskRow {
        id: task_id,
        ..submit.task.clone()
    }
}

/// Inserts the tasks and their jobs with one statement: one row of each per submit.
async fn insert_tasks_with_jobs(
    client: &impl GenericClient,
    submits: &[&NewTask],
) -> anyhow::Result<()> {
    if submits.is_empty() {
        return Ok(());
    }
    let n = submits.len();
    let mut ids = Vec::with_capacity(n);
    let mut key_ids = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut providers = Vec::with_capacity(n);
    let mut upstream = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    let mut durations = Vec::with_capacity(n);
    let mut widths = Vec::with_capacity(n);
    let mut heights = Vec::with_capacity(n);
    let mut fpss = Vec::with_capacity(n);
    let mut seeds = Vec::with_capacity(n);
    let mut urls = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n);
    // text[] per row does not survive unnest (it flattens); events go comma-joined.
    let mut events = Vec::with_capacity(n);
    let mut ats: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut message_ids = Vec::with_capacity(n);
    let mut traceparents = Vec::with_capacity(n);
    let mut images = Vec::with_capacity(n);
    let mut retries = Vec::with_capacity(n);
    let mut batches = Vec::with_capacity(n);
    for s in submits {
        let t = &s.task;
        ids.push(t.id);
        key_ids.push(t.api_key_id);
        models.push(t.model.as_str());
        providers.push(t.provider.as_str());
        upstream.push(t.upstream_model.as_deref());
        prompts.push(t.prompt.as_str());
        durations.push(t.duration);
        widths.push(t.width);
        heights.push(t.height);
        fpss.push(t.fps);
        seeds.push(t.seed);
        urls.push(t.webhook_url.as_deref());
        headers.push(serde_json::to_value(&t.webhook_headers).context("encoding webhook headers")?);
        events.push(t.webhook_events.names().join(","));
        ats.push(t.created_at);
        bodies.push(s.job.body.as_slice());
        message_ids.push(s.job.message_id.as_deref());
        traceparents.push(s.job.traceparent.as_deref());
        images.push(t.image_url.as_deref());
        retries.push(t.webhook_retry.as_ref().map(ToString::to_string));
        batches.push(
            t.webhook_batch
                .map(serde_json::to_value)
                .transpose()
                .context("encoding webhook_batch")?,
        );
    }
    let stmt = client
        .prepare_cached(
            "WITH submit AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::int4[], $8::int4[], $9::int4[], $10::int4[], $11::int8[],
                     $12::text[], $13::jsonb[], $14::text[], $15::timestamptz[], $16::bytea[],
                     $17::text[], $19::text[], $20::text[], $21::jsonb[], $22::text[])
                 AS s (id, api_key_id, model, provider, upstream_model, prompt, duration, width,
                     height, fps, seed, webhook_url, webhook_headers, webhook_events, created_at,
                     job, message_id, image_url, webhook_retry, webhook_batch, traceparent)
             ), task AS (
                 INSERT INTO tasks (id, api_key_id, attempt, status, model, provider,
                     upstream_model, prompt, duration, width, height, fps, seed, webhook_url,
                     webhook_headers, webhook_events, created_at, updated_at, image_url,
                     webhook_retry, webhook_batch)
                 SELECT id, api_key_id, 1, 'pending', model, provider, upstream_model, prompt,
                     duration, width, height, fps, seed, webhook_url, webhook_headers,
                     string_to_array(webhook_events, ','), created_at, created_at, image_url,
                     webhook_retry, webhook_batch
                 FROM submit)
             INSERT INTO outbox (target, route, body, task_id, message_id, traceparent)
             SELECT 'queue', $18, job, id, message_id, traceparent FROM submit",
        )
        .await
        .context("preparing the batch insert")?;
    let route = conduit_core::topology::route::JOBS;
    client
        .execute(
            &stmt,
            &[
                &ids,
                &key_ids,
                &models,
                &providers,
                &upstream,
                &prompts,
                &durations,
                &widths,
                &heights,
                &fpss,
                &seeds,
                &urls,
                &headers,
                &events,
                &ats,
                &bodies,
                &message_ids,
                &route,
                &images,
                &retries,
                &batches,
                &traceparents,
            ],
        )
        .await
        .context("inserting the tasks and their jobs")?;
    Ok(())
}

/// Deletes Idempotency-Keys older than their window: past it they are only dead weight.
pub(super) async fn forget_old_keys(pool: &Pool) -> anyhow::Result<u64> {
    let client = pool.get().await.context("taking a database connection")?;
    client
        .execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)",
            &[&IDEMPOTENCY_WINDOW_HOURS],
        )
        .await
        .context("forgetting old idempotency keys")
}

#[cfg(test)]
#[path = "submits_tests.rs"]
mod tests;
