//! Who is calling: the API key from `Authorization: Bearer` or `X-API-Key`, resolved to
//! its stored record through the [`KeyCache`](crate::keys::KeyCache).

use std::{future::Future, pin::Pin};

use actix_web::{http::header, web, FromRequest, HttpRequest};
use uuid::Uuid;

use crate::{error::ApiError, state::AppState};

/// The authenticated caller of a `/v1` route.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) key_id: Uuid,
}

/// The key the request presents, if any.
pub(crate) fn presented_key(req: &HttpRequest) -> Option<&str> {
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
            let active = state
                .key_cache
                .resolve(&state.pool, &key)
                .await?
                .ok_or(ApiError::Unauthorized)?;
            Ok(Caller { key_id: active.id })
        })
    }
}
