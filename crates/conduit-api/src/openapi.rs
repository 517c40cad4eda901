//! `GET /openapi.json`: the OpenAPI 3.1 description, generated from the handlers'
//! annotations, so it cannot drift from the routes.

use std::{collections::HashMap, sync::OnceLock};

use actix_web::HttpResponse;
use serde_json::json;
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

/// Liveness: 200 while the process and its work loops run; 503 once a consumer or the
/// outbox relay has been stalled longer than `CONDUIT__HEALTH__STALL_SECONDS`.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses(
    (status = 200, description = "Running"),
    (status = 503, description = "A work loop is stalled", body = error::ErrorBody)))]
#[allow(dead_code)]
fn healthz() {}

/// Readiness: 200 while PostgreSQL is reachable, else 503 (a RabbitMQ outage does not
/// count: submits wait in the outbox).
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready"),
    (status = 503, description = "A dependency is unreachable", body = error::ErrorBody)))]
#[allow(dead_code)]
fn readyz() {}

/// Prometheus metrics in text format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Metrics", content_type = "text/plain")))]
#[allow(dead_code)]
fn metrics() {}

/// The API reference page (Scalar, rendering `/openapi.json`).
#[utoipa::path(get, path = "/docs", tag = "operations", responses((status = 200, description = "HTML page", content_type = "text/html")))]
#[allow(dead_code)]
fn docs_page() {}

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
        docs_page,
    ),
    components(schemas(
        routes::GenerationBody,
        routes::TaskStatusParam,
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

/// The document as JSON text: the handlers' annotations plus the webhooks Conduit sends
/// (OpenAPI 3.1 `webhooks`, which the generator has no annotation for).
pub fn document() -> String {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    DOCUMENT
        .get_or_init(|| {
            let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
            add_webhooks(&mut doc);
            serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".into())
        })
        .clone()
}

/// The Standard Webhooks headers every webhook request carries.
fn webhook_headers() -> serde_json::Value {
    json!([
        {"name": "webhook-id", "in": "header", "required": true,
         "description": "One id per event, the same on every attempt of that event (a batch: one id per batch)",
         "schema": {"type": "string"}},
        {"name": "webhook-timestamp", "in": "header", "required": true,
         "description": "Unix seconds of this attempt",
         "schema": {"type": "string", "pattern": "^[0-9]+$"}},
        {"name": "webhook-signature", "in": "header", "required": true,
         "description": "`v1,` + base64 of HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64-decoded part of the key's `whsec_` secret; while a secret rotation overlaps, two signatures separated by a space",
         "schema": {"type": "string"}},
        {"name": "User-Agent", "in": "header", "required": true,
         "schema": {"type": "string", "const": "Conduit-LLM/1.0"}}
    ])
}

fn webhook_operation(summary: &str, description: &str, schema: &str) -> serde_json::Value {
    json!({
        "post": {
            "summary": summary,
            "description": description,
            "tags": ["webhooks"],
            "parameters": webhook_headers(),
            "requestBody": {
                "required": true,
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
            },
            "responses": {
                "2XX": {"description": "Delivered: no further attempt"},
                "410": {"description": "Gone: the receiver asks to stop; no further attempt for this event"},
                "default": {"description": "Any other answer, a timeout (30 s) or a connection error: retried on the schedule (terminal events) or given up (progress)"}
            }
        }
    })
}

/// The four webhook payloads (crates/conduit-core/src/payload.rs) and the batch body.
fn add_webhooks(doc: &mut serde_json::Value) {
    let timestamp = json!({"type": "string", "format": "date-time",
        "description": "When the event happened, RFC 3339 in UTC with milliseconds: `2024-01-20T15:30:45.123Z`"});
    let task_id = json!({"type": "string", "format": "uuid"});
    let terminal = json!({"type": "string", "const": "video_generation_completed"});
    let schemas = json!({
        "CompletedWebhook": {
            "type": "object", "additionalProperties": false,
            "required": ["task_id", "status", "webhook_type", "timestamp", "video_url", "generation_duration_seconds", "model", "prompt"],
            "properties": {
                "task_id": task_id, "status": {"type": "string", "const": "completed"},
                "webhook_type": terminal, "timestamp": timestamp,
                "video_url": {"type": "string", "format": "uri", "description": "Signed, expiring URL of the MP4"},
                "generation_duration_seconds": {"type": "number", "minimum": 0},
                "model": {"type": "string"}, "prompt": {"type": "string"}
            }
        },
        "FailedWebhook": {
            "type": "object", "additionalProperties": false,
            "required": ["task_id", "status", "webhook_type", "timestamp", "error", "model", "prompt"],
            "properties": {
                "task_id": task_id, "status": {"type": "string", "const": "failed"},
                "webhook_type": terminal, "timestamp": timestamp,
                "error": {"type": "string"}, "model": {"type": "string"}, "prompt": {"type": "string"}
            }
        },
        "CancelledWebhook": {
            "type": "object", "additionalProperties": false,
            "required": ["task_id", "status", "webhook_type", "timestamp", "error", "model", "prompt"],
            "properties": {
                "task_id": task_id, "status": {"type": "string", "const": "cancelled"},
                "webhook_type": terminal, "timestamp": timestamp,
                "error": {"type": "string", "const": conduit_core::payload::CANCELLED_ERROR},
                "model": {"type": "string"}, "prompt": {"type": "string"}
            }
        },
        "ProgressWebhook": {
            "type": "object", "additionalProperties": false,
            "required": ["task_id", "status", "webhook_type", "timestamp", "progress_percentage", "message"],
            "properties": {
                "task_id": task_id, "status": {"type": "string", "const": "processing"},
                "webhook_type": {"type": "string", "const": "video_generation_progress"},
                "timestamp": timestamp,
                "progress_percentage": {"type": "integer", "minimum": 0, "maximum": 100},
                "message": {"type": "string"},
                "estimated_seconds_remaining": {"type": "integer", "minimum": 0, "description": "Left out while unknown"}
            }
        },
        "WebhookBatch": {
            "type": "object", "additionalProperties": false,
            "description": "Several events of tasks submitted with `webhook_batch`, in one request (at most `max_events`, 1 MiB)",
            "required": ["webhook_type", "timestamp", "events"],
            "properties": {
                "webhook_type": {"type": "string", "const": "batch"},
                "timestamp": {"type": "string", "format": "date-time", "description": "When the batch was formed"},
                "events": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": false,
                    "required": ["webhook_id", "payload"],
                    "properties": {
                        "webhook_id": {"type": "string", "description": "The event's own id (its delivery log entry)"},
                        "payload": {"oneOf": [
                            {"$ref": "#/components/schemas/CompletedWebhook"},
                            {"$ref": "#/components/schemas/FailedWebhook"},
                            {"$ref": "#/components/schemas/CancelledWebhook"},
                            {"$ref": "#/components/schemas/ProgressWebhook"}
                        ]}
                    }
                }}
            }
        }
    });
    if let (Some(target), Some(new)) = (
        doc.pointer_mut("/components/schemas")
            .and_then(|s| s.as_object_mut()),
        schemas.as_object(),
    ) {
        target.extend(new.clone());
    }
    doc["webhooks"] = json!({
        "videoGenerationCompleted": webhook_operation(
            "Video ready",
            "Sent once when the task's video is stored, to the task's `webhook_url` with its `webhook_headers`.",
            "CompletedWebhook"),
        "videoGenerationFailed": webhook_operation(
            "Generation failed",
            "Sent once when the task fails.",
            "FailedWebhook"),
        "videoGenerationCancelled": webhook_operation(
            "Task cancelled",
            "Sent once when the task is cancelled.",
            "CancelledWebhook"),
        "videoGenerationProgress": webhook_operation(
            "Progress",
            "Sent while the task runs, for tasks that subscribe to `progress`; attempted once, never retried.",
            "ProgressWebhook"),
        "webhookBatch": webhook_operation(
            "A batch of events",
            "Replaces the single-event requests for tasks submitted with `webhook_batch`.",
            "WebhookBatch"),
    });
}

