//! Webhook signing secrets of API keys: reading the current one (and the previous one
//! while a rotation overlaps) and rotating. Every webhook event carries the secrets its
//! key had when the event was recorded (the sender is stateless), so a rotation signs
//! with both from the next event on.

use anyhow::Context;
use chrono::{DateTime, Utc};
use conduit_core::{messages::PreviousSecret, time::now_millis};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use tokio_postgres::Row;
use uuid::Uuid;

use super::LedgerError;
use crate::keys::generate_webhook_secret;

/// A key's signing secrets as of now: the current one, and the one it replaced while
/// their overlap lasts.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct KeySecrets {
    pub(crate) current: String,
    pub(crate) previous: Option<PreviousSecret>,
}

impl std::fmt::Debug for KeySecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySecrets")
            .field("overlapping", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

/// A column `secrets` holding the secrets of task `t`'s key, for queries over `tasks t`:
/// one sub-select, so a `FOR UPDATE` on the task never locks the key's row.
pub(super) const SECRETS_OF_TASK_KEY: &str = "(SELECT jsonb_build_object(
         'current', k.webhook_secret,
         'previous', CASE WHEN k.previous_secret_expires_at > now() THEN k.previous_webhook_secret END,
         'expires_at', CASE WHEN k.previous_secret_expires_at > now() THEN k.previous_secret_expires_at END)
     FROM api_keys k WHERE k.id = t.api_key_id) AS secrets";

#[derive(Deserialize)]
struct Stored {
    current: String,
    previous: Option<String>,
    expires_at: Option<DateTime<Utc>>,
}

impl KeySecrets {
    /// The `secrets` column of [`SECRETS_OF_TASK_KEY`].
    pub(super) fn from_row(row: &Row) -> anyhow::Result<Self> {
        let raw: serde_json::Value = row
            .try_get("secrets")
            .context("reading the key's secrets")?;
        let stored: Stored = serde_json::from_value(raw).context("decoding the key's secrets")?;
        Ok(Self::from_parts(
            stored.current,
            stored.previous,
            stored.expires_at,
        ))
    }

    fn from_parts(
        current: String,
        previous: Option<String>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Self {
        let previous = match (previous, expires_at) {
            (Some(secret), Some(expires_at)) if expires_at > Utc::now() => {
                Some(PreviousSecret { secret, expires_at })
            }
            _ => None,
        };
        Self { current, previous }
    }
}

/// The secrets of key `key_id`.
pub(super) async fn get(
    client: &impl GenericClient,
    key_id: Uuid,
) -> Result<KeySecrets, LedgerError> {
    let row = client
        .query_opt(
            "SELECT webhook_secret, previous_webhook_secret, previous_secret_expires_at
             FROM api_keys WHERE id = $1 AND revoked_at IS NULL",
            &[&key_id],
        )
        .await
        .context("reading the key's webhook secrets")?
        .ok_or(LedgerError::NotFound)?;
    Ok(KeySecrets::from_parts(row.get(0), row.get(1), row.get(2)))
}

/// Gives key `key_id` a new secret; the one it replaces stays valid for `overlap_seconds`
/// (none at all for 0). A secret that was itself in its overlap is dropped at once.
pub(super) async fn rotate(
    client: &impl GenericClient,
    key_id: Uuid,
    overlap_seconds: u32,
) -> Result<KeySecrets, LedgerError> {
    let expires_at = (overlap_seconds > 0)
        .then(|| now_millis() + chrono::Duration::seconds(i64::from(overlap_seconds)));
    let row = client
        .query_opt(
            "UPDATE api_keys
             SET previous_webhook_secret = CASE WHEN $3::timestamptz IS NULL THEN NULL ELSE webhook_secret END,
                 previous_secret_expires_at = $3,
                 webhook_secret = $2
             WHERE id = $1 AND revoked_at IS NULL
             RETURNING webhook_secret, previous_webhook_secret, previous_secret_expires_at",
            &[&key_id, &generate_webhook_secret(), &expires_at],
        )
        .await
        .context("rotating the key's webhook secret")?
        .ok_or(LedgerError::NotFound)?;
    Ok(KeySecrets::from_parts(row.get(0), row.get(1), row.get(2)))
}
