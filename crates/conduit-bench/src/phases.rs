//! The measurements, in the order they run. Every load loop is bounded in count and
//! time; every process and broker name of the run is removed at the end, also on error.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use conduit_core::{
    messages::{JobMessage, RenderSpec, WebhookDelivery, SCHEMA_VERSION},
    payload::{ProgressPayload, WebhookPayload},
    time::now_millis,
    topology::{route, Topology, WAIT_BUCKETS},
    Broker, Outgoing, Service, Settings,
};
use conduit_generator::render::{self, RenderRequest};
use conduit_testkit::{
    stack::{Env, Proc, AMQP_URL},
    Receiver,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    baseline::{self, per_second},
    cpu::{CpuMeter, CpuUse},
    report::{
        Delivery, Isolation, Memory, Paced, PublishStats, Render, Report, ScaleOut, SubmitRow,
        Sustained,
    },
    stats::{ratio, Latency},
    Mode, Options, Phase, Sizes,
};

const READY: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(35);
const PROMPT: &str = "A serene mountain landscape with clouds";
/// Share of the events sent to the hanging receiver in the isolation run.
const HANGING_SHARE: usize = 5; // one in five: 20 %

/// A webhook receiver answering 200 at once that keeps counts and arrival times only.
async fn counting_receiver() -> anyhow::Result<Receiver> {
    Receiver::builder().counting_only().bind().await
}

/// Everything in order; cleans up the namespace and database whatever happens.
pub async fn run_all(options: &Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let namespace = format!("bench_{}", Uuid::new_v4().simple());
    let env = Env::new(&options.bin_dir, "bench", &namespace)?;
    let mut report = Report {
        mode: options.mode,
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu: cpu_model(),
        load_before: load_average(),
        load_after: String::new(),
        command: options.command.clone(),
        wall_seconds: 0.0,
        phases: options.phases.clone(),
        submit: Vec::new(),
        delivery: None,
        sustained: None,
        paced: None,
        isolation: None,
        render: None,
        memory: Vec::new(),
        scale_out: None,
        stream: None,
        notes: Vec::new(),
    };
    let sizes = Sizes::for_mode(options.mode);
    let result = run_phases(options, &sizes, &env, &mut report).await;
    env.clean_up().await;
    result?;
    report.wall_seconds = started.elapsed().as_secs_f64();
    report.load_after = load_average();
    Ok(report)
}

async fn run_phases(
    options: &Options,
    sizes: &Sizes,
    env: &Env,
    report: &mut Report,
) -> anyhow::Result<()> {
    // 1. Submit, then a generator working through the queued jobs for its memory.
    let secret = if options.runs(Phase::Submit) || options.runs(Phase::Generator) {
        submit_and_generator_phases(options, sizes, env, report).await?
    } else {
        // Delivery phases alone need no API: any valid signing secret does.
        TEST_SECRET.to_owned()
    };

    let delivery = [
        Phase::Delivery,
        Phase::Paced,
        Phase::Isolation,
        Phase::ScaleOut,
    ];
    if delivery.iter().any(|p| options.runs(*p)) {
        // The bench's own connection: it feeds the webhooks queue directly.
        let shutdown = CancellationToken::new();
        let broker = bench_broker(env, &shutdown).await?;
        let settings = Settings::load(Service::WebhookSender, None)?;
        let sender_prefetch = u16::try_from(
            settings
                .webhooks
                .concurrency
                .max(usize::from(settings.amqp.prefetch)),
        )
        .unwrap_or(u16::MAX);
        let result = delivery_phases(
            options,
            sizes,
            env,
            report,
            &broker,
            &secret,
            sender_prefetch,
        )
        .await;
        shutdown.cancel();
        result?;
    }

    // 8. The real-time stream, with its own API and sender processes.
    if options.runs(Phase::Stream) {
        report.stream = Some(crate::stream::run(options.mode, options.pace, env).await?);
    }

    // 5. Render, last: nothing else runs while it measures.
    if options.runs(Phase::Render) {
        report.render = Some(render_phase(options.mode, sizes, report).await?);
    }
    Ok(())
}

