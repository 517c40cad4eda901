//! Execution of one job delivery: the catch-up on the lifecycle stream, the attempt
//! limit, the cancel check, the attempt's checkpoint, the provider run under the task
//! timeout (counted from the attempt's first start), progress events, storage and the
//! terminal event. The delivery is acknowledged only once its terminal event is
//! confirmed by the broker, so a crash at any point leaves the job in the queue for
//! another generator, which finds the attempt's checkpoint on the lifecycle stream.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use conduit_core::{
    messages::{
        ControlMessage, JobCheckpoint, JobMessage, StatusEvent, StatusKind, UpstreamJob,
        SCHEMA_VERSION,
    },
    storage::{video_key, VideoStore},
    time::now_millis,
    topology::route,
    Broker, Disposition, Incoming, Outgoing,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};
use uuid::Uuid;

use crate::{
    lifecycle::{newest, Lifecycle},
    metrics::Metrics,
    providers::{
        GenerationContext, GenerationError, ImageLoader, ProgressReporter, ProgressUpdate,
        Providers, UpstreamCheckpoint,
    },
    throttle::ProgressThrottle,
};

/// How long a generator waits to read back its own mark from the lifecycle stream
/// before it publishes another one.
const MARK_PATIENCE: Duration = Duration::from_secs(30);

/// Sequence numbers of one run of an attempt start at this many per millisecond of the
/// run's start time, so a later run (a redelivery after a lost worker, a job handed back
/// at shutdown) always numbers its events above an earlier run's and the ledger, which
/// keeps only events newer than the last it saw, does not drop them as stale.
const SEQ_PER_MILLI: u64 = 10_000;

/// Everything a job handler needs; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    pub broker: Broker,
    pub store: VideoStore,
    pub providers: Providers,
    pub lifecycle: Lifecycle,
    pub metrics: Metrics,
    pub task_timeout: Duration,
    pub max_attempts: u32,
    /// Reads jobs' `image_url`s (internal addresses refused unless allowed).
    pub images: ImageLoader,
}

/// Counts a job in the in-flight gauge for as long as it is alive.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How the provider run ended.
enum Outcome {
    Finished(Result<crate::providers::GeneratedVideo, GenerationError>),
    TimedOut,
    Stopped,
}

/// The status events of one run of an attempt, numbered in publish order.
struct Events {
    broker: Broker,
    task_id: uuid::Uuid,
    attempt: i32,
    base: u64,
    next: AtomicU64,
}

impl Events {
    fn new(broker: Broker, job: &JobMessage) -> Self {
        let millis = u64::try_from(now_millis().timestamp_millis()).unwrap_or(0);
        Self {
            broker,
            task_id: job.task_id,
            attempt: job.attempt,
            base: millis.saturating_mul(SEQ_PER_MILLI),
            next: AtomicU64::new(1),
        }
    }

    async fn publish(&self, kind: StatusKind) -> anyhow::Result<()> {
        let seq = self.base + self.next.fetch_add(1, Ordering::SeqCst);
        let event = StatusEvent {
            v: SCHEMA_VERSION,
            task_id: self.task_id,
            attempt: self.attempt,
            seq,
            at: now_millis(),
            kind,
        };
        let message = Outgoing::json(route::STATUS, &event)?
            .for_task(self.task_id)
            .with_message_id(format!("{}:{}:{seq}", self.task_id, self.attempt));
        self.broker.publish(message).await
    }
}

impl Worker {
    /// Handles one delivery of the `jobs` queue.
    pub async fn handle_job(&self, incoming: Incoming, shutdown: CancellationToken) -> Disposition {
        let job: JobMessage = match serde_json::from_slice(&incoming.body) {
            Ok(job) => job,
            Err(err) => {
                warn!(error = %err, "unreadable job message; rejecting it");
                return Disposition::Reject;
            }
        };
        if job.v != SCHEMA_VERSION {
            warn!(
                version = job.v,
                "job of an unknown schema version; rejecting it"
            );
            return Disposition::Reject;
        }
        let span = tracing::info_span!(
            "job",
            otel.name = "generate",
            provider = %self.providers.name_for(&job),
            task_id = %job.task_id,
            attempt = job.attempt,
            model = %job.model,
            delivery_count = incoming.delivery_count
        );
        self.run(job, incoming.delivery_count, shutdown)
            .instrument(span)
            .await
    }

