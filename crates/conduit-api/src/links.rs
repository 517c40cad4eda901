//! Video URLs. The API hands out one kind of URL whatever the storage, signed and
//! expiring, that needs no API key:
//! `{public_base_url}/v1/videos/files/{task_id}?expires=<unix>&signature=<hex>` (the
//! scheme is in [`conduit_core::video_links`]). With file storage the API serves the
//! bytes itself (see [`crate::videos`]); with S3 it redirects to a freshly pre-signed
//! object URL. Every URL handed out is valid for at least the URL lifetime, and the
//! webhook sender signs a fresh one for each attempt of a completed webhook that the
//! earlier one would not last.

use std::time::Duration;

use chrono::{DateTime, Utc};
use conduit_core::{
    messages::VideoLinkSigner,
    storage::VideoStore,
    video_links::{link_signature, task_link_key, verify_link},
};
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

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Links signed with the signing key itself, as before per-task link keys; still
    /// accepted until they expire.
    fn legacy_mac(&self, task_id: Uuid, expires: i64) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(format!("{task_id}.{expires}").as_bytes());
        mac
    }

    pub(crate) fn signature(&self, task_id: Uuid, expires: i64) -> String {
        link_signature(&task_link_key(&self.key, task_id), task_id, expires)
    }

    pub(crate) fn verify(&self, task_id: Uuid, expires: i64, signature: &str) -> bool {
        if verify_link(
            &task_link_key(&self.key, task_id),
            task_id,
            expires,
            signature,
        ) {
            return true;
        }
        let Ok(raw) = hex::decode(signature) else {
            return false;
        };
        self.legacy_mac(task_id, expires).verify_slice(&raw).is_ok()
    }

    /// Expiry of the URL handed out at `now` for a video completed at `completed_at`:
    /// one lifetime after the end of the TTL window `now` falls in, counted from
    /// completion. Polls within one window therefore show the same URL, and every URL
    /// handed out stays valid for at least the lifetime.
    pub(crate) fn expires_at(&self, completed_at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 4);
        let start = completed_at.timestamp();
        let elapsed = (now.timestamp() - start).max(0);
        start + (elapsed / ttl + 2) * ttl
    }

    /// `{public_base_url}/v1/videos/files/{task_id}`, the link without its query.
    fn base_for(&self, task_id: Uuid) -> String {
        format!("{}/v1/videos/files/{task_id}", self.base_url)
    }

    /// The `video_url` of a completed task, as seen at `now`.
    pub(crate) fn url_for(
        &self,
        task_id: Uuid,
        completed_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> String {
        let expires = self.expires_at(completed_at, now);
        format!(
            "{}?expires={expires}&signature={}",
            self.base_for(task_id),
            self.signature(task_id, expires)
        )
    }

    /// What a webhook sender needs to replace `url_in_body` with a fresh link of
    /// `task_id` at each attempt.
    pub(crate) fn signer(&self, task_id: Uuid, url_in_body: String) -> VideoLinkSigner {
        VideoLinkSigner::new(
            &self.key,
            task_id,
            self.base_for(task_id),
            url_in_body,
            self.ttl.as_secs(),
        )
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
        let legacy = hex::encode(l.legacy_mac(id, 1000).finalize().into_bytes());
        assert!(l.verify(id, 1000, &legacy));
    }

    #[test]
    fn a_url_lives_at_least_the_lifetime() {
        let l = links();
        let done = DateTime::from_timestamp(1_000, 0).unwrap();
        for now in [1_000, 1_050, 1_099, 1_100, 5_432] {
            let at = DateTime::from_timestamp(now, 0).unwrap();
            assert!(l.expires_at(done, at) >= now + 100, "{now}");
        }
    }

    #[test]
    fn expiry_is_stable_within_a_window() {
        let l = links();
        let done = DateTime::from_timestamp(1_000, 0).unwrap();
        assert_eq!(l.expires_at(done, done), 1_200);
        assert_eq!(
            l.expires_at(done, DateTime::from_timestamp(1_099, 0).unwrap()),
            1_200
        );
        assert_eq!(
            l.expires_at(done, DateTime::from_timestamp(1_100, 0).unwrap()),
            1_300
        );
    }
}
