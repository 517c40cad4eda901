//! Every failure answers the OpenAI error shape: unknown routes, wrong methods, bad
//! queries, and a database that is away (503, then recovery).

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{body, eventually, TestApp, TIMEOUT};

fn assert_error_shape(json: &Value, code: &str) {
    let e = &json["error"];
    assert_eq!(e["code"], code, "{json}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e["type"].is_string());
    assert!(json.as_object().unwrap().len() == 1);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_in_json() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::GET, "/nope"),
        (Method::GET, "/v1"),
        (Method::POST, "/v2/videos"),
    ] {
        let (status, json) = app.request(method, path, Some(&app.key)).await;
        assert_eq!(status, 404);
        assert_error_shape(&json, "not_found");
    }
    for (method, path) in [
        (Method::GET, "/v1/videos/generations/async"),
        (Method::PUT, "/v1/models"),
        (Method::POST, "/v1/videos/generations/tasks"),
        (Method::PATCH, "/v1/webhooks/secret"),
        (Method::DELETE, "/openapi.json"),
    ] {
        let (status, json) = app.request(method.clone(), path, Some(&app.key)).await;
        assert_eq!(status, 405, "{method} {path}");
        assert_error_shape(&json, "method_not_allowed");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_database_going_away_is_503_and_the_api_recovers() {
    let app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    let db = app
        .settings
        .database
        .url
        .expose()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let admin = |sql: String| async move {
        let (client, conn) = tokio_postgres::connect(
            "host=127.0.0.1 user=postgres dbname=postgres",
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client.batch_execute(&sql).await.unwrap();
    };
    admin(format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false")).await;
    admin(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    ))
    .await;
    let (status, json) = app.submit(&body()).await;
    assert_eq!(status, 503, "{json}");
    assert_error_shape(&json, "service_unavailable");
    let (status, json) = app.get(&format!("/v1/videos/generations/tasks/{id}")).await;
    assert_eq!(status, 503, "{json}");
    eventually("readyz to report the outage", TIMEOUT, || async {
        (app.request(Method::GET, "/readyz", None).await.0 == 503).then_some(())
    })
    .await;

    admin(format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true")).await;
    eventually("the API to recover", TIMEOUT, || async {
        (app.submit(&body()).await.0 == 202).then_some(())
    })
    .await;
    assert_eq!(app.task(id).await["status"], "pending");
    app.stop().await;
}
