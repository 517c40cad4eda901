//! Test support for every Conduit crate, kept once: a webhook receiver ([`receiver`]),
//! fake video providers ([`fakes`]), a stack of the real binaries as child processes
//! ([`stack`]), a service running inside the test process ([`RunningApp`]), and
//! [`eventually`].
//!
//! A new provider's fake belongs in `fake_<provider>.rs` beside [`fake_fal`] and
//! [`fake_veo`], built on the shared [`fakes::FakeServer`].
//!
//! It is a dev-dependency of the services' tests and the system tests, and a dependency
//! of the benchmark tool; a service crate never depends on it in `[dependencies]`.
//! It knows no service crate either: a test builds its service and hands the kit the
//! port and the future that runs it.

pub mod fake_fal;
pub mod fake_veo;
pub mod fakes;
pub mod receiver;
pub mod stack;
pub mod video;

pub use fakes::{FakeProvider, Protocol, Scenario};
pub use receiver::{ReceivedWebhook, Receiver, Reply};
pub use stack::{Stack, StackOptions};

use std::{future::Future, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
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

/// A service running in the test process, as a task of the test's runtime.
///
/// ```ignore
/// let app = conduit_generator::App::build(settings).await.expect("generator builds");
/// let running = RunningApp::spawn("generator", app.port(), |stop| app.run_until_stopped(stop));
/// ```
pub struct RunningApp {
    /// The port of the service's HTTP server (API, or operator endpoints).
    pub port: u16,
    name: &'static str,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    /// Runs `run(shutdown)` on a task; `name` only labels failures.
    pub fn spawn<Fut>(
        name: &'static str,
        port: u16,
        run: impl FnOnce(CancellationToken) -> Fut,
    ) -> Self
    where
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(shutdown.clone()));
        Self {
            port,
            name,
            shutdown,
            handle,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Asks the service to stop, and asserts that it did within 30 s, without a panic
    /// and without an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let name = self.name;
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .unwrap_or_else(|_| panic!("{name} stops within 30 s"))
            .unwrap_or_else(|e| panic!("{name} task did not panic: {e}"));
        if let Err(err) = result {
            panic!("{name} ran cleanly: {err:#}");
        }
    }

    /// Ends the service abruptly, as a crash would: nothing in flight is finished or
    /// acknowledged.
    pub async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of one metric line of `/metrics` without labels (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
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
