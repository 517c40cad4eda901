//! The public HTTP API: one handler per endpoint of the contract, each documented for
//! the OpenAPI description. Handlers parse, call the storage layer, and shape the
//! answer; every failure is an [`ApiError`].

use std::collections::HashMap;

use actix_web::{
    http::header::{self, HeaderMap},
    web, HttpRequest, HttpResponse,
};
use chrono::{DateTime, Utc};
use conduit_core::time::format_millis;
use futures::StreamExt;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Caller,
    domain::{guard_image_target, guard_webhook_target, GenerationRequest},
    error::{ApiError, ErrorBody, FieldError},
    ledger::{DeliveryRecord, KeySecrets, Submitted, TaskPage, TaskRow, TaskStatus},
    state::AppState,
};

/// Largest accepted submit body, not counting a `data:` `image_url`.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// Largest submit body read at all: [`MAX_BODY`] plus a `data:` `image_url` of 10 MiB
/// decoded. What is not the image must still fit in [`MAX_BODY`].
pub(crate) const MAX_SUBMIT_BODY: usize = MAX_BODY + crate::domain::MAX_IMAGE_DATA_URI_CHARS;
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The submit body, for the OpenAPI description (the handler parses a
/// `serde_json::Value` itself, to name the exact field that is wrong).
#[allow(dead_code)]
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "local-video", "prompt": "A serene mountain landscape with clouds", "duration": 6, "size": "1280x720", "webhook_url": "https://your-app.com/webhooks/video-complete", "webhook_headers": {"Authorization": "Bearer your-webhook-secret"}}))]
pub(crate) struct GenerationBody {
    /// One of `GET /v1/models`.
    model: String,
    /// 1 to 4000 characters.
    #[schema(min_length = 1, max_length = 4000)]
    prompt: String,
    /// Seconds, 1 to 60 (a model may allow less).
    #[schema(minimum = 1, maximum = 60, default = 6)]
    duration: Option<u32>,
    /// `WIDTHxHEIGHT`, both even, 64 to 3840.
    #[schema(default = "1280x720", pattern = "^[0-9]+x[0-9]+$")]
    size: Option<String>,
    #[schema(minimum = 1, maximum = 60, default = 24)]
    fps: Option<u32>,
    seed: Option<i64>,
    /// Absolute http(s) URL, at most 2048 characters, no user-info, not an internal address.
    #[schema(max_length = 2048)]
    webhook_url: Option<String>,
    /// At most 20 headers sent verbatim with every webhook.
    webhook_headers: Option<HashMap<String, String>>,
    /// Subset of `progress`, `completed`, `failed`, `cancelled`; default all four.
    webhook_events: Option<Vec<String>>,
    /// A first frame for image-to-video: an http(s) URL (not an internal address) or a
    /// `data:image/png;base64,` / `data:image/jpeg;base64,` URI of at most 10 MiB decoded.
    /// Only for models whose `image_input` is true (`GET /v1/models`); with a data URI the
    /// body may exceed 64 KiB by the URI's length.
    image_url: Option<String>,
    /// This task's own retry schedule for terminal webhooks, instead of the operator's.
    webhook_retry: Option<WebhookRetryBody>,
    /// Deliver this task's webhooks in batches (see the webhook documentation).
    webhook_batch: Option<WebhookBatchBody>,
}

/// `webhook_retry`: the delay before each attempt of a terminal webhook.
#[allow(dead_code)]
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"schedule": ["0s", "30s", "5m"]}))]
pub(crate) struct WebhookRetryBody {
    /// 1 to 20 delays such as `250ms`, `30s`, `5m`, `2h`; each at most 24 h, together
    /// at most 72 h.
    #[schema(min_items = 1, max_items = 20)]
    schedule: Vec<String>,
}

/// `webhook_batch`: tasks of one key with the same `webhook_url`, `webhook_headers` and
/// `webhook_batch` share batches.
#[allow(dead_code)]
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookBatchBody {
    /// Most events in one POST.
    #[schema(minimum = 1, maximum = 1000, default = 100)]
    max_events: Option<u32>,
    /// Longest wait after a batch's first event before it is sent.
    #[schema(minimum = 0, maximum = 60000, default = 1000)]
    max_wait_ms: Option<u32>,
}

/// Answer to a submit or a retry.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SubmitResponse {
    pub(crate) task_id: Uuid,
    pub(crate) status: String,
    pub(crate) created_at: String,
    pub(crate) estimated_completion_time: String,
    pub(crate) check_status_url: String,
}

