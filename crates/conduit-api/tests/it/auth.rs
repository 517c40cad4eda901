//! Authentication on every `/v1` route, key isolation, and revocation.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{body, eventually, TestApp};

fn routes(id: Uuid) -> Vec<(Method, String)> {
    vec![
        (Method::POST, "/v1/videos/generations/async".into()),
        (Method::GET, format!("/v1/videos/generations/tasks/{id}")),
        (Method::GET, "/v1/videos/generations/tasks".into()),
        (Method::DELETE, format!("/v1/videos/generations/{id}")),
        (
            Method::POST,
            format!("/v1/videos/generations/tasks/{id}/retry"),
        ),
        (
            Method::GET,
            format!("/v1/videos/generations/tasks/{id}/webhooks"),
        ),
        (
            Method::POST,
            format!("/v1/videos/generations/tasks/{id}/webhooks/redeliver"),
        ),
        (Method::GET, "/v1/webhooks/secret".into()),
        (Method::GET, "/v1/models".into()),
    ]
}

#[tokio::test]
async fn every_v1_route_needs_a_valid_key() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    for (method, path) in routes(id) {
        for key in [None, Some("condt_not-a-real-key"), Some("sk-garbage")] {
            let (status, json) = app.request(method.clone(), &path, key).await;
            assert_eq!(status, 401, "{method} {path} with {key:?}: {json}");
            assert_eq!(json["error"]["code"], "unauthorized");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn keys_work_as_bearer_or_x_api_key() {
    let app = TestApp::spawn().await;
    let r = app
        .http
        .get(app.url("/v1/webhooks/secret"))
        .header("X-API-Key", &app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let json: Value = r.json().await.unwrap();
    assert_eq!(json["secret"], app.secret);
    assert!(app.secret.starts_with("whsec_"));
    assert!(app.key.starts_with("condt_"));
    let (status, json) = app.get("/v1/webhooks/secret").await;
    assert_eq!(status, 200);
    assert_eq!(json["secret"], app.secret);
    // A Basic Authorization header (a proxy's) does not hide X-API-Key.
    let r = app
        .http
        .get(app.url("/v1/webhooks/secret"))
        .header("Authorization", "Basic dXNlcjpwdw==")
        .header("X-API-Key", &app.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_key_never_sees_another_keys_task() {
    let app = TestApp::spawn().await;
    let other = app.new_key("other").await;
    let id = app.submit_ok(&body()).await;
    let unknown = Uuid::now_v7();
    for (method, path) in routes(id)
        .into_iter()
        .filter(|(_, p)| p.contains(&id.to_string()))
    {
        let (status, json) = app.request(method.clone(), &path, Some(&other.key)).await;
        let unknown_path = path.replace(&id.to_string(), &unknown.to_string());
        let (u_status, u_json) = app
            .request(method.clone(), &unknown_path, Some(&other.key))
            .await;
        assert_eq!(status, 404, "{method} {path}: {json}");
        assert_eq!(
            (status, &json),
            (u_status, &u_json),
            "{method} {path} must look like an unknown id"
        );
        assert_eq!(json["error"]["code"], "not_found");
    }
    let (_, list) = app
        .request(
            Method::GET,
            "/v1/videos/generations/tasks",
            Some(&other.key),
        )
        .await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let (_, secret) = app
        .request(Method::GET, "/v1/webhooks/secret", Some(&other.key))
        .await;
    assert_eq!(secret["secret"], other.webhook_secret);
    assert_ne!(other.webhook_secret, app.secret);
    // The owner still sees it, and nothing was cancelled.
    assert_eq!(app.task(id).await["status"], "pending");
    app.stop().await;
}

#[tokio::test]
async fn ids_that_are_not_uuids_answer_404() {
    let app = TestApp::spawn().await;
    for path in [
        "/v1/videos/generations/tasks/123",
        "/v1/videos/generations/tasks/not-a-uuid/webhooks",
        "/v1/videos/generations/tasks/%00",
    ] {
        let (status, json) = app.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(json["error"]["code"], "not_found");
    }
    let (status, json) = app.delete("/v1/videos/generations/zzz").await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_revoked_key_stops_working_within_10_seconds() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/v1/webhooks/secret").await.0, 200);
    assert!(conduit_api::keys::revoke(&app.pool, app.key_id)
        .await
        .unwrap());
    eventually(
        "the revoked key to be refused",
        Duration::from_secs(10),
        || async { (app.get("/v1/webhooks/secret").await.0 == 401).then_some(()) },
    )
    .await;
    app.stop().await;
}
