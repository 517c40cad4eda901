//! Restarts of the shared RabbitMQ and PostgreSQL during a burst. These disturb every
//! other test on the machine, so they are ignored by a plain `cargo test` and run by
//! `scripts/test` on their own, one at a time, after everything else.

use std::{process::Command, time::Duration};

use conduit_testkit::{eventually, Receiver, Stack};
use serde_json::json;

const LONG: Duration = Duration::from_secs(240);

fn tiny(receiver: &Receiver, i: usize) -> serde_json::Value {
    json!({
        "model": "local-video",
        "prompt": format!("restart burst task {i}"),
        "duration": 1,
        "fps": 1,
        "size": "64x64",
        "webhook_url": receiver.url("/hook"),
        "webhook_events": ["completed", "failed"],
    })
}

fn run(cmd: &str) {
    let status = Command::new("bash")
        .args(["-c", cmd])
        .status()
        .expect("run command");
    assert!(status.success(), "{cmd} failed");
}

async fn all_completed(receiver: &Receiver, tasks: &[String]) {
    eventually("every terminal webhook", LONG, || async {
        let hooks = receiver.received();
        tasks
            .iter()
            .all(|t| {
                hooks.iter().any(|h| {
                    let b = h.json();
                    b["task_id"] == t.as_str() && b["status"] == "completed"
                })
            })
            .then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "restarts the shared RabbitMQ; run by scripts/test after the other tests"]
async fn rabbitmq_restart_during_a_burst_loses_nothing() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        tasks.push(stack.submit_ok(&tiny(&receiver, i)).await);
    }
    run("rabbitmqctl stop_app");
    // Submits keep working while the broker is away: the outbox holds the jobs.
    for i in 30..40 {
        tasks.push(stack.submit_ok(&tiny(&receiver, i)).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    run("rabbitmqctl start_app && rabbitmqctl await_startup");
    all_completed(&receiver, &tasks).await;
    stack.stop().await;
}

#[tokio::test]
#[ignore = "restarts the shared PostgreSQL; run by scripts/test after the other tests"]
async fn postgresql_restart_during_a_burst_loses_nothing() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        tasks.push(stack.submit_ok(&tiny(&receiver, i)).await);
    }
    run("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main restart");
    // While the database comes back a submit may answer 503; a retried submit with the
    // same Idempotency-Key lands exactly once.
    for i in 30..40 {
        let key = format!("restart-{i}");
        let task = eventually("a submit after the restart", LONG, || async {
            let r = stack
                .http
                .post(stack.api_url("/v1/videos/generations/async"))
                .bearer_auth(&stack.key)
                .header("Idempotency-Key", &key)
                .json(&tiny(&receiver, i))
                .send()
                .await
                .ok()?;
            if r.status() == 202 {
                let body: serde_json::Value = r.json().await.ok()?;
                body["task_id"].as_str().map(str::to_owned)
            } else {
                assert_eq!(
                    r.status(),
                    503,
                    "a submit during the outage must be 202 or 503"
                );
                None
            }
        })
        .await;
        tasks.push(task);
    }
    all_completed(&receiver, &tasks).await;
    stack.stop().await;
}
