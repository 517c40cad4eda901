//! Integration tests of the webhook sender against the machine's RabbitMQ. Each test has
//! its own namespace and plays the API itself: it publishes deliveries to the webhooks
//! queue and reads attempt outcomes and dead letters back. Receivers are small HTTP
//! servers on 127.0.0.1 in the test process.

mod batches;
mod bench;
mod delivery;
mod isolation;
mod python;
mod retries;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{dev::ServerHandle, web, App as HttpApp, HttpRequest, HttpResponse, HttpServer};
use conduit_core::{
    config::{LogFormat, RetrySchedule},
    messages::{AttemptOutcome, DeliveryState, WebhookDelivery, SCHEMA_VERSION},
    payload::{CompletedPayload, FailedPayload, ProgressPayload, WebhookEvent, WebhookPayload},
    testing,
    time::now_millis,
    topology::route,
    Broker, ConsumeLimits, Disposition, Outgoing, Service, Settings, Source,
};
use conduit_webhook_sender::App;
use tokio::{sync::mpsc, task::JoinHandle};
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

/// A sender running in this process.
pub struct RunningApp {
    pub port: u16,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("sender stops within 30 s")
            .expect("sender task did not panic");
        result.expect("sender ran cleanly");
    }

    /// Ends the sender abruptly, as a crash would: in-flight attempts are abandoned
    /// unacknowledged and their consumer channel goes away with them.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics body")
    }
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
        let port = app.port();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        RunningApp {
            port,
            shutdown,
            handle,
        }
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

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Captured {
    pub path: String,
    pub method: String,
    /// Names lower-cased, values as received.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl Captured {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}

/// What a receiver answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Wait this long before answering (a slow or hanging receiver).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Behaviour = Arc<dyn Fn(usize, &Captured) -> Reply + Send + Sync>;

/// A webhook receiver on 127.0.0.1 that records every request and answers as told
/// (`behaviour` gets the 0-based number of the request).
pub struct Receiver {
    pub port: u16,
    log: Arc<Mutex<Vec<Captured>>>,
    handle: ServerHandle,
}

impl Receiver {
    pub async fn start(
        behaviour: impl Fn(usize, &Captured) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let log: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let behaviour: Behaviour = Arc::new(behaviour);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("receiver binds");
        let port = listener.local_addr().expect("receiver address").port();
        let app_log = log.clone();
        let server = HttpServer::new(move || {
            let log = app_log.clone();
            let behaviour = behaviour.clone();
            HttpApp::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let log = log.clone();
                let behaviour = behaviour.clone();
                async move {
                    let captured = Captured {
                        path: req.path().to_owned(),
                        method: req.method().to_string(),
                        headers: req
                            .headers()
                            .iter()
                            .map(|(n, v)| {
                                (
                                    n.as_str().to_owned(),
                                    v.to_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect(),
                        body: String::from_utf8_lossy(&body).into_owned(),
                        at: Instant::now(),
                    };
                    let n = {
                        let mut log = log.lock().expect("receiver log");
                        log.push(captured.clone());
                        log.len() - 1
                    };
                    let reply = behaviour(n, &captured);
                    if !reply.delay.is_zero() {
                        tokio::time::sleep(reply.delay).await;
                    }
                    let status =
                        actix_web::http::StatusCode::from_u16(reply.status).expect("valid status");
                    let mut response = HttpResponse::build(status);
                    for (name, value) in &reply.headers {
                        response.insert_header((name.as_str(), value.as_str()));
                    }
                    response.body("ok")
                }
            }))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .expect("receiver listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { port, log, handle }
    }

    /// A receiver that answers every request with `status`.
    pub async fn answering(status: u16) -> Self {
        Self::start(move |_, _| Reply::status(status)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Captured> {
        self.log.lock().expect("receiver log").clone()
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Captured> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "receiver got {} of {n} requests within {within:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}
