//! Cancel: the status changes at once, the generators are told, the cancelled webhook is
//! recorded, and a cancel racing a Completed event still ends in exactly one terminal
//! state.

use conduit_core::{
    messages::StatusKind, payload::CANCELLED_ERROR, storage::video_key, topology::route, Source,
};
use serde_json::{json, Value};

use crate::{
    helpers::{body, TestApp},
    ledger::{ledger_count, wait_handled},
};

fn hooked() -> Value {
    let mut b = body();
    b["webhook_url"] = json!("https://example.com/hook");
    b
}

#[tokio::test]
async fn cancel_marks_the_task_tells_generators_and_records_the_webhook() {
    let app = TestApp::spawn().await;
    let mut control = app.collect(Source::Control);
    let mut hooks = app.collect(Source::Queue(route::WEBHOOKS.into()));
    // The control queue is bound once the collector is consuming.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let id = app.submit_ok(&hooked()).await;
    let (status, json) = app.delete(&format!("/v1/videos/generations/{id}")).await;
    assert_eq!(status, 204, "{json}");
    let t = app.task(id).await;
    assert_eq!(t["status"], "cancelled");
    assert_eq!(t["error"], CANCELLED_ERROR);
    assert!(t["completed_at"].is_string());

    let cancel = control.next().await;
    assert_eq!(cancel["type"], "cancel");
    assert_eq!(cancel["task_id"], id.to_string());
    assert_eq!(cancel["attempt"], 1);

    let hook = hooks.next().await;
    assert_eq!(hook["event"], "cancelled");
    let payload: Value = serde_json::from_str(hook["body"].as_str().unwrap()).unwrap();
    assert_eq!(payload["status"], "cancelled");
    assert_eq!(payload["webhook_type"], "video_generation_completed");
    assert_eq!(payload["error"], CANCELLED_ERROR);
    assert_eq!(payload["timestamp"], t["completed_at"]);
    let log = app.webhook_log(id).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["event"], "cancelled");

    let (status, json) = app.delete(&format!("/v1/videos/generations/{id}")).await;
    assert_eq!(status, 409);
    assert_eq!(json["error"]["code"], "invalid_operation");
    let (status, json) = app
        .delete(&format!("/v1/videos/generations/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn cancel_after_completion_is_refused() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    app.status_event(
        id,
        1,
        1,
        StatusKind::Completed {
            video_key: video_key(id, 1),
            generation_duration_seconds: 1.0,
            model: None,
        },
    )
    .await;
    app.wait_status(id, "completed").await;
    let (status, json) = app.delete(&format!("/v1/videos/generations/{id}")).await;
    assert_eq!(status, 409);
    assert_eq!(json["error"]["code"], "invalid_operation");
    assert_eq!(app.task(id).await["status"], "completed");
    app.stop().await;
}

#[tokio::test]
async fn cancel_racing_completion_ends_in_exactly_one_terminal_state() {
    let app = TestApp::spawn().await;
    let mut handled = 0.0;
    let mut outcomes = (0, 0);
    for round in 0..12 {
        let id = app.submit_ok(&hooked()).await;
        app.status_event(
            id,
            1,
            1,
            StatusKind::Processing {
                message: "go".into(),
            },
        )
        .await;
        handled += 1.0;
        wait_handled(&app, handled).await;
        let path = format!("/v1/videos/generations/{id}");
        let (cancel, ()) = tokio::join!(app.delete(&path), async {
            if round % 2 == 1 {
                tokio::task::yield_now().await;
            }
            app.status_event(
                id,
                1,
                2,
                StatusKind::Completed {
                    video_key: video_key(id, 1),
                    generation_duration_seconds: 2.0,
                    model: None,
                },
            )
            .await
        });
        handled += 1.0;
        wait_handled(&app, handled).await;
        let task = app.task(id).await;
        let log = app.webhook_log(id).await;
        let terminal: Vec<&Value> = log.iter().filter(|e| e["event"] != "progress").collect();
        assert_eq!(
            terminal.len(),
            1,
            "round {round}: one terminal webhook, got {log:?}"
        );
        match cancel.0 {
            204 => {
                outcomes.0 += 1;
                assert_eq!(task["status"], "cancelled", "round {round}");
                assert_eq!(terminal[0]["event"], "cancelled");
                assert!(task.get("video_url").is_none());
            }
            409 => {
                outcomes.1 += 1;
                assert_eq!(task["status"], "completed", "round {round}");
                assert_eq!(terminal[0]["event"], "completed");
                assert!(task.get("error").is_none());
            }
            other => panic!("round {round}: cancel answered {other}: {}", cancel.1),
        }
    }
    assert_eq!(
        ledger_count(&app, "after_terminal").await,
        f64::from(outcomes.0)
    );
    app.stop().await;
}
