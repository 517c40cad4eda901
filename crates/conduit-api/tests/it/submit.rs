//! A valid submit: 202 with the contract's body and a Location, the task readable at
//! once, and its job on the jobs queue carrying every parameter.

use std::time::Duration;

use conduit_core::{messages::StatusKind, topology::route, Source};
use serde_json::json;

use crate::helpers::{body, eventually, TestApp, TIMEOUT};

#[tokio::test]
async fn submit_answers_202_with_location_and_records_the_task() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .post(app.url("/v1/videos/generations/async"))
        .bearer_auth(&app.key)
        .json(&json!({
            "model": "local-video",
            "prompt": "A serene mountain landscape with clouds",
            "duration": 2,
            "size": "320x180",
            "fps": 12,
            "seed": 7,
            "webhook_url": "https://example.com/webhooks/video-complete",
            "webhook_headers": {"Authorization": "Bearer your-webhook-secret"},
            "webhook_events": ["completed", "failed"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let json: serde_json::Value = r.json().await.unwrap();
    let id = json["task_id"].as_str().unwrap();
    uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(json["status"], "pending");
    assert_eq!(
        json["check_status_url"],
        format!("/v1/videos/generations/tasks/{id}")
    );
    assert_eq!(location, format!("/v1/videos/generations/tasks/{id}"));
    for k in ["created_at", "estimated_completion_time"] {
        let t = json[k].as_str().unwrap();
        assert!(t.ends_with('Z') && t.len() == 24, "{k} = {t}");
    }
    let task = app.get(&location).await.1;
    assert_eq!(task["task_id"], id);
    assert_eq!(task["status"], "pending");
    assert_eq!(task["progress"], 0);
    assert_eq!(task["model"], "local-video");
    assert_eq!(task["duration"], 2);
    assert_eq!(task["size"], "320x180");
    assert_eq!(task["fps"], 12);
    for absent in [
        "completed_at",
        "video_url",
        "error",
        "estimated_seconds_remaining",
    ] {
        assert!(
            task.get(absent).is_none(),
            "{absent} must be left out: {task}"
        );
    }
    assert!(task.as_object().unwrap().values().all(|v| !v.is_null()));
    app.stop().await;
}

#[tokio::test]
async fn defaults_fill_in_and_the_job_carries_them() {
    let app = TestApp::spawn().await;
    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    let id = app.submit_ok(&body()).await;
    let job = jobs.next().await;
    assert_eq!(job["task_id"], id.to_string());
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["model"], "local-video");
    assert_eq!(job["provider"], "local");
    assert_eq!(job["spec"]["duration_seconds"], 6);
    assert_eq!(job["spec"]["width"], 1280);
    assert_eq!(job["spec"]["height"], 720);
    assert_eq!(job["spec"]["fps"], 24);
    let task = app.task(id).await;
    assert_eq!(task["size"], "1280x720");
    // The relay commits the row's removal only after the broker confirmed the job, so
    // the job can arrive a moment before the outbox is empty.
    eventually("the relay to empty the outbox", TIMEOUT, || async {
        (app.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_task_stays_pending_without_a_generator_and_runs_once_one_starts() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.task(id).await["status"], "pending");
    let depth = app.broker.queue_depth(route::JOBS).await.unwrap();
    assert_eq!(depth, 1, "the job waits in the jobs queue");

    // A generator starts: it takes the job and reports on it.
    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    let job = jobs.next().await;
    assert_eq!(job["task_id"], id.to_string());
    app.status_event(
        id,
        1,
        1,
        StatusKind::Processing {
            message: "Starting".into(),
        },
    )
    .await;
    app.wait_status(id, "processing").await;
    app.status_event(
        id,
        1,
        2,
        StatusKind::Completed {
            video_key: conduit_core::storage::video_key(id, 1),
            generation_duration_seconds: 1.5,
            model: None,
        },
    )
    .await;
    let task = app.wait_status(id, "completed").await;
    assert_eq!(task["progress"], 100);
    app.stop().await;
}

#[tokio::test]
async fn models_lists_every_configured_model_and_its_availability() {
    let app = TestApp::spawn().await;
    let (status, json) = app.get("/v1/models").await;
    assert_eq!(status, 200);
    let data = json["data"].as_array().unwrap();
    let local = data.iter().find(|m| m["id"] == "local-video").unwrap();
    assert_eq!(local["available"], true);
    assert_eq!(local["provider"], "local");
    let minimax = data.iter().find(|m| m["id"] == "minimax-video").unwrap();
    assert_eq!(minimax["available"], false);
    assert_eq!(
        minimax["missing_setting"],
        "CONDUIT__PROVIDERS__MINIMAX__API_KEY"
    );
    // What each model can make is listed, so a client need not learn it from a 400.
    assert_eq!(minimax["durations"], json!([6, 10]));
    assert_eq!(minimax["resolutions"], json!(["512P", "768P", "1080P"]));
    let veo = data.iter().find(|m| m["id"] == "veo-video").unwrap();
    assert_eq!(
        veo["sizes"],
        json!(["1280x720", "720x1280", "1920x1080", "1080x1920"])
    );
    assert!(local.get("durations").is_none());
    // Which models take an image_url; a /v1/videos model needs its server first.
    assert_eq!(local["image_input"], true);
    assert_eq!(veo["image_input"], true);
    let openai = data.iter().find(|m| m["id"] == "openai-video").unwrap();
    assert_eq!(openai["available"], false);
    assert_eq!(
        openai["missing_setting"],
        "CONDUIT__PROVIDERS__OPENAI__BASE_URL"
    );
    app.stop().await;
}

#[tokio::test]
async fn operator_endpoints_answer() {
    let app = TestApp::spawn().await;
    let _ = app.submit_ok(&body()).await;
    assert_eq!(
        app.request(reqwest::Method::GET, "/healthz", None).await.0,
        200
    );
    crate::helpers::eventually("readyz", crate::helpers::TIMEOUT, || async {
        (app.request(reqwest::Method::GET, "/readyz", None).await.0 == 200).then_some(())
    })
    .await;
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "conduit_api_http_requests_total",
        "conduit_api_tasks_submitted_total",
        "conduit_api_outbox_published_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    app.stop().await;
}

#[tokio::test]
async fn an_image_url_is_kept_with_the_task_and_a_large_data_uri_passes_the_body_limit() {
    use base64::Engine;
    let app = TestApp::spawn_with(|s| s.webhooks.allow_private_targets = false).await;
    // A PNG signature and 200 KiB of data: the body is over 64 KiB because of the image only.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(std::iter::repeat_n(7u8, 200 * 1024));
    let image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    let mut b = body();
    b["image_url"] = json!(image);
    let id = app.submit_ok(&b).await;
    let client = app.pool.get().await.unwrap();
    let row = client
        .query_one("SELECT image_url FROM tasks WHERE id = $1", &[&id])
        .await
        .unwrap();
    let stored: Option<String> = row.get(0);
    assert_eq!(stored.as_deref(), Some(image.as_str()));
    let job = client
        .query_one("SELECT body FROM outbox WHERE task_id = $1", &[&id])
        .await;
    if let Ok(job) = job {
        let job: Vec<u8> = job.get(0);
        let job: serde_json::Value = serde_json::from_slice(&job).unwrap();
        assert_eq!(job["image_url"], json!(image));
    }
    // The same padding outside image_url is too large.
    let mut b = body();
    b["prompt"] = json!("x".repeat(70 * 1024));
    assert_eq!(app.submit(&b).await.0, 413);
    // An image URL on an internal address is refused like a webhook target.
    let mut b = body();
    b["image_url"] = json!("http://127.0.0.1:9/cat.png");
    let (status, json) = app.submit(&b).await;
    assert_eq!(status, 400);
    assert_eq!(json["error"]["param"], "image_url");
    app.stop().await;
}

#[tokio::test]
async fn a_retried_image_task_carries_its_image_again() {
    let app = TestApp::spawn().await;
    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    let mut b = body();
    b["image_url"] = json!("https://images.example/first.png");
    let id = app.submit_ok(&b).await;
    let first = jobs.next().await;
    assert_eq!(first["image_url"], "https://images.example/first.png");
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
    let (status, _) = app
        .post(&format!("/v1/videos/generations/tasks/{id}/retry"))
        .await;
    assert_eq!(status, 202);
    let second = jobs.next().await;
    assert_eq!(second["attempt"], 2);
    assert_eq!(second["image_url"], "https://images.example/first.png");
    app.stop().await;
}

#[tokio::test]
async fn a_video_made_by_a_fallback_model_says_so() {
    let app = TestApp::spawn().await;
    let mut hooks = app.collect(Source::Queue(route::WEBHOOKS.into()));
    let mut b = body();
    b["webhook_url"] = json!("https://example.com/hook");
    b["webhook_events"] = json!(["completed"]);
    let id = app.submit_ok(&b).await;
    app.status_event(
        id,
        1,
        1,
        StatusKind::Completed {
            video_key: conduit_core::storage::video_key(id, 1),
            generation_duration_seconds: 2.0,
            model: Some("veo-video".into()),
        },
    )
    .await;
    let t = app.wait_status(id, "completed").await;
    assert_eq!(t["model"], "local-video");
    assert_eq!(
        t["message"],
        "Video generation completed by fallback model veo-video (local-video was unavailable)"
    );
    let hook = hooks.next().await;
    let payload: serde_json::Value = serde_json::from_str(hook["body"].as_str().unwrap()).unwrap();
    assert_eq!(payload["model"], "veo-video");
    app.stop().await;
}