/// The public test vector's secret (Standard Webhooks), for runs without an API key.
const TEST_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn bench_broker(env: &Env, shutdown: &CancellationToken) -> anyhow::Result<Broker> {
    let mut settings = Settings::load(Service::WebhookSender, None)?;
    settings.amqp.url = conduit_core::Secret::new(AMQP_URL);
    settings.amqp.namespace = env.namespace.clone();
    let broker = Broker::start(&settings.amqp, "conduit-bench", shutdown.clone());
    broker.wait_ready(Duration::from_secs(30)).await?;
    Ok(broker)
}

/// 1 and 6 (generator): the submit runs against pgbench, then a generator rendering the
/// jobs they queued (or, without the submit runs, jobs published straight to the queue).
/// Returns the webhook secret of the run's API key.
async fn submit_and_generator_phases(
    options: &Options,
    sizes: &Sizes,
    env: &Env,
    report: &mut Report,
) -> anyhow::Result<String> {
    let (key, secret) = env
        .create_key("bench")
        .context("creating the bench API key")?;
    let mut api = None;
    if options.runs(Phase::Submit) {
        let mut proc = env.spawn("conduit-api", 0, &[])?;
        proc.wait_ready(READY).await?;
        for &clients in &sizes.submit_clients {
            let row = submit_load(&proc, &key, clients, sizes).await?;
            let pg = pgbench_at(env, clients, sizes, report).await;
            report.submit.push(row.with_pgbench(pg));
        }
        push_memory(report, &proc, "1: submit load");
        api = Some(proc);
    }
    if options.runs(Phase::Generator) {
        if api.is_none() {
            let shutdown = CancellationToken::new();
            let broker = bench_broker(env, &shutdown).await?;
            let jobs: Vec<Outgoing> = (0..sizes.generator_jobs).map(|_| job()).collect();
            broker
                .publish_batch(&jobs)
                .await
                .context("queueing render jobs")?;
            shutdown.cancel();
        }
        let mut generator = env.spawn("conduit-generator", 0, &[])?;
        generator.wait_ready(READY).await?;
        tokio::time::sleep(Duration::from_secs(sizes.generator_secs)).await;
        push_memory(
            report,
            &generator,
            &format!(
                "rendering queued 1280x720 jobs for {} s",
                sizes.generator_secs
            ),
        );
        generator.terminate(STOP_GRACE);
    }
    if let Some(mut api) = api {
        api.terminate(STOP_GRACE);
    }
    Ok(secret)
}

/// A render job as the API queues it for a default submit (1280x720, 6 s, 24 fps).
fn job() -> Outgoing {
    let task_id = Uuid::new_v4();
    let job = JobMessage {
        v: SCHEMA_VERSION,
        task_id,
        attempt: 1,
        model: "local-video".into(),
        provider: "local".into(),
        upstream_model: None,
        prompt: PROMPT.into(),
        spec: RenderSpec {
            duration_seconds: 6,
            width: 1280,
            height: 720,
            fps: 24,
            seed: None,
        },
        submitted_at: now_millis(),
        image_url: None,
        checkpoint: None,
    };
    Outgoing::json(route::JOBS, &job)
        .map(|o| o.for_task(task_id).with_message_id(job.message_id()))
        .unwrap_or_else(|_| Outgoing {
            target: conduit_core::Target::Queue(route::JOBS.into()),
            body: Vec::new(),
            task_id: None,
            message_id: None,
            traceparent: None,
        })
}

