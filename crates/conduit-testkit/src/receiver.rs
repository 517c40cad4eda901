//! The webhook receiver of every test and of the benchmark: a keep-alive HTTP/1.1 server
//! (hyper) on 127.0.0.1, so the receiver is never what limits the sender under load.
//!
//! It counts requests and keeps, per `webhook-id`, when the first one arrived (what the
//! benchmark's latency figures read), and it records every request in full (method,
//! path, headers, body), unless it was built with [`ReceiverBuilder::counting_only`].
//! It answers as told: by default 200, otherwise what a `behaviour` returns for each
//! request, possibly after a delay, the way a slow or stuck client endpoint does.
//! [`Receiver::release`] answers every held and future request at once.

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
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub method: String,
    pub path: String,
    /// Names lower-cased, values as received, in order; repeated headers stay repeated.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// When the whole request (body included) was in.
    pub at: Instant,
}

impl ReceivedWebhook {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("webhook body is JSON")
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many times header `name` was sent.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}

/// What the receiver answers to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Hold the request this long before answering (until [`Receiver::release`]).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// Chooses the reply to request number `n` (0-based, in arrival order).
type Behaviour = Arc<dyn Fn(usize, &ReceivedWebhook) -> Reply + Send + Sync>;

struct Shared {
    behaviour: Behaviour,
    /// Keep every request in `requests`; when false only counts and arrivals are kept.
    record: bool,
    requests: Mutex<Vec<ReceivedWebhook>>,
    arrivals: Mutex<HashMap<String, Instant>>,
    count: AtomicUsize,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

/// How a receiver is made; [`Receiver::builder`].
pub struct ReceiverBuilder {
    behaviour: Behaviour,
    record: bool,
}

impl ReceiverBuilder {
    /// Answers each request with what `behaviour` returns for it.
    pub fn replying(
        mut self,
        behaviour: impl Fn(usize, &ReceivedWebhook) -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.behaviour = Arc::new(behaviour);
        self
    }

    /// Holds each request for `hang` (or until [`Receiver::release`]), then answers 200.
    pub fn hanging(self, hang: Duration) -> Self {
        self.replying(move |_, _| Reply::status(200).after(hang))
    }

    /// Keeps counts and arrival times only, not the requests themselves (a long
    /// benchmark run would hold every body in memory otherwise).
    pub fn counting_only(mut self) -> Self {
        self.record = false;
        self
    }

    pub async fn bind(self) -> anyhow::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the webhook receiver")?;
        let port = listener.local_addr().context("receiver address")?.port();
        let shared = Arc::new(Shared {
            behaviour: self.behaviour,
            record: self.record,
            requests: Mutex::default(),
            arrivals: Mutex::default(),
            count: AtomicUsize::new(0),
            first: Mutex::default(),
            last: Mutex::default(),
        });
        let release = CancellationToken::new();
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let (s, r, st, k) = (shared.clone(), release.clone(), stop.clone(), kill.clone());
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
                let (s, r, k) = (s.clone(), r.clone(), k.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, s.clone(), r.clone()));
                    let connection = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        // Dropping the connection closes it, held requests included.
                        () = k.cancelled() => {}
                    }
                });
            }
        });
        Ok(Receiver {
            port,
            shared,
            release,
            stop,
            kill,
        })
    }

    /// [`ReceiverBuilder::bind`] for tests: panics if 127.0.0.1 has no free port.
    pub async fn start(self) -> Receiver {
        self.bind().await.expect("webhook receiver starts")
    }
}

/// A running receiver. Dropping it stops accepting connections and answers held
/// requests; [`Receiver::stop`] closes every connection at once.
pub struct Receiver {
    port: u16,
    shared: Arc<Shared>,
    release: CancellationToken,
    stop: CancellationToken,
    kill: CancellationToken,
}

impl Receiver {
    /// A receiver that records every request and answers 200.
    pub fn builder() -> ReceiverBuilder {
        ReceiverBuilder {
            behaviour: Arc::new(|_, _| Reply::status(200)),
            record: true,
        }
    }

    /// Records every request and answers 200.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Records every request and answers `status`.
    pub async fn answering(status: u16) -> Self {
        Self::replying(move |_, _| Reply::status(status)).await
    }

    /// Records every request and answers what `behaviour` returns for it (it gets the
    /// request's 0-based number and the request).
    pub async fn replying(
        behaviour: impl Fn(usize, &ReceivedWebhook) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::builder().replying(behaviour).start().await
    }

    /// Records every request and answers with `script` in order, the last reply
    /// repeating.
    pub async fn scripted(script: Vec<Reply>) -> Self {
        assert!(
            !script.is_empty(),
            "a scripted receiver needs at least one reply"
        );
        Self::replying(move |n, _| script[n.min(script.len() - 1)].clone()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request so far, in arrival order (empty when counting only).
    pub fn received(&self) -> Vec<ReceivedWebhook> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
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
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Waits until at least `n` requests arrived and returns them; fails the test after
    /// `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<ReceivedWebhook> {
        assert!(
            self.wait_for_count(n, within).await,
            "receiver got {} of {n} requests within {within:?}",
            self.count()
        );
        self.received()
    }

    /// Stops at once: no new connections, and every open one (held requests included)
    /// is closed without an answer.
    pub async fn stop(self) {
        self.kill.cancel();
        self.stop.cancel();
        tokio::task::yield_now().await;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // After `stop` the held requests were closed; none may be answered instead.
        if !self.kill.is_cancelled() {
            self.release.cancel();
        }
        self.stop.cancel();
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    release: CancellationToken,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    // The request counts once its body is in, as a real receiver would see it.
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let now = Instant::now();
    let id = parts
        .headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
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
    let request = ReceivedWebhook {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: now,
    };
    // Numbered and recorded under one lock, so the numbers follow the record's order.
    let n = match shared.requests.lock() {
        Ok(mut requests) => {
            let n = shared.count.fetch_add(1, Ordering::Relaxed);
            if shared.record {
                requests.push(request.clone());
            }
            n
        }
        Err(_) => shared.count.fetch_add(1, Ordering::Relaxed),
    };
    let reply = (shared.behaviour)(n, &request);
    if !reply.delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(reply.delay) => {}
            () = release.cancelled() => {}
        }
    }
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() =
        hyper::StatusCode::from_u16(reply.status).unwrap_or(hyper::StatusCode::OK);
    for (name, value) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}
