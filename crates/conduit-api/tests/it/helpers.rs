//! A real API process in-process (port 0) on its own namespace and database, an HTTP
//! client, a key, and a broker handle that plays the generator and the webhook sender.

use std::time::Duration;

use conduit_api::{db, keys, App};
use conduit_core::{
    broker::Outgoing,
    config::Settings,
    messages::{StatusEvent, StatusKind, SCHEMA_VERSION},
    testing,
    topology::route,
    Broker, ConsumeLimits, Disposition, Service, Source,
};
use conduit_testkit::RunningApp;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub use conduit_testkit::eventually;

/// Builds the API from `settings` and runs it in this process (port 0).
pub async fn start_api(settings: Settings) -> RunningApp {
    let app = App::build(settings).await.expect("API builds");
    RunningApp::spawn("API", app.port(), |stop| app.run_until_stopped(stop))
}

pub struct TestApp {
    pub settings: Settings,
    pub api: Option<RunningApp>,
    pub http: reqwest::Client,
    pub pool: Pool,
    pub key: String,
    pub key_id: Uuid,
    pub secret: String,
    pub broker: Broker,
    broker_stop: CancellationToken,
}

pub fn test_settings() -> Settings {
    testing::settings(Service::Api)
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings();
        configure(&mut settings);
        Self::spawn_settings(settings).await
    }

    pub async fn spawn_settings(settings: Settings) -> Self {
        let api = start_api(settings.clone()).await;
        let pool = db::pool(&settings.database).expect("pool");
        let created = keys::create(&pool, "test").await.expect("create key");
        let broker_stop = CancellationToken::new();
        let mut good_amqp = settings.amqp.clone();
        good_amqp.url = testing::settings(Service::Api).amqp.url;
        let broker = Broker::start(&good_amqp, "api-tests", broker_stop.clone());
        broker
            .wait_ready(Duration::from_secs(10))
            .await
            .expect("test broker connects");
        Self {
            settings,
            api: Some(api),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            pool,
            key: created.key,
            key_id: created.id,
            secret: created.webhook_secret,
            broker,
            broker_stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.api.as_ref().expect("API running").port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port())
    }

    /// Replaces the running API by a fresh one built from `settings` (same database).
    pub async fn restart_with(&mut self, settings: Settings) {
        if let Some(api) = self.api.take() {
            api.stop().await;
        }
        self.settings = settings.clone();
        self.api = Some(start_api(settings).await);
    }

    pub async fn new_key(&self, name: &str) -> keys::CreatedKey {
        keys::create(&self.pool, name).await.expect("create key")
    }

    pub async fn submit_as(&self, key: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/v1/videos/generations/async"))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("submit");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn submit(&self, body: &Value) -> (u16, Value) {
        self.submit_as(&self.key, body).await
    }

    pub async fn submit_ok(&self, body: &Value) -> Uuid {
        let (status, json) = self.submit(body).await;
        assert_eq!(status, 202, "submit answered {status}: {json}");
        json["task_id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, Some(&self.key))
            .await
    }

    pub async fn post(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(&self.key))
            .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, Some(&self.key))
            .await
    }

    pub async fn task(&self, id: Uuid) -> Value {
        let (status, json) = self
            .get(&format!("/v1/videos/generations/tasks/{id}"))
            .await;
        assert_eq!(status, 200, "task look-up answered {status}: {json}");
        json
    }

    pub async fn wait_status(&self, id: Uuid, status: &str) -> Value {
        eventually(&format!("task {id} to be {status}"), TIMEOUT, || async {
            let t = self.task(id).await;
            (t["status"] == status).then_some(t)
        })
        .await
    }

    pub async fn webhook_log(&self, id: Uuid) -> Vec<Value> {
        let (status, json) = self
            .get(&format!("/v1/videos/generations/tasks/{id}/webhooks"))
            .await;
        assert_eq!(status, 200, "{json}");
        json["data"].as_array().cloned().unwrap_or_default()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let client = self.pool.get().await.expect("db");
        client
            .query_one(sql, &[])
            .await
            .expect("count query")
            .get(0)
    }

    /// Publishes a status event as a generator would.
    pub async fn status_event(&self, task_id: Uuid, attempt: i32, seq: u64, kind: StatusKind) {
        let event = StatusEvent {
            v: SCHEMA_VERSION,
            task_id,
            attempt,
            seq,
            at: conduit_core::time::now_millis(),
            kind,
        };
        self.broker
            .publish(
                Outgoing::json(route::STATUS, &event)
                    .unwrap()
                    .for_task(task_id),
            )
            .await
            .expect("publish status event");
    }

    pub async fn publish(&self, route: &str, message: &impl serde::Serialize) {
        self.broker
            .publish(Outgoing::json(route, message).unwrap())
            .await
            .expect("publish");
    }

    /// Starts collecting messages of a queue (or the control fanout); every message is
    /// acknowledged and forwarded as JSON.
    pub fn collect(&self, source: Source) -> Collector {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let broker = self.broker.clone();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = broker
                .consume(
                    source,
                    ConsumeLimits {
                        prefetch: 50,
                        concurrency: 1,
                    },
                    token,
                    move |incoming, _| {
                        let tx = tx.clone();
                        async move {
                            let value: Value =
                                serde_json::from_slice(&incoming.body).unwrap_or(Value::Null);
                            let _ = tx.send(value);
                            Disposition::Ack
                        }
                    },
                )
                .await;
        });
        Collector { rx, stop }
    }

    pub async fn stop(mut self) {
        if let Some(api) = self.api.take() {
            api.stop().await;
        }
        self.broker_stop.cancel();
        self.pool.close();
        cleanup(&self.settings).await;
    }
}

/// Drops the test's database, queues and video folder.
pub async fn cleanup(settings: &Settings) {
    let mut config: tokio_postgres::Config = settings.database.url.expose().parse().unwrap();
    let name = config.get_dbname().unwrap().to_owned();
    config.dbname("postgres");
    if let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
    let _ = testing::delete_namespace(
        testing::settings(Service::Api).amqp.url.expose(),
        &settings.amqp.namespace,
    )
    .await;
    if let Some(path) = settings.storage.url.strip_prefix("file://") {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Messages taken from a queue by [`TestApp::collect`].
pub struct Collector {
    rx: mpsc::UnboundedReceiver<Value>,
    stop: CancellationToken,
}

impl Collector {
    pub async fn next(&mut self) -> Value {
        tokio::time::timeout(TIMEOUT, self.rx.recv())
            .await
            .expect("a message within the timeout")
            .expect("collector running")
    }

    /// Whatever arrives within `wait`.
    pub async fn drain_for(&mut self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(v)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push(v);
        }
        out
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A minimal valid submit body.
pub fn body() -> Value {
    serde_json::json!({"model": "local-video", "prompt": "A serene mountain landscape with clouds"})
}
