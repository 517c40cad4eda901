//! The delivery log (attempt outcomes from the senders) and redelivery.

use conduit_core::{
    messages::{AttemptOutcome, DeliveryState, StatusKind, SCHEMA_VERSION},
    payload::WebhookEvent,
    storage::video_key,
    time::now_millis,
    topology::route,
    Source,
};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{body, eventually, TestApp, TIMEOUT};

async fn completed_task(app: &TestApp) -> (Uuid, Value) {
    let mut b = body();
    b["webhook_url"] = json!("https://example.com/hook");
    b["webhook_headers"] = json!({"Authorization": "Bearer receiver-secret"});
    let id = app.submit_ok(&b).await;
    app.status_event(
        id,
        1,
        1,
        StatusKind::Completed {
            video_key: video_key(id, 1),
            generation_duration_seconds: 3.0,
            model: None,
        },
    )
    .await;
    app.wait_status(id, "completed").await;
    let log = app.webhook_log(id).await;
    (id, log[0].clone())
}

fn outcome(
    id: Uuid,
    webhook_id: &str,
    attempt: u32,
    code: Option<u16>,
    state: DeliveryState,
) -> AttemptOutcome {
    AttemptOutcome {
        v: SCHEMA_VERSION,
        webhook_id: webhook_id.to_owned(),
        task_id: id,
        event: WebhookEvent::Completed,
        attempt,
        attempted_at: now_millis(),
        duration_ms: 12,
        status_code: code,
        error: code.is_none().then(|| "connection refused".to_owned()),
        state,
        next_attempt_at: (state == DeliveryState::Pending)
            .then(|| now_millis() + chrono::Duration::seconds(5)),
    }
}

#[tokio::test]
async fn attempt_outcomes_fill_the_delivery_log() {
    let app = TestApp::spawn().await;
    let (id, entry) = completed_task(&app).await;
    assert_eq!(entry["status"], "pending");
    assert!(entry["next_attempt_at"].is_string());
    let webhook_id = entry["webhook_id"].as_str().unwrap().to_owned();

    let failed = outcome(id, &webhook_id, 1, None, DeliveryState::Pending);
    app.publish(route::OUTCOMES, &failed).await;
    app.publish(route::OUTCOMES, &failed).await; // a duplicate changes nothing
    eventually("the failed attempt in the log", TIMEOUT, || async {
        let log = app.webhook_log(id).await;
        (log[0]["attempts"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    app.publish(
        route::OUTCOMES,
        &outcome(id, &webhook_id, 2, Some(200), DeliveryState::Delivered),
    )
    .await;
    let entry = eventually("the delivery in the log", TIMEOUT, || async {
        let log = app.webhook_log(id).await;
        (log[0]["status"] == "delivered").then(|| log[0].clone())
    })
    .await;
    let attempts = entry["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{entry}");
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["error"], "connection refused");
    assert!(attempts[0].get("status_code").is_none());
    assert_eq!(attempts[1]["status_code"], 200);
    assert_eq!(attempts[1]["duration_ms"], 12);
    assert!(entry.get("next_attempt_at").is_none(), "only while pending");
    assert_eq!(entry["event"], "completed");
    assert_eq!(entry["webhook_type"], "video_generation_completed");
    app.stop().await;
}

#[tokio::test]
async fn redeliver_resends_the_latest_terminal_webhook_with_its_id() {
    let app = TestApp::spawn().await;
    let mut hooks = app.collect(Source::Queue(route::WEBHOOKS.into()));
    let (id, entry) = completed_task(&app).await;
    let first = hooks.next().await;
    let webhook_id = entry["webhook_id"].as_str().unwrap().to_owned();
    assert_eq!(first["webhook_id"], webhook_id);
    app.publish(
        route::OUTCOMES,
        &outcome(id, &webhook_id, 3, Some(500), DeliveryState::Failed),
    )
    .await;
    eventually("the failure in the log", TIMEOUT, || async {
        (app.webhook_log(id).await[0]["status"] == "failed").then_some(())
    })
    .await;

    let (status, json) = app
        .post(&format!(
            "/v1/videos/generations/tasks/{id}/webhooks/redeliver"
        ))
        .await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(json["webhook_id"], webhook_id);
    assert_eq!(json["event"], "completed");
    let again = hooks.next().await;
    assert_eq!(again["webhook_id"], webhook_id);
    assert_eq!(again["attempts_made"], 0);
    assert_eq!(
        again["body"], first["body"],
        "the same event, byte for byte"
    );
    assert_eq!(again["secret"], app.secret);
    assert_eq!(again["headers"]["Authorization"], "Bearer receiver-secret");
    assert_eq!(app.webhook_log(id).await[0]["status"], "pending");
    app.stop().await;
}

#[tokio::test]
async fn redeliver_needs_a_terminal_webhook() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    let (status, json) = app
        .post(&format!(
            "/v1/videos/generations/tasks/{id}/webhooks/redeliver"
        ))
        .await;
    assert_eq!(status, 409, "{json}");
    assert_eq!(json["error"]["code"], "invalid_operation");
    let (status, _) = app
        .post(&format!(
            "/v1/videos/generations/tasks/{}/webhooks/redeliver",
            Uuid::now_v7()
        ))
        .await;
    assert_eq!(status, 404);
    app.stop().await;
}

#[tokio::test]
async fn the_log_of_a_task_without_webhooks_is_empty() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    let (status, json) = app
        .get(&format!("/v1/videos/generations/tasks/{id}/webhooks"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(json, json!({"data": []}));
    app.stop().await;
}