/// A task as `GET /v1/videos/generations/tasks/{task_id}` shows it. Keys without a value
/// are left out.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskView {
    pub(crate) task_id: Uuid,
    /// `pending`, `processing`, `completed`, `failed` or `cancelled`.
    pub(crate) status: String,
    #[schema(minimum = 0, maximum = 100)]
    pub(crate) progress: i16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) estimated_seconds_remaining: Option<i64>,
    pub(crate) model: String,
    pub(crate) prompt: String,
    pub(crate) duration: i32,
    pub(crate) size: String,
    pub(crate) fps: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) seed: Option<i64>,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) video_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) generation_duration_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskList {
    pub(crate) data: Vec<TaskView>,
    pub(crate) has_more: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SecretView {
    /// `whsec_` + base64: the key that signs this API key's webhooks.
    pub(crate) secret: String,
    /// The secret before the latest rotation, while webhooks still carry a signature
    /// made with it too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) previous: Option<PreviousSecretView>,
}

/// A secret replaced by a rotation, still signed with until `expires_at`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PreviousSecretView {
    pub(crate) secret: String,
    /// RFC 3339, UTC, milliseconds: when webhooks stop carrying its signature.
    pub(crate) expires_at: String,
}

impl From<KeySecrets> for SecretView {
    fn from(s: KeySecrets) -> Self {
        Self {
            secret: s.current,
            previous: s.previous.map(|p| PreviousSecretView {
                secret: p.secret,
                expires_at: fmt(&p.expires_at),
            }),
        }
    }
}

/// The optional body of a secret rotation, for the OpenAPI description.
#[allow(dead_code)]
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateBody {
    /// Seconds during which webhooks carry a signature made with the old secret too.
    #[schema(minimum = 0, maximum = 604800, default = 86400)]
    overlap_seconds: Option<u32>,
}

/// Longest overlap of a rotation: a week.
const MAX_OVERLAP_SECONDS: u64 = 604_800;
const DEFAULT_OVERLAP_SECONDS: u32 = 86_400;

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ModelView {
    pub(crate) id: String,
    pub(crate) object: String,
    pub(crate) provider: String,
    /// False while the provider has no credentials configured.
    pub(crate) available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_duration: Option<u32>,
    /// The only durations, in seconds, the model makes, when it is that strict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) durations: Option<Vec<u32>>,
    /// The only sizes the model makes (`WIDTHxHEIGHT`), when it is that strict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sizes: Option<Vec<String>>,
    /// The provider's resolution names a request's size maps to (`512P`, `768P`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) resolutions: Option<Vec<String>>,
    /// The setting that makes the model available, while it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) missing_setting: Option<String>,
    /// Whether the model takes an `image_url` (image-to-video).
    pub(crate) image_input: bool,
    /// Models tried in order when this one's provider is rate-limited or unreachable.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) fallback: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ModelList {
    pub(crate) object: String,
    pub(crate) data: Vec<ModelView>,
}

/// One attempt in the delivery log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct AttemptView {
    pub(crate) attempt: i32,
    /// RFC 3339, UTC, milliseconds.
    pub(crate) attempted_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) duration_ms: i64,
}

/// One event in the delivery log.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct WebhookLogEntry {
    pub(crate) webhook_id: String,
    /// `video_generation_completed` or `video_generation_progress`.
    pub(crate) webhook_type: String,
    /// `progress`, `completed`, `failed` or `cancelled`.
    pub(crate) event: String,
    /// `pending`, `delivered`, `failed` or `dropped`.
    pub(crate) status: String,
    /// When the next attempt is due, while pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) next_attempt_at: Option<String>,
    /// When the event happened (the payload's `timestamp`).
    pub(crate) occurred_at: String,
    pub(crate) url: String,
    pub(crate) attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct WebhookLog {
    pub(crate) data: Vec<WebhookLogEntry>,
}

impl From<DeliveryRecord> for WebhookLogEntry {
    fn from(d: DeliveryRecord) -> Self {
        Self {
            webhook_id: d.webhook_id,
            webhook_type: d.event.webhook_type().to_owned(),
            event: d.event.as_str().to_owned(),
            status: d.status,
            next_attempt_at: d.next_attempt_at.as_ref().map(fmt),
            occurred_at: fmt(&d.occurred_at),
            url: d.url,
            attempts: d
                .attempts
                .into_iter()
                .map(|a| AttemptView {
                    attempt: a.attempt,
                    attempted_at: fmt(&a.attempted_at),
                    status_code: a.status_code,
                    error: a.error,
                    duration_ms: a.duration_ms,
                })
                .collect(),
        }
    }
}

