//! Wiring one API process together: database, broker, background workers (outbox relay,
//! ledger, outcome recorder) and the HTTP server, plus the order they stop in.

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix_web::{
    dev::{Server, Service},
    middleware::ErrorHandlers,
    web, HttpServer,
};
use anyhow::Context;
use conduit_core::{
    config::Settings,
    ops::{self, LiveCheck, OpsState, ReadyCheck},
    storage::VideoStore,
    Broker,
};
use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::{
    consumers::{self, Consumers},
    db::{self, is_unavailable},
    domain::ModelCatalog,
    error::{json_error_safety_net, ApiError, FieldError},
    keys::KeyCache,
    ledger::{SubmitWriter, TaskLedger},
    links::{VideoLinks, SIGNING_KEY_SETTING},
    metrics::Metrics,
    openapi,
    routes::{self, MAX_BODY},
    state::AppState,
    stream::{self, StreamHub, StreamMetrics},
    videos,
};

/// How long start-up waits for PostgreSQL to become reachable.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);
/// How long background workers get to finish after the HTTP server stopped.
const WORKER_GRACE: Duration = Duration::from_secs(20);

/// A built API process, bound to its port and ready to run.
pub struct App {
    port: u16,
    server: Server,
    state: Arc<AppState>,
    /// Stops the relay and the consumers.
    work: CancellationToken,
    /// Closes the broker connection, after the workers are done with it.
    broker_stop: CancellationToken,
    /// Writes the submits the handlers queue; runs while the server does.
    submit_writer: SubmitWriter,
}

impl App {
    /// Creates the database if needed, migrates, starts connecting to RabbitMQ in the
    /// background and binds `http.bind` (port 0 picks a free port).
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let metrics = Metrics::new().context("registering metrics")?;
        let pool = connect_with_patience(&settings).await?;
        let signing_key = match &settings.storage.signing_key {
            Some(key) => key.expose().as_bytes().to_vec(),
            None => {
                let fresh = hex::encode(rand::random::<[u8; 32]>());
                db::setting_or_insert(&pool, SIGNING_KEY_SETTING, fresh)
                    .await?
                    .into_bytes()
            }
        };
        let store = VideoStore::from_url(&settings.storage.url)?;
        let links = VideoLinks::new(
            signing_key,
            &settings.public_base_url,
            Duration::from_secs(settings.storage.url_ttl_seconds),
            store.clone(),
        );
        let work = CancellationToken::new();
        let broker_stop = CancellationToken::new();
        let broker = Broker::start(&settings.amqp, "conduit-api", broker_stop.clone());
        let (ledger, submit_writer) = TaskLedger::new(
            pool.clone(),
            links.clone(),
            metrics.clone(),
            submit_writers(&settings),
        );
        let stream = Arc::new(StreamHub::new(
            StreamMetrics::register(&metrics.registry).context("registering stream metrics")?,
        ));
        let state = Arc::new(AppState {
            models: ModelCatalog::from_settings(&settings),
            settings,
            ledger: Arc::new(ledger),
            pool,
            broker,
            key_cache: KeyCache::default(),
            links,
            metrics,
            stream,
        });
        let listener = TcpListener::bind(&state.settings.http.bind)
            .with_context(|| format!("binding {}", state.settings.http.bind))?;
        let address = listener.local_addr().context("reading the bound address")?;
        info!(service = "conduit-api", address = %address, "listening");
        let server = http_server(state.clone(), listener)?;
        Ok(App {
            port: address.port(),
            server,
            state,
            work,
            broker_stop,
            submit_writer,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until `shutdown` fires, then stops taking requests, finishes those in
    /// flight, lets the workers hand back or finish their messages, and closes the
    /// broker connection last.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            server,
            state,
            work,
            broker_stop,
            submit_writer,
            ..
        } = self;
        // The writer outlives the HTTP server: it stops only after the last handler has
        // had its answer, then finishes what is queued.
        let writer_stop = CancellationToken::new();
        let writer = tokio::spawn(submit_writer.run(writer_stop.clone()));
        let workers = spawn_workers(&state, &work);
        let handle = server.handle();
        let mut server = tokio::spawn(server);
        let result = tokio::select! {
            () = shutdown.cancelled() => {
                info!("stopping: no new requests; finishing those in flight");
                handle.stop(true).await;
                Ok(())
            }
            r = &mut server => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("HTTP server failed")),
                Err(e) => Err(anyhow::Error::from(e).context("HTTP server task failed")),
            },
        };
        writer_stop.cancel();
        if tokio::time::timeout(WORKER_GRACE, writer).await.is_err() {
            warn!("the submit writer did not stop in time");
        }
        work.cancel();
        let wait = futures::future::join_all(workers);
        if tokio::time::timeout(WORKER_GRACE, wait).await.is_err() {
            warn!("background workers did not stop in time");
        }
        broker_stop.cancel();
        state.pool.close();
        info!("stopped");
        result
    }
}

