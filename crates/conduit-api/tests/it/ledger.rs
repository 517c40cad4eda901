//! The task ledger, fed by this test acting as the generator: the state machine, the
//! webhook events it writes, and the events it must drop.

use std::time::Duration;

use conduit_core::{
    messages::{AttemptOutcome, DeliveryState, StatusKind, SCHEMA_VERSION},
    payload::{WebhookEvent, CANCELLED_ERROR},
    storage::video_key,
    time::now_millis,
    topology::route,
    Source,
};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{body, eventually, TestApp, TIMEOUT};

fn hooked() -> Value {
    let mut b = body();
    b["webhook_url"] = json!("https://example.com/hook");
    b["webhook_headers"] = json!({"X-Custom-Header": "custom-value"});
    b
}

fn progress(percent: u8) -> StatusKind {
    StatusKind::Progress {
        percent,
        message: format!("Rendering {percent}%"),
        eta_seconds: Some(10),
    }
}

/// The sender's word that `webhook_id` was delivered.
fn settled(task_id: Uuid, webhook_id: &str, event: WebhookEvent) -> AttemptOutcome {
    AttemptOutcome {
        v: SCHEMA_VERSION,
        webhook_id: webhook_id.to_owned(),
        task_id,
        event,
        attempt: 1,
        attempted_at: now_millis(),
        duration_ms: 5,
        status_code: Some(200),
        error: None,
        state: DeliveryState::Delivered,
        next_attempt_at: None,
    }
}

fn completed(id: Uuid, attempt: i32) -> StatusKind {
    StatusKind::Completed {
        video_key: video_key(id, attempt),
        generation_duration_seconds: 4.25,
        model: None,
    }
}

