//! Integration tests of the generator against the machine's RabbitMQ. Each test has its
//! own namespace and plays the API itself: it publishes jobs and cancels, and reads the
//! status events from the status queue.

mod cancel;
mod jobs;
mod lost_workers;
mod remote_like;

use std::time::{Duration, Instant};

use conduit_core::{
    config::LogFormat,
    messages::{ControlMessage, JobMessage, RenderSpec, StatusEvent, StatusKind, SCHEMA_VERSION},
    testing,
    topology::route,
    Broker, ConsumeLimits, Disposition, Outgoing, Service, Settings, Source,
};
use conduit_generator::App;
use conduit_testkit::RunningApp;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One test's namespace, with a broker handle and a reader of the status queue.
pub struct Harness {
    pub settings: Settings,
    pub broker: Broker,
    stop: CancellationToken,
    events: mpsc::UnboundedReceiver<(StatusEvent, Instant)>,
}

impl Harness {
    pub async fn new(tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = testing::settings(Service::Generator);
        settings.log.format = LogFormat::Pretty;
        settings.log.level = "warn".into();
        tweak(&mut settings);
        conduit_core::telemetry::init(&settings.log);
        let stop = CancellationToken::new();
        let broker = Broker::start(&settings.amqp, "generator-test", stop.clone());
        broker
            .wait_ready(Duration::from_secs(10))
            .await
            .expect("RabbitMQ reachable");
        let (tx, events) = mpsc::unbounded_channel();
        let reader = broker.clone();
        let reader_stop = stop.clone();
        tokio::spawn(async move {
            reader
                .consume(
                    Source::Queue(route::STATUS.into()),
                    ConsumeLimits {
                        prefetch: 100,
                        concurrency: 1,
                    },
                    reader_stop,
                    move |incoming, _| {
                        let event: StatusEvent =
                            serde_json::from_slice(&incoming.body).expect("status event parses");
                        let _ = tx.send((event, Instant::now()));
                        async { Disposition::Ack }
                    },
                )
                .await
        });
        Self {
            settings,
            broker,
            stop,
            events,
        }
    }

    pub async fn start_app(&self) -> RunningApp {
        self.start_app_with(self.settings.clone()).await
    }

    pub async fn start_app_with(&self, settings: Settings) -> RunningApp {
        let app = App::build(settings).await.expect("generator builds");
        RunningApp::spawn("generator", app.port(), |stop| app.run_until_stopped(stop))
    }

    pub fn job(&self, prompt: &str, width: u32, height: u32, seconds: u32, fps: u32) -> JobMessage {
        JobMessage {
            v: SCHEMA_VERSION,
            task_id: Uuid::new_v4(),
            attempt: 1,
            model: "local-video".into(),
            provider: "local".into(),
            upstream_model: None,
            prompt: prompt.into(),
            spec: RenderSpec {
                duration_seconds: seconds,
                width,
                height,
                fps,
                seed: Some(7),
            },
            submitted_at: conduit_core::time::now_millis(),
            image_url: None,
            checkpoint: None,
        }
    }

    /// A job that takes far longer than any test waits for it.
    pub fn long_job(&self, prompt: &str) -> JobMessage {
        self.job(prompt, 1920, 1080, 60, 60)
    }

    pub async fn submit(&self, job: &JobMessage) {
        let message = Outgoing::json(route::JOBS, job)
            .expect("job serialises")
            .for_task(job.task_id);
        self.broker.publish(message).await.expect("job published");
    }

    pub async fn cancel(&self, job: &JobMessage) {
        let message = Outgoing::control(&ControlMessage::Cancel {
            v: SCHEMA_VERSION,
            task_id: job.task_id,
            attempt: job.attempt,
        })
        .expect("cancel serialises");
        self.broker
            .publish(message)
            .await
            .expect("cancel published");
    }

    /// The next status event, if one arrives within `within`.
    pub async fn next_event(&mut self, within: Duration) -> Option<(StatusEvent, Instant)> {
        tokio::time::timeout(within, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// The events of `task_id` up to and including its terminal one.
    pub async fn until_terminal(
        &mut self,
        task_id: Uuid,
        within: Duration,
    ) -> Vec<(StatusEvent, Instant)> {
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((event, at)) = self.next_event(left).await else {
                panic!("no terminal event for {task_id} within {within:?}; got {events:#?}");
            };
            if event.task_id != task_id {
                continue;
            }
            let terminal = event.kind.is_terminal();
            events.push((event, at));
            if terminal {
                return events;
            }
        }
    }

    /// Waits for the `processing` event of `task_id`.
    pub async fn until_processing(&mut self, task_id: Uuid, within: Duration) -> StatusEvent {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (event, _) = self
                .next_event(left)
                .await
                .unwrap_or_else(|| panic!("no processing event for {task_id} within {within:?}"));
            if event.task_id == task_id && matches!(event.kind, StatusKind::Processing { .. }) {
                return event;
            }
        }
    }

    /// Where the file store keeps `key`.
    pub fn stored_path(&self, key: &str) -> std::path::PathBuf {
        let root = self
            .settings
            .storage
            .url
            .strip_prefix("file://")
            .expect("tests use file storage");
        std::path::Path::new(root).join(key)
    }

    pub async fn cleanup(self) {
        self.stop.cancel();
        let _ = testing::delete_namespace(
            self.settings.amqp.url.expose(),
            &self.settings.amqp.namespace,
        )
        .await;
        if let Some(root) = self.settings.storage.url.strip_prefix("file://") {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
