//! Batch delivery, per-task retry schedules and signatures during a secret rotation,
//! checked against the reference Python `standardwebhooks` library where signatures
//! are concerned.

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use conduit_core::messages::{BatchSettings, DeliveryState, PreviousSecret, WebhookDelivery};
use conduit_webhook_sender::signing;
use uuid::Uuid;

use conduit_testkit::ReceivedWebhook;

use crate::{completed, delivery_of, failed, progress, Harness, Receiver, Reply, SECRET};

/// The secret a rotation replaced, in the tests below.
const OLD_SECRET: &str = "whsec_c2VjcmV0LWtleS1vdGhlcg==";

fn batched(d: WebhookDelivery, max_events: u32, max_wait_ms: u64) -> WebhookDelivery {
    WebhookDelivery {
        batch: Some(BatchSettings {
            max_events,
            max_wait_ms,
        }),
        ..d
    }
}

fn overlapping(d: WebhookDelivery, expires_in: chrono::Duration) -> WebhookDelivery {
    WebhookDelivery {
        previous_secret: Some(PreviousSecret {
            secret: OLD_SECRET.into(),
            expires_at: conduit_core::time::now_millis() + expires_in,
        }),
        ..d
    }
}

fn body_json(r: &ReceivedWebhook) -> serde_json::Value {
    serde_json::from_str(&r.body).expect("webhook body is JSON")
}

/// The event ids of a batch request, in order.
fn event_ids(r: &ReceivedWebhook) -> Vec<String> {
    body_json(r)["events"]
        .as_array()
        .expect("a batch has events")
        .iter()
        .map(|e| e["webhook_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Verifies every request with the reference library and `secret`; the number verified.
/// `None` when python3 or the library is missing (the caller skips).
async fn verify_with_reference(secret: &str, requests: &[ReceivedWebhook]) -> Option<usize> {
    let python = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !python.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIPPED the reference-library check: `python3 -m pip install standardwebhooks` \
             (scripts/test does) to run it"
        );
        return None;
    }
    const SCRIPT: &str = r#"
import json, sys
from standardwebhooks import Webhook
cases = json.load(sys.stdin)
for c in cases:
    Webhook(c["secret"]).verify(c["body"].encode(), c["headers"])
print(len(cases))
"#;
    let out = crate::python::run_with_cases(SCRIPT, secret, requests).await;
    assert!(
        out.status.success(),
        "the reference library refused a signature made with {secret}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a count"),
    )
}

