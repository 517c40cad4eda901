//! End-to-end: the three real binaries, driven over HTTP only, each test with a stack
//! of its own.

use std::time::Duration;

use conduit_testkit::{
    eventually, signature_is_valid, ReceivedWebhook, Receiver, Stack, StackOptions,
};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

fn terminal(hooks: &[ReceivedWebhook], task_id: &str) -> Vec<ReceivedWebhook> {
    hooks
        .iter()
        .filter(|h| {
            let b = h.json();
            b["task_id"] == task_id && b["webhook_type"] == "video_generation_completed"
        })
        .cloned()
        .collect()
}

async fn wait_terminal(receiver: &Receiver, task_id: &str) -> ReceivedWebhook {
    eventually(&format!("terminal webhook of {task_id}"), LONG, || async {
        terminal(&receiver.received(), task_id).into_iter().next()
    })
    .await
}

#[tokio::test]
async fn seed_example_runs_from_submit_to_completed_webhook_and_video() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let prompt = "A serene mountain landscape with clouds";
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": prompt,
            "duration": 2,
            "size": "320x180",
            "fps": 12,
            "webhook_url": receiver.url("/webhooks/video-complete"),
            "webhook_headers": {
                "Authorization": "Bearer your-webhook-secret",
                "X-Custom-Header": "custom-value"
            }
        }))
        .await;

    let hook = wait_terminal(&receiver, &task_id).await;
    let body = hook.json();
    assert_eq!(hook.method, "POST");
    assert_eq!(hook.path, "/webhooks/video-complete");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["model"], "local-video");
    assert_eq!(body["prompt"], prompt);
    assert!(body["generation_duration_seconds"].is_number());
    assert!(body.as_object().unwrap().values().all(|v| !v.is_null()));
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in [
        "task_id",
        "status",
        "webhook_type",
        "timestamp",
        "video_url",
        "generation_duration_seconds",
        "model",
        "prompt",
    ] {
        assert!(keys.contains(&k), "completed webhook lacks {k}: {body}");
    }
    assert_eq!(keys.len(), 8, "completed webhook has extra keys: {body}");
    assert_eq!(
        hook.header("authorization"),
        Some("Bearer your-webhook-secret")
    );
    assert_eq!(hook.header("x-custom-header"), Some("custom-value"));
    assert_eq!(hook.header("user-agent"), Some("Conduit-LLM/1.0"));
    assert!(hook
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    assert!(signature_is_valid(
        &stack.secret,
        hook.header("webhook-id").unwrap(),
        hook.header("webhook-timestamp").unwrap(),
        &hook.body,
        hook.header("webhook-signature").unwrap(),
    ));

    // The video downloads without an API key, as H.264 MP4, with range support.
    let url = body["video_url"].as_str().unwrap();
    let video = reqwest::get(url).await.unwrap();
    assert_eq!(video.status(), 200);
    assert_eq!(video.headers()["content-type"], "video/mp4");
    let bytes = video.bytes().await.unwrap();
    assert_eq!(&bytes[4..8], b"ftyp");
    let ranged = reqwest::Client::new()
        .get(url)
        .header("Range", "bytes=0-7")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(&ranged.bytes().await.unwrap()[..], &bytes[..8]);

    // Polling agrees with the webhook.
    let task = stack.task(&task_id).await;
    assert_eq!(task["status"], "completed");
    assert_eq!(task["progress"], 100);
    assert!(task["video_url"].as_str().is_some());
    assert!(task.get("error").is_none());
    stack.stop().await;
}

