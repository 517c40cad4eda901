//! One error type for every failure the API can answer with, rendered in one place as
//! the OpenAI-shaped JSON body the contract promises, whatever produced it (a handler,
//! an extractor, routing, or actix itself through [`json_error_safety_net`]).

use actix_web::{
    body::{BoxBody, EitherBody, MessageBody},
    dev::ServiceResponse,
    http::{header, StatusCode},
    middleware::ErrorHandlerResponse,
    HttpResponse, ResponseError,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{db::is_unavailable, ledger::LedgerError};

/// The `code` of a 400 answer about one request field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldCode {
    MissingParameter,
    InvalidValue,
    UnknownParameter,
    UnsupportedModel,
}

impl FieldCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FieldCode::MissingParameter => "missing_parameter",
            FieldCode::InvalidValue => "invalid_value",
            FieldCode::UnknownParameter => "unknown_parameter",
            FieldCode::UnsupportedModel => "unsupported_model",
        }
    }
}

/// Why one field of a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) param: String,
    pub(crate) code: FieldCode,
    pub(crate) message: String,
}

impl FieldError {
    pub(crate) fn missing(param: &str) -> Self {
        Self {
            param: param.to_owned(),
            code: FieldCode::MissingParameter,
            message: format!("Missing required parameter: '{param}'"),
        }
    }

    pub(crate) fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.to_owned(),
            code: FieldCode::InvalidValue,
            message: message.into(),
        }
    }

    pub(crate) fn unknown(param: &str) -> Self {
        Self {
            param: param.to_owned(),
            code: FieldCode::UnknownParameter,
            message: format!("Unrecognized request argument supplied: '{param}'"),
        }
    }

    pub(crate) fn unsupported_model(message: impl Into<String>) -> Self {
        Self {
            param: "model".to_owned(),
            code: FieldCode::UnsupportedModel,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{}", .0.message)]
    Field(FieldError),
    #[error("{0}")]
    InvalidJson(String),
    #[error("Missing or invalid API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("This route does not support the {0} method")]
    MethodNotAllowed(String),
    #[error("{0}")]
    InvalidOperation(String),
    #[error("This Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    #[error("The request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("The request body must be JSON, sent with 'Content-Type: application/json'")]
    UnsupportedMediaType,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Gone(String),
    #[error("The requested range is not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    #[error("The service is temporarily unavailable; retry shortly")]
    Unavailable(#[source] anyhow::Error),
    #[error("The server had an error while processing the request")]
    Unexpected(#[source] anyhow::Error),
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Field(e)
    }
}

impl From<anyhow::Error> for ApiError {
    /// Storage errors that mean "the database is away" become 503, so a client retries;
    /// anything else is a bug and becomes a logged 500.
    fn from(err: anyhow::Error) -> Self {
        if is_unavailable(&err) {
            ApiError::Unavailable(err)
        } else {
            ApiError::Unexpected(err)
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(err: tokio_postgres::Error) -> Self {
        anyhow::Error::from(err).into()
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        ApiError::Unavailable(anyhow::Error::from(err).context("taking a database connection"))
    }
}

impl From<LedgerError> for ApiError {
    /// The one place where the ledger's refusals become what a client reads.
    fn from(err: LedgerError) -> Self {
        match err {
            LedgerError::NotFound => ApiError::not_found_task(),
            LedgerError::AlreadyTerminal(status) => ApiError::InvalidOperation(format!(
                "The task is already {} and cannot be cancelled",
                status.as_str()
            )),
            LedgerError::NotRetryable(status) => ApiError::InvalidOperation(format!(
                "Only failed or cancelled tasks can be retried; this one is {}",
                status.as_str()
            )),
            LedgerError::NoTerminalWebhook => {
                ApiError::InvalidOperation("The task has no terminal webhook to redeliver".into())
            }
            LedgerError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            LedgerError::UnknownCursor => ApiError::Field(FieldError::invalid(
                "after",
                "after must be the id of one of your tasks",
            )),
            LedgerError::Unavailable(err) => ApiError::Unavailable(err),
            LedgerError::Internal(err) => ApiError::Unexpected(err),
        }
    }
}

/// The OpenAI error body.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    pub(crate) message: String,
    /// `invalid_request_error`, `authentication_error` or `server_error`.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) param: Option<String>,
    pub(crate) code: String,
}

impl ApiError {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ApiError::Field(f) => f.code.as_str(),
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::InvalidOperation(_) => "invalid_operation",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::Forbidden(_) => "invalid_signature",
            ApiError::Gone(_) => "expired",
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Unexpected(_) => "internal_error",
        }
    }

    pub(crate) fn param(&self) -> Option<&str> {
        match self {
            ApiError::Field(f) => Some(&f.param),
            _ => None,
        }
    }

    pub(crate) fn not_found_task() -> Self {
        ApiError::NotFound("No task found with that id".into())
    }

    pub(crate) fn body(&self) -> ErrorBody {
        error_body(
            self.status_code(),
            self.to_string(),
            self.param(),
            self.code(),
        )
    }
}

pub(crate) fn error_body(
    status: StatusCode,
    message: String,
    param: Option<&str>,
    code: &str,
) -> ErrorBody {
    let kind = if status == StatusCode::UNAUTHORIZED {
        "authentication_error"
    } else if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    ErrorBody {
        error: ErrorDetail {
            message,
            kind: kind.into(),
            param: param.map(str::to_owned),
            code: code.into(),
        },
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Field(_) | ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InvalidOperation(_) | ApiError::IdempotencyKeyReused => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Unexpected(err) => {
                tracing::error!(error = %format!("{err:#}"), "request failed unexpectedly")
            }
            ApiError::Unavailable(err) => {
                tracing::warn!(error = %format!("{err:#}"), "dependency unavailable")
            }
            _ => {}
        }
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::RangeNotSatisfiable { size } => {
                response.insert_header((header::CONTENT_RANGE, format!("bytes */{size}")));
            }
            ApiError::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            _ => {}
        }
        response.json(self.body())
    }
}

