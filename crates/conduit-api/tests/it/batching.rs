//! Group commit under load: many clients submit at once through the real server. The
//! writer-level tests (one batch answering each submit as if alone) live beside the
//! writer, in `src/ledger/submits_tests.rs`.

use std::collections::{BTreeMap, BTreeSet};

use conduit_core::{topology::route, Secret, Source};
use serde_json::{json, Value};

use crate::helpers::{body, eventually, test_settings, TestApp, TIMEOUT};

fn other_body() -> Value {
    json!({
        "model": "local-video",
        "prompt": "A lighthouse in a storm",
        "duration": 2,
        "size": "320x180",
        "fps": 12,
        "seed": 7,
        "webhook_url": "https://example.com/hooks/video",
        "webhook_headers": {"Authorization": "Bearer abc", "X-Tenant": "t1"},
        "webhook_events": ["completed", "failed"],
    })
}

/// A submit's body, status and task id.
type Answered<'a> = (&'a Value, u16, Option<String>);

async fn post(app: &TestApp, idem: Option<&str>, b: &Value) -> (u16, Value) {
    let mut req = app
        .http
        .post(app.url("/v1/videos/generations/async"))
        .bearer_auth(&app.key)
        .json(b);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn concurrent_submits_with_mixed_keys_over_several_writers() {
    // A pool of 16 runs four writers, so submits of one key race across batches too.
    let app = TestApp::spawn_with(|s| s.database.pool_size = 16).await;
    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    let a = body();
    let b = other_body();
    let mut plan: Vec<(Option<String>, &Value)> = Vec::new();
    for i in 0..24 {
        plan.push((None, if i % 2 == 0 { &a } else { &b }));
    }
    for i in 0..8 {
        plan.push((Some(format!("own-{i}")), &a));
    }
    for _ in 0..8 {
        plan.push((Some("shared".into()), &a));
    }
    // One key, two bodies: whichever lands first owns it, the other body gets 409s.
    for i in 0..8 {
        plan.push((Some("contested".into()), if i % 2 == 0 { &a } else { &b }));
    }
    let answers = futures::future::join_all(
        plan.iter()
            .map(|(key, body)| post(&app, key.as_deref(), body)),
    )
    .await;

    let mut created = BTreeSet::new();
    let mut by_key: BTreeMap<&str, Vec<Answered>> = BTreeMap::new();
    for ((key, body), (status, json)) in plan.iter().zip(&answers) {
        let id = json["task_id"].as_str().map(str::to_owned);
        match key {
            None => {
                assert_eq!(*status, 202, "{json}");
                assert!(
                    created.insert(id.unwrap()),
                    "a keyless submit is a new task"
                );
            }
            Some(k) => by_key
                .entry(k.as_str())
                .or_default()
                .push((*body, *status, id)),
        }
    }
    for (key, seen) in &by_key {
        let winners: BTreeSet<&str> = seen
            .iter()
            .filter(|(_, s, _)| *s == 202)
            .map(|(b, _, _)| b["prompt"].as_str().unwrap())
            .collect();
        assert_eq!(winners.len(), 1, "one body owns {key}: {seen:?}");
        let ids: BTreeSet<&String> = seen.iter().filter_map(|(_, _, id)| id.as_ref()).collect();
        assert_eq!(ids.len(), 1, "one task for {key}: {seen:?}");
        for (body, status, _) in seen {
            let owner = winners.contains(body["prompt"].as_str().unwrap());
            assert_eq!(*status, if owner { 202 } else { 409 }, "{key}: {seen:?}");
        }
        created.insert((*ids.iter().next().unwrap()).clone());
    }
    let expected = 24 + 8 + 1 + 1;
    assert_eq!(created.len(), expected);
    assert_eq!(
        app.count("SELECT count(*) FROM tasks").await,
        expected as i64
    );
    // Every task's job reaches the broker, once.
    let mut published = BTreeSet::new();
    while published.len() < expected {
        let job = jobs.next().await;
        assert!(published.insert(job["task_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(
        published,
        created.iter().cloned().collect::<BTreeSet<String>>()
    );
    assert!(jobs
        .drain_for(std::time::Duration::from_millis(300))
        .await
        .is_empty());
    app.stop().await;
}

#[tokio::test]
async fn concurrent_submits_during_a_broker_outage_are_accepted_and_published_later() {
    let mut settings = test_settings();
    settings.database.pool_size = 16;
    let good_url = settings.amqp.url.clone();
    settings.amqp.url = Secret::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let mut app = TestApp::spawn_settings(settings.clone()).await;
    let b = body();
    let keys: Vec<String> = (0..40).map(|i| format!("o-{i}")).collect();
    let answers = futures::future::join_all(keys.iter().map(|k| post(&app, Some(k), &b))).await;
    let mut ids = BTreeSet::new();
    for (status, json) in &answers {
        assert_eq!(*status, 202, "{json}");
        ids.insert(json["task_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 40);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 40);

    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    settings.amqp.url = good_url;
    app.restart_with(settings).await;
    let mut seen = BTreeSet::new();
    while seen.len() < ids.len() {
        let job = jobs.next().await;
        assert!(seen.insert(job["task_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(seen, ids);
    eventually("the outbox to be empty", TIMEOUT, || async {
        (app.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    app.stop().await;
}