pub(crate) async fn ledger_count(app: &TestApp, result: &str) -> f64 {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("conduit_api_ledger_events_total")
                && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends one event and waits until the ledger handled it, so events apply in order (the
/// ledger handles deliveries concurrently, and order is what these tests are about).
async fn feed(
    app: &TestApp,
    id: Uuid,
    attempt: i32,
    seq: u64,
    kind: StatusKind,
    handled_before: f64,
) {
    app.status_event(id, attempt, seq, kind).await;
    wait_handled(app, handled_before + 1.0).await;
}

pub(crate) async fn wait_handled(app: &TestApp, events: f64) {
    eventually("the ledger to handle every event", TIMEOUT, || async {
        let total = ledger_count(app, "applied").await
            + ledger_count(app, "duplicate_or_stale").await
            + ledger_count(app, "after_terminal").await
            + ledger_count(app, "other_attempt").await
            + ledger_count(app, "unknown_task").await;
        (total >= events).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_task_runs_through_processing_progress_and_completed() {
    let app = TestApp::spawn().await;
    let mut hooks = app.collect(Source::Queue(route::WEBHOOKS.into()));
    let id = app.submit_ok(&hooked()).await;
    app.status_event(
        id,
        1,
        1,
        StatusKind::Processing {
            message: "Starting".into(),
        },
    )
    .await;
    let t = app.wait_status(id, "processing").await;
    assert_eq!(t["message"], "Starting");

    app.status_event(id, 1, 2, progress(40)).await;
    let t = eventually("progress 40", TIMEOUT, || async {
        let t = app.task(id).await;
        (t["progress"] == 40).then_some(t)
    })
    .await;
    assert_eq!(t["estimated_seconds_remaining"], 10);
    assert_eq!(t["message"], "Rendering 40%");
    let hook = hooks.next().await;
    assert_eq!(hook["event"], "progress");
    assert_eq!(hook["url"], "https://example.com/hook");
    assert_eq!(hook["headers"]["X-Custom-Header"], "custom-value");
    assert_eq!(hook["secret"], app.secret);
    assert_eq!(hook["attempts_made"], 0);
    let payload: Value = serde_json::from_str(hook["body"].as_str().unwrap()).unwrap();
    assert_eq!(payload["status"], "processing");
    assert_eq!(payload["webhook_type"], "video_generation_progress");
    assert_eq!(payload["progress_percentage"], 40);
    assert_eq!(payload["estimated_seconds_remaining"], 10);
    assert_eq!(payload["task_id"], id.to_string());
    // The sender settles the progress webhook, so the task's next one is released at once.
    app.publish(
        route::OUTCOMES,
        &settled(
            id,
            hook["webhook_id"].as_str().unwrap(),
            WebhookEvent::Progress,
        ),
    )
    .await;
    eventually("the progress webhook settled", TIMEOUT, || async {
        let log = app.webhook_log(id).await;
        (log[0]["status"] == "delivered").then_some(())
    })
    .await;

    app.status_event(id, 1, 3, completed(id, 1)).await;
    let t = app.wait_status(id, "completed").await;
    assert_eq!(t["progress"], 100);
    assert_eq!(t["message"], "Video generation completed");
    assert_eq!(t["generation_duration_seconds"], 4.25);
    assert!(t["completed_at"].is_string());
    assert!(t.get("estimated_seconds_remaining").is_none());
    assert!(t.get("error").is_none());
    let video_url = t["video_url"].as_str().unwrap();
    assert!(video_url.starts_with(&format!(
        "{}/v1/videos/files/{id}?expires=",
        app.settings.public_base_url
    )));
    let hook = hooks.next().await;
    assert_eq!(hook["event"], "completed");
    assert!(hook["webhook_id"].as_str().unwrap().starts_with("msg_"));
    let payload: Value = serde_json::from_str(hook["body"].as_str().unwrap()).unwrap();
    let mut keys: Vec<&str> = payload
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "generation_duration_seconds",
            "model",
            "prompt",
            "status",
            "task_id",
            "timestamp",
            "video_url",
            "webhook_type"
        ]
    );
    assert_eq!(payload["status"], "completed");
    assert_eq!(payload["webhook_type"], "video_generation_completed");
    assert_eq!(
        payload["video_url"], video_url,
        "polling and the webhook agree"
    );
    assert_eq!(payload["timestamp"], t["completed_at"]);
    assert_eq!(payload["prompt"], body()["prompt"]);

    let log = app.webhook_log(id).await;
    let events: Vec<&str> = log.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["progress", "completed"]);
    assert_eq!(log[0]["status"], "delivered");
    assert_eq!(log[1]["status"], "pending");
    assert_eq!(log[1]["webhook_id"], hook["webhook_id"]);
    assert_eq!(log[1]["webhook_type"], "video_generation_completed");
    app.stop().await;
}

#[tokio::test]
async fn duplicate_and_stale_events_are_dropped() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&hooked()).await;
    feed(
        &app,
        id,
        1,
        1,
        StatusKind::Processing {
            message: "Starting".into(),
        },
        0.0,
    )
    .await;
    feed(&app, id, 1, 3, progress(50), 1.0).await;
    feed(&app, id, 1, 2, progress(20), 2.0).await; // stale
    feed(&app, id, 1, 3, progress(50), 3.0).await; // duplicate
    feed(&app, id, 1, 3, progress(60), 4.0).await; // same seq, other content: still a duplicate
    let t = app.task(id).await;
    assert_eq!(t["progress"], 50);
    assert_eq!(ledger_count(&app, "duplicate_or_stale").await, 3.0);
    let log = app.webhook_log(id).await;
    assert_eq!(log.len(), 1, "one progress webhook: {log:?}");
    app.stop().await;
}

#[tokio::test]
async fn nothing_changes_a_terminal_task() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&hooked()).await;
    feed(
        &app,
        id,
        1,
        1,
        StatusKind::Processing {
            message: "Starting".into(),
        },
        0.0,
    )
    .await;
    feed(
        &app,
        id,
        1,
        2,
        StatusKind::Failed {
            error: "Insufficient credits for video generation".into(),
        },
        1.0,
    )
    .await;
    let t = app.wait_status(id, "failed").await;
    assert_eq!(t["error"], "Insufficient credits for video generation");
    assert!(t["completed_at"].is_string());
    app.status_event(id, 1, 3, progress(90)).await;
    app.status_event(id, 1, 4, completed(id, 1)).await;
    wait_handled(&app, 4.0).await;
    assert_eq!(ledger_count(&app, "after_terminal").await, 2.0);
    let t = app.task(id).await;
    assert_eq!(t["status"], "failed");
    assert!(t.get("video_url").is_none());
    let log = app.webhook_log(id).await;
    let events: Vec<&str> = log.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["failed"], "no progress after the terminal state");
    app.stop().await;
}

