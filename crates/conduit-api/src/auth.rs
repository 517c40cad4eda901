//! Who is calling: the API key from `Authorization: Bearer` or `X-API-Key`, resolved to
//! its stored record. Look-ups are cached for a few seconds (hashed keys only), which
//! keeps the database out of the hot path while a revoked key still stops working
//! within [`CACHE_TTL`].

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::{http::header, web, FromRequest, HttpRequest};
use anyhow::Context;
use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::{error::ApiError, keys, state::AppState};

/// How long a resolved key is trusted without asking the database again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Bound on remembered keys, so random garbage cannot grow the cache without limit.
const CACHE_CAPACITY: usize = 10_000;

/// The authenticated caller of a `/v1` route.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: Uuid,
    pub webhook_secret: String,
}

#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<[u8; 32], (Instant, Caller)>>,
}

impl KeyCache {
    fn get(&self, hash: &[u8; 32]) -> Option<Caller> {
        let entries = self.entries.lock().ok()?;
        entries
            .get(hash)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, c)| c.clone())
    }

    fn put(&self, hash: [u8; 32], caller: Caller) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CACHE_CAPACITY {
                entries.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
                if entries.len() >= CACHE_CAPACITY {
                    entries.clear();
                }
            }
            entries.insert(hash, (Instant::now(), caller));
        }
    }
}

/// The key the request presents, if any.
fn presented_key(req: &HttpRequest) -> Option<&str> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    // A proxy may own the Authorization header (Basic auth); X-API-Key still works then.
    bearer.or_else(|| {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    })
}

async fn resolve(pool: &Pool, cache: &KeyCache, key: &str) -> Result<Caller, ApiError> {
    if !keys::looks_like_key(key) {
        return Err(ApiError::Unauthorized);
    }
    let hash = keys::hash_key(key);
    if let Some(caller) = cache.get(&hash) {
        return Ok(caller);
    }
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id, webhook_secret FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .await
        .context("preparing key look-up")?;
    let row = client
        .query_opt(&stmt, &[&hash.as_slice()])
        .await
        .context("looking up the API key")?
        .ok_or(ApiError::Unauthorized)?;
    let caller = Caller {
        key_id: row.get(0),
        webhook_secret: row.get(1),
    };
    cache.put(hash, caller.clone());
    Ok(caller)
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Self::Error>>>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let key = presented_key(req).map(str::to_owned);
        Box::pin(async move {
            let state =
                state.ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("app state missing")))?;
            let key = key.ok_or(ApiError::Unauthorized)?;
            resolve(&state.pool, &state.key_cache, &key).await
        })
    }
}

/// Shared handle, so the cache lives as long as the app.
pub type SharedKeyCache = Arc<KeyCache>;
