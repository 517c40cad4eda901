//! What every service serves to operators: `GET /healthz`, `GET /readyz` and
//! `GET /metrics`, plus the SIGTERM/SIGINT handling that starts a clean shutdown.
//!
//! `/healthz` is liveness: 200 while every work loop of the process beats (see
//! [`crate::health`]), 503 once one has been silent longer than the stall grace, so a
//! liveness probe restarts a process whose consumer died while the process lived.
//! `/readyz` is readiness: whether the dependencies the service needs to do its work
//! now are reachable.

use std::{future::Future, net::TcpListener, pin::Pin, sync::Arc, time::Duration};

use actix_web::{dev::Server, web, App, HttpResponse, HttpServer};
use anyhow::Context;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::health::Health;

type ReadyFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Answers whether the service's dependencies (broker, database) are reachable now.
#[derive(Clone)]
pub struct ReadyCheck(Arc<dyn Fn() -> ReadyFuture + Send + Sync>);

impl ReadyCheck {
    pub fn new<F, Fut>(check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        Self(Arc::new(move || Box::pin(check())))
    }

    pub async fn is_ready(&self) -> bool {
        (self.0)().await
    }
}

/// What `/healthz` watches: the process's heartbeats and how long one may be silent.
#[derive(Clone)]
pub struct LiveCheck {
    pub health: Health,
    pub stall: Duration,
}

/// Shared state of the operator endpoints.
#[derive(Clone)]
pub struct OpsState {
    pub registry: Registry,
    pub ready: ReadyCheck,
    pub live: LiveCheck,
}

/// Adds the three operator routes to an actix app. Each answers `GET` (and `HEAD`);
/// any other method gets 405 with an `Allow` header.
pub fn configure(state: OpsState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(state))
            .service(ops_resource("/healthz").to(healthz))
            .service(ops_resource("/readyz").to(readyz))
            .service(ops_resource("/metrics").to(metrics));
    }
}

/// `GET`/`HEAD` on `path`, 405 for every other method.
fn ops_resource(path: &str) -> OpsResource {
    OpsResource(path.to_owned())
}

struct OpsResource(String);

impl OpsResource {
    fn to<F, Args>(self, handler: F) -> actix_web::Resource
    where
        F: actix_web::Handler<Args>,
        Args: actix_web::FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        web::resource(self.0)
            .route(
                web::route()
                    .guard(
                        actix_web::guard::Any(actix_web::guard::Get()).or(actix_web::guard::Head()),
                    )
                    .to(handler),
            )
            .default_service(web::to(|| async { method_not_allowed("GET, HEAD") }))
    }
}

/// 405 in the services' JSON error shape, with the `Allow` header RFC 9110 requires.
pub fn method_not_allowed(allow: &str) -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((actix_web::http::header::ALLOW, allow.to_owned()))
        .json(serde_json::json!({
            "error": {
                "message": "Method not allowed",
                "type": "invalid_request_error",
                "code": "method_not_allowed"
            }
        }))
}

/// Adds the process metrics (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
/// `process_open_fds`, `process_max_fds`, `process_virtual_memory_bytes`,
/// `process_start_time_seconds`, `process_threads`) to `registry` (Linux only; a no-op
/// elsewhere).
pub fn register_process_metrics(registry: &Registry) -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("registering process metrics")?;
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
    Ok(())
}

async fn healthz(state: web::Data<OpsState>) -> HttpResponse {
    let stalled = state.live.health.stalled(state.live.stall);
    if stalled.is_empty() {
        return HttpResponse::Ok().json(serde_json::json!({"status": "ok"}));
    }
    let names: Vec<String> = stalled
        .iter()
        .map(|(name, silent)| format!("{name} ({}s)", silent.as_secs()))
        .collect();
    warn!(stalled = %names.join(", "), "a work loop is stalled; answering /healthz 503");
    HttpResponse::ServiceUnavailable().json(serde_json::json!({
        "error": {
            "message": format!("Stalled for longer than {}s: {}", state.live.stall.as_secs(), names.join(", ")),
            "type": "service_unavailable",
            "code": "stalled"
        }
    }))
}

async fn readyz(state: web::Data<OpsState>) -> HttpResponse {
    if state.ready.is_ready().await {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "error": {
                "message": "A dependency this service needs is not reachable",
                "type": "service_unavailable",
                "code": "service_unavailable"
            }
        }))
    }
}

async fn metrics(state: web::Data<OpsState>) -> HttpResponse {
    let mut buf = Vec::new();
    let families = state.registry.gather();
    match TextEncoder::new().encode(&families, &mut buf) {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(buf),
        Err(err) => HttpResponse::InternalServerError().body(err.to_string()),
    }
}

/// Binds `bind` (port 0 picks a free port), logs the address and returns the server
/// with its port. Used by the generator and the sender; the API mounts [`configure`]
/// in its own app.
pub fn serve(bind: &str, state: OpsState, service: &str) -> anyhow::Result<(Server, u16)> {
    let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
    let port = listener
        .local_addr()
        .context("reading bound address")?
        .port();
    info!(service, address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
    let server = HttpServer::new(move || App::new().configure(configure(state.clone())))
        .workers(1)
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)
        .context("starting HTTP server")?
        .run();
    Ok((server, port))
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received; finishing in-flight work");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
