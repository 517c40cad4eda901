//! Idempotency-Key: a retried submit lands once; a reused key with another body is a 409;
//! keys are scoped to the API key.

use serde_json::{json, Value};

use crate::helpers::{body, TestApp};

async fn submit_with_key(app: &TestApp, api_key: &str, idem: &str, b: &Value) -> (u16, Value) {
    let r = app
        .http
        .post(app.url("/v1/videos/generations/async"))
        .bearer_auth(api_key)
        .header("Idempotency-Key", idem)
        .json(b)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn same_key_and_body_return_the_same_task() {
    let app = TestApp::spawn().await;
    let (s1, first) = submit_with_key(&app, &app.key, "order-1", &body()).await;
    let (s2, second) = submit_with_key(&app, &app.key, "order-1", &body()).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(first["task_id"], second["task_id"]);
    assert_eq!(first["created_at"], second["created_at"]);
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 1);
    // Spelling out a default is the same request.
    let mut explicit = body();
    explicit["duration"] = json!(6);
    let (s3, third) = submit_with_key(&app, &app.key, "order-1", &explicit).await;
    assert_eq!(s3, 202);
    assert_eq!(third["task_id"], first["task_id"]);
    app.stop().await;
}

#[tokio::test]
async fn same_key_with_another_body_is_a_conflict() {
    let app = TestApp::spawn().await;
    let (s1, _) = submit_with_key(&app, &app.key, "order-2", &body()).await;
    assert_eq!(s1, 202);
    let mut changed = body();
    changed["prompt"] = json!("something else");
    let (s2, json) = submit_with_key(&app, &app.key, "order-2", &changed).await;
    assert_eq!(s2, 409, "{json}");
    assert_eq!(json["error"]["code"], "idempotency_key_reused");
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_api_key() {
    let app = TestApp::spawn().await;
    let other = app.new_key("other").await;
    let (_, mine) = submit_with_key(&app, &app.key, "shared", &body()).await;
    let (status, theirs) = submit_with_key(&app, &other.key, "shared", &body()).await;
    assert_eq!(status, 202);
    assert_ne!(mine["task_id"], theirs["task_id"]);
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_submits_with_one_key_create_one_task() {
    let app = TestApp::spawn().await;
    let b = body();
    let attempts =
        futures::future::join_all((0..8).map(|_| submit_with_key(&app, &app.key, "burst", &b)))
            .await;
    let ids: std::collections::BTreeSet<String> = attempts
        .iter()
        .map(|(s, j)| {
            assert_eq!(*s, 202, "{j}");
            j["task_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM idempotency_keys").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_idempotency_key_is_refused() {
    let app = TestApp::spawn().await;
    let (status, json) = submit_with_key(&app, &app.key, &"k".repeat(300), &body()).await;
    assert_eq!(status, 400);
    assert_eq!(json["error"]["code"], "invalid_value");
    assert_eq!(json["error"]["param"], "Idempotency-Key");
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 0);
    app.stop().await;
}
