//! Batch delivery, a per-task retry schedule and a secret rotation through the three real
//! binaries; signatures checked by the reference Python `standardwebhooks` library.

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use conduit_testkit::{
    eventually, signature_is_valid, ReceivedWebhook, Receiver, Reply, Stack, StackOptions,
};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(180);

/// A quick render: one 64x64 frame.
fn tiny(receiver: &Receiver) -> Value {
    json!({
        "model": "local-video",
        "prompt": "a dot",
        "duration": 1,
        "size": "64x64",
        "fps": 1,
        "webhook_url": receiver.url("/hooks"),
    })
}

/// Verifies every webhook with the reference library and `secret`; false when the
/// library is not installed (the check is skipped then, loudly).
async fn reference_verifies(secret: &str, hooks: &[ReceivedWebhook]) -> bool {
    let present = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!("SKIPPED the reference-library check: `python3 -m pip install standardwebhooks`");
        return false;
    }
    const SCRIPT: &str = r#"
import json, sys
from standardwebhooks import Webhook
cases = json.load(sys.stdin)
for c in cases:
    Webhook(c["secret"]).verify(c["body"].encode(), c["headers"])
print(len(cases))
"#;
    let cases: Vec<Value> = hooks
        .iter()
        .map(|h| {
            // The reference library takes the headers as a mapping.
            let headers: std::collections::BTreeMap<&str, &str> = h
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            json!({"secret": secret, "body": h.body, "headers": headers})
        })
        .collect();
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(&serde_json::to_vec(&cases).expect("cases"))
            .await
            .expect("cases written");
    }
    let out = child.wait_with_output().await.expect("python3 finishes");
    assert!(
        out.status.success(),
        "the reference library refused a webhook: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        hooks.len().to_string()
    );
    true
}

#[tokio::test]
async fn two_hundred_tasks_arrive_in_far_fewer_verified_batches() {
    let stack = Stack::start_with(StackOptions {
        generator_concurrency: 4,
        ..StackOptions::default()
    })
    .await;
    let receiver = Receiver::start().await;
    let mut tasks = BTreeSet::new();
    for _ in 0..200 {
        let mut b = tiny(&receiver);
        b["webhook_events"] = json!(["completed"]);
        b["webhook_batch"] = json!({"max_events": 100, "max_wait_ms": 2000});
        tasks.insert(stack.submit_ok(&b).await);
    }
    let events = eventually("200 completed events in batches", LONG, || async {
        let mut events = Vec::new();
        for hook in receiver.received() {
            let body = hook.json();
            assert_eq!(body["webhook_type"], "batch", "{body}");
            for e in body["events"].as_array().expect("events") {
                events.push(e.clone());
            }
        }
        (events.len() >= 200).then_some(events)
    })
    .await;
    let hooks = receiver.received();
    assert!(hooks.len() <= 40, "200 events took {} POSTs", hooks.len());
    let mut seen_tasks = BTreeSet::new();
    let mut seen_ids = BTreeSet::new();
    for e in &events {
        assert_eq!(e["payload"]["status"], "completed");
        assert_eq!(e["payload"]["webhook_type"], "video_generation_completed");
        seen_tasks.insert(e["payload"]["task_id"].as_str().unwrap().to_owned());
        assert!(seen_ids.insert(e["webhook_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(seen_tasks, tasks);
    for h in &hooks {
        assert!(signature_is_valid(
            &stack.secret,
            h.header("webhook-id").unwrap(),
            h.header("webhook-timestamp").unwrap(),
            &h.body,
            h.header("webhook-signature").unwrap(),
        ));
    }
    reference_verifies(&stack.secret, &hooks).await;

    // The delivery log keeps one entry per event, delivered under the event's own id.
    let some = tasks.iter().next().unwrap();
    let (status, log) = stack
        .get(&format!("/v1/videos/generations/tasks/{some}/webhooks"))
        .await;
    assert_eq!(status, 200);
    let entries = log["data"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{log}");
    eventually(
        "the event delivered in the log",
        Duration::from_secs(20),
        || async {
            let (_, log) = stack
                .get(&format!("/v1/videos/generations/tasks/{some}/webhooks"))
                .await;
            (log["data"][0]["status"] == "delivered").then_some(())
        },
    )
    .await;
    assert!(seen_ids.contains(entries[0]["webhook_id"].as_str().unwrap()));
    stack.stop().await;
}

#[tokio::test]
async fn a_task_schedule_of_three_attempts() {
    let stack = Stack::start_with(StackOptions {
        retry_schedule: "0s,1h".into(),
        ..StackOptions::default()
    })
    .await;
    let receiver = Receiver::scripted(vec![Reply::status(500)]).await;
    let mut b = tiny(&receiver);
    b["webhook_events"] = json!(["completed"]);
    b["webhook_retry"] = json!({"schedule": ["0s", "300ms", "300ms"]});
    let id = stack.submit_ok(&b).await;
    let log = eventually("the webhook to fail for good", LONG, || async {
        let (_, log) = stack
            .get(&format!("/v1/videos/generations/tasks/{id}/webhooks"))
            .await;
        (log["data"][0]["status"] == "failed").then_some(log)
    })
    .await;
    assert_eq!(
        log["data"][0]["attempts"].as_array().unwrap().len(),
        3,
        "{log}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 3);
    stack.stop().await;
}

#[tokio::test]
async fn webhooks_sent_during_a_rotation_verify_with_either_secret() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let rotated: Value = stack
        .http
        .post(stack.api_url("/v1/webhooks/secret/rotate"))
        .bearer_auth(&stack.key)
        .json(&json!({"overlap_seconds": 3600}))
        .send()
        .await
        .expect("rotate")
        .json()
        .await
        .expect("rotation JSON");
    let new = rotated["secret"].as_str().expect("new secret").to_owned();
    assert_ne!(new, stack.secret);
    assert_eq!(rotated["previous"]["secret"], stack.secret);
    let (_, shown) = stack.get("/v1/webhooks/secret").await;
    assert_eq!(shown, rotated);

    let mut single = tiny(&receiver);
    single["webhook_events"] = json!(["completed"]);
    let mut batched = single.clone();
    batched["webhook_batch"] = json!({"max_wait_ms": 100});
    stack.submit_ok(&single).await;
    stack.submit_ok(&batched).await;
    let hooks = eventually("both webhooks", LONG, || async {
        let got = receiver.received();
        (got.len() >= 2).then_some(got)
    })
    .await;
    for h in &hooks {
        let sig = h.header("webhook-signature").unwrap();
        assert_eq!(sig.split(' ').count(), 2, "two signatures: {sig}");
        for secret in [&new, &stack.secret] {
            assert!(signature_is_valid(
                secret,
                h.header("webhook-id").unwrap(),
                h.header("webhook-timestamp").unwrap(),
                &h.body,
                sig,
            ));
        }
    }
    assert!(hooks.iter().any(|h| h.json()["webhook_type"] == "batch"));
    if reference_verifies(&new, &hooks).await {
        reference_verifies(&stack.secret, &hooks).await;
    }
    stack.stop().await;
}