/// Batches committing at once: a quarter of the pool (at most 4), so submits never take
/// the connections the other routes and the consumers need.
fn submit_writers(settings: &Settings) -> usize {
    (settings.database.pool_size / 4).clamp(1, 4)
}

/// Connects and migrates, waiting out a database that is still starting (a stack whose
/// services come up together) for up to [`STARTUP_PATIENCE`].
async fn connect_with_patience(settings: &Settings) -> anyhow::Result<deadpool_postgres::Pool> {
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match db::connect_and_migrate(&settings.database).await {
            Ok(pool) => return Ok(pool),
            Err(err) if is_unavailable(&err) && started.elapsed() < STARTUP_PATIENCE => {
                warn!(error = %format!("{err:#}"), "PostgreSQL not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
            Err(err) => return Err(err),
        }
    }
}

fn spawn_workers(state: &Arc<AppState>, work: &CancellationToken) -> Vec<JoinHandle<()>> {
    let relay = state.ledger.relay(state.broker.clone());
    let consumers = Consumers {
        ledger: state.ledger.clone(),
        broker: state.broker.clone(),
        metrics: state.metrics.clone(),
        limits: consumers::limits(
            state.settings.database.pool_size,
            state.settings.amqp.prefetch,
        ),
    };
    let status = consumers.clone().run_status(work.clone());
    let outcomes = consumers.run_outcomes(work.clone());
    let ledger = state.ledger.clone();
    let janitor_stop = work.clone();
    let stream_ledger = state.ledger.clone();
    let stream_janitor_stop = work.clone();
    vec![
        tokio::spawn(state.stream.clone().run(state.broker.clone(), work.clone())),
        tokio::spawn(state.ledger.stream_sequencer().run(work.clone())),
        tokio::spawn(async move {
            stream_ledger
                .forget_old_stream_events(stream_janitor_stop)
                .await
        }),
        tokio::spawn(async move { ledger.forget_old_idempotency_keys(janitor_stop).await }),
        tokio::spawn(relay.run(work.clone())),
        tokio::spawn(status.map(|r| {
            if let Err(e) = r {
                warn!(error = %format!("{e:#}"), "status consumer stopped");
            }
        })),
        tokio::spawn(outcomes.map(|r| {
            if let Err(e) = r {
                warn!(error = %format!("{e:#}"), "outcome consumer stopped");
            }
        })),
    ]
}

/// Ready while the database answers. Not the broker: the outbox takes submits while
/// RabbitMQ is away (its lag shows in `/metrics`, a relay that stalls in `/healthz`).
fn ready_check(state: &Arc<AppState>) -> ReadyCheck {
    let state = state.clone();
    ReadyCheck::new(move || {
        let state = state.clone();
        async move { state.ledger.reachable(Duration::from_secs(2)).await }
    })
}

/// The server span of one request, continuing the caller's W3C `traceparent`.
fn request_span(req: &actix_web::dev::ServiceRequest) -> tracing::Span {
    let span = tracing::info_span!(
        "HTTP request",
        otel.name = %req.method(),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.path(),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let traceparent = req
        .headers()
        .get(conduit_core::telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    conduit_core::telemetry::continue_trace(&span, traceparent);
    span
}

/// A resource whose unsupported methods answer 405 in the JSON error shape.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(routes::method_not_allowed))
}

fn http_server(state: Arc<AppState>, listener: TcpListener) -> anyhow::Result<Server> {
    let ops_state = OpsState {
        registry: state.metrics.registry.clone(),
        ready: ready_check(&state),
        live: LiveCheck {
            health: state.broker.health().clone(),
            stall: state.settings.stall_grace(),
        },
    };
    let data = web::Data::from(state.clone());
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    let server = HttpServer::new(move || {
        let metrics = data.metrics.clone();
        actix_web::App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::default().limit(MAX_BODY))
            .app_data(
                web::PathConfig::default().error_handler(|_, _| ApiError::not_found_task().into()),
            )
            .app_data(web::QueryConfig::default().error_handler(|err, _| {
                ApiError::Field(FieldError::invalid(
                    "query",
                    format!("Invalid query string: {err}"),
                ))
                .into()
            }))
            .app_data(
                web::JsonConfig::default()
                    .limit(MAX_BODY)
                    .error_handler(|err, _| {
                        ApiError::InvalidJson(format!("Invalid JSON body: {err}")).into()
                    }),
            )
            .wrap(ErrorHandlers::new().default_handler(json_error_safety_net))
            .wrap_fn(move |req, srv| {
                let started = std::time::Instant::now();
                let method = req.method().to_string();
                let metrics = metrics.clone();
                let span = request_span(&req);
                srv.call(req).instrument(span.clone()).map(move |res| {
                    if let Ok(res) = &res {
                        span.record("http.response.status_code", res.status().as_u16());
                        // Routing happens inside: name the span after the matched route.
                        if let Some(route) = res.request().match_pattern() {
                            conduit_core::telemetry::rename(&span, format!("{method} {route}"));
                            span.record("http.route", route.as_str());
                        }
                    }
                    if let Ok(res) = &res {
                        let route = res
                            .request()
                            .match_pattern()
                            .unwrap_or_else(|| "unmatched".to_owned());
                        metrics
                            .http_requests
                            .with_label_values(&[
                                route.as_str(),
                                method.as_str(),
                                res.status().as_str(),
                            ])
                            .inc();
                        metrics
                            .http_duration
                            .with_label_values(&[route.as_str(), method.as_str()])
                            .observe(started.elapsed().as_secs_f64());
                    }
                    res
                })
            })
            .configure(ops::configure(ops_state.clone()))
            .service(resource("/openapi.json").route(web::get().to(openapi::serve)))
            .service(resource("/docs").route(web::get().to(openapi::reference)))
            .service(resource("/v1/videos/generations/async").route(web::post().to(routes::submit)))
            .service(
                resource("/v1/videos/generations/tasks").route(web::get().to(routes::list_tasks)),
            )
            .service(
                resource("/v1/videos/generations/tasks/{task_id}")
                    .route(web::get().to(routes::get_task)),
            )
            .service(
                resource("/v1/videos/generations/tasks/{task_id}/retry")
                    .route(web::post().to(routes::retry)),
            )
            .service(
                resource("/v1/videos/generations/tasks/{task_id}/webhooks")
                    .route(web::get().to(routes::webhook_log)),
            )
            .service(
                resource("/v1/videos/generations/tasks/{task_id}/webhooks/redeliver")
                    .route(web::post().to(routes::redeliver)),
            )
            .service(
                resource("/v1/videos/generations/{task_id}")
                    .route(web::delete().to(routes::cancel)),
            )
            .service(
                resource("/v1/videos/generations/tasks/{task_id}/events")
                    .route(web::get().to(stream::sse::task_events)),
            )
            .service(resource("/v1/stream").route(web::get().to(stream::ws::stream)))
            .service(resource("/v1/webhooks/secret").route(web::get().to(routes::webhook_secret)))
            .service(
                resource("/v1/webhooks/secret/rotate")
                    .route(web::post().to(routes::rotate_webhook_secret)),
            )
            .service(resource("/v1/models").route(web::get().to(routes::models)))
            .service(
                resource("/v1/videos/files/{task_id}")
                    .route(web::get().to(videos::download))
                    .route(web::head().to(videos::download)),
            )
            .default_service(web::to(routes::not_found))
    })
    .workers(workers)
    .disable_signals()
    .shutdown_timeout(8)
    .listen(listener)
    .context("starting the HTTP server")?
    .run();
    Ok(server)
}