/// What a redelivery queued.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Redelivery {
    pub(crate) webhook_id: String,
    pub(crate) event: String,
    pub(crate) status: String,
}

fn fmt(at: &DateTime<Utc>) -> String {
    format_millis(at)
}

fn status_url(task_id: Uuid) -> String {
    format!("/v1/videos/generations/tasks/{task_id}")
}

fn task_id_of(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found_task())
}

fn accepted(task: &TaskRow) -> HttpResponse {
    let body = SubmitResponse {
        task_id: task.id,
        status: task.status.as_str().to_owned(),
        created_at: fmt(&task.created_at),
        estimated_completion_time: fmt(
            &(task.updated_at + chrono::Duration::seconds(task.estimated_seconds()))
        ),
        check_status_url: status_url(task.id),
    };
    HttpResponse::Accepted()
        .insert_header((header::LOCATION, status_url(task.id)))
        .json(body)
}

async fn task_view(state: &AppState, task: TaskRow) -> Result<TaskView, ApiError> {
    let video_url = state.ledger.video_url(&task).await?;
    let processing = task.status == TaskStatus::Processing;
    Ok(TaskView {
        task_id: task.id,
        status: task.status.as_str().to_owned(),
        progress: task.progress,
        message: task.message,
        estimated_seconds_remaining: task.eta_seconds.filter(|_| processing),
        model: task.model,
        prompt: task.prompt,
        duration: task.duration,
        size: format!("{}x{}", task.width, task.height),
        fps: task.fps,
        seed: task.seed,
        created_at: fmt(&task.created_at),
        updated_at: fmt(&task.updated_at),
        completed_at: task.completed_at.as_ref().map(fmt),
        video_url,
        generation_duration_seconds: task
            .generation_duration_seconds
            .filter(|_| task.status == TaskStatus::Completed),
        error: task.error,
    })
}

fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(raw) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads the body up to `limit`, refusing more without buffering it.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    if !is_json_content_type(req.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(MAX_BODY));
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::InvalidJson(format!("Could not read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge(MAX_BODY));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(raw) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::Field(FieldError::invalid(
            "Idempotency-Key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ),
        ))
    };
    let key = raw.to_str().map_err(|_| invalid())?.trim();
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(invalid());
    }
    Ok(Some(key.to_owned()))
}

/// Submit a video generation task.
#[utoipa::path(
    post,
    path = "/v1/videos/generations/async",
    tag = "tasks",
    request_body(content = GenerationBody, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]([ -~]{0,253}[!-~])?$",
        description = "Makes a retried submit safe for 24 h: 1 to 255 printable ASCII characters")),
    responses(
        (status = 202, description = "The task is durably recorded", body = SubmitResponse,
            headers(("Location" = String, description = "The task's status URL"))),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another body", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (not counting a data: image_url)", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "submit", skip_all, fields(task_id))]
pub(crate) async fn submit(
    caller: Caller,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let idempotency = idempotency_key(&req)?;
    let body = read_body(&req, payload, MAX_SUBMIT_BODY).await?;
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidJson(format!("The request body is not valid JSON: {e}")))?;
    // Only a data: image_url may take the body past 64 KiB.
    let image_len = value
        .get("image_url")
        .and_then(serde_json::Value::as_str)
        .filter(|u| u.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("data:")))
        .map_or(0, str::len);
    if body.len().saturating_sub(image_len) > MAX_BODY {
        return Err(ApiError::PayloadTooLarge(MAX_BODY));
    }
    let request = GenerationRequest::parse(&value, &state.models)?;
    if let Some(url) = &request.webhook_url {
        guard_webhook_target(url, state.settings.webhooks.allow_private_targets).await?;
    }
    if let Some(image) = &request.image_url {
        guard_image_target(image, state.settings.webhooks.allow_private_targets).await?;
    }
    let new = request.to_new_task(caller.key_id, idempotency.as_deref())?;
    let task = match state.ledger.submit(new).await? {
        Submitted::Created(task) => {
            state
                .metrics
                .tasks_submitted
                .with_label_values(&[task.model.as_str()])
                .inc();
            task
        }
        Submitted::Replayed(task) => task,
    };
    tracing::Span::current().record("task_id", tracing::field::display(task.id));
    Ok(accepted(&task))
}