    /// Handles one record of the lifecycle stream.
    pub fn handle_lifecycle(&self, incoming: &Incoming) {
        match serde_json::from_slice::<ControlMessage>(&incoming.body) {
            Ok(record) => {
                let cancel = match &record {
                    ControlMessage::Cancel {
                        task_id, attempt, ..
                    } => Some((*task_id, *attempt)),
                    _ => None,
                };
                let running = self.lifecycle.apply(record, Instant::now());
                if let Some((task_id, attempt)) = cancel {
                    tracing::debug!(%task_id, attempt, running, "cancel read");
                    if running {
                        info!(%task_id, attempt, "cancel received; stopping the attempt");
                    }
                }
            }
            Err(err) => warn!(error = %err, "unreadable lifecycle record; ignoring it"),
        }
    }

    /// Publishes a lifecycle record and waits for the broker's confirm.
    async fn record(&self, task_id: Uuid, record: &ControlMessage) -> anyhow::Result<()> {
        let message = Outgoing::json(route::LIFECYCLE, record)?.for_task(task_id);
        self.broker.publish(message).await
    }

    /// Waits until this process has read everything published to the lifecycle stream
    /// before now: it publishes a mark and waits to read it back. False when shutdown
    /// came first.
    async fn catch_up(&self, task_id: Uuid, shutdown: &CancellationToken) -> bool {
        loop {
            let id = Uuid::new_v4();
            let seen = self.lifecycle.mark(id);
            let mark = ControlMessage::Mark {
                v: SCHEMA_VERSION,
                id,
            };
            match self.record(task_id, &mark).await {
                Ok(()) => {
                    tokio::select! {
                        seen = tokio::time::timeout(MARK_PATIENCE, seen) => {
                            if matches!(seen, Ok(Ok(()))) {
                                return true;
                            }
                            warn!("the lifecycle stream has not delivered this generator's mark yet; marking again");
                        }
                        () = shutdown.cancelled() => {
                            self.lifecycle.forget_mark(id);
                            return false;
                        }
                    }
                }
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "could not publish a mark on the lifecycle stream; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => {
                            self.lifecycle.forget_mark(id);
                            return false;
                        }
                    }
                }
            }
            self.lifecycle.forget_mark(id);
        }
    }

    async fn run(
        &self,
        mut job: JobMessage,
        delivery_count: u32,
        shutdown: CancellationToken,
    ) -> Disposition {
        // The attempt's cancel and the checkpoint of an earlier run, if there are any,
        // were published before this point: read them before deciding anything.
        if !self.catch_up(job.task_id, &shutdown).await {
            return self.hand_back(&job).await;
        }
        let work = shutdown.child_token();
        let Some(registration) = self.lifecycle.start(job.task_id, job.attempt, work.clone())
        else {
            info!("task was cancelled before it started; not running it");
            self.metrics.jobs_cancelled.inc();
            return Disposition::Ack;
        };
        let earlier = newest(
            job.checkpoint.take(),
            self.lifecycle.checkpoint(job.task_id, job.attempt),
        );
        let _in_flight = InFlight::new(&self.metrics.jobs_in_flight);
        let events = Events::new(self.broker.clone(), &job);
        let provider = self.providers.name_for(&job);
        let finished = |outcome: &str| {
            self.metrics
                .tasks_finished
                .with_label_values(&[job.model.as_str(), provider.as_str(), outcome])
                .inc();
        };

        if delivery_count >= self.max_attempts {
            warn!("job delivered too often; failing the task");
            self.metrics
                .jobs_failed
                .with_label_values(&["interrupted"])
                .inc();
            finished("failed");
            let error = format!(
                "Video generation was interrupted {delivery_count} times (worker lost); giving up"
            );
            return self.finish(&events, StatusKind::Failed { error }).await;
        }

        let processing = StatusKind::Processing {
            message: "Video generation started".into(),
        };
        if let Err(err) = events.publish(processing).await {
            warn!(error = %format!("{err:#}"), "could not publish the processing event; handing the job back");
            return Disposition::Requeue;
        }
        // The first start of the attempt is made durable before any work, so the
        // timeout counts from it whoever takes the attempt over.
        let checkpoint = match earlier {
            Some(checkpoint) => {
                info!(first_started_at = %checkpoint.first_started_at, upstream_job = ?checkpoint.upstream.as_ref().map(|u| &u.id), "taking over an attempt that started before");
                checkpoint
            }
            None => {
                let checkpoint = JobCheckpoint {
                    first_started_at: now_millis(),
                    upstream: None,
                };
                let record = ControlMessage::Checkpoint {
                    v: SCHEMA_VERSION,
                    task_id: job.task_id,
                    attempt: job.attempt,
                    checkpoint: checkpoint.clone(),
                };
                if let Err(err) = self.record(job.task_id, &record).await {
                    warn!(error = %format!("{err:#}"), "could not record the attempt's start; handing the job back");
                    return Disposition::Requeue;
                }
                checkpoint
            }
        };
        let deadline = checkpoint.first_started_at
            + chrono::Duration::from_std(self.task_timeout).unwrap_or(chrono::Duration::MAX);
        let remaining = (deadline - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let current = Arc::new(Mutex::new(checkpoint));
        let upstream = self.upstream_checkpoint(&job, &current, &shutdown, &registration);
        self.metrics.jobs_started.inc();
        let started = Instant::now();
        let (outcome, made_by) = self
            .generate(&job, &events, &work, started, remaining, upstream)
            .await;
        // Whatever happened, the provider's work stops now.
        work.cancel();

        if !matches!(outcome, Outcome::Finished(Ok(_))) {
            // However the provider reacted to being stopped, a user cancel means the API
            // already made the task terminal, and a shutdown means the job goes back,
            // with the attempt's checkpoint.
            if registration.cancelled_by_user() {
                info!("generation stopped: cancelled by the user");
                self.metrics.jobs_cancelled.inc();
                finished("cancelled");
                return Disposition::Ack;
            }
            if shutdown.is_cancelled() {
                job.checkpoint = Some(lock(&current).clone());
                return self.hand_back(&job).await;
            }
        }

        let terminal = match outcome {
            Outcome::Finished(Ok(video)) => {
                let elapsed = started.elapsed().as_secs_f64();
                if let Some(frames) = video.frames_rendered {
                    self.metrics
                        .render_fps
                        .observe(f64::from(frames) / elapsed.max(1e-6));
                }
                let key = video_key(job.task_id, job.attempt);
                match self.store.put(&key, video.bytes).await {
                    Ok(()) => {
                        self.metrics.jobs_completed.inc();
                        self.metrics
                            .generation_seconds
                            .with_label_values(&[job.model.as_str(), provider.as_str()])
                            .observe(elapsed);
                        finished("completed");
                        info!(video_key = %key, seconds = elapsed, made_by = %made_by, "video generated");
                        StatusKind::Completed {
                            video_key: key,
                            generation_duration_seconds: (elapsed * 1000.0).round() / 1000.0,
                            // Named only when a fallback model made the video.
                            model: (made_by != job.model).then_some(made_by),
                        }
                    }
                    Err(err) => {
                        warn!(error = %format!("{err:#}"), "could not store the video");
                        self.metrics
                            .jobs_failed
                            .with_label_values(&["storage"])
                            .inc();
                        finished("failed");
                        StatusKind::Failed {
                            error: "Video generation succeeded but storing the video failed".into(),
                        }
                    }
                }
            }
            Outcome::TimedOut => {
                warn!("task timed out");
                self.metrics
                    .jobs_failed
                    .with_label_values(&["timeout"])
                    .inc();
                finished("timed_out");
                StatusKind::Failed {
                    error: format!(
                        "Video generation timed out after {} seconds",
                        self.task_timeout.as_secs()
                    ),
                }
            }
            Outcome::Finished(Err(GenerationError::Cancelled)) | Outcome::Stopped => {
                self.metrics.jobs_failed.with_label_values(&["error"]).inc();
                finished("failed");
                StatusKind::Failed {
                    error: "Video generation was stopped unexpectedly".into(),
                }
            }
            Outcome::Finished(Err(
                GenerationError::Failed(error) | GenerationError::Unavailable(error),
            )) => {
                warn!(%error, "generation failed");
                self.metrics.jobs_failed.with_label_values(&["error"]).inc();
                if provider != "local" {
                    self.metrics
                        .provider_errors
                        .with_label_values(&[provider.as_str(), crate::metrics::error_kind(&error)])
                        .inc();
                }
                finished("failed");
                StatusKind::Failed { error }
            }
        };
        drop(registration);
        let disposition = self.finish(&events, terminal).await;
        if disposition == Disposition::Ack {
            let finished = ControlMessage::Finished {
                v: SCHEMA_VERSION,
                task_id: job.task_id,
                attempt: job.attempt,
            };
            // Only lets caches drop the checkpoint; the stream's retention does it too.
            if let Err(err) = self.record(job.task_id, &finished).await {
                warn!(error = %format!("{err:#}"), "could not record the attempt's end");
            }
        }
        disposition
    }

    /// The upstream side of the attempt's checkpoint: the job an earlier run submitted,
    /// a way to record a new one durably, and whether the work is being handed back.
    fn upstream_checkpoint(
        &self,
        job: &JobMessage,
        current: &Arc<Mutex<JobCheckpoint>>,
        shutdown: &CancellationToken,
        registration: &crate::lifecycle::Registration,
    ) -> UpstreamCheckpoint {
        let resume = lock(current).upstream.clone();
        let worker = self.clone();
        let current = current.clone();
        let (task_id, attempt) = (job.task_id, job.attempt);
        let shutdown = shutdown.clone();
        let by_user = registration.by_user_flag();
        UpstreamCheckpoint::new(
            resume,
            move |upstream: UpstreamJob| {
                let worker = worker.clone();
                let checkpoint = {
                    let mut current = lock(&current);
                    current.upstream = Some(upstream);
                    current.clone()
                };
                async move {
                    let record = ControlMessage::Checkpoint {
                        v: SCHEMA_VERSION,
                        task_id,
                        attempt,
                        checkpoint,
                    };
                    worker.record(task_id, &record).await?;
                    info!("upstream job recorded in the attempt's checkpoint");
                    Ok(())
                }
            },
            move || shutdown.is_cancelled() && !by_user.load(Ordering::SeqCst),
        )
    }

    /// Runs the job's provider and, while one is unavailable (rate-limited or unreachable
    /// after its retries), the models of its `fallback` list in order. Returns the result
    /// and the model that produced it.
    async fn generate_with_fallbacks(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> (
        Result<crate::providers::GeneratedVideo, GenerationError>,
        String,
    ) {
        let (mut current, rest) = resume_chain(
            job,
            self.providers.fallbacks(job),
            ctx.upstream.resumed_model(),
        );
        if current.model != job.model {
            info!(model = %job.model, fallback = %current.model, "resuming with the fallback model an earlier run submitted to");
        }
        let mut fallbacks = rest.into_iter();
        loop {
            let provider = match self.providers.resolve(&current) {
                Ok(provider) => provider,
                Err(error) => return (Err(GenerationError::Failed(error)), current.model),
            };
            let name = self.providers.name_for(&current);
            // The render (local) or the provider's submit, polls and download.
            let call_span = if name == "local" {
                tracing::info_span!("render", otel.name = "render", provider = %name, width = current.spec.width, height = current.spec.height)
            } else {
                tracing::info_span!("provider call", otel.name = %format!("{name} generate"), otel.kind = "client", provider = %name, model = %current.model)
            };
            match provider
                .generate(&current, ctx.clone())
                .instrument(call_span)
                .await
            {
                Err(GenerationError::Unavailable(why)) => {
                    let Some(next) = fallbacks.next() else {
                        return (Err(GenerationError::Unavailable(why)), current.model);
                    };
                    warn!(model = %current.model, fallback = %next.model, reason = %why, "provider unavailable; trying the fallback model");
                    ctx.progress.report(ProgressUpdate {
                        percent: 0,
                        message: format!(
                            "Model {} is unavailable ({why}); generating with fallback model {}",
                            current.model, next.model
                        ),
                        eta_seconds: None,
                    });
                    current = next;
                }
                result => return (result, current.model),
            }
        }
    }

    /// Runs the provider with progress events, until it finishes, the task times out or
    /// the work is stopped (cancel, shutdown). Also returns the model that ran last.
    async fn generate(
        &self,
        job: &JobMessage,
        events: &Events,
        work: &CancellationToken,
        started: Instant,
        remaining: Duration,
        upstream: UpstreamCheckpoint,
    ) -> (Outcome, String) {
        let (tx, mut rx) = watch::channel::<Option<ProgressUpdate>>(None);
        // Progress never goes back, also when a fallback model starts over.
        let highest = std::sync::atomic::AtomicU8::new(0);
        let ctx = GenerationContext {
            progress: ProgressReporter::new(move |mut update| {
                update.percent = highest
                    .fetch_max(update.percent, Ordering::Relaxed)
                    .max(update.percent);
                tx.send_replace(Some(update));
            }),
            cancel: work.clone(),
            images: self.images.clone(),
            upstream,
        };
        let ran = std::sync::Mutex::new(job.model.clone());
        let done = CancellationToken::new();
        let progress = async {
            let mut throttle = ProgressThrottle::new(started);
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    () = done.cancelled() => break,
                }
                let Some(update) = rx.borrow_and_update().clone() else {
                    continue;
                };
                if !throttle.offer(Instant::now(), update.percent) {
                    continue;
                }
                let kind = StatusKind::Progress {
                    percent: update.percent.min(100),
                    message: update.message,
                    eta_seconds: update.eta_seconds,
                };
                if let Err(err) = events.publish(kind).await {
                    // A lost progress event is superseded by the next one.
                    warn!(error = %format!("{err:#}"), "could not publish a progress event");
                }
            }
        };
        let generation = async {
            let chain = async {
                let (result, model) = self.generate_with_fallbacks(job, ctx).await;
                if let Ok(mut ran) = ran.lock() {
                    *ran = model;
                }
                result
            };
            let outcome = tokio::select! {
                // A result that is ready wins over a cancel or timeout that came with it.
                biased;
                result = chain => Outcome::Finished(result),
                () = tokio::time::sleep(remaining) => Outcome::TimedOut,
                () = work.cancelled() => Outcome::Stopped,
            };
            done.cancel();
            outcome
        };
        // The progress loop ends with the generation (after any publish in progress), so
        // no progress event is published after the terminal one.
        let (outcome, ()) = tokio::join!(generation, progress);
        let model = ran.into_inner().unwrap_or_else(|e| e.into_inner());
        (outcome, model)
    }

    /// Publishes the terminal event; acknowledges the job only once it is confirmed.
    async fn finish(&self, events: &Events, terminal: StatusKind) -> Disposition {
        match events.publish(terminal).await {
            Ok(()) => Disposition::Ack,
            Err(err) => {
                warn!(error = %format!("{err:#}"), "could not publish the terminal event; the job goes back to the queue");
                Disposition::Requeue
            }
        }
    }

    /// Gives an unfinished job back at shutdown, with the attempt's checkpoint if it
    /// started. A copy is republished and the original
    /// acknowledged, because a requeue would count as a lost delivery towards the
    /// attempt limit; if the copy cannot be published, the original is requeued.
    async fn hand_back(&self, job: &JobMessage) -> Disposition {
        let copy = Outgoing::json(route::JOBS, job)
            .map(|m| m.for_task(job.task_id).with_message_id(job.message_id()));
        match copy {
            Ok(message) => match self.broker.publish(message).await {
                Ok(()) => {
                    self.metrics.jobs_handed_back.inc();
                    info!("shutting down; job handed back to the queue");
                    Disposition::Ack
                }
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "could not republish the job at shutdown; requeueing it");
                    Disposition::Requeue
                }
            },
            Err(_) => Disposition::Requeue,
        }
    }
}

