//! Integration tests of the webhook sender against the machine's RabbitMQ. Each test has
//! its own namespace and plays the API itself: it publishes deliveries to the webhooks
//! queue and reads attempt outcomes and dead letters back. Receivers are the test kit's
//! HTTP servers on 127.0.0.1 in the test process.

mod batches;
mod bench;
mod delivery;
mod isolation;
mod python;
mod retries;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use conduit_core::{
    config::{LogFormat, RetrySchedule},
    messages::{AttemptOutcome, DeliveryState, WebhookDelivery, SCHEMA_VERSION},
    payload::{CompletedPayload, FailedPayload, ProgressPayload, WebhookEvent, WebhookPayload},
    testing,
    time::now_millis,
    topology::route,
    Broker, ConsumeLimits, Disposition, Outgoing, Service, Settings, Source,
};
use conduit_testkit::RunningApp;
pub use conduit_testkit::{Receiver, Reply};
use conduit_webhook_sender::App;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The reference secret of the Standard Webhooks test vectors.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One test's namespace: a broker handle and readers of the outcomes and dead-letter
/// queues.
pub struct Harness {
    pub settings: Settings,
    pub broker: Broker,
    stop: CancellationToken,
    outcomes: mpsc::UnboundedReceiver<AttemptOutcome>,
    /// Outcomes read but not yet asked for.
    backlog: Vec<AttemptOutcome>,
    dead: mpsc::UnboundedReceiver<Vec<u8>>,
}

fn reader<T: Send + 'static>(
    broker: &Broker,
    route: &str,
    stop: CancellationToken,
    parse: impl Fn(Vec<u8>) -> T + Send + Sync + 'static,
) -> mpsc::UnboundedReceiver<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    let broker = broker.clone();
    let route = route.to_owned();
    tokio::spawn(async move {
        broker
            .consume(
                Source::Queue(route),
                ConsumeLimits {
                    prefetch: 100,
                    concurrency: 1,
                },
                stop,
                move |incoming, _| {
                    let _ = tx.send(parse(incoming.body));
                    async { Disposition::Ack }
                },
            )
            .await
    });
    rx
}

impl Harness {
    pub async fn new(tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = testing::settings(Service::WebhookSender);
        settings.log.format = LogFormat::Pretty;
        settings.log.level = "warn".into();
        tweak(&mut settings);
        conduit_core::telemetry::init(&settings.log);
        let stop = CancellationToken::new();
        let broker = Broker::start(&settings.amqp, "sender-test", stop.clone());
        broker
            .wait_ready(Duration::from_secs(10))
            .await
            .expect("RabbitMQ reachable");
        let outcomes = reader(&broker, route::OUTCOMES, stop.clone(), |body| {
            serde_json::from_slice(&body).expect("outcome parses")
        });
        let dead = reader(&broker, route::DEAD_WEBHOOKS, stop.clone(), |body| body);
        Self {
            settings,
            broker,
            stop,
            outcomes,
            backlog: Vec::new(),
            dead,
        }
    }

    pub fn schedule(raw: &str) -> RetrySchedule {
        RetrySchedule::parse(raw).expect("valid schedule")
    }

    pub async fn start_app(&self) -> RunningApp {
        self.start_app_with(self.settings.clone()).await
    }

    pub async fn start_app_with(&self, settings: Settings) -> RunningApp {
        let app = App::build(settings).await.expect("sender builds");
        RunningApp::spawn("sender", app.port(), |stop| app.run_until_stopped(stop))
    }

    pub async fn publish(&self, d: &WebhookDelivery) {
        self.publish_to(route::WEBHOOKS, d).await;
    }

    pub async fn publish_to(&self, route: &str, d: &WebhookDelivery) {
        let message = Outgoing::json(route, d)
            .expect("delivery serialises")
            .for_task(d.task_id)
            .with_message_id(d.webhook_id.clone());
        self.broker
            .publish(message)
            .await
            .expect("delivery published");
    }

    /// The next attempt outcome not yet looked at, whatever its event.
    pub async fn next_outcome(&mut self, within: Duration) -> Option<AttemptOutcome> {
        self.next_outcome_where(|_| true, within).await
    }

