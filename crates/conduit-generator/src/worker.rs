//! Execution of one job delivery: the attempt limit, the cancel check, the provider run
//! under the task timeout, progress events, storage and the terminal event. The
//! delivery is acknowledged only once its terminal event is confirmed by the broker, so
//! a crash at any point leaves the job in the queue for another generator.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use conduit_core::{
    messages::{ControlMessage, JobMessage, StatusEvent, StatusKind, SCHEMA_VERSION},
    storage::{video_key, VideoStore},
    time::now_millis,
    topology::route,
    Broker, Disposition, Incoming, Outgoing,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::{
    cancels::CancelRegistry,
    metrics::Metrics,
    providers::{
        GenerationContext, GenerationError, ImageLoader, ProgressReporter, ProgressUpdate,
        Providers,
    },
    throttle::ProgressThrottle,
};

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
    pub cancels: CancelRegistry,
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
            task_id = %job.task_id,
            attempt = job.attempt,
            model = %job.model,
            delivery_count = incoming.delivery_count
        );
        self.run(job, incoming.delivery_count, shutdown)
            .instrument(span)
            .await
    }

    /// Handles one message of the control fanout.
    pub fn handle_control(&self, incoming: &Incoming) {
        match serde_json::from_slice::<ControlMessage>(&incoming.body) {
            Ok(ControlMessage::Cancel {
                task_id, attempt, ..
            }) => {
                let running = self.cancels.cancel(task_id, attempt, Instant::now());
                info!(%task_id, attempt, running, "cancel received");
            }
            Err(err) => warn!(error = %err, "unreadable control message; ignoring it"),
        }
    }

    async fn run(
        &self,
        job: JobMessage,
        delivery_count: u32,
        shutdown: CancellationToken,
    ) -> Disposition {
        let work = shutdown.child_token();
        let Some(registration) = self.cancels.start(job.task_id, job.attempt, work.clone()) else {
            info!("task was cancelled before it started; not running it");
            self.metrics.jobs_cancelled.inc();
            return Disposition::Ack;
        };
        let _in_flight = InFlight::new(&self.metrics.jobs_in_flight);
        let events = Events::new(self.broker.clone(), &job);

        if delivery_count >= self.max_attempts {
            warn!("job delivered too often; failing the task");
            self.metrics
                .jobs_failed
                .with_label_values(&["interrupted"])
                .inc();
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
        self.metrics.jobs_started.inc();
        let started = Instant::now();
        let (outcome, made_by) = self.generate(&job, &events, &work, started).await;
        // Whatever happened, the provider's work stops now.
        work.cancel();

        if !matches!(outcome, Outcome::Finished(Ok(_))) {
            // However the provider reacted to being stopped, a user cancel means the API
            // already made the task terminal, and a shutdown means the job goes back.
            if registration.cancelled_by_user() {
                info!("generation stopped: cancelled by the user");
                self.metrics.jobs_cancelled.inc();
                return Disposition::Ack;
            }
            if shutdown.is_cancelled() {
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
                        self.metrics.generation_seconds.observe(elapsed);
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
                StatusKind::Failed {
                    error: format!(
                        "Video generation timed out after {} seconds",
                        self.task_timeout.as_secs()
                    ),
                }
            }
            Outcome::Finished(Err(GenerationError::Cancelled)) | Outcome::Stopped => {
                self.metrics.jobs_failed.with_label_values(&["error"]).inc();
                StatusKind::Failed {
                    error: "Video generation was stopped unexpectedly".into(),
                }
            }
            Outcome::Finished(Err(
                GenerationError::Failed(error) | GenerationError::Unavailable(error),
            )) => {
                warn!(%error, "generation failed");
                self.metrics.jobs_failed.with_label_values(&["error"]).inc();
                StatusKind::Failed { error }
            }
        };
        drop(registration);
        self.finish(&events, terminal).await
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
        let mut current = job.clone();
        let mut fallbacks = self.providers.fallbacks(job).into_iter();
        loop {
            let provider = match self.providers.resolve(&current) {
                Ok(provider) => provider,
                Err(error) => return (Err(GenerationError::Failed(error)), current.model),
            };
            match provider.generate(&current, ctx.clone()).await {
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
                () = tokio::time::sleep(self.task_timeout) => Outcome::TimedOut,
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

    /// Gives an unfinished job back at shutdown. A copy is republished and the original
    /// acknowledged, because a requeue would count as a lost delivery towards the
    /// attempt limit; if the copy cannot be published, the original is requeued.
    async fn hand_back(&self, job: &JobMessage) -> Disposition {
        let copy = Outgoing::json(route::JOBS, job)
            .map(|m| m.for_task(job.task_id).with_message_id(job.message_id()));
        match copy {
            Ok(message) => match self.broker.publish(message).await {
                Ok(()) => {
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