#[tokio::test]
async fn progress_webhooks_arrive_before_the_terminal_one() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "A slow sunrise over a quiet harbour, seen from a hill",
            // 900 frames at 720p take seconds even in an optimised build: a render
            // that finishes within a second may send no progress at all.
            "duration": 30,
            "size": "1280x720",
            "fps": 30,
            "webhook_url": receiver.url("/hook"),
        }))
        .await;
    wait_terminal(&receiver, &task_id).await;
    let hooks = receiver.received();
    let progress: Vec<Value> = hooks
        .iter()
        .map(ReceivedWebhook::json)
        .filter(|b| b["webhook_type"] == "video_generation_progress")
        .collect();
    assert!(
        !progress.is_empty(),
        "no progress webhook for a multi-second render"
    );
    let last_is_terminal =
        hooks.last().unwrap().json()["webhook_type"] == "video_generation_completed";
    assert!(
        last_is_terminal,
        "a progress webhook came after the terminal one"
    );
    let mut previous = -1;
    for p in &progress {
        assert_eq!(p["status"], "processing");
        let pct = p["progress_percentage"].as_i64().unwrap();
        assert!((0..=100).contains(&pct));
        assert!(pct >= previous, "progress went backwards");
        previous = pct;
        assert!(p["message"].is_string());
    }
    stack.stop().await;
}

#[tokio::test]
async fn cancel_sends_the_cancelled_webhook_and_stops_the_task() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "A very long render that will be cancelled",
            "duration": 60,
            "size": "1280x720",
            "webhook_url": receiver.url("/hook"),
        }))
        .await;
    stack.wait_status(&task_id, "processing", LONG).await;
    let r = stack
        .http
        .delete(stack.api_url(&format!("/v1/videos/generations/{task_id}")))
        .bearer_auth(&stack.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let task = stack.task(&task_id).await;
    assert_eq!(task["status"], "cancelled");
    assert_eq!(
        task["error"],
        "Video generation was cancelled by user request"
    );
    let hook = wait_terminal(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "cancelled");
    assert_eq!(
        hook["error"],
        "Video generation was cancelled by user request"
    );
    // The terminal state never changes afterwards.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stack.task(&task_id).await["status"], "cancelled");
    assert_eq!(terminal(&receiver.received(), &task_id).len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_task_past_its_timeout_fails_with_a_clear_error() {
    let stack = Stack::start_with(StackOptions {
        env: vec![(
            "CONDUIT__GENERATOR__TASK_TIMEOUT_SECONDS".into(),
            "1".into(),
        )],
        ..Default::default()
    })
    .await;
    let receiver = Receiver::start().await;
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "Too long for its timeout",
            "duration": 60,
            "size": "1280x720",
            "webhook_url": receiver.url("/hook"),
            "webhook_events": ["failed"],
        }))
        .await;
    let hook = wait_terminal(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "failed");
    assert!(
        hook["error"].as_str().unwrap().contains("timed out"),
        "error should say it timed out: {hook}"
    );
    let task = stack.task(&task_id).await;
    assert_eq!(task["status"], "failed");
    assert_eq!(task["error"], hook["error"]);
    // Only the subscribed event was sent.
    assert!(receiver
        .received()
        .iter()
        .all(|h| h.json()["status"] == "failed"));
    stack.stop().await;
}

#[tokio::test]
async fn polling_matches_webhooks_and_the_delivery_log() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "Polling and webhooks tell the same story",
            "duration": 1,
            "size": "64x64",
            "fps": 4,
            "webhook_url": receiver.url("/hook"),
            "webhook_events": ["completed"],
        }))
        .await;
    let hook = wait_terminal(&receiver, &task_id).await;
    let body = hook.json();
    let task = stack.task(&task_id).await;
    assert_eq!(task["status"], body["status"]);
    assert_eq!(task["video_url"], body["video_url"]);
    assert_eq!(
        task["generation_duration_seconds"],
        body["generation_duration_seconds"]
    );
    let webhook_id = hook.header("webhook-id").unwrap().to_owned();
    let log = eventually("delivery log to show the delivery", LONG, || async {
        let (status, log) = stack
            .get(&format!("/v1/videos/generations/tasks/{task_id}/webhooks"))
            .await;
        assert_eq!(status, 200);
        let entry = log["data"]
            .as_array()
            .or_else(|| log.as_array())
            .and_then(|entries| {
                entries
                    .iter()
                    .find(|e| e["webhook_id"] == webhook_id.as_str())
                    .cloned()
            })?;
        (entry["status"] == "delivered").then_some(entry)
    })
    .await;
    assert_eq!(log["event"], "completed");
    assert_eq!(log["attempts"][0]["status_code"], 200);
    stack.stop().await;
}