/// The code a bare status gets when something outside the handlers (actix's own routing
/// or extractors) answered it.
fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_value",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "invalid_operation",
        411 => "length_required",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        416 => "range_not_satisfiable",
        431 => "request_header_fields_too_large",
        503 => "service_unavailable",
        s if s >= 500 => "internal_error",
        _ => "invalid_request",
    }
}

/// Middleware hook: any error response that is not already JSON (actix's plain-text
/// errors) is rewritten to the JSON error shape, so no client ever sees another body.
pub(crate) fn json_error_safety_net<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let message = res
        .response()
        .error()
        .map(|e| e.to_string())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("Request failed")
                .to_owned()
        });
    let body = error_body(status, message, None, code_for_status(status));
    let (req, old) = res.into_parts();
    let mut new = HttpResponse::build(status);
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.append_header((name.clone(), value.clone()));
        }
    }
    let new = new.json(body);
    let res = ServiceResponse::new(req, new).map_into_right_body::<B>();
    Ok(ErrorHandlerResponse::Response(
        res.map_body(|_, b: EitherBody<B, BoxBody>| b),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_errors_render_the_openai_shape() {
        let err = ApiError::from(FieldError::invalid(
            "duration",
            "duration must be an integer",
        ));
        let json = serde_json::to_value(err.body()).unwrap();
        assert_eq!(json["error"]["param"], "duration");
        assert_eq!(json["error"]["code"], "invalid_value");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(err.status_code(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn errors_without_param_leave_it_out() {
        let json = serde_json::to_value(ApiError::Unauthorized.body()).unwrap();
        assert!(json["error"].get("param").is_none());
        assert_eq!(json["error"]["code"], "unauthorized");
    }

    #[actix_web::test]
    async fn plain_error_responses_are_rewritten_to_json() {
        use actix_web::{middleware::ErrorHandlers, test, web, App};
        let app = test::init_service(
            App::new()
                .wrap(ErrorHandlers::new().default_handler(json_error_safety_net))
                .route(
                    "/plain",
                    web::get().to(|| async { HttpResponse::BadRequest().body("nope") }),
                )
                .route(
                    "/json",
                    web::get().to(|| async { Err::<HttpResponse, _>(ApiError::Unauthorized) }),
                ),
        )
        .await;
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/plain").to_request()).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["error"]["code"], "invalid_value");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/json").to_request()).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(
            body["error"]["code"], "unauthorized",
            "JSON errors pass untouched"
        );
    }

    #[test]
    fn pool_errors_are_unavailable() {
        let err = anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))
        .context("querying");
        assert!(matches!(ApiError::from(err), ApiError::Unavailable(_)));
        let bug = anyhow::anyhow!("a bug");
        assert!(matches!(ApiError::from(bug), ApiError::Unexpected(_)));
    }
}