/// Look up one task.
#[utoipa::path(
    get,
    path = "/v1/videos/generations/tasks/{task_id}",
    tag = "tasks",
    params(("task_id" = String, Path, description = "Task id (UUID)")),
    responses(
        (status = 200, body = TaskView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown task, another key's task, or not a UUID", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "get_task", skip_all, fields(task_id = %path))]
pub(crate) async fn get_task(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let task_id = task_id_of(&path)?;
    let task = state
        .ledger
        .get(caller.key_id, task_id)
        .await?
        .ok_or_else(ApiError::not_found_task)?;
    Ok(HttpResponse::Ok().json(task_view(&state, task).await?))
}

/// List the caller's tasks, newest first.
#[utoipa::path(
    get,
    path = "/v1/videos/generations/tasks",
    tag = "tasks",
    params(
        ("status" = Option<TaskStatusParam>, Query, description = "Only tasks in this status"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Page size, 1 to 100, default 20"),
        ("after" = Option<uuid::Uuid>, Query, description = "Task id of the last task of the previous page"),
    ),
    responses(
        (status = 200, body = TaskList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn list_tasks(
    caller: Caller,
    state: web::Data<AppState>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<HttpResponse, ApiError> {
    let mut status = None;
    let mut limit = 20;
    let mut after = None;
    for (name, value) in query.into_inner() {
        match name.as_str() {
            "status" => {
                status = Some(TaskStatus::parse(&value).ok_or_else(|| {
                    FieldError::invalid(
                        "status",
                        "status must be one of pending, processing, completed, failed, cancelled",
                    )
                })?)
            }
            "limit" => {
                limit = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        FieldError::invalid("limit", "limit must be an integer from 1 to 100")
                    })?
            }
            "after" => {
                after = Some(Uuid::parse_str(&value).map_err(|_| {
                    FieldError::invalid("after", "after must be the id of one of your tasks")
                })?)
            }
            other => return Err(FieldError::unknown(other).into()),
        }
    }
    let page = TaskPage {
        status,
        limit,
        after,
    };
    let (rows, has_more) = state.ledger.list(caller.key_id, &page).await?;
    let mut data = Vec::with_capacity(rows.len());
    for task in rows {
        data.push(task_view(&state, task).await?);
    }
    Ok(HttpResponse::Ok().json(TaskList { data, has_more }))
}

/// Cancel a pending or processing task.
#[utoipa::path(
    delete,
    path = "/v1/videos/generations/{task_id}",
    tag = "tasks",
    params(("task_id" = String, Path, description = "Task id (UUID)")),
    responses(
        (status = 204, description = "Cancelled"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Already terminal", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "cancel", skip_all, fields(task_id = %path))]
pub(crate) async fn cancel(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let task_id = task_id_of(&path)?;
    state.ledger.cancel(caller.key_id, task_id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Run a failed or cancelled task again as a new attempt.
#[utoipa::path(
    post,
    path = "/v1/videos/generations/tasks/{task_id}/retry",
    tag = "tasks",
    params(("task_id" = String, Path, description = "Task id (UUID)")),
    responses(
        (status = 202, body = SubmitResponse, headers(("Location" = String, description = "The task's status URL"))),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Not failed or cancelled", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "retry", skip_all, fields(task_id = %path))]
pub(crate) async fn retry(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let task_id = task_id_of(&path)?;
    let task = state.ledger.retry(caller.key_id, task_id).await?;
    Ok(accepted(&task))
}

/// The task's webhook delivery log.
#[utoipa::path(
    get,
    path = "/v1/videos/generations/tasks/{task_id}/webhooks",
    tag = "webhooks",
    params(("task_id" = String, Path, description = "Task id (UUID)")),
    responses(
        (status = 200, body = WebhookLog),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn webhook_log(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let task_id = task_id_of(&path)?;
    let log = state.ledger.delivery_log(caller.key_id, task_id).await?;
    Ok(HttpResponse::Ok().json(WebhookLog {
        data: log.into_iter().map(WebhookLogEntry::from).collect(),
    }))
}

/// Send the task's latest terminal webhook again (same webhook-id, fresh schedule).
#[utoipa::path(
    post,
    path = "/v1/videos/generations/tasks/{task_id}/webhooks/redeliver",
    tag = "webhooks",
    params(("task_id" = String, Path, description = "Task id (UUID)")),
    responses(
        (status = 202, body = Redelivery),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "No terminal webhook yet", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "redeliver", skip_all, fields(task_id = %path))]
pub(crate) async fn redeliver(
    caller: Caller,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let task_id = task_id_of(&path)?;
    let redelivered = state.ledger.redeliver(caller.key_id, task_id).await?;
    Ok(HttpResponse::Accepted().json(Redelivery {
        webhook_id: redelivered.webhook_id,
        event: redelivered.event.as_str().to_owned(),
        status: "pending".into(),
    }))
}

/// The calling key's webhook signing secret, and the previous one while a rotation
/// overlaps.
#[utoipa::path(
    get,
    path = "/v1/webhooks/secret",
    tag = "webhooks",
    responses((status = 200, body = SecretView), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn webhook_secret(
    caller: Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let secrets = state.ledger.webhook_secrets(caller.key_id).await?;
    Ok(HttpResponse::Ok().json(SecretView::from(secrets)))
}

/// Make a new webhook signing secret for the calling key. Until the overlap ends, every
/// webhook carries two signatures (new first, then old).
#[utoipa::path(
    post,
    path = "/v1/webhooks/secret/rotate",
    tag = "webhooks",
    request_body(content = Option<RotateBody>, description = "Optional; `{}` or no body means the default overlap of 86400 s"),
    responses(
        (status = 200, body = SecretView),
        (status = 400, description = "A bad body (`invalid_value`, `param` `overlap_seconds`)", body = ErrorBody),
        (status = 401, body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
#[tracing::instrument(name = "rotate_webhook_secret", skip_all, fields(key_id = %caller.key_id))]
pub(crate) async fn rotate_webhook_secret(
    caller: Caller,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let overlap = overlap_seconds(&body)?;
    let secrets = state
        .ledger
        .rotate_webhook_secret(caller.key_id, overlap)
        .await?;
    Ok(HttpResponse::Ok().json(SecretView::from(secrets)))
}

/// The rotation body's overlap: none or `{}` is the default; anything but an object with
/// at most an integer `overlap_seconds` in range is refused.
fn overlap_seconds(body: &[u8]) -> Result<u32, ApiError> {
    let bad = |why: &str| {
        ApiError::Field(FieldError::invalid(
            "overlap_seconds",
            format!("{why}; send {{\"overlap_seconds\": N}} with N from 0 to {MAX_OVERLAP_SECONDS}, or no body"),
        ))
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DEFAULT_OVERLAP_SECONDS);
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("The body is not JSON"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("The body must be a JSON object"))?;
    if obj.keys().any(|k| k != "overlap_seconds") {
        return Err(bad("The body may hold only overlap_seconds"));
    }
    match obj.get("overlap_seconds").filter(|v| !v.is_null()) {
        None => Ok(DEFAULT_OVERLAP_SECONDS),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= MAX_OVERLAP_SECONDS)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad("overlap_seconds must be an integer from 0 to 604800")),
    }
}

/// The configured video models.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses((status = 200, body = ModelList), (status = 401, body = ErrorBody)),
    security(("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn models(_caller: Caller, state: web::Data<AppState>) -> HttpResponse {
    let data = state
        .models
        .iter()
        .map(|m| ModelView {
            id: m.id.clone(),
            object: "model".into(),
            provider: m.provider.clone(),
            available: m.available(),
            max_duration: m.max_duration,
            durations: m.settings.durations.clone(),
            sizes: m.settings.sizes.clone(),
            resolutions: m
                .settings
                .resolutions
                .as_ref()
                .map(|tiers| tiers.iter().map(|t| t.name.clone()).collect()),
            missing_setting: m.missing_setting.clone(),
            image_input: m.image_input(),
            fallback: m.settings.fallback.clone(),
        })
        .collect();
    HttpResponse::Ok().json(ModelList {
        object: "list".into(),
        data,
    })
}

/// The `status` filter of the task list.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub(crate) enum TaskStatusParam {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

/// Answers unknown routes.
pub(crate) async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "No route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Answers known routes called with a method they do not support: 405 with the `Allow`
/// header RFC 9110 requires, listing the methods the OpenAPI document gives the route.
pub(crate) async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    use actix_web::{http::header, ResponseError};
    let mut response = ApiError::MethodNotAllowed(req.method().to_string()).error_response();
    let allow = req
        .match_pattern()
        .and_then(|pattern| crate::openapi::allowed_methods(&pattern))
        .and_then(|allow| header::HeaderValue::from_str(&allow).ok());
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}
