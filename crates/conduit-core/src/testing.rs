//! Helpers for the services' own tests (feature `testing`): every test gets its own
//! AMQP namespace (and, for the API, its own database), so tests run in parallel and
//! never see each other's messages.

use std::time::Duration;

use anyhow::Context;
use lapin::{
    options::ExchangeDeleteOptions, options::QueueDeleteOptions, Connection, ConnectionProperties,
};

use crate::{
    config::{Secret, Service, Settings},
    topology::{route, Topology, WAIT_BUCKETS},
};

/// The machine's RabbitMQ, as the system tests and the benchmark reach it.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The machine's PostgreSQL as the administrator (creating and dropping databases).
pub const PG_ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// The URL of database `name` on the machine's PostgreSQL.
pub fn database_url(name: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

/// A namespace no other test uses: `t_<random>`.
pub fn unique_namespace() -> String {
    format!("t_{}", uuid::Uuid::new_v4().simple())
}

/// Settings for a test: defaults, the machine's RabbitMQ and PostgreSQL, a fresh
/// namespace, HTTP on port 0, a private video folder, retries fast enough for tests and
/// private (loopback) webhook targets allowed.
pub fn settings(service: Service) -> Settings {
    let mut s = Settings::load(service, None).expect("default settings load");
    let ns = unique_namespace();
    s.database.url = Secret::new(database_url(&format!("conduit_{ns}")));
    s.database.pool_size = 4;
    s.amqp.namespace = ns;
    s.http.bind = "127.0.0.1:0".into();
    s.storage.url = format!(
        "file://{}",
        std::env::temp_dir()
            .join(format!("conduit-videos-{}", s.amqp.namespace))
            .display()
    );
    s.webhooks.allow_private_targets = true;
    s.webhooks.retry_schedule =
        crate::config::RetrySchedule::parse("0s,200ms,200ms").expect("valid schedule");
    s
}

/// Deletes every queue and exchange of `namespace` (best effort, for test clean-up).
pub async fn delete_namespace(amqp_url: &str, namespace: &str) -> anyhow::Result<()> {
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(amqp_url, ConnectionProperties::default()),
    )
    .await
    .context("timed out connecting")?
    .context("connecting to RabbitMQ")?;
    let channel = conn.create_channel().await?;
    let t = Topology::new(namespace);
    let mut queues: Vec<String> = route::QUORUM_QUEUES
        .iter()
        .chain([route::LIFECYCLE].iter())
        .map(|r| t.queue(r))
        .collect();
    queues.extend(
        WAIT_BUCKETS
            .iter()
            .map(|d| t.queue(&Topology::wait_route(*d))),
    );
    for q in queues {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [t.exchange(), t.control_exchange()] {
        let _ = channel
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
