//! The per-task webhook options (`webhook_retry`, `webhook_batch`) and secret rotation:
//! validation, what the delivery messages carry, Idempotency-Key, and the secret
//! endpoints.

use std::time::Duration;

use conduit_core::{topology::route, Source};
use serde_json::{json, Value};

use crate::helpers::{body, TestApp};

fn hooked_with(field: &str, value: Value) -> Value {
    let mut b = body();
    b["webhook_url"] = json!("https://example.com/hook");
    b[field] = value;
    b
}

async fn assert_refused(app: &TestApp, field: &str, bad: Vec<(Value, &str)>) {
    for (value, code) in bad {
        let b = hooked_with(field, value.clone());
        let (status, json) = app.submit(&b).await;
        assert_eq!(status, 400, "{value} answered {status}: {json}");
        assert_eq!(json["error"]["code"], code, "{value}: {json}");
        assert_eq!(json["error"]["param"], field, "{value}: {json}");
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
}

#[tokio::test]
async fn webhook_retry_is_validated_as_the_contract_says() {
    let app = TestApp::spawn().await;
    assert_refused(
        &app,
        "webhook_retry",
        vec![
            (
                json!({"schedule": ["1s"], "attempts": 3}),
                "unknown_parameter",
            ),
            (json!({}), "missing_parameter"),
            (json!(["0s", "30s"]), "invalid_value"),
            (json!("0s,30s"), "invalid_value"),
            (json!({"schedule": []}), "invalid_value"),
            (json!({"schedule": vec!["1s"; 21]}), "invalid_value"),
            (json!({"schedule": ["1d"]}), "invalid_value"),
            (json!({"schedule": ["30"]}), "invalid_value"),
            (json!({"schedule": [30]}), "invalid_value"),
            (json!({"schedule": ["25h"]}), "invalid_value"),
            (
                json!({"schedule": ["24h", "24h", "24h", "1s"]}),
                "invalid_value",
            ),
        ],
    )
    .await;
    let id = app
        .submit_ok(&hooked_with(
            "webhook_retry",
            json!({"schedule": vec!["24h", "24h", "24h"]}),
        ))
        .await;
    assert_eq!(app.task(id).await["status"], "pending");
    app.stop().await;
}

#[tokio::test]
async fn webhook_batch_is_validated_as_the_contract_says() {
    let app = TestApp::spawn().await;
    assert_refused(
        &app,
        "webhook_batch",
        vec![
            (
                json!({"max_events": 10, "max_size": 1}),
                "unknown_parameter",
            ),
            (json!(100), "invalid_value"),
            (json!({"max_events": 0}), "invalid_value"),
            (json!({"max_events": 1001}), "invalid_value"),
            (json!({"max_events": "10"}), "invalid_value"),
            (json!({"max_wait_ms": -1}), "invalid_value"),
            (json!({"max_wait_ms": 60001}), "invalid_value"),
            (json!({"max_wait_ms": 0.5}), "invalid_value"),
        ],
    )
    .await;
    app.submit_ok(&hooked_with("webhook_batch", json!({})))
        .await;
    app.submit_ok(&hooked_with(
        "webhook_batch",
        json!({"max_events": 1000, "max_wait_ms": 60000}),
    ))
    .await;
    app.stop().await;
}

#[tokio::test]
async fn the_options_travel_with_every_webhook_and_its_redelivery() {
    let app = TestApp::spawn().await;
    let mut hooks = app.collect(Source::Queue(route::WEBHOOKS.into()));
    let mut b = hooked_with("webhook_retry", json!({"schedule": ["0s", "30s", "5m"]}));
    b["webhook_batch"] = json!({"max_events": 50});
    let id = app.submit_ok(&b).await;
    let (status, _) = app.delete(&format!("/v1/videos/generations/{id}")).await;
    assert_eq!(status, 204);
    let hook = hooks.next().await;
    assert_eq!(hook["event"], "cancelled");
    assert_eq!(hook["retry"], "0s,30s,5m");
    assert_eq!(
        hook["batch"],
        json!({"max_events": 50, "max_wait_ms": 1000})
    );
    assert!(hook.get("previous_secret").is_none());

    let (status, json) = app
        .post(&format!(
            "/v1/videos/generations/tasks/{id}/webhooks/redeliver"
        ))
        .await;
    assert_eq!(status, 202, "{json}");
    let again = hooks.next().await;
    assert_eq!(again["webhook_id"], hook["webhook_id"]);
    assert_eq!(again["retry"], "0s,30s,5m");
    assert_eq!(again["batch"], hook["batch"]);

    // A task without the options sends messages without them.
    let plain = app
        .submit_ok(&hooked_with("webhook_events", json!(["cancelled"])))
        .await;
    app.delete(&format!("/v1/videos/generations/{plain}")).await;
    let hook = hooks.next().await;
    assert!(hook.get("retry").is_none() && hook.get("batch").is_none());
    app.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_tells_the_options_apart() {
    let app = TestApp::spawn().await;
    let send = |b: Value| {
        let app = &app;
        async move {
            let r = app
                .http
                .post(app.url("/v1/videos/generations/async"))
                .bearer_auth(&app.key)
                .header("Idempotency-Key", "opts-1")
                .json(&b)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let first = hooked_with("webhook_retry", json!({"schedule": ["0s", "1m"]}));
    let (status, a) = send(first.clone()).await;
    assert_eq!(status, 202, "{a}");
    // The same schedule spelt another way is the same request.
    let (status, b) = send(hooked_with(
        "webhook_retry",
        json!({"schedule": ["0ms", "60s"]}),
    ))
    .await;
    assert_eq!(status, 202, "{b}");
    assert_eq!(a["task_id"], b["task_id"]);
    let (status, c) = send(hooked_with(
        "webhook_retry",
        json!({"schedule": ["0s", "2m"]}),
    ))
    .await;
    assert_eq!(status, 409, "{c}");
    let mut batched = first;
    batched["webhook_batch"] = json!({});
    let (status, d) = send(batched).await;
    assert_eq!(status, 409, "{d}");
    assert_eq!(d["error"]["code"], "idempotency_key_reused");
    app.stop().await;
}

async fn rotate(app: &TestApp, body: Option<&str>) -> (u16, Value) {
    let mut req = app
        .http
        .post(app.url("/v1/webhooks/secret/rotate"))
        .bearer_auth(&app.key);
    if let Some(body) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(body.to_owned());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_rotation_overlaps_and_every_webhook_carries_both_secrets() {
    let app = TestApp::spawn().await;
    let mut hooks = app.collect(Source::Queue(route::WEBHOOKS.into()));
    let (status, before) = app.get("/v1/webhooks/secret").await;
    assert_eq!(status, 200);
    assert_eq!(before, json!({"secret": app.secret}));

    let (status, rotated) = rotate(&app, Some(r#"{"overlap_seconds": 3600}"#)).await;
    assert_eq!(status, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_") && new != app.secret);
    assert_eq!(rotated["previous"]["secret"], app.secret);
    let expires: chrono::DateTime<chrono::Utc> = rotated["previous"]["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let left = expires - chrono::Utc::now();
    assert!(left > chrono::Duration::minutes(59) && left <= chrono::Duration::hours(1));
    // Shown at once, not after a cache expires.
    let (_, shown) = app.get("/v1/webhooks/secret").await;
    assert_eq!(shown, rotated);

    let id = app
        .submit_ok(&hooked_with("webhook_events", json!(["cancelled"])))
        .await;
    app.delete(&format!("/v1/videos/generations/{id}")).await;
    let hook = hooks.next().await;
    assert_eq!(hook["secret"], new);
    assert_eq!(hook["previous_secret"]["secret"], app.secret);
    assert_eq!(
        hook["previous_secret"]["expires_at"],
        rotated["previous"]["expires_at"]
    );

    // No body: the default overlap of a day; the secret being replaced is the previous.
    let (status, again) = rotate(&app, None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["previous"]["secret"], new);
    let expires: chrono::DateTime<chrono::Utc> = again["previous"]["expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(expires - chrono::Utc::now() > chrono::Duration::hours(23));

    // An overlap of 0 switches at once.
    let (status, at_once) = rotate(&app, Some(r#"{"overlap_seconds": 0}"#)).await;
    assert_eq!(status, 200);
    assert!(at_once.get("previous").is_none(), "{at_once}");
    let (_, shown) = app.get("/v1/webhooks/secret").await;
    assert_eq!(shown, at_once);
    let id = app
        .submit_ok(&hooked_with("webhook_events", json!(["cancelled"])))
        .await;
    app.delete(&format!("/v1/videos/generations/{id}")).await;
    let hook = hooks.next().await;
    assert_eq!(hook["secret"], at_once["secret"]);
    assert!(hook.get("previous_secret").is_none());
    app.stop().await;
}

#[tokio::test]
async fn an_overlap_ends_on_time() {
    let app = TestApp::spawn().await;
    let (status, rotated) = rotate(&app, Some(r#"{"overlap_seconds": 1}"#)).await;
    assert_eq!(status, 200);
    assert!(rotated["previous"].is_object());
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (_, shown) = app.get("/v1/webhooks/secret").await;
    assert_eq!(shown, json!({"secret": rotated["secret"]}));
    app.stop().await;
}

#[tokio::test]
async fn a_bad_rotation_body_is_refused_and_changes_nothing() {
    let app = TestApp::spawn().await;
    for bad in [
        r#"{"overlap_seconds": -1}"#,
        r#"{"overlap_seconds": 604801}"#,
        r#"{"overlap_seconds": "60"}"#,
        r#"{"overlap_seconds": 1.5}"#,
        r#"{"overlap": 60}"#,
        r#"[60]"#,
        r#"not json"#,
    ] {
        let (status, json) = rotate(&app, Some(bad)).await;
        assert_eq!(status, 400, "{bad}: {json}");
        assert_eq!(json["error"]["code"], "invalid_value", "{bad}");
        assert_eq!(json["error"]["param"], "overlap_seconds", "{bad}");
    }
    let (_, shown) = app.get("/v1/webhooks/secret").await;
    assert_eq!(shown, json!({"secret": app.secret}));
    let (status, ok) = rotate(&app, Some(r#"{"overlap_seconds": 604800}"#)).await;
    assert_eq!(status, 200, "{ok}");
    let (status, _) = app
        .request(reqwest::Method::POST, "/v1/webhooks/secret/rotate", None)
        .await;
    assert_eq!(status, 401);
    app.stop().await;
}
