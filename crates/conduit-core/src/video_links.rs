//! The signed video links the API serves, shared by the API (which hands them out and
//! checks them) and the webhook sender (which signs a fresh one for any attempt of an
//! event carrying a `video_url` that would not last the URL lifetime from then):
//!
//! `{public_base_url}/v1/videos/files/{task_id}?expires=<unix>&signature=<hex>`, where
//! the signature is HMAC-SHA256 over `{task_id}.{expires}` with the task's link key, and
//! the task's link key is HMAC-SHA256 over `video-link:{task_id}` with the API's signing
//! key. A sender that holds one task's link key can sign links of that task only.

use base64::{engine::general_purpose::STANDARD, Engine};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::messages::VideoLinkSigner;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The link key of `task_id` under the signing key `master`.
pub fn task_link_key(master: &[u8], task_id: Uuid) -> Vec<u8> {
    hmac(master, format!("video-link:{task_id}").as_bytes())
        .finalize()
        .into_bytes()
        .to_vec()
}

/// The hex signature of `task_id`'s link expiring at `expires`.
pub fn link_signature(task_key: &[u8], task_id: Uuid, expires: i64) -> String {
    hex(&hmac(task_key, format!("{task_id}.{expires}").as_bytes())
        .finalize()
        .into_bytes())
}

/// True when `signature` (hex) signs `task_id`'s link expiring at `expires`.
pub fn verify_link(task_key: &[u8], task_id: Uuid, expires: i64, signature: &str) -> bool {
    let raw: Option<Vec<u8>> = signature
        .len()
        .is_multiple_of(2)
        .then(|| {
            (0..signature.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(signature.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten();
    match raw {
        Some(raw) => hmac(task_key, format!("{task_id}.{expires}").as_bytes())
            .verify_slice(&raw)
            .is_ok(),
        None => false,
    }
}

/// The link of `task_id` under `base` (`{public_base_url}/v1/videos/files/{task_id}`).
pub fn link(base: &str, task_key: &[u8], task_id: Uuid, expires: i64) -> String {
    format!(
        "{base}?expires={expires}&signature={}",
        link_signature(task_key, task_id, expires)
    )
}

/// The `expires` of a link, if it has one.
fn expiry(link: &str) -> Option<i64> {
    let (_, query) = link.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("expires="))?
        .parse()
        .ok()
}

impl VideoLinkSigner {
    /// A signer for `task_id`'s link whose body currently shows `url_in_body`.
    pub fn new(
        master: &[u8],
        task_id: Uuid,
        base: String,
        url_in_body: String,
        ttl_seconds: u64,
    ) -> Self {
        Self {
            url_in_body,
            base,
            task_key: STANDARD.encode(task_link_key(master, task_id)),
            ttl_seconds,
        }
    }

    /// `body` with its `video_url` replaced by one of `task_id` valid for the lifetime
    /// from `now`; the body unchanged when its URL is still valid for the lifetime (so an
    /// early attempt shows the very URL a poll shows), when it does not hold the URL or
    /// the key is bad.
    pub fn refresh(&self, body: &str, task_id: Uuid, now: DateTime<Utc>) -> String {
        let ttl = i64::try_from(self.ttl_seconds).unwrap_or(i64::MAX / 4);
        if expiry(&self.url_in_body).is_some_and(|at| at > now.timestamp() + ttl) {
            return body.to_owned();
        }
        let Ok(key) = STANDARD.decode(&self.task_key) else {
            return body.to_owned();
        };
        let old = match serde_json::to_string(&self.url_in_body) {
            Ok(quoted) => quoted,
            Err(_) => return body.to_owned(),
        };
        if !body.contains(&old) {
            return body.to_owned();
        }
        let fresh = link(&self.base, &key, task_id, now.timestamp() + ttl + 1);
        match serde_json::to_string(&fresh) {
            Ok(quoted) => body.replacen(&old, &quoted, 1),
            Err(_) => body.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_key_signs_its_own_task_only() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let key = task_link_key(b"master", a);
        let sig = link_signature(&key, a, 100);
        assert!(verify_link(&key, a, 100, &sig));
        assert!(!verify_link(&key, a, 101, &sig));
        assert!(!verify_link(&key, b, 100, &sig));
        assert!(!verify_link(&task_link_key(b"master", b), a, 100, &sig));
        assert!(!verify_link(&key, a, 100, "zz"));
    }

    #[test]
    fn refresh_replaces_only_the_video_url() {
        let task = Uuid::new_v4();
        let base = format!("http://h/v1/videos/files/{task}");
        let key = task_link_key(b"m", task);
        let old = link(&base, &key, task, 50);
        let body =
            serde_json::json!({"video_url": old, "prompt": "a \"quoted\" prompt"}).to_string();
        let signer = VideoLinkSigner::new(b"m", task, base.clone(), old.clone(), 60);
        let now = DateTime::from_timestamp(1_000, 0).unwrap();
        let fresh = signer.refresh(&body, task, now);
        let v: serde_json::Value = serde_json::from_str(&fresh).unwrap();
        let url = v["video_url"].as_str().unwrap();
        assert_eq!(url, link(&base, &key, task, 1_061));
        assert_eq!(v["prompt"], "a \"quoted\" prompt");
        assert_eq!(signer.refresh("{}", task, now), "{}");
    }

    #[test]
    fn a_link_still_valid_for_the_lifetime_is_kept() {
        let task = Uuid::new_v4();
        let base = format!("http://h/v1/videos/files/{task}");
        let key = task_link_key(b"m", task);
        let current = link(&base, &key, task, 1_100);
        let body = serde_json::json!({ "video_url": current }).to_string();
        let signer = VideoLinkSigner::new(b"m", task, base, current, 60);
        // Valid until 1 100: kept at 1 000 (100 s left), re-signed at 1 050 (50 s left).
        let early = DateTime::from_timestamp(1_000, 0).unwrap();
        assert_eq!(signer.refresh(&body, task, early), body);
        let late = DateTime::from_timestamp(1_050, 0).unwrap();
        assert_ne!(signer.refresh(&body, task, late), body);
    }
}
