//! Per-task webhook order with several senders (CONTRACT.md §4): three sender replicas,
//! one of them killed with SIGKILL mid-run, two generators, tasks that send progress,
//! half of them to a receiver that takes 1.5 s per answer. Every task's webhooks must
//! reach its receiver in the order their events happened, with no progress after the
//! terminal webhook.

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use conduit_testkit::{eventually, ReceivedWebhook, Receiver, Reply, Stack, StackOptions};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(240);
const TASKS: usize = 12;

fn task(receiver: &Receiver, i: usize) -> Value {
    json!({
        "model": "local-video",
        "prompt": format!("ordered webhooks, task number {i}"),
        // A render of a few seconds: progress webhooks go out about once a second.
        "duration": 12,
        "fps": 24,
        "size": "1280x720",
        "webhook_url": receiver.url("/hook"),
        "webhook_events": ["progress", "completed", "failed", "cancelled"],
    })
}

/// Each task's webhooks in arrival order, a repeated `webhook-id` (an attempt repeated
/// after the sender that made it was killed) counted once, at its first arrival.
fn by_task(hooks: &[ReceivedWebhook]) -> BTreeMap<String, Vec<Value>> {
    let mut seen = HashSet::new();
    let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut hooks = hooks.to_vec();
    hooks.sort_by_key(|h| h.at);
    for h in hooks {
        let id = h.header("webhook-id").unwrap_or_default().to_owned();
        if !seen.insert(id) {
            continue;
        }
        let body = h.json();
        let task = body["task_id"].as_str().unwrap_or_default().to_owned();
        map.entry(task).or_default().push(body);
    }
    map
}

fn is_terminal(body: &Value) -> bool {
    body["webhook_type"] != "video_generation_progress"
}

#[tokio::test]
async fn three_senders_one_killed_keep_each_tasks_webhooks_in_order() {
    let mut stack = Stack::start_with(StackOptions {
        generators: 2,
        senders: 3,
        ..Default::default()
    })
    .await;
    let fast = Receiver::start().await;
    let slow =
        Receiver::scripted(vec![Reply::status(200).after(Duration::from_millis(1500))]).await;
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let receiver = if i % 2 == 0 { &slow } else { &fast };
        tasks.push(stack.submit_ok(&task(receiver, i)).await);
    }
    // Mid-run: once progress is flowing, one sender dies with deliveries in hand.
    eventually("the first progress webhooks", LONG, || async {
        (slow.received().len() + fast.received().len() >= 4).then_some(())
    })
    .await;
    stack.senders[1].kill9();

    eventually("every task's terminal webhook", LONG, || async {
        let hooks = [slow.received(), fast.received()].concat();
        let got = by_task(&hooks);
        tasks
            .iter()
            .all(|t| got.get(t).is_some_and(|hs| hs.iter().any(is_terminal)))
            .then_some(())
    })
    .await;
    // Anything still in flight would arrive within a slow answer or two.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let hooks = [slow.received(), fast.received()].concat();
    let mut progress_seen = 0;
    for (task, bodies) in by_task(&hooks) {
        let mut terminal_seen = false;
        let mut last_time = String::new();
        for body in &bodies {
            let kind = body["webhook_type"].as_str().unwrap_or_default();
            let at = body["timestamp"].as_str().unwrap_or_default().to_owned();
            assert!(
                !(terminal_seen && kind == "video_generation_progress"),
                "task {task}: a progress webhook arrived after the terminal one: {bodies:#?}"
            );
            assert!(
                at >= last_time,
                "task {task}: {kind} of {at} arrived after an event of {last_time}: {bodies:#?}"
            );
            if kind == "video_generation_progress" {
                progress_seen += 1;
            } else {
                terminal_seen = true;
                assert_eq!(body["status"], "completed", "task {task} did not complete");
            }
            last_time = at;
        }
    }
    assert!(
        progress_seen >= TASKS,
        "only {progress_seen} progress webhooks for {TASKS} multi-second renders: the test proves nothing"
    );
    stack.stop().await;
}
