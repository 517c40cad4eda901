//! `conduit-webhook-sender` owns the delivery of webhook events to client URLs: it
//! consumes the `webhooks` queue with bounded concurrency and a per-host cap, signs each
//! request the Standard Webhooks way, applies the target guard to the address actually
//! dialled, publishes every attempt's outcome for the API's delivery log, and keeps
//! scheduled retries in RabbitMQ's wait queues (never in memory) until the schedule is
//! exhausted and the delivery goes to the dead-letter queue. It is stateless and never
//! talks to PostgreSQL.

pub mod delivery;
pub mod guard;
mod limits;
pub mod metrics;
pub mod retry;
pub mod signing;

use std::sync::Arc;

use actix_web::dev::Server;
use anyhow::Context;
use conduit_core::{
    ops::{self, LiveCheck, OpsState, ReadyCheck},
    topology::route,
    Broker, ConsumeLimits, Service, Settings, Source,
};
use tokio_util::sync::CancellationToken;
use tracing::info;

use delivery::Deliverer;

/// A built sender: broker connection started, ops server bound, not yet consuming.
pub struct App {
    deliverer: Arc<Deliverer>,
    broker: Broker,
    server: Server,
    port: u16,
    limits: ConsumeLimits,
    /// Closes the broker connection once the consumer has drained.
    broker_stop: CancellationToken,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let metrics = metrics::Metrics::new().context("creating metrics")?;
        let broker_stop = CancellationToken::new();
        let broker = Broker::start(
            &settings.amqp,
            Service::WebhookSender.name(),
            broker_stop.clone(),
        );
        let ready_broker = broker.clone();
        let state = OpsState {
            registry: metrics.registry.clone(),
            ready: ReadyCheck::new(move || {
                let broker = ready_broker.clone();
                async move { broker.is_ready() }
            }),
            live: LiveCheck {
                health: broker.health().clone(),
                stall: settings.stall_grace(),
            },
        };
        let (server, port) = ops::serve(&settings.http.bind, state, Service::WebhookSender.name())?;
        let deliverer = Deliverer::new(&settings, broker.clone(), metrics)
            .context("building the webhook HTTP client")?;
        let concurrency = settings.webhooks.concurrency;
        // Enough prefetched deliveries to keep every slot busy, within AMQP's u16.
        let prefetch = concurrency.max(usize::from(settings.amqp.prefetch));
        let limits = ConsumeLimits {
            prefetch: u16::try_from(prefetch).unwrap_or(u16::MAX),
            concurrency,
        };
        Ok(App {
            deliverer: Arc::new(deliverer),
            broker,
            server,
            port,
            limits,
            broker_stop,
        })
    }

    /// Port of the health and metrics server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Delivers webhooks until `shutdown` fires, then lets in-flight attempts finish (or
    /// hands them back), closes the broker connection and stops the ops server.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let server_handle = self.server.handle();
        let server = tokio::spawn(self.server);
        let deliverer = self.deliverer.clone();
        info!(
            concurrency = self.limits.concurrency,
            prefetch = self.limits.prefetch,
            "webhook sender consuming"
        );
        let consumed = self
            .broker
            .consume(
                Source::Queue(route::WEBHOOKS.into()),
                self.limits,
                shutdown,
                move |incoming, token| {
                    let deliverer = deliverer.clone();
                    async move { deliverer.handle(incoming, token).await }
                },
            )
            .await;
        self.broker_stop.cancel();
        server_handle.stop(true).await;
        let _ = server.await;
        consumed.context("webhook consumer")?;
        info!("webhook sender stopped");
        Ok(())
    }
}
