//! Tracing set-up shared by the three binaries: JSON lines (default) or human-readable
//! output, filtered by `RUST_LOG` or else by `log.level`. Logs go to stderr, so a
//! command's own output on stdout (a new API key, say) stays clean for scripts.
//!
//! With `telemetry.otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) set, spans are also
//! exported over OTLP/HTTP (protobuf) and the W3C trace context travels in each AMQP
//! message's `traceparent` header, so one task is one trace across the three services.
//! Unset, no exporter, no OpenTelemetry layer and no propagation run at all.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider, Resource};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, Service, Settings};

/// The AMQP header (and HTTP header) that carries the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (and trace context propagated) in this process.
pub fn enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Flushes and stops the span exporter when dropped (or on [`Telemetry::shutdown`]).
#[must_use = "dropping the guard stops exporting spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered. Blocking: it runs on a blocking thread.
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(err) = provider.shutdown() {
                    eprintln!("telemetry: flushing spans failed: {err}");
                }
            })
            .await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The exporter's HTTP client blocks; never do that on a runtime thread.
            std::thread::spawn(move || {
                let _ = provider.shutdown();
            });
        }
    }
}

/// Installs logging only (tests, commands that do not serve); later calls are no-ops.
pub fn init(settings: &LogSettings) {
    let _ = install(settings, None);
}

/// Installs logging and, when an OTLP endpoint is configured, span export for `service`.
pub fn init_service(settings: &Settings, service: Service) -> Telemetry {
    let endpoint = settings
        .telemetry
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .map(|e| e.trim().trim_end_matches('/').to_owned())
        .filter(|e| !e.is_empty());
    let provider = match endpoint.as_deref().map(|e| provider(e, service)) {
        Some(Ok(provider)) => Some(provider),
        Some(Err(err)) => {
            eprintln!("telemetry: not exporting traces: {err:#}");
            None
        }
        None => None,
    };
    if install(&settings.log, provider.as_ref()) && provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        EXPORTING.store(true, Ordering::Relaxed);
        if let Some(endpoint) = &endpoint {
            tracing::info!(endpoint = %endpoint, "exporting traces over OTLP/HTTP");
        }
    }
    Telemetry { provider }
}

fn provider(endpoint: &str, service: Service) -> anyhow::Result<SdkTracerProvider> {
    use anyhow::Context;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .context("building the OTLP span exporter")?;
    // OTEL_SERVICE_NAME (read by the default resource) wins over the binary's name.
    let mut resource = Resource::builder();
    if !std::env::var("OTEL_SERVICE_NAME").is_ok_and(|n| !n.trim().is_empty()) {
        resource = resource.with_service_name(service.name());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Returns whether this call installed the global subscriber.
fn install(settings: &LogSettings, provider: Option<&SdkTracerProvider>) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let base = fmt::layer().with_target(true).with_writer(std::io::stderr);
    let logs = match settings.format {
        LogFormat::Json => base
            .json()
            .flatten_event(true)
            .with_current_span(true)
            // Every enclosing span's fields, so each line carries the `trace_id` and
            // `task_id` its root span recorded.
            .with_span_list(true)
            .boxed(),
        LogFormat::Pretty => base.boxed(),
    };
    let otel = provider.map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer().with_tracer(p.tracer("conduit"))
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init()
        .is_ok()
}

/// The W3C `traceparent` of the current span, for a message that continues it.
/// `None` when tracing is off or no span is current.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent_of(&Span::current())
}

/// The W3C `traceparent` of `span` (tracing on only).
pub fn traceparent_of(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` continue the trace of a received W3C `traceparent` (from an HTTP
/// request or an AMQP message) and records its `trace_id` field for the logs. Without
/// a valid header the span starts a trace of its own. No-op when tracing is off.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(header) = traceparent {
        let mut carrier = HashMap::new();
        carrier.insert(TRACEPARENT.to_owned(), header.to_owned());
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records the span's trace id in its `trace_id` field (declared `Empty` by the span).
pub fn record_trace_id(span: &Span) {
    if !enabled() {
        return;
    }
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}

/// Renames `span` in the exported trace (for example after routing found the route).
/// Recording `otel.name` is not enough once the span's trace context exists, which
/// [`continue_trace`] makes happen at once. No-op when tracing is off.
pub fn rename(span: &Span, name: String) {
    if !enabled() {
        return;
    }
    span.context().span().update_name(name);
}
