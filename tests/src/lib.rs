//! The harness of the system tests: it starts the three real Conduit binaries as
//! separate processes (each stack with its own AMQP namespace, database and video
//! folder), a local webhook receiver, and drives everything over HTTP as a user would.

pub mod fake_fal;
pub mod fake_veo;
pub mod fakes;
pub mod receiver;
pub mod stack;

pub use fakes::{FakeProvider, Protocol, Scenario};
pub use receiver::{ReceivedWebhook, Receiver, Reply};
pub use stack::{Stack, StackOptions};

use std::time::Duration;

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks a Standard Webhooks signature the way the reference libraries do.
pub fn signature_is_valid(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &str,
    header: &str,
) -> bool {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let engine = base64::engine::general_purpose::STANDARD;
    let Ok(key) = engine.decode(secret.trim_start_matches("whsec_")) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&key) else {
        return false;
    };
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let expected = engine.encode(mac.finalize().into_bytes());
    header
        .split_whitespace()
        .filter_map(|sig| sig.strip_prefix("v1,"))
        .any(|sig| sig == expected)
}
