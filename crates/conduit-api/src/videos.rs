//! Video URLs and the video download route. With file storage the API serves the bytes
//! itself under a signed, expiring URL that needs no API key:
//! `{public_base_url}/v1/videos/files/{task_id}?expires=<unix>&signature=<hex>`, where
//! the signature is HMAC-SHA256 over `{task_id}.{expires}`. With S3 the store's own
//! pre-signed URL is handed out instead.

use std::time::Duration;

use actix_web::{
    http::header::{self, HeaderValue},
    web, HttpRequest, HttpResponse,
};
use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use conduit_core::storage::VideoStore;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

type HmacSha256 = Hmac<Sha256>;

/// Settings-table key of the generated signing key (used when storage.signing_key is unset).
pub const SIGNING_KEY_SETTING: &str = "video_url_signing_key";
/// Bytes read from storage per chunk of a streamed response.
const CHUNK: u64 = 1024 * 1024;

/// Makes and checks video URLs.
#[derive(Clone)]
pub struct VideoLinks {
    key: Vec<u8>,
    base_url: String,
    ttl: Duration,
    store: VideoStore,
}

impl VideoLinks {
    pub fn new(key: Vec<u8>, base_url: &str, ttl: Duration, store: VideoStore) -> Self {
        Self {
            key,
            base_url: base_url.trim_end_matches('/').to_owned(),
            ttl: ttl.max(Duration::from_secs(1)),
            store,
        }
    }

    fn mac(&self, task_id: Uuid, expires: i64) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(format!("{task_id}.{expires}").as_bytes());
        mac
    }

    pub fn signature(&self, task_id: Uuid, expires: i64) -> String {
        hex::encode(self.mac(task_id, expires).finalize().into_bytes())
    }

    pub fn verify(&self, task_id: Uuid, expires: i64, signature: &str) -> bool {
        let Ok(raw) = hex::decode(signature) else {
            return false;
        };
        self.mac(task_id, expires).verify_slice(&raw).is_ok()
    }

    /// Expiry of the URL handed out at `now` for a video completed at `completed_at`:
    /// the end of the TTL window `now` falls in, counted from completion. The completed
    /// webhook and every poll within one window therefore show the same URL, and a poll
    /// always gets one that is still valid.
    pub fn expires_at(&self, completed_at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let start = completed_at.timestamp();
        let elapsed = (now.timestamp() - start).max(0);
        start + (elapsed / ttl + 1) * ttl
    }

    /// The `video_url` of a completed task, as seen at `now`.
    pub async fn url_for(
        &self,
        task_id: Uuid,
        video_key: &str,
        completed_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<String> {
        if let Some(url) = self.store.presigned_url(video_key, self.ttl).await? {
            return Ok(url);
        }
        let expires = self.expires_at(completed_at, now);
        Ok(format!(
            "{}/v1/videos/files/{task_id}?expires={expires}&signature={}",
            self.base_url,
            self.signature(task_id, expires)
        ))
    }
}

/// Which bytes a `Range` header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    Full,
    /// Inclusive first and last byte.
    Partial(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range against an object of `size` bytes. Anything this does
/// not understand (other units, several ranges, bad syntax) is ignored, as RFC 9110
/// allows, and the whole object is served.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
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
pub struct FileQuery {
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
        (status = 403, description = "Bad signature", body = crate::error::ErrorBody),
        (status = 404, description = "No such video", body = crate::error::ErrorBody),
        (status = 410, description = "The URL expired", body = crate::error::ErrorBody),
        (status = 416, description = "Range not satisfiable", body = crate::error::ErrorBody),
    ),
    security(())
)]
pub async fn download(
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
    let client = state.pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT video_key FROM tasks WHERE id = $1 AND status = 'completed'")
        .await
        .context("preparing video look-up")?;
    let key: Option<String> = client
        .query_opt(&stmt, &[&task_id])
        .await
        .context("looking up the video")?
        .and_then(|r| r.get(0));
    drop(client);
    let not_found = || ApiError::NotFound("No such video".into());
    let key = key.ok_or_else(not_found)?;
    let size = state.store.size(&key).await?.ok_or_else(not_found)?;
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
    let store = state.store.clone();
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

    fn links() -> VideoLinks {
        let store = VideoStore::from_url(&format!(
            "file://{}",
            std::env::temp_dir().join("conduit-links-test").display()
        ))
        .unwrap();
        VideoLinks::new(b"k".to_vec(), "http://h/", Duration::from_secs(100), store)
    }

    #[test]
    fn signatures_verify_only_for_their_task_and_expiry() {
        let l = links();
        let id = Uuid::new_v4();
        let sig = l.signature(id, 1000);
        assert!(l.verify(id, 1000, &sig));
        assert!(!l.verify(id, 1001, &sig));
        assert!(!l.verify(Uuid::new_v4(), 1000, &sig));
        assert!(!l.verify(id, 1000, "zz"));
    }

    #[test]
    fn expiry_is_stable_within_a_window() {
        let l = links();
        let done = DateTime::from_timestamp(1_000, 0).unwrap();
        assert_eq!(l.expires_at(done, done), 1_100);
        assert_eq!(
            l.expires_at(done, DateTime::from_timestamp(1_099, 0).unwrap()),
            1_100
        );
        assert_eq!(
            l.expires_at(done, DateTime::from_timestamp(1_100, 0).unwrap()),
            1_200
        );
    }
}