    /// The first outcome not yet looked at that matches `wanted`; the others are kept
    /// for later calls.
    pub async fn next_outcome_where(
        &mut self,
        wanted: impl Fn(&AttemptOutcome) -> bool,
        within: Duration,
    ) -> Option<AttemptOutcome> {
        if let Some(i) = self.backlog.iter().position(&wanted) {
            return Some(self.backlog.remove(i));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let o = tokio::time::timeout_at(deadline, self.outcomes.recv())
                .await
                .ok()
                .flatten()?;
            if wanted(&o) {
                return Some(o);
            }
            self.backlog.push(o);
        }
    }

    /// Outcomes of `webhook_id` until one is final (not pending).
    pub async fn outcomes_until_final(
        &mut self,
        webhook_id: &str,
        within: Duration,
    ) -> Vec<AttemptOutcome> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(o) = self
                .next_outcome_where(|o| o.webhook_id == webhook_id, left)
                .await
            else {
                panic!("no final outcome for {webhook_id} within {within:?}; got {seen:#?}");
            };
            let last = o.state != DeliveryState::Pending;
            seen.push(o);
            if last {
                return seen;
            }
        }
    }

    /// The final outcome of each of `ids`, in the order of `ids`.
    pub async fn finals(&mut self, ids: &[String], within: Duration) -> Vec<AttemptOutcome> {
        let deadline = Instant::now() + within;
        let mut finals: BTreeMap<String, AttemptOutcome> = BTreeMap::new();
        while finals.len() < ids.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(o) = self
                .next_outcome_where(
                    |o| ids.contains(&o.webhook_id) && o.state != DeliveryState::Pending,
                    left,
                )
                .await
            else {
                panic!(
                    "only {} of {} final outcomes within {within:?}",
                    finals.len(),
                    ids.len()
                );
            };
            finals.insert(o.webhook_id.clone(), o);
        }
        ids.iter().filter_map(|id| finals.remove(id)).collect()
    }

    /// The next message of the dead-letter queue.
    pub async fn next_dead(&mut self, within: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(within, self.dead.recv())
            .await
            .ok()
            .flatten()
    }

    pub async fn cleanup(self) {
        self.stop.cancel();
        let _ = testing::delete_namespace(
            self.settings.amqp.url.expose(),
            &self.settings.amqp.namespace,
        )
        .await;
    }
}

pub fn webhook_id() -> String {
    format!("msg_{}", Uuid::new_v4().simple())
}

/// A delivery of `payload` to `url`, as the API would publish it.
pub fn delivery_of(url: &str, payload: &WebhookPayload) -> WebhookDelivery {
    let occurred_at = match payload {
        WebhookPayload::Completed(p) => p.timestamp,
        WebhookPayload::Failed(p) => p.timestamp,
        WebhookPayload::Progress(p) => p.timestamp,
    };
    WebhookDelivery {
        v: SCHEMA_VERSION,
        webhook_id: webhook_id(),
        task_id: payload.task_id(),
        event: payload.event(),
        url: url.to_owned(),
        headers: BTreeMap::new(),
        secret: SECRET.to_owned(),
        body: payload.to_body(),
        occurred_at,
        attempts_made: 0,
        not_before: None,
        retry: None,
        batch: None,
        previous_secret: None,
        video_link: None,
    }
}

pub fn completed(task_id: Uuid) -> WebhookPayload {
    WebhookPayload::Completed(CompletedPayload::new(
        task_id,
        now_millis(),
        "https://cdn.example.com/videos/generated-video.mp4".into(),
        45.5,
        "minimax-video".into(),
        "A serene mountain landscape with clouds".into(),
    ))
}

pub fn failed(task_id: Uuid) -> WebhookPayload {
    WebhookPayload::Failed(FailedPayload::failed(
        task_id,
        now_millis(),
        "Insufficient credits for video generation".into(),
        "minimax-video".into(),
        "A serene mountain landscape with clouds".into(),
    ))
}

pub fn cancelled(task_id: Uuid) -> WebhookPayload {
    WebhookPayload::Failed(FailedPayload::cancelled(
        task_id,
        now_millis(),
        "minimax-video".into(),
        "A serene mountain landscape with clouds".into(),
    ))
}

pub fn progress(task_id: Uuid, percent: u8) -> WebhookPayload {
    WebhookPayload::Progress(ProgressPayload::new(
        task_id,
        now_millis(),
        percent,
        "Rendering video content".into(),
        Some(30),
    ))
}

pub fn event_of(payload: &WebhookPayload) -> WebhookEvent {
    payload.event()
}