/// The methods the document gives `path` (an actix pattern such as
/// `/v1/videos/generations/tasks/{task_id}`), as an `Allow` header value.
pub(crate) fn allowed_methods(path: &str) -> Option<String> {
    static ALLOW: OnceLock<HashMap<String, String>> = OnceLock::new();
    ALLOW
        .get_or_init(|| {
            ApiDoc::openapi()
                .paths
                .paths
                .into_iter()
                .map(|(path, item)| {
                    let methods = [
                        ("GET", item.get.is_some()),
                        ("HEAD", item.head.is_some()),
                        ("POST", item.post.is_some()),
                        ("PUT", item.put.is_some()),
                        ("PATCH", item.patch.is_some()),
                        ("DELETE", item.delete.is_some()),
                    ];
                    let allow: Vec<&str> = methods
                        .iter()
                        .filter(|(_, present)| *present)
                        .map(|(m, _)| *m)
                        .collect();
                    (path, allow.join(", "))
                })
                .collect()
        })
        .get(path)
        .cloned()
}

pub(crate) async fn serve() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

/// `GET /docs`: the API reference, rendered in the browser by Scalar from
/// `/openapi.json`. The page loads Scalar's script from its CDN when it is opened; the
/// server ships and downloads nothing.
pub(crate) async fn reference() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(REFERENCE_PAGE)
}

const REFERENCE_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Conduit API reference</title>
</head>
<body>
  <noscript>The reference needs JavaScript; the document itself is <a href="openapi.json">/openapi.json</a>.</noscript>
  <script id="api-reference" data-url="openapi.json"></script>
  <script src="https://cdn.jsdelivr.net/npm/@scalar/api-reference"></script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn document_is_openapi_3_1() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert!(doc["paths"]["/v1/videos/generations/async"]["post"].is_object());
    }

    #[test]
    fn webhooks_describe_the_four_payloads_and_the_batch() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let hooks = doc["webhooks"].as_object().unwrap();
        assert_eq!(hooks.len(), 5);
        for (name, hook) in hooks {
            let schema = hook["post"]["requestBody"]["content"]["application/json"]["schema"]
                ["$ref"]
                .as_str()
                .unwrap();
            let schema = schema.trim_start_matches("#/components/schemas/");
            assert!(
                doc["components"]["schemas"][schema].is_object(),
                "{name}: {schema}"
            );
        }
        // The schemas match what the sender really sends.
        let id = uuid::Uuid::new_v4();
        let now = chrono::Utc::now();
        let progress = serde_json::to_value(conduit_core::payload::ProgressPayload::new(
            id,
            now,
            40,
            "Rendering".into(),
            None,
        ))
        .unwrap();
        let required = doc["components"]["schemas"]["ProgressWebhook"]["required"]
            .as_array()
            .unwrap();
        for key in required {
            assert!(progress.get(key.as_str().unwrap()).is_some(), "{key}");
        }
        for key in progress.as_object().unwrap().keys() {
            assert!(
                doc["components"]["schemas"]["ProgressWebhook"]["properties"][key].is_object(),
                "{key}"
            );
        }
    }

    #[test]
    fn allow_lists_the_methods_of_a_path() {
        assert_eq!(
            super::allowed_methods("/v1/videos/generations/async").as_deref(),
            Some("POST")
        );
        assert_eq!(super::allowed_methods("/healthz").as_deref(), Some("GET"));
    }
}
