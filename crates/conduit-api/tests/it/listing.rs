//! `GET /v1/videos/generations/tasks`: newest first, cursor pages, status filter, and
//! refusals of bad query values.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::{body, TestApp};

fn ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn pages_run_newest_first_without_gaps_or_repeats() {
    let app = TestApp::spawn().await;
    let mut submitted = Vec::new();
    for _ in 0..5 {
        submitted.push(app.submit_ok(&body()).await.to_string());
    }
    submitted.reverse();
    let (status, first) = app.get("/v1/videos/generations/tasks?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(first["has_more"], true);
    let mut seen = ids(&first);
    let mut after = seen.last().unwrap().clone();
    loop {
        let (status, page) = app
            .get(&format!(
                "/v1/videos/generations/tasks?limit=2&after={after}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        seen.extend(ids(&page));
        if page["has_more"] == false {
            break;
        }
        after = seen.last().unwrap().clone();
    }
    assert_eq!(seen, submitted);
    let (_, all) = app.get("/v1/videos/generations/tasks").await;
    assert_eq!(ids(&all), submitted);
    assert_eq!(all["has_more"], false);
    app.stop().await;
}

#[tokio::test]
async fn status_filters_the_list() {
    let app = TestApp::spawn().await;
    let keep = app.submit_ok(&body()).await;
    let cancel = app.submit_ok(&body()).await;
    assert_eq!(
        app.delete(&format!("/v1/videos/generations/{cancel}"))
            .await
            .0,
        204
    );
    let (_, pending) = app.get("/v1/videos/generations/tasks?status=pending").await;
    assert_eq!(ids(&pending), vec![keep.to_string()]);
    let (_, cancelled) = app
        .get("/v1/videos/generations/tasks?status=cancelled")
        .await;
    assert_eq!(ids(&cancelled), vec![cancel.to_string()]);
    let (_, done) = app
        .get("/v1/videos/generations/tasks?status=completed")
        .await;
    assert!(ids(&done).is_empty());
    app.stop().await;
}

#[tokio::test]
async fn bad_query_values_are_400_invalid_value() {
    let app = TestApp::spawn().await;
    let _ = app.submit_ok(&body()).await;
    let mut params = BTreeSet::new();
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("status=done", "status"),
        ("status=", "status"),
        ("after=not-a-uuid", "after"),
        ("after=", "after"),
        ("after=01a22319-48ae-7573-9fc6-3d72847f4d89", "after"),
    ] {
        let (status, json) = app
            .get(&format!("/v1/videos/generations/tasks?{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {json}");
        assert_eq!(json["error"]["code"], "invalid_value", "{query}");
        assert_eq!(json["error"]["param"], param, "{query}");
        params.insert(param);
    }
    let (status, json) = app.get("/v1/videos/generations/tasks?colour=red").await;
    assert_eq!(status, 400);
    assert_eq!(json["error"]["code"], "unknown_parameter");
    assert_eq!(params.len(), 3);
    app.stop().await;
}
