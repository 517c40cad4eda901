//! The machine's own limits, measured in the same run as the services: pgbench's
//! single-row insert rate, wrk's raw POST rate to the receiver, a bare RabbitMQ consumer's
//! drain rate and ffmpeg's x264 ultrafast encode rate. A tool that is not installed gives
//! no baseline (the report says so) rather than failing the run.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
    Connection, ConnectionProperties,
};
use serde::Serialize;

use conduit_testkit::stack::{database_url, pg_admin, AMQP_URL};

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PgbenchResult {
    pub clients: usize,
    pub tps: f64,
    pub latency_avg_ms: Option<f64>,
}

/// Connections pgbench may open without starving the rest of the server: PostgreSQL's
/// `max_connections` less those in use and a margin for the services and other users.
pub async fn pg_spare_connections() -> anyhow::Result<usize> {
    let client = pg_admin().await?;
    let max: i64 = client
        .query_one("SELECT current_setting('max_connections')::bigint", &[])
        .await?
        .get(0);
    let used: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_activity", &[])
        .await?
        .get(0);
    Ok(usize::try_from(max - used - 24).unwrap_or(0).max(1))
}

/// pgbench inserting one row per transaction into a scratch table of a scratch database:
/// `-c clients -j 2 -T secs -f script -n`.
pub async fn pgbench(dir: &Path, clients: usize, secs: u64) -> anyhow::Result<PgbenchResult> {
    let db = format!("conduit_bench_pg_{}", uuid::Uuid::new_v4().simple());
    let admin = pg_admin().await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{db}\""))
        .await
        .context("creating the pgbench database")?;
    let result = async {
        let (client, conn) = tokio_postgres::connect(
            &database_url(&db),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(conn);
        // Shaped like a task row: a key, a JSON document and a timestamp.
        client
            .batch_execute(
                "CREATE TABLE scratch (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
                 body jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .context("creating the scratch table")?;
        let script = dir.join("insert.sql");
        std::fs::write(
            &script,
            "INSERT INTO scratch (body) VALUES ('{\"model\":\"local-video\",\"prompt\":\"A serene mountain landscape with clouds\"}');\n",
        )?;
        let out = tokio::process::Command::new("pgbench")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-n", "-j", "2"])
            .args(["-c", &clients.to_string(), "-T", &secs.to_string(), "-f"])
            .arg(&script)
            .arg(&db)
            .output()
            .await
            .context("running pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "pgbench failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tps = text
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no tps in pgbench output: {text}"))?;
        let latency_avg_ms = text
            .lines()
            .find_map(|l| l.strip_prefix("latency average = "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        Ok(PgbenchResult {
            clients,
            tps,
            latency_avg_ms,
        })
    }
    .await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .await;
    result
}

/// wrk POSTing `body` (with a `webhook-id` and JSON content type) to `url` over
/// `connections` keep-alive connections for `secs`: requests per second.
pub async fn wrk(
    dir: &Path,
    url: &str,
    body: &str,
    connections: usize,
    secs: u64,
) -> anyhow::Result<f64> {
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = [==[{body}]==]\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"User-Agent\"] = \"Conduit-LLM/1.0\"\n\
             wrk.headers[\"webhook-id\"] = \"msg_wrk\"\n"
        ),
    )?;
    let out = tokio::process::Command::new("wrk")
        .args(["-t", "2", "-c", &connections.to_string()])
        .args(["-d", &format!("{secs}s"), "-s"])
        .arg(&script)
        .arg(url)
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|r| r.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))
}

/// A bare lapin consumer on `queue` (already holding `n` messages) with `prefetch`,
/// acking each delivery and doing nothing else: messages per second from the first
/// delivery to the last ack.
pub async fn bare_drain(
    queue: &str,
    n: usize,
    prefetch: u16,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .context("connecting the bare consumer")?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "conduit-bench-bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("consuming the webhooks queue")?;
    let deadline = Instant::now() + timeout;
    let mut first = None;
    let mut seen = 0;
    while seen < n {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(delivery)) = tokio::time::timeout(remaining, consumer.next()).await else {
            break;
        };
        let delivery = delivery.context("bare consumer delivery")?;
        first.get_or_insert_with(Instant::now);
        delivery.acker.ack(BasicAckOptions::default()).await?;
        seen += 1;
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    if seen < n {
        bail!("the bare consumer drained only {seen} of {n} messages within {timeout:?}");
    }
    Ok(per_second(seen.saturating_sub(1), elapsed))
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FfmpegResult {
    pub frames: u32,
    pub seconds: f64,
    pub fps: f64,
}

/// `ffmpeg -f lavfi -i testsrc2=size=WxH:rate=R -frames:v N -c:v libx264 -preset
/// ultrafast -threads 1 -f null -`, timed from the outside.
pub async fn ffmpeg(
    width: u32,
    height: u32,
    rate: u32,
    frames: u32,
) -> anyhow::Result<FfmpegResult> {
    let started = Instant::now();
    let out = tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg(format!("testsrc2=size={width}x{height}:rate={rate}"))
        .args(["-frames:v", &frames.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-threads",
            "1",
            "-f",
            "null",
            "-",
        ])
        .output()
        .await
        .context("running ffmpeg")?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("ffmpeg failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(FfmpegResult {
        frames,
        seconds,
        fps: f64::from(frames) / seconds,
    })
}

/// `count / elapsed`, zero for an empty interval.
pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        count as f64 / s
    } else {
        0.0
    }
}

/// A bare consumer left running on `queue`: records when each message (by its AMQP
/// `message_id`) arrived, and acks it. The broker-only baseline of the paced latency run.
pub struct BareCollector {
    arrivals: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
}

impl BareCollector {
    pub async fn start(queue: &str, prefetch: u16) -> anyhow::Result<Self> {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .context("connecting the bare collector")?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "conduit-bench-collector".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("consuming the webhooks queue")?;
        let arrivals = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let (a, c, s) = (arrivals.clone(), count.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = consumer.next() => next,
                    () = s.cancelled() => break,
                };
                let Some(Ok(delivery)) = next else { break };
                let now = Instant::now();
                if let Some(id) = delivery.properties.message_id() {
                    if let Ok(mut m) = a.lock() {
                        m.insert(id.to_string(), now);
                    }
                }
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
            let _ = channel.close(200, "done".into()).await;
            let _ = conn.close(200, "done".into()).await;
        });
        Ok(Self {
            arrivals,
            count,
            stop,
        })
    }
}

impl Drop for BareCollector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Where the paced run looks for arrivals: the receiver (through the sender) or the
/// bare collector (broker only).
pub trait Arrivals {
    fn count(&self) -> usize;
    fn arrivals(&self) -> std::collections::HashMap<String, Instant>;
}

impl Arrivals for BareCollector {
    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn arrivals(&self) -> std::collections::HashMap<String, Instant> {
        self.arrivals.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Arrivals for conduit_testkit::Receiver {
    fn count(&self) -> usize {
        conduit_testkit::Receiver::count(self)
    }
    fn arrivals(&self) -> std::collections::HashMap<String, Instant> {
        conduit_testkit::Receiver::arrivals(self)
    }
}
