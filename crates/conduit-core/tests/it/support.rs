//! What every broker test needs: a namespace of its own, a broker on it, a consumer
//! that reports what it sees, and the `rabbitmqctl` calls that break connections.

use std::{process::Command, time::Duration};

use anyhow::{bail, Context};
use conduit_core::{
    broker::{Broker, ConsumeLimits, Disposition, Incoming, Source},
    testing, Service, Settings,
};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen within a second or two.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A namespace owned by one test; dropping it deletes its queues and exchanges, also
/// when the test panicked, so a failing run leaves nothing behind on the broker.
pub struct Namespace {
    pub settings: Settings,
}

impl Namespace {
    pub fn new() -> Self {
        // The broker's warnings (recoveries, unsettled deliveries) go to the test's own
        // output, shown when it fails; `RUST_LOG` picks the level.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "conduit_core=info".into()),
            )
            .try_init();
        Self {
            settings: testing::settings(Service::Generator),
        }
    }

    pub fn name(&self) -> &str {
        &self.settings.amqp.namespace
    }

    /// A broker on this namespace whose connection name is unique to the caller, so
    /// the test can find (and close) exactly its own connection.
    pub fn broker(&self, label: &str, shutdown: &CancellationToken) -> Broker {
        Broker::start(&self.settings.amqp, label, shutdown.clone())
    }

    /// A broker that is connected and has declared the topology.
    pub async fn ready_broker(&self, label: &str, shutdown: &CancellationToken) -> Broker {
        let broker = self.broker(label, shutdown);
        broker
            .wait_ready(PATIENCE)
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 is reachable");
        broker
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let url = self.settings.amqp.url.expose().to_owned();
        let ns = self.settings.amqp.namespace.clone();
        // Drop cannot await, and the test's runtime may be gone or panicking: clean up
        // on a runtime of our own in a thread of our own.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for clean-up");
            rt.block_on(testing::delete_namespace(&url, &ns))
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("could not delete namespace: {err:#}"),
            Err(_) => eprintln!("namespace clean-up panicked"),
        }
    }
}

/// A consumer running in the background that forwards every delivery it gets and
/// settles it as `decide` says.
pub struct Probe {
    pub deliveries: mpsc::UnboundedReceiver<Incoming>,
    pub stop: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Probe {
    pub fn start(
        broker: &Broker,
        route: &str,
        decide: impl Fn(&Incoming) -> Disposition + Send + Sync + 'static,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let broker = broker.clone();
        let source = Source::Queue(route.to_owned());
        let token = stop.clone();
        let task = tokio::spawn(async move {
            broker
                .consume(
                    source,
                    ConsumeLimits {
                        prefetch: 20,
                        concurrency: 4,
                    },
                    token,
                    move |incoming, _cancel| {
                        let disposition = decide(&incoming);
                        let _ = tx.send(incoming);
                        async move { disposition }
                    },
                )
                .await
        });
        Self {
            deliveries: rx,
            stop,
            task,
        }
    }

    /// The next delivery, or `None` if none comes within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Incoming> {
        tokio::time::timeout(wait, self.deliveries.recv())
            .await
            .ok()
            .flatten()
    }

    /// Stops the consumer and waits for `consume` to return.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("consume returns after shutdown")
            .expect("consumer task did not panic")
            .expect("consume returns Ok after shutdown");
    }
}

pub fn body_text(incoming: &Incoming) -> String {
    serde_json::from_slice::<String>(&incoming.body).expect("test bodies are JSON strings")
}

/// Closes, from the broker's side, every connection whose name is `connection_name`
/// (only this test's own: other tests share the broker). Returns how many it closed.
pub async fn close_connections_named(connection_name: &str) -> anyhow::Result<usize> {
    let name = connection_name.to_owned();
    tokio::task::spawn_blocking(move || {
        // `name` is the peer address; the name a client chose travels in its
        // client properties, printed as {"connection_name","<name>"}.
        let listed = rabbitmqctl(&["-s", "list_connections", "pid", "client_properties"])?;
        let wanted = format!("{{\"connection_name\",\"{name}\"}}");
        let mut closed = 0;
        for line in listed.lines() {
            let Some((pid, properties)) = line.split_once('\t') else {
                continue;
            };
            if properties.contains(&wanted) {
                rabbitmqctl(&["close_connection", pid.trim(), "test"])?;
                closed += 1;
            }
        }
        Ok(closed)
    })
    .await
    .context("rabbitmqctl task")?
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("running rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
