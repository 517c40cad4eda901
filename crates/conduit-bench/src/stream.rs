//! The stream phase: what 10 000 idle WebSocket connections cost one API process (RSS and
//! CPU), and the latency from a status event to a stream client beside the latency to
//! the webhook receiver for the very same events.
//!
//! The tool plays the generator: it publishes progress status events on the run's
//! `{ns}.status` queue at a fixed pace, each carrying its own number in `message`. The
//! API's ledger applies each one, which records one event for the stream and one webhook
//! (the tasks have a `webhook_url` on the tool's receiver); a WebSocket client of the tool
//! and a webhook sender process carry them on. Both latencies are measured from the
//! publish call, on the tool's own monotonic clock.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use conduit_core::{
    messages::{StatusEvent, StatusKind, SCHEMA_VERSION},
    time::now_millis,
    topology::route,
    Broker, Outgoing, Service, Settings,
};
use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use conduit_testkit::{
    stack::{Env, Proc, AMQP_URL},
    Receiver,
};

use crate::{
    cpu::{CpuMeter, CpuUse},
    stats::Latency,
    Mode,
};

const READY: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(35);

/// Counts and durations of the stream phase.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    connections: usize,
    /// Connection attempts in flight at once.
    opening: usize,
    idle_secs: u64,
    tasks: usize,
    pace: f64,
    warmup: Duration,
    secs: u64,
}

impl Sizes {
    fn for_mode(mode: Mode, pace: Option<f64>) -> Self {
        match mode {
            Mode::Full => Self {
                connections: 10_000,
                opening: 64,
                // One ping round (every 20 s) falls inside.
                idle_secs: 25,
                tasks: 200,
                pace: pace.unwrap_or(DEFAULT_PACE),
                warmup: Duration::from_secs(2),
                secs: 15,
            },
            Mode::Smoke => Self {
                connections: 50,
                opening: 25,
                idle_secs: 1,
                tasks: 5,
                pace: pace.unwrap_or(20.0),
                warmup: Duration::from_millis(200),
                secs: 1,
            },
        }
    }
}

/// Status events per second through the ledger when no `--pace` is given. Every event is
/// one ledger transaction, so this is far below the broker-only paced runs.
const DEFAULT_PACE: f64 = 100.0;

/// The stream phase's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamReport {
    pub connections: usize,
    pub open_seconds: f64,
    /// VmRSS of conduit-api before the connections, with them open and idle.
    pub rss_before_mib: f64,
    pub rss_idle_mib: f64,
    pub kib_per_connection: f64,
    pub idle_seconds: f64,
    /// CPU of conduit-api while the connections sat idle (pings included).
    pub idle_cpu: Vec<CpuUse>,
    pub pace: f64,
    pub tasks: usize,
    pub published: usize,
    pub stream: Latency,
    pub webhook: Latency,
    /// CPU of each process over the paced run, per 1000 status events.
    pub paced_cpu: Vec<CpuUse>,
}

async fn broker(env: &Env, shutdown: &CancellationToken) -> anyhow::Result<Broker> {
    let mut settings = Settings::load(Service::Api, None)?;
    settings.amqp.url = conduit_core::Secret::new(AMQP_URL);
    settings.amqp.namespace = env.namespace.clone();
    let broker = Broker::start(&settings.amqp, "conduit-bench-stream", shutdown.clone());
    broker.wait_ready(Duration::from_secs(30)).await?;
    Ok(broker)
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn ws_request(
    api: &Proc,
    key: &str,
) -> anyhow::Result<tokio_tungstenite::tungstenite::handshake::client::Request> {
    let mut req = format!("ws://127.0.0.1:{}/v1/stream", api.port)
        .into_client_request()
        .context("building the WebSocket request")?;
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).context("key header")?,
    );
    Ok(req)
}

/// Opens one connection and keeps reading it (answering pings) in a task of its own.
/// A 503 (the database busy, shared with the rest of the machine) is retried as a client
/// would.
async fn open_idle(api: &Proc, key: &str) -> anyhow::Result<JoinHandle<()>> {
    let mut tries = 0;
    let mut ws = loop {
        match tokio_tungstenite::connect_async(ws_request(api, key)?).await {
            Ok((ws, _)) => break ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r))
                if r.status().as_u16() == 503 && tries < 10 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            Err(err) => return Err(err).context("opening a WebSocket"),
        }
    };
    Ok(tokio::spawn(async move {
        while let Some(Ok(_)) = ws.next().await {}
    }))
}

