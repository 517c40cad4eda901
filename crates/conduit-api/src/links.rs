//! Video URLs. With file storage the API serves the bytes itself (see
//! [`crate::videos`]) under a signed, expiring URL that needs no API key:
//! `{public_base_url}/v1/videos/files/{task_id}?expires=<unix>&signature=<hex>`, where
//! the signature is HMAC-SHA256 over `{task_id}.{expires}`. With S3 the store's own
//! pre-signed URL is handed out instead.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conduit_core::storage::VideoStore;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Settings-table key of the generated signing key (used when storage.signing_key is unset).
pub(crate) const SIGNING_KEY_SETTING: &str = "video_url_signing_key";

/// Makes and checks video URLs.
#[derive(Clone)]
pub(crate) struct VideoLinks {
    key: Vec<u8>,
    base_url: String,
    ttl: Duration,
    store: VideoStore,
}

impl VideoLinks {
    pub(crate) fn new(key: Vec<u8>, base_url: &str, ttl: Duration, store: VideoStore) -> Self {
        Self {
            key,
            base_url: base_url.trim_end_matches('/').to_owned(),
            ttl: ttl.max(Duration::from_secs(1)),
            store,
        }
    }

    pub(crate) fn store(&self) -> &VideoStore {
        &self.store
    }

    fn mac(&self, task_id: Uuid, expires: i64) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(format!("{task_id}.{expires}").as_bytes());
        mac
    }

    pub(crate) fn signature(&self, task_id: Uuid, expires: i64) -> String {
        hex::encode(self.mac(task_id, expires).finalize().into_bytes())
    }

    pub(crate) fn verify(&self, task_id: Uuid, expires: i64, signature: &str) -> bool {
        let Ok(raw) = hex::decode(signature) else {
            return false;
        };
        self.mac(task_id, expires).verify_slice(&raw).is_ok()
    }

    /// Expiry of the URL handed out at `now` for a video completed at `completed_at`:
    /// the end of the TTL window `now` falls in, counted from completion. The completed
    /// webhook and every poll within one window therefore show the same URL, and a poll
    /// always gets one that is still valid.
    pub(crate) fn expires_at(&self, completed_at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let start = completed_at.timestamp();
        let elapsed = (now.timestamp() - start).max(0);
        start + (elapsed / ttl + 1) * ttl
    }

    /// The `video_url` of a completed task, as seen at `now`.
    pub(crate) async fn url_for(
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

#[cfg(test)]
mod tests {
    use super::*;

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
