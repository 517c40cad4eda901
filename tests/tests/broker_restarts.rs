//! RabbitMQ restarts under load, against a private RabbitMQ node this file starts on
//! free ports (the machine's shared broker must never be restarted: other tests run
//! against it). After every restart each service must be ready and consuming again
//! within 30 s, and every task must reach its terminal webhook; a consumer that is gone
//! longer than the stall grace must turn `/healthz` 503.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use conduit_testkit::{
    eventually,
    stack::{free_port, Proc},
    Receiver, Reply, Stack, StackOptions,
};
use serde_json::json;

/// How long every service gets to be ready and consuming after the broker returns.
const RECOVERY: Duration = Duration::from_secs(30);

/// A RabbitMQ node of this test's own: its own name, ports, data and log folders.
struct PrivateRabbit {
    node: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl PrivateRabbit {
    fn start() -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let node = format!("conduit-{}@localhost", &tag[..12]);
        let dir = std::env::temp_dir().join(format!("conduit-rabbit-{}", &tag[..12]));
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("create private RabbitMQ folder");
        let port = free_port().expect("a free port");
        let rabbit = Self {
            node,
            port,
            dist_port: free_port().expect("a free port"),
            dir,
        };
        std::fs::write(home.join(".erlang.cookie"), format!("CONDUIT{tag}"))
            .expect("write Erlang cookie");
        set_mode(&home.join(".erlang.cookie"), 0o400);
        std::fs::write(
            rabbit.dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .expect("write rabbitmq.conf");
        std::fs::write(rabbit.dir.join("enabled_plugins"), "[].\n").expect("write plugins file");
        std::fs::write(rabbit.dir.join("rabbitmq-env.conf"), "").expect("write env file");
        let status = rabbit
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .expect("run rabbitmq-server");
        assert!(status.success(), "rabbitmq-server -detached failed");
        // The detached node registers with epmd a moment after the command returns;
        // until then `await_startup` fails at once with "not running".
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while let Err(err) = rabbit.try_ctl(&["await_startup", "--timeout", "120"]) {
            assert!(
                std::time::Instant::now() < deadline,
                "the private RabbitMQ node did not start: {err}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        rabbit
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// A RabbitMQ script run as this node's operator (root runs the scripts directly:
    /// the packaged wrappers would switch to the shared node's user and settings).
    fn command(&self, script: &str) -> Command {
        let direct = PathBuf::from("/usr/lib/rabbitmq/bin").join(script);
        let program = if direct.exists() {
            direct
        } else {
            PathBuf::from(script)
        };
        let mut cmd = Command::new(program);
        let d = |name: &str| self.dir.join(name).display().to_string();
        cmd.env("HOME", d("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // A node that crashes writes its dump here, not into the test's folder.
            .env("ERL_CRASH_DUMP", d("erl_crash.dump"))
            .current_dir(&self.dir)
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn ctl(&self, args: &[&str]) {
        if let Err(err) = self.try_ctl(args) {
            panic!("{err}");
        }
    }

    fn try_ctl(&self, args: &[&str]) -> Result<(), String> {
        let out = self
            .command("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run rabbitmqctl");
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    fn start_app(&self) {
        self.ctl(&["start_app"]);
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = self
            .command("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .arg("stop")
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(unix)]
fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[cfg(not(unix))]
fn set_mode(_: &std::path::Path, _: u32) {}

async fn stack_on(rabbit: &PrivateRabbit, extra: &[(&str, &str)]) -> Stack {
    let mut env = vec![
        ("CONDUIT__AMQP__URL".to_owned(), rabbit.url()),
        // A hanging receiver times out quickly, so its retries are in flight throughout.
        (
            "CONDUIT__WEBHOOKS__TIMEOUT_SECONDS".to_owned(),
            "2".to_owned(),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Stack::start_with(StackOptions {
        env,
        ..Default::default()
    })
    .await
}

fn task(receiver: &Receiver, label: &str, frames: u32) -> serde_json::Value {
    json!({
        "model": "local-video",
        "prompt": format!("broker restart task {label}"),
        "duration": frames,
        "fps": 1,
        "size": "96x64",
        "webhook_url": receiver.url("/hook"),
        "webhook_events": ["completed", "failed", "cancelled", "progress"],
    })
}

/// Submits with a fresh connection each time and retries a request that failed in
/// transport with the same `Idempotency-Key`, so the task exists exactly once.
async fn submit(stack: &Stack, body: &serde_json::Value) -> String {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let key = uuid::Uuid::new_v4().to_string();
    for _ in 0..5 {
        let sent = client
            .post(stack.api_url("/v1/videos/generations/async"))
            .bearer_auth(&stack.key)
            .header("Idempotency-Key", &key)
            .json(body)
            .send()
            .await;
        let Ok(r) = sent else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let status = r.status().as_u16();
        let json: serde_json::Value = r.json().await.unwrap_or_default();
        assert_eq!(status, 202, "submit answered {status}: {json}");
        return json["task_id"].as_str().expect("task_id").to_owned();
    }
    panic!("the API did not take a submit in 5 tries");
}

async fn status_of(proc: &Proc, path: &str) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let r = client.get(proc.url(path)).send().await.ok()?;
    Some(r.status().as_u16())
}

/// What an operator would look at when a task never finished: each missing task's
/// state in the API, and every service's warnings and errors.
async fn explain(stack: &Stack, missing: &[String]) -> String {
    let mut out = String::new();
    for t in missing.iter().take(10) {
        let task = stack.task(t).await;
        let (_, log) = stack
            .get(&format!("/v1/videos/generations/tasks/{t}/webhooks"))
            .await;
        out.push_str(&format!("task {t}: {task}\n  webhooks: {log}\n"));
    }
    for proc in services(stack) {
        let logs = proc.logs();
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("ERROR")
                    || l.contains("\"level\":\"WARN")
                    || l.contains("\"level\":\"ERROR")
            })
            .collect();
        let tail = &lines[lines.len().saturating_sub(25)..];
        out.push_str(&format!("--- {} ---\n{}\n", proc.url(""), tail.join("\n")));
    }
    out
}

fn missing_terminals(hooks: &[conduit_testkit::ReceivedWebhook], tasks: &[String]) -> Vec<String> {
    tasks
        .iter()
        .filter(|t| {
            !hooks.iter().any(|h| {
                let b = h.json();
                b["task_id"] == t.as_str() && b["status"] == "completed"
            })
        })
        .cloned()
        .collect()
}

/// Waits up to `within` for every task's completed webhook at `receivers`; on time-out,
/// fails with [`explain`]'s account.
async fn all_terminal(
    stack: &Stack,
    receivers: &[&Receiver],
    tasks: &[String],
    within: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let hooks: Vec<_> = receivers.iter().flat_map(|r| r.received()).collect();
        let missing = missing_terminals(&hooks, tasks);
        if missing.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{what}: {} of {} tasks have no completed webhook after {within:?}\n{}",
                missing.len(),
                tasks.len(),
                explain(stack, &missing).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn services(stack: &Stack) -> Vec<&Proc> {
    std::iter::once(&stack.api)
        .chain(&stack.generators)
        .chain(&stack.senders)
        .collect()
}

#[tokio::test]
async fn twenty_rabbitmq_restarts_under_load_leave_every_service_consuming() {
    let rabbit = PrivateRabbit::start();
    let stack = stack_on(&rabbit, &[]).await;
    let fine = Receiver::start().await;
    let slow =
        Receiver::scripted(vec![Reply::status(200).after(Duration::from_millis(1500))]).await;
    let hanging =
        Receiver::scripted(vec![Reply::status(200).after(Duration::from_secs(3600))]).await;
    let mut tasks = Vec::new();
    for round in 0..20 {
        // Load: renders in progress, webhooks in flight, a receiver that never answers.
        for i in 0..6 {
            let receiver = if i == 0 { &slow } else { &fine };
            let id = submit(
                &stack,
                &task(receiver, &format!("{round}.{i}"), 2 + (i % 3)),
            )
            .await;
            tasks.push(id);
        }
        submit(&stack, &task(&hanging, &format!("{round}.hang"), 1)).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        rabbit.stop_app();
        // The outbox takes submits while the broker is away.
        for i in 0..3 {
            tasks.push(submit(&stack, &task(&fine, &format!("{round}.outage.{i}"), 1)).await);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        rabbit.start_app();
        let back = tokio::time::Instant::now();
        for proc in services(&stack) {
            let left = RECOVERY.saturating_sub(back.elapsed());
            eventually(
                &format!("round {round}: {} ready after the restart", proc.url("")),
                left,
                || async { (status_of(proc, "/readyz").await == Some(200)).then_some(()) },
            )
            .await;
        }
        // Consuming, not only connected: a probe task crosses the relay, the generator
        // and the sender within the same 30 s.
        let probe = submit(&stack, &task(&fine, &format!("{round}.probe"), 1)).await;
        let left = RECOVERY.saturating_sub(back.elapsed());
        all_terminal(
            &stack,
            &[&fine],
            std::slice::from_ref(&probe),
            left,
            &format!("round {round}: the probe task"),
        )
        .await;
        tasks.push(probe);
    }
    all_terminal(
        &stack,
        &[&fine, &slow],
        &tasks,
        Duration::from_secs(240),
        "after 20 restarts",
    )
    .await;
    for proc in services(&stack) {
        assert_eq!(status_of(proc, "/healthz").await, Some(200));
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_consumer_gone_longer_than_the_grace_turns_healthz_503() {
    const STALL: Duration = Duration::from_secs(5);
    let rabbit = PrivateRabbit::start();
    let stack = stack_on(&rabbit, &[("CONDUIT__HEALTH__STALL_SECONDS", "5")]).await;
    // Idle is not stalled: with nothing to consume for twice the grace, every service
    // stays live.
    let idle_until = tokio::time::Instant::now() + STALL * 2;
    while tokio::time::Instant::now() < idle_until {
        for proc in services(&stack) {
            assert_eq!(
                status_of(proc, "/healthz").await,
                Some(200),
                "{} is idle, not stalled",
                proc.url("")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The broker goes away for good: every consumer (and the API's relay) is gone.
    rabbit.stop_app();
    let gone = tokio::time::Instant::now();
    for proc in services(&stack) {
        // Within the grace plus a heartbeat tick and the probe's own latency, and not
        // before the grace minus the tick (the last beat came up to a tick before).
        let left = (STALL + Duration::from_secs(3)).saturating_sub(gone.elapsed());
        eventually(&format!("{} /healthz 503", proc.url("")), left, || async {
            (status_of(proc, "/healthz").await == Some(503)).then_some(())
        })
        .await;
        assert!(
            gone.elapsed() >= STALL - Duration::from_millis(1500),
            "{} turned /healthz 503 {:?} after the broker went, before the grace was over",
            proc.url(""),
            gone.elapsed()
        );
    }
    // The API serves from its database: it stays in its Service while the broker is away.
    assert_eq!(status_of(&stack.api, "/readyz").await, Some(200));
    for proc in stack.generators.iter().chain(&stack.senders) {
        assert_eq!(status_of(proc, "/readyz").await, Some(503));
    }
    rabbit.start_app();
    for proc in services(&stack) {
        eventually(
            &format!("{} live again", proc.url("")),
            RECOVERY,
            || async { (status_of(proc, "/healthz").await == Some(200)).then_some(()) },
        )
        .await;
    }
    stack.stop().await;
}
