//! The video download route: the bytes behind a signed, expiring URL made by
//! [`crate::links`], with HTTP Range support.

use actix_web::{
    http::header::{self, HeaderValue},
    web, HttpRequest, HttpResponse,
};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use serde::Deserialize;
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

/// Bytes read from storage per chunk of a streamed response.
const CHUNK: u64 = 1024 * 1024;

/// Which bytes a `Range` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeRequest {
    Full,
    /// Inclusive first and last byte.
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range against an object of `size` bytes. Anything this does
/// not understand (other units, several ranges, bad syntax) is ignored, as RFC 9110
/// allows, and the whole object is served.
pub(crate) fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match num(suffix) {
            None => RangeRequest::Full,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(size - n.min(size), size - 1),
        },
        (start, "") => match num(start) {
            None => RangeRequest::Full,
            Some(s) if s >= size => RangeRequest::Unsatisfiable,
            Some(s) => RangeRequest::Partial(s, size - 1),
        },
        (start, end) => match (num(start), num(end)) {
            (Some(s), Some(e)) if s <= e => {
                if s >= size {
                    RangeRequest::Unsatisfiable
                } else {
                    RangeRequest::Partial(s, e.min(size - 1))
                }
            }
            _ => RangeRequest::Full,
        },
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct FileQuery {
    expires: Option<String>,
    signature: Option<String>,
}

/// Download a finished video (signed URL, no API key).
#[utoipa::path(
    get,
    path = "/v1/videos/files/{task_id}",
    tag = "videos",
    params(
        ("task_id" = String, Path, description = "Task id"),
        ("expires" = i64, Query, description = "Unix time the URL expires"),
        ("signature" = String, Query, description = "Hex HMAC-SHA256 of `{task_id}.{expires}`"),
        ("Range" = Option<String>, Header, description = "A single `bytes=` range"),
    ),
    responses(
        (status = 200, description = "The whole video", content_type = "video/mp4"),
        (status = 206, description = "The requested range", content_type = "video/mp4"),
        (status = 400, description = "Malformed query string (a parameter given twice, say)", body = crate::error::ErrorBody),
        (status = 403, description = "Bad signature", body = crate::error::ErrorBody),
        (status = 404, description = "No such video", body = crate::error::ErrorBody),
        (status = 410, description = "The URL expired", body = crate::error::ErrorBody),
        (status = 416, description = "Range not satisfiable", body = crate::error::ErrorBody),
    ),
    security(())
)]
pub(crate) async fn download(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<FileQuery>,
) -> Result<HttpResponse, ApiError> {
    let task_id = Uuid::parse_str(&path).map_err(|_| ApiError::NotFound("No such video".into()))?;
    let forbidden =
        || ApiError::Forbidden("The video URL's signature is missing or invalid".into());
    let expires: i64 = query
        .expires
        .as_deref()
        .and_then(|e| e.parse().ok())
        .ok_or_else(forbidden)?;
    let signature = query.signature.as_deref().ok_or_else(forbidden)?;
    if !state.links.verify(task_id, expires, signature) {
        return Err(forbidden());
    }
    if Utc::now().timestamp() > expires {
        return Err(ApiError::Gone(
            "The video URL expired; fetch the task again for a fresh one".into(),
        ));
    }
    let key = state.ledger.completed_video_key(task_id).await?;
    let not_found = || ApiError::NotFound("No such video".into());
    let key = key.ok_or_else(not_found)?;
    // An object store serves the bytes itself: send the client to a freshly pre-signed
    // object URL that lives as long as this link still does.
    let left = u64::try_from(expires - Utc::now().timestamp()).unwrap_or(0);
    let lifetime = Duration::from_secs(left.clamp(60, state.links.ttl().as_secs().max(60)));
    if let Some(url) = state.links.store().presigned_url(&key, lifetime).await? {
        return Ok(HttpResponse::Found()
            .insert_header((header::LOCATION, url))
            .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .finish());
    }
    let size = state
        .links
        .store()
        .size(&key)
        .await?
        .ok_or_else(not_found)?;
    let range = parse_range(
        req.headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok()),
        size,
    );
    let (status, first, last) = match range {
        RangeRequest::Full => (actix_web::http::StatusCode::OK, 0, size.saturating_sub(1)),
        RangeRequest::Partial(a, b) => (actix_web::http::StatusCode::PARTIAL_CONTENT, a, b),
        RangeRequest::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable { size }),
    };
    let length = if size == 0 { 0 } else { last - first + 1 };
    let mut response = HttpResponse::build(status);
    response
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("video/mp4")))
        .insert_header((header::ACCEPT_RANGES, HeaderValue::from_static("bytes")))
        .insert_header((
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, max-age=3600"),
        ))
        .no_chunking(length);
    if status == actix_web::http::StatusCode::PARTIAL_CONTENT {
        response.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {first}-{last}/{size}"),
        ));
    }
    if length == 0 {
        return Ok(response.finish());
    }
    let store = state.links.store().clone();
    let end = last + 1;
    let stream = futures::stream::unfold(first, move |at| {
        let store = store.clone();
        let key = key.clone();
        async move {
            if at >= end {
                return None;
            }
            let to = (at + CHUNK).min(end);
            let chunk: Result<Bytes, actix_web::Error> = store
                .get_range(&key, at..to)
                .await
                .map_err(|e| actix_web::error::ErrorInternalServerError(format!("{e:#}")));
            Some((chunk, to))
        }
    });
    Ok(response.streaming(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("bytes=0-7"), 10), Partial(0, 7));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Partial(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Partial(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Partial(0, 9));
        assert_eq!(parse_range(Some("bytes=2-100"), 10), Partial(2, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-12"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Full);
    }
}