#[tokio::test]
async fn two_hundred_tasks_go_out_in_far_fewer_signed_posts() {
    let mut h = Harness::new(|_| {}).await;
    let receiver = Receiver::answering(200).await;
    let app = h.start_app().await;
    let url = receiver.url("/hooks");

    let mut sent = Vec::new();
    for i in 0..200 {
        let task = Uuid::new_v4();
        let payload = if i % 10 == 0 {
            failed(task)
        } else {
            completed(task)
        };
        let d = batched(delivery_of(&url, &payload), 100, 1_000);
        h.publish(&d).await;
        sent.push(d);
    }
    let ids: Vec<String> = sent.iter().map(|d| d.webhook_id.clone()).collect();
    for o in h.finals(&ids, Duration::from_secs(60)).await {
        assert_eq!(o.state, DeliveryState::Delivered, "{o:?}");
        assert_eq!(o.status_code, Some(200));
        assert_eq!(o.attempt, 1);
    }

    let requests = receiver.received();
    assert!(
        requests.len() <= 20,
        "200 events took {} POSTs",
        requests.len()
    );
    // Every event exactly once, each payload exactly its single webhook's body.
    let mut seen = BTreeSet::new();
    for r in &requests {
        let body = body_json(r);
        assert_eq!(body["webhook_type"], "batch");
        assert!(body["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24));
        let events = body["events"].as_array().expect("events");
        assert!(!events.is_empty() && events.len() <= 100);
        for e in events {
            let id = e["webhook_id"].as_str().expect("an event id").to_owned();
            let d = sent
                .iter()
                .find(|d| d.webhook_id == id)
                .expect("a sent event");
            assert!(
                r.body.contains(&format!(r#""payload":{}"#, d.body)),
                "payload of {id} is not the single webhook's body verbatim"
            );
            assert!(seen.insert(id), "an event went out twice");
        }
        let batch_id = r.header("webhook-id").expect("a batch webhook-id");
        assert!(
            !ids.iter().any(|id| id == batch_id),
            "the batch has its own id"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(seen.len(), 200);
    if let Some(n) = verify_with_reference(SECRET, &requests).await {
        assert_eq!(n, requests.len());
    }

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_batch_leaves_out_progress_that_a_later_event_of_its_task_supersedes() {
    let mut h = Harness::new(|_| {}).await;
    let receiver = Receiver::answering(204).await;
    let app = h.start_app().await;
    let url = receiver.url("/hooks");
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let a_progress = batched(delivery_of(&url, &progress(a, 40)), 10, 1_500);
    let b_progress = batched(delivery_of(&url, &progress(b, 70)), 10, 1_500);
    let a_done = batched(delivery_of(&url, &completed(a)), 10, 1_500);
    for d in [&a_progress, &b_progress, &a_done] {
        h.publish(d).await;
    }
    let ids = [
        a_progress.webhook_id.clone(),
        b_progress.webhook_id.clone(),
        a_done.webhook_id.clone(),
    ];
    let finals = h.finals(&ids, Duration::from_secs(30)).await;
    assert_eq!(finals[0].state, DeliveryState::Dropped, "{:?}", finals[0]);
    assert!(finals[0]
        .error
        .as_deref()
        .is_some_and(|e| e.contains("superseded")));
    assert_eq!(finals[1].state, DeliveryState::Delivered);
    assert_eq!(finals[2].state, DeliveryState::Delivered);
    let requests = receiver.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(requests.len(), 1, "one batch");
    assert_eq!(
        event_ids(&requests[0]),
        vec![b_progress.webhook_id.clone(), a_done.webhook_id.clone()]
    );

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_task_schedule_of_three_attempts_replaces_the_operators() {
    // The operator's schedule would retry for hours; the task asks for three attempts.
    let mut h = Harness::new(|s| {
        s.webhooks.retry_schedule = Harness::schedule("0s,1h,1h,1h,1h");
    })
    .await;
    let receiver = Receiver::answering(500).await;
    let app = h.start_app().await;

    let d = WebhookDelivery {
        retry: Some(Harness::schedule("0s,200ms,300ms")),
        ..delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()))
    };
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    let states: Vec<_> = outcomes.iter().map(|o| (o.attempt, o.state)).collect();
    assert_eq!(
        states,
        vec![
            (1, DeliveryState::Pending),
            (2, DeliveryState::Pending),
            (3, DeliveryState::Failed),
        ]
    );
    let dead = h
        .next_dead(Duration::from_secs(10))
        .await
        .expect("the exhausted event is dead-lettered");
    let dead: WebhookDelivery = serde_json::from_slice(&dead).expect("a delivery");
    assert_eq!(dead.webhook_id, d.webhook_id);
    assert_eq!(dead.retry, d.retry, "the schedule travels with the event");
    let requests = receiver.received();
    assert_eq!(requests.len(), 3);
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(190));
    assert!(requests[2].at - requests[1].at >= Duration::from_millis(290));

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_failing_batch_retries_its_terminal_events_on_the_longest_schedule() {
    let mut h = Harness::new(|s| {
        s.webhooks.retry_schedule = Harness::schedule("0s,1h");
    })
    .await;
    let receiver = Receiver::answering(503).await;
    let app = h.start_app().await;
    let url = receiver.url("/hooks");
    // Total 500 ms (three attempts) beats total 100 ms (two attempts).
    let long = WebhookDelivery {
        retry: Some(Harness::schedule("0s,200ms,300ms")),
        ..batched(delivery_of(&url, &completed(Uuid::new_v4())), 10, 500)
    };
    let short = WebhookDelivery {
        retry: Some(Harness::schedule("0s,100ms")),
        ..batched(delivery_of(&url, &failed(Uuid::new_v4())), 10, 500)
    };
    // Without a schedule of its own a task has the operator's, the longest of all here.
    let prog = WebhookDelivery {
        retry: Some(Harness::schedule("0s")),
        ..batched(delivery_of(&url, &progress(Uuid::new_v4(), 10)), 10, 500)
    };
    for d in [&long, &short, &prog] {
        h.publish(d).await;
    }
    for d in [&long, &short] {
        let outcomes = h
            .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
            .await;
        let states: Vec<_> = outcomes.iter().map(|o| (o.attempt, o.state)).collect();
        assert_eq!(
            states,
            vec![
                (1, DeliveryState::Pending),
                (2, DeliveryState::Pending),
                (3, DeliveryState::Failed),
            ],
            "{}",
            d.webhook_id
        );
    }
    // A progress event is attempted once, as it would be on its own.
    let p = h
        .outcomes_until_final(&prog.webhook_id, Duration::from_secs(5))
        .await;
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].state, DeliveryState::Failed);

    let requests = receiver.received();
    assert_eq!(requests.len(), 3, "one batch, three attempts");
    let batch_id = requests[0].header("webhook-id").expect("batch id");
    assert!(requests
        .iter()
        .all(|r| r.header("webhook-id") == Some(batch_id)));
    assert_eq!(event_ids(&requests[0]).len(), 3);
    let mut retried = event_ids(&requests[1]);
    retried.sort();
    let mut terminal = vec![long.webhook_id.clone(), short.webhook_id.clone()];
    terminal.sort();
    assert_eq!(retried, terminal, "retries carry the terminal events only");
    assert!(h.next_dead(Duration::from_secs(10)).await.is_some());

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn gone_drops_every_event_of_a_batch() {
    let mut h = Harness::new(|_| {}).await;
    let receiver = Receiver::answering(410).await;
    let app = h.start_app().await;
    let url = receiver.url("/hooks");
    let ds: Vec<WebhookDelivery> = (0..3)
        .map(|_| batched(delivery_of(&url, &completed(Uuid::new_v4())), 10, 300))
        .collect();
    for d in &ds {
        h.publish(d).await;
    }
    let ids: Vec<String> = ds.iter().map(|d| d.webhook_id.clone()).collect();
    for o in h.finals(&ids, Duration::from_secs(20)).await {
        assert_eq!(o.state, DeliveryState::Dropped);
        assert_eq!(o.status_code, Some(410));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1);

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn during_a_rotation_webhooks_verify_with_either_secret() {
    let mut h = Harness::new(|_| {}).await;
    let receiver = Receiver::replying(|_, _| Reply::status(200)).await;
    let app = h.start_app().await;
    let url = receiver.url("/hooks");
    let single = overlapping(
        delivery_of(&url, &completed(Uuid::new_v4())),
        chrono::Duration::hours(1),
    );
    let in_batch = overlapping(
        batched(delivery_of(&url, &completed(Uuid::new_v4())), 10, 200),
        chrono::Duration::hours(1),
    );
    let after_overlap = overlapping(
        delivery_of(&url, &completed(Uuid::new_v4())),
        chrono::Duration::seconds(-1),
    );
    for d in [&single, &in_batch, &after_overlap] {
        h.publish(d).await;
    }
    let ids = [
        single.webhook_id.clone(),
        in_batch.webhook_id.clone(),
        after_overlap.webhook_id.clone(),
    ];
    h.finals(&ids, Duration::from_secs(20)).await;
    let requests = receiver.wait_for(3, Duration::from_secs(5)).await;
    let by_id = |id: &str| {
        requests
            .iter()
            .find(|r| r.header("webhook-id") == Some(id) || r.body.contains(id))
            .cloned()
            .expect("request")
    };
    let overlap = vec![by_id(&single.webhook_id), by_id(&in_batch.webhook_id)];
    for r in &overlap {
        let header = r.header("webhook-signature").expect("signature");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(
            parts.len(),
            2,
            "two signatures during the overlap: {header}"
        );
        let id = r.header("webhook-id").expect("id");
        let ts: i64 = r
            .header("webhook-timestamp")
            .expect("ts")
            .parse()
            .expect("ts");
        // New first, then old.
        assert_eq!(
            parts[0],
            signing::sign(SECRET, id, ts, &r.body).expect("sign")
        );
        assert_eq!(
            parts[1],
            signing::sign(OLD_SECRET, id, ts, &r.body).expect("sign")
        );
    }
    let late = by_id(&after_overlap.webhook_id);
    let header = late.header("webhook-signature").expect("signature");
    assert!(
        !header.contains(' '),
        "after the overlap one signature: {header}"
    );
    let id = late.header("webhook-id").expect("id");
    let ts: i64 = late
        .header("webhook-timestamp")
        .expect("ts")
        .parse()
        .expect("ts");
    assert!(signing::verify(SECRET, id, ts, &late.body, header));
    assert!(!signing::verify(OLD_SECRET, id, ts, &late.body, header));

    if let Some(n) = verify_with_reference(SECRET, &requests).await {
        assert_eq!(n, 3);
        assert_eq!(verify_with_reference(OLD_SECRET, &overlap).await, Some(2));
    }

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}
