//! The benchmark's webhook receiver: a keep-alive HTTP/1.1 server (hyper) on 127.0.0.1
//! that answers 200 with an empty body and records, per `webhook-id`, when the request
//! arrived. A receiver made with [`Receiver::hanging`] holds every request until its
//! hang elapses or the receiver is released, the way a stuck client endpoint does.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Shared {
    arrivals: Mutex<HashMap<String, Instant>>,
    count: AtomicUsize,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

/// A running receiver; stops accepting when dropped.
pub struct Receiver {
    port: u16,
    shared: Arc<Shared>,
    release: CancellationToken,
    stop: CancellationToken,
}

impl Receiver {
    /// A receiver that answers at once.
    pub async fn start() -> anyhow::Result<Self> {
        Self::bind(None).await
    }

    /// A receiver that holds each request for `hang` (or until [`Receiver::release`]).
    pub async fn hanging(hang: Duration) -> anyhow::Result<Self> {
        Self::bind(Some(hang)).await
    }

    async fn bind(hang: Option<Duration>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the webhook receiver")?;
        let port = listener.local_addr().context("receiver address")?.port();
        let shared = Arc::new(Shared::default());
        let release = CancellationToken::new();
        let stop = CancellationToken::new();
        let (s, r, st) = (shared.clone(), release.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = st.cancelled() => return,
                };
                let _ = stream.set_nodelay(true);
                let (s, r) = (s.clone(), r.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, s.clone(), hang, r.clone()));
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            port,
            shared,
            release,
            stop,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// Arrival time of the first request for each `webhook-id`.
    pub fn arrivals(&self) -> HashMap<String, Instant> {
        self.shared
            .arrivals
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// First and last arrival.
    pub fn span(&self) -> Option<(Instant, Instant)> {
        let first = *self.shared.first.lock().ok()?;
        let last = *self.shared.last.lock().ok()?;
        first.zip(last)
    }

    /// Answers every held and future request at once.
    pub fn release(&self) {
        self.release.cancel();
    }

    /// Waits until `n` requests arrived or `timeout` passed; returns whether they did.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.release.cancel();
        self.stop.cancel();
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    hang: Option<Duration>,
    release: CancellationToken,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let id = req
        .headers()
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // The request counts once its body is in, as a real receiver would see it.
    let _ = req.into_body().collect().await;
    let now = Instant::now();
    if let Some(id) = id {
        if let Ok(mut m) = shared.arrivals.lock() {
            m.entry(id).or_insert(now);
        }
    }
    if let Ok(mut f) = shared.first.lock() {
        f.get_or_insert(now);
    }
    if let Ok(mut l) = shared.last.lock() {
        *l = Some(now);
    }
    shared.count.fetch_add(1, Ordering::Relaxed);
    if let Some(hang) = hang {
        tokio::select! {
            () = tokio::time::sleep(hang) => {}
            () = release.cancelled() => {}
        }
    }
    Ok(Response::new(Empty::new()))
}