/// Where a run of `job` starts in its model list (`job` itself, then `fallbacks`): a
/// takeover goes on with the model whose upstream job an earlier run submitted
/// (`resumed`), so the models before it are not asked again; otherwise with `job`.
/// Returns the first model to run and the fallbacks left after it.
fn resume_chain(
    job: &JobMessage,
    fallbacks: Vec<JobMessage>,
    resumed: Option<&str>,
) -> (JobMessage, Vec<JobMessage>) {
    if let Some(model) = resumed.filter(|m| *m != job.model) {
        if let Some(at) = fallbacks.iter().position(|f| f.model == model) {
            let mut rest = fallbacks;
            let found = rest.remove(at);
            return (found, rest.split_off(at));
        }
    }
    (job.clone(), fallbacks)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A holder cannot leave the checkpoint half written; keep using it after a panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use conduit_core::messages::RenderSpec;

    use super::*;

    fn job(model: &str) -> JobMessage {
        JobMessage {
            v: SCHEMA_VERSION,
            task_id: Uuid::nil(),
            attempt: 1,
            model: model.into(),
            provider: "p".into(),
            upstream_model: None,
            prompt: "p".into(),
            spec: RenderSpec {
                duration_seconds: 1,
                width: 64,
                height: 64,
                fps: 4,
                seed: None,
            },
            submitted_at: now_millis(),
            image_url: None,
            checkpoint: None,
        }
    }

    fn models(chain: &(JobMessage, Vec<JobMessage>)) -> Vec<String> {
        std::iter::once(&chain.0)
            .chain(&chain.1)
            .map(|j| j.model.clone())
            .collect()
    }

    #[test]
    fn a_takeover_goes_on_with_the_model_it_submitted_to() {
        let own = job("a");
        let list = || vec![job("b"), job("c"), job("d")];
        assert_eq!(
            models(&resume_chain(&own, list(), None)),
            ["a", "b", "c", "d"]
        );
        assert_eq!(
            models(&resume_chain(&own, list(), Some("a"))),
            ["a", "b", "c", "d"]
        );
        assert_eq!(models(&resume_chain(&own, list(), Some("c"))), ["c", "d"]);
        // A model no longer in the list: start from the top.
        assert_eq!(
            models(&resume_chain(&own, list(), Some("gone"))),
            ["a", "b", "c", "d"]
        );
    }
}