async fn delivery_phases(
    options: &Options,
    sizes: &Sizes,
    env: &Env,
    report: &mut Report,
    broker: &Broker,
    secret: &str,
    prefetch: u16,
) -> anyhow::Result<()> {
    let n = sizes.deliveries;
    let queue = broker.topology().queue(route::WEBHOOKS);
    let outcomes = broker.topology().queue(route::OUTCOMES);
    let mut drain = None;

    if options.runs(Phase::Delivery) {
        // 2a. Bare consumer drains of the same queue, one right before and one right
        // after the sender's: the machine's other load moves a single drain by up to a
        // factor of two, and the sender is compared with the mean of the two around it.
        let mut bare_runs = Vec::new();
        let mut bare_cpu = Vec::new();
        if let Some((rate, cpu)) = bare_run(broker, secret, &queue, prefetch, sizes, report).await?
        {
            bare_runs.push(rate);
            bare_cpu = cpu;
        }

        // 2b. One sender draining the same number of webhooks.
        let receiver = counting_receiver().await?;
        preload(broker, &receiver.url("/hook"), secret, n).await?;
        let mut proc = env.spawn("conduit-webhook-sender", 0, &[])?;
        proc.wait_ready(READY).await?;
        let meter = CpuMeter::start(&[("conduit-webhook-sender", proc.pid().unwrap_or(0))]);
        let one = drain_rate(&receiver, n, sizes.drain_timeout, report, "one sender").await;
        let sender_cpu = meter.finish(n);
        push_memory(report, &proc, "2: draining the queued webhooks");
        proc.terminate(STOP_GRACE);
        purge(&outcomes).await;

        if let Some((rate, _)) = bare_run(broker, secret, &queue, prefetch, sizes, report).await? {
            bare_runs.push(rate);
        }

        // 2c. wrk against a receiver of its own, same body.
        let wrk = if baseline::have("wrk") {
            let wrk_receiver = counting_receiver().await?;
            let body = sample_body();
            match baseline::wrk(
                &env.dir,
                &wrk_receiver.url("/hook"),
                &body,
                64,
                sizes.wrk_secs,
            )
            .await
            {
                Ok(rate) => Some(rate),
                Err(e) => {
                    report.notes.push(format!("wrk: {e:#}"));
                    None
                }
            }
        } else {
            report
                .notes
                .push("wrk is not installed: no raw HTTP baseline".into());
            None
        };
        let bare_rate =
            (!bare_runs.is_empty()).then(|| bare_runs.iter().sum::<f64>() / bare_runs.len() as f64);
        report.delivery = Some(Delivery {
            messages: n,
            sender_rate: one,
            bare_consumer_rate: bare_rate,
            bare_consumer_runs: bare_runs,
            wrk_rate: wrk,
            ratio_bare: ratio(one, bare_rate),
            ratio_wrk: ratio(one, wrk),
            bare_cpu,
            sender_cpu,
        });
        drain = Some(one);
    }

    let mut pace = options.pace;
    if options.runs(Phase::Paced) || options.runs(Phase::Isolation) {
        // 3. The sustainable rate: events published as fast as the broker confirms
        // them while the sender delivers, the way a running stack feeds it. The drain
        // rate of 2 is measured with nobody publishing, so half of it can be most of
        // what the broker manages once it also takes the events in.
        if pace.is_none() {
            let mut proc = env.spawn("conduit-webhook-sender", 0, &[])?;
            proc.wait_ready(READY).await?;
            let receiver = counting_receiver().await?;
            let s = sustained(broker, secret, &receiver, sizes, &proc).await?;
            proc.terminate(STOP_GRACE);
            purge(&outcomes).await;
            let basis = drain.map_or(s.delivered_rate, |d| d.min(s.delivered_rate));
            pace = Some((basis * 0.5).max(1.0));
            report.sustained = Some(s);
        }
    }
    let pace = pace.unwrap_or(1.0);

    if options.runs(Phase::Paced) || options.runs(Phase::Isolation) {
        // The same pace with a bare consumer in place of the sender, right before the
        // paced run, so the broker's (and this tool's) own share of the latency is known.
        let broker_only = {
            let collector = baseline::BareCollector::start(&queue, prefetch).await?;
            let run = paced(
                broker,
                secret,
                pace,
                sizes,
                &collector,
                "http://127.0.0.1:9/unused".into(),
                None,
                &[],
            )
            .await?;
            run.latency
        };

        let mut proc = env.spawn("conduit-webhook-sender", 3, &[])?;
        proc.wait_ready(READY).await?;
        let pid = [("conduit-webhook-sender", proc.pid().unwrap_or(0))];
        // Runs 3 and 4 take turns, so that both see the same spells of load from the
        // rest of the machine; their latencies are pooled per kind.
        let mut paced_runs = Vec::new();
        let mut isolation_runs = Vec::new();
        for _ in 0..sizes.latency_rounds {
            let healthy = counting_receiver().await?;
            let run = paced(
                broker,
                secret,
                pace,
                sizes,
                &healthy,
                healthy.url("/hook"),
                None,
                &pid,
            )
            .await?;
            purge(&outcomes).await;
            paced_runs.push(run);

            // 4. The same with one event in five going to a receiver that hangs.
            if options.runs(Phase::Isolation) {
                let healthy = counting_receiver().await?;
                let hanging = Receiver::builder()
                    .counting_only()
                    .hanging(sizes.hang)
                    .bind()
                    .await?;
                let parked_before = parked_total(&proc).await;
                let mut run = paced(
                    broker,
                    secret,
                    pace,
                    sizes,
                    &healthy,
                    healthy.url("/hook"),
                    Some(&hanging),
                    &pid,
                )
                .await?;
                run.parked = parked_total(&proc).await - parked_before;
                run.hanging_requests = hanging.count();
                hanging.release();
                drop(hanging);
                // The hanging receiver's deliveries, parked for later, are done with.
                for bucket in WAIT_BUCKETS {
                    purge(&broker.topology().queue(&Topology::wait_route(bucket))).await;
                }
                purge(&outcomes).await;
                isolation_runs.push(run);
            }
        }
        let paced = PacedRun::pool(paced_runs);
        let paced_p99 = paced.latency.p99_ms;
        report.paced = Some(Paced {
            target_rate: pace,
            published: paced.published,
            delivered: paced.delivered,
            latency: paced.latency,
            broker_only: Some(broker_only),
            publish: paced.publish,
            cpu: paced.cpu,
            rounds: paced.rounds,
        });
        if !isolation_runs.is_empty() {
            let run = PacedRun::pool(isolation_runs);
            report.isolation = Some(Isolation {
                hanging_requests: run.hanging_requests,
                parked: run.parked,
                target_rate: pace,
                hanging_share: 1.0 / HANGING_SHARE as f64,
                healthy_published: run.published,
                healthy_delivered: run.delivered,
                healthy: run.latency,
                p99_ratio: ratio(run.latency.p99_ms, Some(paced_p99)),
                publish: run.publish,
                cpu: run.cpu,
                rounds: run.rounds,
            });
        }
        push_memory(report, &proc, "3–4: paced and isolation runs");
        proc.terminate(STOP_GRACE);
        purge(&outcomes).await;
        // What the hanging receiver left behind must not reach the next phase.
        purge(&queue).await;
        for bucket in WAIT_BUCKETS {
            purge(&broker.topology().queue(&Topology::wait_route(bucket))).await;
        }
    }

    // 7. Two senders on the same queue.
    if options.runs(Phase::ScaleOut) {
        let receiver = counting_receiver().await?;
        preload(broker, &receiver.url("/hook"), secret, n).await?;
        let mut a = env.spawn("conduit-webhook-sender", 1, &[])?;
        let mut b = env.spawn("conduit-webhook-sender", 2, &[])?;
        a.wait_ready(READY).await?;
        b.wait_ready(READY).await?;
        let two = drain_rate(&receiver, n, sizes.drain_timeout, report, "two senders").await;
        let one = drain.unwrap_or(0.0);
        report.scale_out = Some(ScaleOut {
            one_sender_rate: one,
            two_senders_rate: two,
            ratio: ratio(two, drain),
        });
        push_memory(report, &a, "7: one of two senders");
        a.terminate(STOP_GRACE);
        b.terminate(STOP_GRACE);
        purge(&outcomes).await;
    }
    Ok(())
}

