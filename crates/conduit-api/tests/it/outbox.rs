//! The outbox: a submit succeeds while RabbitMQ is unreachable, and the job is published
//! once a relay can reach the broker.

use std::time::Duration;

use conduit_core::{topology::route, Secret, Source};

use crate::helpers::{body, eventually, test_settings, TestApp, TIMEOUT};

#[tokio::test]
async fn submits_succeed_while_the_broker_is_down_and_jobs_follow_later() {
    let mut settings = test_settings();
    let good_url = settings.amqp.url.clone();
    // Port 1 on loopback: nothing listens there, so every connection is refused.
    settings.amqp.url = Secret::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let mut app = TestApp::spawn_settings(settings.clone()).await;

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.submit_ok(&body()).await);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        app.count("SELECT count(*) FROM outbox").await,
        3,
        "jobs wait in the outbox"
    );
    for id in &ids {
        assert_eq!(app.task(*id).await["status"], "pending");
    }
    // Readiness is the database's: the API keeps taking submits without the broker.
    let (ready, _) = app.request(reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(ready, 200, "ready without the broker");

    // The same database, now with a reachable broker: the relay publishes the backlog.
    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    settings.amqp.url = good_url;
    app.restart_with(settings).await;
    let mut seen = Vec::new();
    while seen.len() < ids.len() {
        let job = jobs.next().await;
        seen.push(
            job["task_id"]
                .as_str()
                .unwrap()
                .parse::<uuid::Uuid>()
                .unwrap(),
        );
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    eventually("the outbox to be empty", TIMEOUT, || async {
        (app.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    assert!(
        jobs.drain_for(Duration::from_millis(500)).await.is_empty(),
        "each job is published once"
    );
    app.stop().await;
}
