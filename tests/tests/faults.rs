//! Fault tests on a stack's own processes: `kill -9` of each service mid-work, and
//! scaling out. Each asserts that nothing is lost: every terminal webhook arrives at
//! least once, and every copy of one event carries the same `webhook-id`.

use std::{collections::BTreeMap, time::Duration};

use conduit_testkit::{eventually, ReceivedWebhook, Receiver, Stack, StackOptions};
use serde_json::json;

const LONG: Duration = Duration::from_secs(180);

/// A tiny, fast task: one 64x64 frame.
fn tiny(receiver: &Receiver, i: usize) -> serde_json::Value {
    json!({
        "model": "local-video",
        "prompt": format!("burst task number {i}"),
        "duration": 1,
        "fps": 1,
        "size": "64x64",
        "webhook_url": receiver.url("/hook"),
        "webhook_events": ["completed", "failed", "cancelled"],
    })
}

/// Terminal webhooks by task id.
fn terminal_by_task(hooks: &[ReceivedWebhook]) -> BTreeMap<String, Vec<ReceivedWebhook>> {
    let mut map: BTreeMap<String, Vec<ReceivedWebhook>> = BTreeMap::new();
    for h in hooks {
        let b = h.json();
        if b["webhook_type"] == "video_generation_completed" {
            map.entry(b["task_id"].as_str().expect("task_id").to_owned())
                .or_default()
                .push(h.clone());
        }
    }
    map
}

/// Waits until every task has its terminal webhook; checks ids are stable.
async fn assert_all_delivered(receiver: &Receiver, tasks: &[String]) {
    eventually("every terminal webhook", LONG, || async {
        let got = terminal_by_task(&receiver.received());
        tasks.iter().all(|t| got.contains_key(t)).then_some(())
    })
    .await;
    for (task, copies) in terminal_by_task(&receiver.received()) {
        let first = copies[0].header("webhook-id").expect("webhook-id header");
        assert!(
            copies.iter().all(|c| c.header("webhook-id") == Some(first)),
            "task {task}: duplicate deliveries carry different webhook-ids"
        );
        assert_eq!(
            copies[0].json()["status"],
            "completed",
            "task {task} did not complete"
        );
    }
}

#[tokio::test]
async fn sender_killed_mid_burst_loses_no_webhook() {
    let mut stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        tasks.push(stack.submit_ok(&tiny(&receiver, i)).await);
    }
    eventually("some webhooks before the kill", LONG, || async {
        (terminal_by_task(&receiver.received()).len() >= 10).then_some(())
    })
    .await;
    stack.senders[0].kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.senders[0].restart();
    stack.senders[0]
        .wait_ready(Stack::READY)
        .await
        .expect("restarted and ready");
    assert_all_delivered(&receiver, &tasks).await;
    stack.stop().await;
}

#[tokio::test]
async fn generator_killed_mid_render_has_its_job_taken_over() {
    let mut stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let task = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "A render interrupted halfway",
            // 1800 frames at 720p: long enough to be caught mid-render.
            "duration": 60,
            "size": "1280x720",
            "fps": 30,
            "webhook_url": receiver.url("/hook"),
        }))
        .await;
    eventually("render progress", LONG, || async {
        let t = stack.task(&task).await;
        (t["status"] == "processing" && t["progress"].as_i64().unwrap_or(0) >= 10).then_some(())
    })
    .await;
    stack.generators[0].kill9();
    stack.generators[0].restart();
    stack.generators[0]
        .wait_ready(Stack::READY)
        .await
        .expect("restarted and ready");
    assert_all_delivered(&receiver, std::slice::from_ref(&task)).await;
    let t = stack.task(&task).await;
    assert_eq!(t["status"], "completed");
    stack.stop().await;
}

#[tokio::test]
async fn api_killed_with_tasks_in_flight_loses_nothing() {
    let mut stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        tasks.push(stack.submit_ok(&tiny(&receiver, i)).await);
    }
    stack.api.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.api.restart();
    stack
        .api
        .wait_ready(Stack::READY)
        .await
        .expect("restarted and ready");
    assert_all_delivered(&receiver, &tasks).await;
    for t in &tasks {
        assert_eq!(stack.task(t).await["status"], "completed");
    }
    stack.stop().await;
}

#[tokio::test]
async fn two_generators_and_two_senders_share_the_work() {
    let stack = Stack::start_with(StackOptions {
        generators: 2,
        senders: 2,
        generator_concurrency: 1,
        ..Default::default()
    })
    .await;
    let receiver = Receiver::start().await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut body = tiny(&receiver, i);
        // Long enough that one generator cannot take every job alone.
        body["size"] = json!("320x180");
        body["fps"] = json!(12);
        tasks.push(stack.submit_ok(&body).await);
    }
    assert_all_delivered(&receiver, &tasks).await;
    for (role, procs, counter) in [
        (
            "generator",
            &stack.generators,
            "conduit_generator_jobs_completed_total",
        ),
        (
            "sender",
            &stack.senders,
            "conduit_webhook_attempts_total{outcome=\"delivered\"}",
        ),
    ] {
        for (i, p) in procs.iter().enumerate() {
            let handled = counter_value(&stack.http, p.port, counter).await;
            assert!(handled > 0.0, "{role} {i} handled none of the tasks");
        }
    }
    stack.stop().await;
}

/// The value of one counter (name with its labels, as printed) on a process's `/metrics`.
async fn counter_value(http: &reqwest::Client, port: u16, series: &str) -> f64 {
    let text = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("metrics request")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