/// Preloads the queue and drains it with a bare consumer: its rate and the CPU it took,
/// or `None` (with a note) when it could not finish.
async fn bare_run(
    broker: &Broker,
    secret: &str,
    queue: &str,
    prefetch: u16,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<Option<(f64, Vec<CpuUse>)>> {
    let n = sizes.deliveries;
    preload(broker, "http://127.0.0.1:9/unused", secret, n).await?;
    let meter = CpuMeter::start(&[]);
    Ok(
        match baseline::bare_drain(queue, n, prefetch, sizes.drain_timeout).await {
            Ok(rate) => Some((rate, meter.finish(n))),
            Err(e) => {
                report.notes.push(format!("bare consumer: {e:#}"));
                None
            }
        },
    )
}

/// The sender's `conduit_webhook_parked_total`, all reasons (0 when unreadable).
async fn parked_total(sender: &Proc) -> f64 {
    let Ok(response) = reqwest::get(sender.url("/metrics")).await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("conduit_webhook_parked_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Empties a queue of the run's namespace (best effort): attempt outcomes nobody
/// consumes here would otherwise pile up from phase to phase and change what the broker
/// works with.
async fn purge(queue: &str) {
    let purged = async {
        let conn =
            lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default())
            .await?;
        let _ = channel.close(200, "done".into()).await;
        let _ = conn.close(200, "done".into()).await;
        anyhow::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), purged).await;
}

async fn pgbench_at(
    env: &Env,
    clients: usize,
    sizes: &Sizes,
    report: &mut Report,
) -> Option<baseline::PgbenchResult> {
    if !baseline::have("pgbench") {
        report
            .notes
            .push("pgbench is not installed: no insert baseline".into());
        return None;
    }
    let spare = baseline::pg_spare_connections().await.unwrap_or(1);
    let used = clients.min(spare);
    if used < clients {
        report.notes.push(format!(
            "pgbench ran {used} clients instead of {clients}: PostgreSQL's max_connections \
             leaves no more (the API itself holds at most its pool of connections)"
        ));
    }
    match baseline::pgbench(&env.dir, used, sizes.submit_secs).await {
        Ok(r) => Some(r),
        Err(e) => {
            report.notes.push(format!("pgbench: {e:#}"));
            None
        }
    }
}

fn push_memory(report: &mut Report, proc: &Proc, during: &str) {
    if let Some(kib) = proc.peak_rss_kib() {
        report.memory.push(Memory {
            service: proc.name.clone(),
            during: during.to_owned(),
            peak_rss_mib: kib as f64 / 1024.0,
        });
    }
}

/// `clients` keep-alive clients POSTing submits back to back for the run's duration
/// after a warm-up; accepted submits per second and their latencies.
async fn submit_load(
    api: &Proc,
    key: &str,
    clients: usize,
    sizes: &Sizes,
) -> anyhow::Result<SubmitRow> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = api.url("/v1/videos/generations/async");
    let body = bytes::Bytes::from(
        serde_json::json!({"model": "local-video", "prompt": PROMPT}).to_string(),
    );
    let measure_from = Instant::now() + sizes.submit_warmup;
    let until = measure_from + Duration::from_secs(sizes.submit_secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (http, url, body, key) = (http.clone(), url.clone(), body.clone(), key.to_owned());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < until {
                let sent = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => {
                        let accepted = r.status().as_u16() == 202;
                        let _ = r.bytes().await;
                        accepted
                    }
                    Err(_) => false,
                };
                let done = Instant::now();
                if sent >= measure_from && done <= until {
                    if ok {
                        latencies.push(done - sent);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        let (l, e) = joined.context("a submit client panicked")?;
        all.extend(l);
        errors += e;
    }
    let accepted = all.len();
    let seconds = sizes.submit_secs as f64;
    Ok(SubmitRow {
        clients,
        seconds,
        accepted,
        errors,
        rate: accepted as f64 / seconds,
        latency: Latency::of(&mut all),
        pgbench: None,
        ratio: None,
    })
}

fn sample_body() -> String {
    WebhookPayload::Progress(ProgressPayload::new(
        Uuid::new_v4(),
        now_millis(),
        50,
        "Rendering video content".into(),
        Some(30),
    ))
    .to_body()
}

/// A progress webhook for a task of its own (the sender serialises one task's webhooks,
/// and progress webhooks are attempted once, so a hanging receiver causes no retries).
fn delivery(url: &str, secret: &str) -> (String, Outgoing) {
    let task_id = Uuid::new_v4();
    let webhook_id = format!("msg_{}", Uuid::new_v4().simple());
    let payload = WebhookPayload::Progress(ProgressPayload::new(
        task_id,
        now_millis(),
        50,
        "Rendering video content".into(),
        Some(30),
    ));
    let d = WebhookDelivery {
        v: SCHEMA_VERSION,
        webhook_id: webhook_id.clone(),
        task_id,
        event: payload.event(),
        url: url.to_owned(),
        headers: BTreeMap::new(),
        secret: secret.to_owned(),
        body: payload.to_body(),
        occurred_at: now_millis(),
        attempts_made: 0,
        not_before: None,
        retry: None,
        batch: None,
        previous_secret: None,
        video_link: None,
    };
    let out = Outgoing::json(route::WEBHOOKS, &d)
        .map(|o| o.for_task(task_id).with_message_id(webhook_id.clone()))
        .unwrap_or_else(|_| Outgoing {
            target: conduit_core::Target::Queue(route::WEBHOOKS.into()),
            body: Vec::new(),
            task_id: None,
            message_id: None,
            traceparent: None,
        });
    (webhook_id, out)
}

/// Puts `n` webhooks for `url` on the webhooks queue, 500 per confirmed batch.
async fn preload(broker: &Broker, url: &str, secret: &str, n: usize) -> anyhow::Result<()> {
    let all: Vec<Outgoing> = (0..n).map(|_| delivery(url, secret).1).collect();
    for chunk in all.chunks(500) {
        broker
            .publish_batch(chunk)
            .await
            .context("preloading webhooks")?;
    }
    Ok(())
}

/// Deliveries per second from the first arrival to the n-th.
async fn drain_rate(
    receiver: &Receiver,
    n: usize,
    timeout: Duration,
    report: &mut Report,
    what: &str,
) -> f64 {
    if !receiver.wait_for_count(n, timeout).await {
        report.notes.push(format!(
            "{what}: only {} of {n} webhooks arrived within {timeout:?}",
            receiver.count()
        ));
    }
    receiver.span().map_or(0.0, |(first, last)| {
        per_second(receiver.count().saturating_sub(1), last - first)
    })
}

struct PacedRun {
    published: usize,
    delivered: usize,
    latency: Latency,
    samples: Vec<Duration>,
    publish: PublishStats,
    cpu: Vec<CpuUse>,
    parked: f64,
    hanging_requests: usize,
    /// Each run's own figures, when several were pooled.
    rounds: Vec<Latency>,
}

impl PacedRun {
    /// Several runs of the same kind as one: samples pooled, counts summed, the
    /// publisher's and CPU figures of the last run.
    fn pool(runs: Vec<PacedRun>) -> PacedRun {
        let rounds: Vec<Latency> = runs.iter().map(|r| r.latency).collect();
        let mut samples = Vec::new();
        let (mut published, mut delivered, mut parked, mut hanging) = (0, 0, 0.0, 0);
        let mut last = None;
        for run in runs {
            published += run.published;
            delivered += run.delivered;
            parked += run.parked;
            hanging += run.hanging_requests;
            samples.extend_from_slice(&run.samples);
            last = Some((run.publish, run.cpu));
        }
        let (publish, cpu) = last.unwrap_or_else(|| {
            (
                PublishStats {
                    target_rate: 0.0,
                    achieved_rate: 0.0,
                    batches: 0,
                    confirm: Latency::default(),
                },
                Vec::new(),
            )
        });
        PacedRun {
            published,
            delivered,
            latency: Latency::of(&mut samples),
            samples,
            publish,
            cpu,
            parked,
            hanging_requests: hanging,
            rounds,
        }
    }
}

/// Publishes webhooks at `rate` per second (every 5 ms, the ones due), one in
/// [`HANGING_SHARE`] to `hanging` when given, for the warm-up and then the measured
/// seconds; latency is from the publish call to the arrival at `healthy`, of the events
/// published after the warm-up (the first seconds open connections and fill pools).
#[allow(clippy::too_many_arguments)]
async fn paced(
    broker: &Broker,
    secret: &str,
    rate: f64,
    sizes: &Sizes,
    healthy: &dyn baseline::Arrivals,
    healthy_url: String,
    hanging: Option<&Receiver>,
    cpu_of: &[(&str, u32)],
) -> anyhow::Result<PacedRun> {
    let published: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let confirms: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let failed = Arc::new(AtomicBool::new(false));
    let hanging_url = hanging.map(|h| h.url("/hook"));
    let secs = sizes.paced_warmup.as_secs_f64() + sizes.paced_secs as f64;
    let total = (rate * secs) as usize;
    let start = Instant::now();
    let measure_from = start + sizes.paced_warmup;
    let mut meter = None;
    let mut sent = 0usize;
    let mut healthy_sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut batches = tokio::task::JoinSet::new();
    while sent < total && start.elapsed().as_secs_f64() < secs + 5.0 {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(total);
        if due <= sent {
            continue;
        }
        let measured = Instant::now() >= measure_from;
        if measured && meter.is_none() {
            meter = Some((CpuMeter::start(cpu_of), sent));
        }
        let mut batch = Vec::with_capacity(due - sent);
        let mut ids = Vec::new();
        for i in sent..due {
            let to_hang = hanging_url.as_ref().filter(|_| i % HANGING_SHARE == 0);
            let (id, out) = delivery(to_hang.unwrap_or(&healthy_url), secret);
            if to_hang.is_none() {
                healthy_sent += 1;
                if measured {
                    ids.push(id);
                }
            }
            batch.push(out);
        }
        sent = due;
        let (broker, published, failed, confirms) = (
            broker.clone(),
            published.clone(),
            failed.clone(),
            confirms.clone(),
        );
        batches.spawn(async move {
            let at = Instant::now();
            if let Ok(mut m) = published.lock() {
                m.extend(ids.into_iter().map(|id| (id, at)));
            }
            if broker.publish_batch(&batch).await.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            if let Ok(mut c) = confirms.lock() {
                c.push(at.elapsed());
            }
        });
        while batches.try_join_next().is_some() {}
    }
    let published_for = start.elapsed();
    while batches.join_next().await.is_some() {}
    let expected: HashMap<String, Instant> =
        published.lock().map(|m| m.clone()).unwrap_or_default();
    // Wait (bounded) for the healthy receiver to have every one of its webhooks.
    let deadline = Instant::now() + Duration::from_secs(30);
    while healthy.count() < healthy_sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = meter.map_or_else(Vec::new, |(m, from)| m.finish(sent - from));
    let arrivals = healthy.arrivals();
    let mut latencies: Vec<Duration> = expected
        .iter()
        .filter_map(|(id, at)| arrivals.get(id).map(|a| a.saturating_duration_since(*at)))
        .collect();
    if failed.load(Ordering::Relaxed) {
        anyhow::bail!("a paced publish was not confirmed by RabbitMQ");
    }
    let mut confirms = confirms.lock().map(|c| c.clone()).unwrap_or_default();
    Ok(PacedRun {
        published: expected.len(),
        delivered: latencies.len(),
        latency: Latency::of(&mut latencies),
        samples: latencies,
        parked: 0.0,
        hanging_requests: 0,
        rounds: Vec::new(),
        publish: PublishStats {
            target_rate: rate,
            achieved_rate: per_second(sent, published_for),
            batches: confirms.len(),
            confirm: Latency::of(&mut confirms),
        },
        cpu,
    })
}

/// The highest rate the sender keeps up with while events are being published: a
/// publisher keeps a few confirmed batches in flight, as fast as the broker takes them,
/// while the sender delivers; the rate is what arrives at the receiver after a warm-up.
/// When the webhooks queue does not grow, the publisher (not the sender) was the limit
/// and the figure is a lower bound.
async fn sustained(
    broker: &Broker,
    secret: &str,
    receiver: &Receiver,
    sizes: &Sizes,
    sender: &Proc,
) -> anyhow::Result<Sustained> {
    const BATCH: usize = 200;
    const IN_FLIGHT: usize = 4;
    let url = receiver.url("/hook");
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (broker, url, secret, stop, published) = (
            broker.clone(),
            url.clone(),
            secret.to_owned(),
            stop.clone(),
            published.clone(),
        );
        publishers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<Outgoing> = (0..BATCH).map(|_| delivery(&url, &secret).1).collect();
                broker
                    .publish_batch(&batch)
                    .await
                    .context("publishing at the sustained rate")?;
                published.fetch_add(BATCH, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    tokio::time::sleep(sizes.paced_warmup).await;
    let (from_published, from_delivered) = (published.load(Ordering::Relaxed), receiver.count());
    let meter = CpuMeter::start(&[("conduit-webhook-sender", sender.pid().unwrap_or(0))]);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(sizes.sustain_secs)).await;
    let elapsed = started.elapsed();
    let (to_published, to_delivered) = (published.load(Ordering::Relaxed), receiver.count());
    stop.store(true, Ordering::Relaxed);
    let cpu = meter.finish(to_delivered - from_delivered);
    while let Some(joined) = publishers.join_next().await {
        joined.context("a publisher panicked")??;
    }
    let total = published.load(Ordering::Relaxed);
    // Let the backlog drain so the next phase starts from an empty queue.
    receiver.wait_for_count(total, sizes.drain_timeout).await;
    Ok(Sustained {
        seconds: elapsed.as_secs_f64(),
        published_rate: per_second(to_published - from_published, elapsed),
        delivered_rate: per_second(to_delivered - from_delivered, elapsed),
        backlog_at_end: to_published.saturating_sub(to_delivered),
        cpu,
    })
}

async fn render_phase(mode: Mode, sizes: &Sizes, report: &mut Report) -> anyhow::Result<Render> {
    let (width, height) = sizes.render_size;
    let request = RenderRequest {
        prompt: PROMPT.into(),
        seed: Some(42),
        width,
        height,
        duration_seconds: sizes.render_seconds,
        fps: 24,
    };
    let frames = request.total_frames();
    let started = Instant::now();
    tokio::task::spawn_blocking(move || {
        let cancel = AtomicBool::new(false);
        render::render(&request, &mut |_, _| {}, &cancel)
    })
    .await
    .context("the render thread panicked")?
    .context("rendering")?;
    let seconds = started.elapsed().as_secs_f64();
    let fps = f64::from(frames) / seconds;
    let ffmpeg = if baseline::have("ffmpeg") {
        match baseline::ffmpeg(width, height, 24, frames).await {
            Ok(r) => Some(r),
            Err(e) => {
                report.notes.push(format!("ffmpeg: {e:#}"));
                None
            }
        }
    } else {
        report
            .notes
            .push("ffmpeg is not installed: no encoder baseline".into());
        None
    };
    if mode == Mode::Smoke {
        report
            .notes
            .push("smoke run: tiny counts, debug build; the figures mean nothing".into());
    }
    Ok(Render {
        width,
        height,
        frames,
        seconds,
        fps,
        ratio: ratio(fps, ffmpeg.as_ref().map(|f| f.fps)),
        ffmpeg,
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" / "))
        .unwrap_or_else(|| "unknown".into())
}
