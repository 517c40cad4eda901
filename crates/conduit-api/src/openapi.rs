//! `GET /openapi.json`: the OpenAPI 3.1 description, generated from the handlers'
//! annotations, so it cannot drift from the routes.

use actix_web::HttpResponse;
use utoipa::{
    openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme},
    Modify, OpenApi,
};

use crate::{error, routes, stream, videos};

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("condt_...")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Running")))]
#[allow(dead_code)]
fn healthz() {}

/// Readiness: 200 while RabbitMQ and PostgreSQL are reachable, else 503.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready"),
    (status = 503, description = "A dependency is unreachable", body = error::ErrorBody)))]
#[allow(dead_code)]
fn readyz() {}

/// Prometheus metrics in text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Metrics", content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "OpenAPI 3.1 description", content_type = "application/json")))]
#[allow(dead_code)]
fn openapi_json() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Conduit API",
        description = "Asynchronous video generation with signed webhooks (Standard Webhooks). Every error is `{\"error\":{\"message\",\"type\",\"param\",\"code\"}}`.",
    ),
    paths(
        routes::submit,
        routes::get_task,
        routes::list_tasks,
        routes::cancel,
        routes::retry,
        routes::webhook_log,
        routes::redeliver,
        routes::webhook_secret,
        routes::rotate_webhook_secret,
        routes::models,
        stream::sse::task_events,
        stream::ws::stream,
        videos::download,
        healthz,
        readyz,
        metrics,
        openapi_json,
    ),
    components(schemas(
        routes::GenerationBody,
        routes::SubmitResponse,
        routes::TaskView,
        routes::TaskList,
        routes::SecretView,
        routes::PreviousSecretView,
        routes::RotateBody,
        routes::WebhookRetryBody,
        routes::WebhookBatchBody,
        routes::ModelView,
        routes::ModelList,
        routes::WebhookLog,
        routes::WebhookLogEntry,
        routes::AttemptView,
        routes::Redelivery,
        stream::ws::StreamFrame,
        stream::ws::StreamRequest,
        error::ErrorBody,
        error::ErrorDetail,
    )),
    modifiers(&Security),
    tags(
        (name = "tasks", description = "Submit, follow, cancel and retry video generation tasks"),
        (name = "webhooks", description = "Webhook secret, delivery log and redelivery"),
        (name = "stream", description = "Real-time events: Server-Sent Events per task, a WebSocket per key"),
        (name = "models", description = "Configured video models"),
        (name = "videos", description = "Finished videos behind signed, expiring URLs"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub(crate) struct ApiDoc;

/// The document as JSON text.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".into())
}

pub(crate) async fn serve() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_is_openapi_3_1() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert!(doc["paths"]["/v1/videos/generations/async"]["post"].is_object());
    }
}
