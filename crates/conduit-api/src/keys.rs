//! API keys: `condt_` followed by 43 base62 characters (256 random bits). Only the
//! SHA-256 of a key is stored, with a short prefix for people to recognise it; each key
//! also owns the `whsec_` secret its webhooks are signed with.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Context;
use base64::Engine;
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub(crate) const KEY_PREFIX: &str = "condt_";
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 43 base62 characters carry just over 256 bits.
const KEY_CHARS: usize = 43;

/// How long a resolved key is trusted without asking the database again.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(5);
/// Bound on remembered keys, so random garbage cannot grow the cache without limit.
const CACHE_CAPACITY: usize = 10_000;

/// An active key, as a request's caller. Its webhook secret is not cached: a rotation
/// must show at once, so the secret is read from the database where it is used.
#[derive(Debug, Clone)]
pub(crate) struct ActiveKey {
    pub(crate) id: Uuid,
}

/// Resolved keys by hash, each trusted for [`CACHE_TTL`]: the database stays out of the
/// hot path while a revoked key still stops working within that time.
#[derive(Default)]
pub(crate) struct KeyCache {
    entries: Mutex<HashMap<[u8; 32], (Instant, ActiveKey)>>,
}

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Option<ActiveKey> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(hash)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, c)| c.clone())
    }

    fn put(&self, hash: [u8; 32], key: ActiveKey) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CACHE_CAPACITY {
                entries.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
                if entries.len() >= CACHE_CAPACITY {
                    entries.clear();
                }
            }
            entries.insert(hash, (Instant::now(), key));
        }
    }

    /// The active key `key`, or `None` for an unknown, revoked or malformed one.
    pub(crate) async fn resolve(
        &self,
        pool: &Pool,
        key: &str,
    ) -> anyhow::Result<Option<ActiveKey>> {
        if !looks_like_key(key) {
            return Ok(None);
        }
        let hash = hash_key(key);
        if let Some(found) = self.get(&hash) {
            return Ok(Some(found));
        }
        let client = pool.get().await.context("taking a database connection")?;
        let stmt = client
            .prepare_cached("SELECT id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
            .await
            .context("preparing key look-up")?;
        let Some(row) = client
            .query_opt(&stmt, &[&hash.as_slice()])
            .await
            .context("looking up the API key")?
        else {
            return Ok(None);
        };
        let found = ActiveKey { id: row.get(0) };
        self.put(hash, found.clone());
        Ok(Some(found))
    }
}

/// A freshly generated key, shown once.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedKey {
    pub id: Uuid,
    pub name: String,
    pub key: String,
    pub webhook_secret: String,
}

/// A stored key as `keys list` shows it (never the key itself).
#[derive(Debug, Clone, Serialize)]
pub struct KeySummary {
    pub id: Uuid,
    pub name: String,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub(crate) fn generate_key() -> String {
    let mut rng = rand::rng();
    let body: String = (0..KEY_CHARS)
        .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
        .collect();
    format!("{KEY_PREFIX}{body}")
}

/// `whsec_` + base64 of 32 random bytes, the Standard Webhooks secret format.
pub(crate) fn generate_webhook_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

pub(crate) fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// True when `raw` is shaped like a key at all, so garbage never reaches the database.
pub(crate) fn looks_like_key(raw: &str) -> bool {
    raw.strip_prefix(KEY_PREFIX).is_some_and(|body| {
        !body.is_empty()
            && body.len() <= 128
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

pub async fn create(pool: &Pool, name: &str) -> anyhow::Result<CreatedKey> {
    let name = name.trim();
    anyhow::ensure!(!name.is_empty(), "a key needs a non-empty --name");
    let key = generate_key();
    let created = CreatedKey {
        id: Uuid::now_v7(),
        name: name.to_owned(),
        webhook_secret: generate_webhook_secret(),
        key,
    };
    let client = pool.get().await.context("connecting to the database")?;
    client
        .execute(
            "INSERT INTO api_keys (id, name, key_hash, key_prefix, webhook_secret)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &created.id,
                &created.name,
                &hash_key(&created.key).as_slice(),
                &created.key[..KEY_PREFIX.len() + 6].to_owned(),
                &created.webhook_secret,
            ],
        )
        .await
        .context("storing the new key")?;
    Ok(created)
}

pub async fn list(pool: &Pool) -> anyhow::Result<Vec<KeySummary>> {
    let client = pool.get().await.context("connecting to the database")?;
    let rows = client
        .query(
            "SELECT id, name, key_prefix, created_at, revoked_at FROM api_keys ORDER BY created_at",
            &[],
        )
        .await
        .context("listing keys")?;
    Ok(rows
        .iter()
        .map(|r| KeySummary {
            id: r.get(0),
            name: r.get(1),
            key_prefix: r.get(2),
            created_at: r.get(3),
            revoked_at: r.get(4),
        })
        .collect())
}

/// Revokes a key; false when no such (unrevoked) key exists.
pub async fn revoke(pool: &Pool, id: Uuid) -> anyhow::Result<bool> {
    let client = pool.get().await.context("connecting to the database")?;
    let n = client
        .execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
            &[&id],
        )
        .await
        .context("revoking the key")?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_recognisable() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with("condt_"));
        assert_eq!(a.len(), 6 + 43);
        assert!(looks_like_key(&a));
        assert!(!looks_like_key("sk-123"));
        assert!(!looks_like_key("condt_"));
        assert!(!looks_like_key("condt_a b"));
    }

    #[test]
    fn webhook_secrets_decode_to_32_bytes() {
        let s = generate_webhook_secret();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s.strip_prefix("whsec_").unwrap())
            .unwrap();
        assert_eq!(raw.len(), 32);
    }
}