#[tokio::test]
async fn events_of_another_attempt_or_task_are_dropped() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    app.status_event(
        id,
        2,
        1,
        StatusKind::Processing {
            message: "wrong attempt".into(),
        },
    )
    .await;
    app.status_event(
        Uuid::now_v7(),
        1,
        1,
        StatusKind::Processing {
            message: "nobody".into(),
        },
    )
    .await;
    wait_handled(&app, 2.0).await;
    assert_eq!(app.task(id).await["status"], "pending");
    assert_eq!(ledger_count(&app, "other_attempt").await, 1.0);
    assert_eq!(ledger_count(&app, "unknown_task").await, 1.0);
    app.stop().await;
}

#[tokio::test]
async fn webhook_events_filter_what_is_recorded() {
    let app = TestApp::spawn().await;
    let mut b = hooked();
    b["webhook_events"] = json!(["completed"]);
    let id = app.submit_ok(&b).await;
    app.status_event(id, 1, 1, progress(30)).await;
    app.status_event(id, 1, 2, completed(id, 1)).await;
    app.wait_status(id, "completed").await;
    let log = app.webhook_log(id).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["event"], "completed");
    // Without a webhook_url nothing is recorded at all.
    let plain = app.submit_ok(&body()).await;
    app.status_event(plain, 1, 1, completed(plain, 1)).await;
    app.wait_status(plain, "completed").await;
    assert!(app.webhook_log(plain).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn retry_runs_a_failed_task_as_a_new_attempt() {
    let app = TestApp::spawn().await;
    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    let id = app.submit_ok(&hooked()).await;
    assert_eq!(jobs.next().await["attempt"], 1);
    let (status, json) = app
        .post(&format!("/v1/videos/generations/tasks/{id}/retry"))
        .await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (409, Some("invalid_operation")),
        "pending cannot be retried"
    );

    app.status_event(
        id,
        1,
        1,
        StatusKind::Failed {
            error: "provider said no".into(),
        },
    )
    .await;
    app.wait_status(id, "failed").await;
    let r = app
        .http
        .post(app.url(&format!("/v1/videos/generations/tasks/{id}/retry")))
        .bearer_auth(&app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().contains_key("location"));
    let json: Value = r.json().await.unwrap();
    assert_eq!(json["task_id"], id.to_string());
    assert_eq!(json["status"], "pending");
    let t = app.task(id).await;
    assert_eq!(t["status"], "pending");
    assert_eq!(t["progress"], 0);
    assert!(t.get("error").is_none() && t.get("completed_at").is_none());
    let job = jobs.next().await;
    assert_eq!(job["task_id"], id.to_string());
    assert_eq!(job["attempt"], 2);

    // Late events of the first attempt change nothing; the new attempt's do.
    app.status_event(id, 1, 2, progress(80)).await;
    app.status_event(
        id,
        2,
        1,
        StatusKind::Processing {
            message: "again".into(),
        },
    )
    .await;
    app.wait_status(id, "processing").await;
    assert_eq!(app.task(id).await["progress"], 0);
    app.status_event(id, 2, 2, completed(id, 2)).await;
    app.wait_status(id, "completed").await;
    let log = app.webhook_log(id).await;
    let events: Vec<&str> = log.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["failed", "completed"]);
    assert_ne!(
        log[0]["webhook_id"], log[1]["webhook_id"],
        "a new attempt's events get new ids"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_cancelled_task_can_be_retried() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    assert_eq!(
        app.delete(&format!("/v1/videos/generations/{id}")).await.0,
        204
    );
    let t = app.task(id).await;
    assert_eq!(t["error"], CANCELLED_ERROR);
    let (status, _) = app
        .post(&format!("/v1/videos/generations/tasks/{id}/retry"))
        .await;
    assert_eq!(status, 202);
    assert_eq!(app.task(id).await["status"], "pending");
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.stop().await;
}

