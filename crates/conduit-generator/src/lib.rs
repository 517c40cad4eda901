//! `conduit-generator` owns the execution of generation jobs: it consumes the `jobs`
//! queue with bounded concurrency, runs each job's provider (the built-in local renderer
//! or a remote video API), stores the finished video and publishes the task's status
//! events (processing, progress, completed or failed). It reads the lifecycle stream
//! (cancels, attempt checkpoints) from its start, skips cancelled attempts and stops the
//! running ones a cancel names, and resumes attempts an earlier run started. It never
//! talks to PostgreSQL: the API's ledger is the only writer of task state.

mod lifecycle;
pub mod metrics;
pub mod providers;
pub mod render;
mod throttle;
mod worker;

use std::{sync::Arc, time::Duration};

use actix_web::dev::{Server, ServerHandle};
use anyhow::Context;
use conduit_core::{
    ops::{self, LiveCheck, OpsState, ReadyCheck},
    storage::VideoStore,
    topology::route,
    Broker, ConsumeLimits, Disposition, Service, Settings, Source,
};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use providers::Providers;
use worker::Worker;

/// How long a stopping generator waits for its last upstream cancel requests.
const UPSTREAM_STOPS_GRACE: Duration = Duration::from_secs(5);

/// A built generator: broker connection started, ops server bound, not yet consuming.
pub struct App {
    worker: Worker,
    server: Server,
    port: u16,
    concurrency: usize,
    /// Closes the broker connection once the consumers have drained.
    broker_stop: CancellationToken,
}

impl App {
    /// Builds the generator with the providers its settings allow.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let providers = Providers::from_settings(&settings);
        Self::build_with_providers(settings, providers).await
    }

    /// Builds the generator with an explicit set of providers.
    pub async fn build_with_providers(
        settings: Settings,
        providers: Providers,
    ) -> anyhow::Result<App> {
        let metrics = metrics::Metrics::new().context("creating metrics")?;
        metrics.init_providers(providers.names());
        let store = VideoStore::from_url(&settings.storage.url).context("opening video storage")?;
        let broker_stop = CancellationToken::new();
        let broker = Broker::start(
            &settings.amqp,
            Service::Generator.name(),
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
        let (server, port) = ops::serve(&settings.http.bind, state, Service::Generator.name())?;
        let worker = Worker {
            broker,
            store,
            providers,
            lifecycle: lifecycle::Lifecycle::default(),
            metrics,
            task_timeout: settings.task_timeout(),
            max_attempts: settings.generator.max_attempts,
            images: providers::ImageLoader::new(settings.webhooks.allow_private_targets),
        };
        Ok(App {
            worker,
            server,
            port,
            concurrency: settings.generator.concurrency,
            broker_stop,
        })
    }

    /// Port of the health and metrics server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Consumes jobs and cancels until `shutdown` fires, then hands back unfinished
    /// jobs, closes the broker connection and stops the ops server.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let server_handle: ServerHandle = self.server.handle();
        let server = tokio::spawn(self.server);
        let worker = Arc::new(self.worker);
        let prefetch = u16::try_from(self.concurrency).unwrap_or(u16::MAX);
        let limits = ConsumeLimits {
            prefetch,
            concurrency: self.concurrency,
        };

        let broker = worker.broker.clone();
        let control_open = Arc::new(tokio::sync::Notify::new());
        let control = {
            let worker = worker.clone();
            let control_open = control_open.clone();
            // One at a time, in stream order: handling a record is a quick, synchronous
            // update, and order matters (a mark is read after everything before it).
            broker.consume_signalling(
                Source::Stream(route::LIFECYCLE.into()),
                ConsumeLimits {
                    prefetch: 1000,
                    concurrency: 1,
                },
                shutdown.clone(),
                Some(control_open),
                move |incoming, _| {
                    worker.handle_lifecycle(&incoming);
                    async { Disposition::Ack }
                },
            )
        };
        let jobs = {
            let worker = worker.clone();
            let handler_worker = worker.clone();
            async move {
                // Each job waits for its mark on the stream; without a reader it would
                // wait in vain.
                tokio::select! {
                    () = control_open.notified() => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                worker
                    .broker
                    .consume(
                        Source::Queue(route::JOBS.into()),
                        limits,
                        shutdown.clone(),
                        move |incoming, token| {
                            let worker = handler_worker.clone();
                            async move { worker.handle_job(incoming, token).await }
                        },
                    )
                    .await
            }
        };
        info!(concurrency = self.concurrency, "generator consuming jobs");
        let (control, jobs) = tokio::join!(control, jobs);
        // Cancels of upstream jobs the hand-back abandoned go out before the process ends.
        providers::settle_upstream_stops(UPSTREAM_STOPS_GRACE).await;
        self.broker_stop.cancel();
        server_handle.stop(true).await;
        let _ = server.await;
        control.context("lifecycle stream consumer")?;
        jobs.context("job consumer")?;
        info!("generator stopped");
        Ok(())
    }
}