/// Runs the phase against its own API and sender processes.
pub async fn run(mode: Mode, pace: Option<f64>, env: &Env) -> anyhow::Result<StreamReport> {
    let sizes = Sizes::for_mode(mode, pace);
    let (key, _) = env
        .create_key("stream")
        .context("creating the stream phase's key")?;
    // The idle connections belong to another key: they get no events (a connection
    // receives every event of its key's tasks).
    let (idle_key, _) = env
        .create_key("stream-idle")
        .context("creating the idle connections' key")?;
    let mut api = env.spawn("conduit-api", 9, &[])?;
    api.wait_ready(READY).await?;
    let api_pid = api.pid().context("conduit-api has no pid")?;
    let mut sender = env.spawn("conduit-webhook-sender", 9, &[])?;
    sender.wait_ready(READY).await?;
    let shutdown = CancellationToken::new();
    let keys = Keys {
        measured: &key,
        idle: &idle_key,
    };
    let result = measure(&sizes, &api, api_pid, &sender, keys, env, &shutdown).await;
    shutdown.cancel();
    sender.terminate(STOP_GRACE);
    api.terminate(STOP_GRACE);
    result
}

struct Keys<'a> {
    measured: &'a str,
    idle: &'a str,
}

async fn measure(
    sizes: &Sizes,
    api: &Proc,
    api_pid: u32,
    sender: &Proc,
    keys: Keys<'_>,
    env: &Env,
    shutdown: &CancellationToken,
) -> anyhow::Result<StreamReport> {
    let key = keys.measured;
    // 1. Idle connections.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = vm_rss_kib(api_pid).unwrap_or(0);
    let opened_at = Instant::now();
    let opened: Vec<anyhow::Result<JoinHandle<()>>> = stream::iter(0..sizes.connections)
        .map(|_| open_idle(api, keys.idle))
        .buffer_unordered(sizes.opening)
        .collect()
        .await;
    let open_seconds = opened_at.elapsed().as_secs_f64();
    let mut idle = Vec::with_capacity(opened.len());
    for o in opened {
        idle.push(o?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let meter = CpuMeter::start(&[("conduit-api", api_pid)]);
    tokio::time::sleep(Duration::from_secs(sizes.idle_secs)).await;
    let idle_cpu: Vec<CpuUse> = meter
        .finish(0)
        .into_iter()
        .filter(|c| c.process == "conduit-api")
        .collect();
    let rss_idle = vm_rss_kib(api_pid).unwrap_or(0);
    let still_open = idle.iter().filter(|h| !h.is_finished()).count();
    if still_open < sizes.connections {
        bail!(
            "only {still_open} of {} idle connections stayed open",
            sizes.connections
        );
    }

    // 2. Paced status events, followed on the stream and by webhook.
    let receiver = Receiver::builder().counting_only().bind().await?;
    let http = reqwest::Client::new();
    let mut tasks = Vec::with_capacity(sizes.tasks);
    for _ in 0..sizes.tasks {
        let r = http
            .post(api.url("/v1/videos/generations/async"))
            .bearer_auth(key)
            .json(&serde_json::json!({
                "model": "local-video",
                "prompt": "A serene mountain landscape with clouds",
                "webhook_url": receiver.url("/hook"),
                "webhook_events": ["progress"],
            }))
            .send()
            .await
            .context("submitting a stream phase task")?;
        let body: serde_json::Value = r.json().await.context("submit answer")?;
        let id = body["task_id"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .with_context(|| format!("no task_id in {body}"))?;
        tasks.push(id);
    }
    // Event number → (arrival on the stream, event id).
    let arrivals: Arc<Mutex<HashMap<usize, (Instant, String)>>> = Arc::default();
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_request(api, key)?)
        .await
        .context("opening the measuring WebSocket")?;
    let reader = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                let now = Instant::now();
                let Ok(frame) = serde_json::from_str::<serde_json::Value>(&text) else {
                    continue;
                };
                let number = frame["data"]["message"]
                    .as_str()
                    .and_then(|m| m.strip_prefix('s'))
                    .and_then(|n| n.parse::<usize>().ok());
                if let (Some(n), Some(id)) = (number, frame["id"].as_str()) {
                    if let Ok(mut a) = arrivals.lock() {
                        a.entry(n).or_insert((now, id.to_owned()));
                    }
                }
            }
        })
    };
    let broker = broker(env, shutdown).await?;
    let total_secs = sizes.warmup.as_secs_f64() + sizes.secs as f64;
    let total = (sizes.pace * total_secs).round() as usize;
    let warm = (sizes.pace * sizes.warmup.as_secs_f64()).round() as usize;
    let mut published: Vec<Option<Instant>> = vec![None; total];
    let meter = CpuMeter::start(&[
        ("conduit-api", api_pid),
        (
            "conduit-webhook-sender",
            sender.pid().context("sender has no pid")?,
        ),
    ]);
    let started = Instant::now();
    let mut next = 0;
    while next < total {
        let due = ((started.elapsed().as_secs_f64() * sizes.pace) as usize + 1).min(total);
        if due > next {
            let batch: Vec<Outgoing> = (next..due)
                .map(|n| status(tasks[n % tasks.len()], n))
                .collect::<anyhow::Result<_>>()?;
            let at = Instant::now();
            for chunk in batch.chunks(100) {
                // A broker slow to confirm (it is shared) gets a second try; the ledger
                // drops a duplicate by its sequence number.
                if broker.publish_batch(chunk).await.is_err() {
                    broker
                        .publish_batch(chunk)
                        .await
                        .context("publishing status events")?;
                }
            }
            for slot in &mut published[next..due] {
                *slot = Some(at);
            }
            next = due;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Wait for the stream and the webhooks to catch up (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let got = arrivals.lock().map(|a| a.len()).unwrap_or(0);
        if got >= total && receiver.count() >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let paced_cpu = meter.finish(total);
    reader.abort();
    for h in &idle {
        h.abort();
    }
    let webhooks = receiver.arrivals();
    let (mut stream_lat, mut webhook_lat) = (Vec::new(), Vec::new());
    if let Ok(a) = arrivals.lock() {
        for (n, (at, id)) in a.iter() {
            let Some(Some(sent)) = published.get(*n) else {
                continue;
            };
            if *n < warm {
                continue;
            }
            stream_lat.push(at.saturating_duration_since(*sent));
            if let Some(hook) = webhooks.get(id) {
                webhook_lat.push(hook.saturating_duration_since(*sent));
            }
        }
    }
    let to_mib = |kib: u64| kib as f64 / 1024.0;
    Ok(StreamReport {
        connections: sizes.connections,
        open_seconds,
        rss_before_mib: to_mib(rss_before),
        rss_idle_mib: to_mib(rss_idle),
        kib_per_connection: rss_idle.saturating_sub(rss_before) as f64 / sizes.connections as f64,
        idle_seconds: sizes.idle_secs as f64,
        idle_cpu,
        pace: sizes.pace,
        tasks: sizes.tasks,
        published: total - warm,
        stream: Latency::of(&mut stream_lat),
        webhook: Latency::of(&mut webhook_lat),
        paced_cpu,
    })
}

/// Progress event number `n` of `task`, as a generator publishes it.
fn status(task: Uuid, n: usize) -> anyhow::Result<Outgoing> {
    let event = StatusEvent {
        v: SCHEMA_VERSION,
        task_id: task,
        attempt: 1,
        seq: n as u64 + 1,
        at: now_millis(),
        kind: StatusKind::Progress {
            percent: u8::try_from(n % 100).unwrap_or(0),
            message: format!("s{n}"),
            eta_seconds: None,
        },
    };
    Ok(Outgoing::json(route::STATUS, &event)?.for_task(task))
}

/// The phase's section of docs/benchmarks.md.
pub fn markdown(r: &StreamReport) -> String {
    let mut s = String::new();
    let cpu = |uses: &[CpuUse], name: &str| {
        uses.iter()
            .find(|c| c.process == name)
            .map_or("–".to_owned(), |c| format!("{:.3}", c.cores))
    };
    let _ = writeln!(
        s,
        "\n### 8. Real-time stream (one API process)\n\n\
         | measure | value |\n|---|---|\n\
         | idle WebSocket connections | {} (opened in {:.1} s) |\n\
         | conduit-api RSS before / with them open | {:.1} MiB / {:.1} MiB ({:.1} KiB per connection) |\n\
         | conduit-api CPU while they idle {:.0} s (pings included) | {} cores |",
        r.connections,
        r.open_seconds,
        r.rss_before_mib,
        r.rss_idle_mib,
        r.kib_per_connection,
        r.idle_seconds,
        cpu(&r.idle_cpu, "conduit-api"),
    );
    let _ = writeln!(
        s,
        "\nStatus event (published as a generator does) → client, {} progress events/s over {} \
         tasks, with the idle connections still open; both columns are the same events:\n\n\
         | to | received | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n\
         | WebSocket stream client | {}/{} | {:.1} | {:.1} | {:.1} |\n\
         | webhook receiver (through the sender) | {}/{} | {:.1} | {:.1} | {:.1} |",
        r.pace,
        r.tasks,
        r.stream.samples,
        r.published,
        r.stream.p50_ms,
        r.stream.p99_ms,
        r.stream.max_ms,
        r.webhook.samples,
        r.published,
        r.webhook.p50_ms,
        r.webhook.p99_ms,
        r.webhook.max_ms,
    );
    let per: Vec<String> = r
        .paced_cpu
        .iter()
        .map(|c| format!("{} {:.0}", c.process, c.ms_per_1000))
        .collect();
    let _ = writeln!(s, "\nCPU ms per 1000 status events: {}.", per.join(", "));
    s
}