#[tokio::test]
async fn a_taken_over_job_completes_even_when_its_sequence_starts_again() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    feed(
        &app,
        id,
        1,
        1,
        StatusKind::Processing {
            message: "first worker".into(),
        },
        0.0,
    )
    .await;
    feed(&app, id, 1, 5, progress(50), 1.0).await;
    // The first generator is lost; another takes the job over and numbers from 1 again.
    feed(
        &app,
        id,
        1,
        1,
        StatusKind::Processing {
            message: "second worker".into(),
        },
        2.0,
    )
    .await;
    assert_eq!(
        app.task(id).await["progress"],
        50,
        "a restarted sequence's progress is stale"
    );
    feed(&app, id, 1, 2, completed(id, 1), 3.0).await;
    app.wait_status(id, "completed").await;
    // A duplicate terminal event (the first generator was only slow) changes nothing.
    feed(
        &app,
        id,
        1,
        9,
        StatusKind::Failed {
            error: "late".into(),
        },
        4.0,
    )
    .await;
    let t = app.task(id).await;
    assert_eq!(t["status"], "completed");
    assert!(t.get("error").is_none());
    app.stop().await;
}

/// At most one webhook per task in flight, whatever the number of senders: an event
/// recorded while the previous webhook is unsettled waits, progress that piles up
/// meanwhile is coalesced to the newest, and the outcome that settles the previous one
/// releases the next.
#[tokio::test]
async fn a_tasks_next_webhook_waits_until_the_previous_one_is_settled() {
    let app = TestApp::spawn().await;
    let mut hooks = app.collect(Source::Queue(route::WEBHOOKS.into()));
    let id = app.submit_ok(&hooked()).await;
    app.status_event(
        id,
        1,
        1,
        StatusKind::Processing {
            message: "Starting".into(),
        },
    )
    .await;
    app.status_event(id, 1, 2, progress(10)).await;
    let first = hooks.next().await;
    assert_eq!(first["event"], "progress");

    // While the first is in flight: two more progress events and the terminal one.
    app.status_event(id, 1, 3, progress(40)).await;
    app.status_event(id, 1, 4, progress(70)).await;
    app.status_event(id, 1, 5, completed(id, 1)).await;
    app.wait_status(id, "completed").await;
    assert!(
        hooks.drain_for(Duration::from_millis(500)).await.is_empty(),
        "a webhook was released while the task's previous one was in flight"
    );
    let log = app.webhook_log(id).await;
    let statuses: Vec<&str> = log.iter().map(|e| e["status"].as_str().unwrap()).collect();
    // The superseded progress is dropped; the terminal one waits (pending, not yet due).
    assert_eq!(statuses, ["pending", "dropped", "dropped", "pending"]);
    assert!(log[3].get("next_attempt_at").is_none() || log[3]["next_attempt_at"].is_null());

    // A retry scheduled for the first releases nothing; its final outcome does.
    let mut retrying = settled(
        id,
        first["webhook_id"].as_str().unwrap(),
        WebhookEvent::Progress,
    );
    retrying.state = DeliveryState::Pending;
    retrying.status_code = Some(500);
    retrying.next_attempt_at = Some(now_millis() + chrono::Duration::seconds(5));
    app.publish(route::OUTCOMES, &retrying).await;
    assert!(hooks.drain_for(Duration::from_millis(500)).await.is_empty());
    let mut done = settled(
        id,
        first["webhook_id"].as_str().unwrap(),
        WebhookEvent::Progress,
    );
    done.attempt = 2;
    done.attempted_at = now_millis();
    app.publish(route::OUTCOMES, &done).await;
    let next = hooks.next().await;
    assert_eq!(next["event"], "completed");
    assert_eq!(next["webhook_id"], log[3]["webhook_id"]);
    assert!(hooks.drain_for(Duration::from_millis(300)).await.is_empty());
    app.stop().await;
}
