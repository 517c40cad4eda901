use std::time::Duration;

use conduit_core::{messages::StatusKind, topology::Topology};
use lapin::{
    options::{BasicGetOptions, BasicNackOptions},
    Connection, ConnectionProperties,
};

use crate::Harness;

#[tokio::test]
async fn a_job_of_a_killed_generator_is_taken_over_by_another() {
    let mut h = Harness::new(|_| {}).await;
    let job = h.job("survives a crash", 1280, 720, 20, 30);
    h.submit(&job).await;

    // A real generator process, killed (SIGKILL) while it renders: no ack, no goodbye.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_conduit-generator"))
        .env_remove("CONDUIT_CONFIG")
        .env("CONDUIT__AMQP__URL", h.settings.amqp.url.expose())
        .env("CONDUIT__AMQP__NAMESPACE", &h.settings.amqp.namespace)
        .env("CONDUIT__STORAGE__URL", &h.settings.storage.url)
        .env("CONDUIT__HTTP__BIND", "127.0.0.1:0")
        .env("CONDUIT__LOG__FORMAT", "pretty")
        .env("CONDUIT__LOG__LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("generator binary starts");
    let first = h
        .until_processing(job.task_id, Duration::from_secs(30))
        .await;
    child.start_kill().expect("kill generator");
    let _ = child.wait().await;

    let app = h.start_app().await;
    let events = h
        .until_terminal(job.task_id, Duration::from_secs(120))
        .await;
    let (second, _) = events
        .iter()
        .find(|(e, _)| matches!(e.kind, StatusKind::Processing { .. }))
        .expect("the job ran again");
    assert!(second.seq > first.seq, "the takeover's events are newer");
    assert!(
        matches!(
            events.last().expect("terminal").0.kind,
            StatusKind::Completed { .. }
        ),
        "{events:#?}"
    );
    app.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_task_lost_three_times_fails_with_a_clear_error() {
    let mut h = Harness::new(|_| {}).await;
    let job = h.job("lost again and again", 160, 96, 1, 4);
    h.submit(&job).await;

    // Three workers that took the job and lost it: each return counts as a delivery.
    let conn = Connection::connect(
        h.settings.amqp.url.expose(),
        ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let queue =
        Topology::new(h.settings.amqp.namespace.clone()).queue(conduit_core::topology::route::JOBS);
    for _ in 0..3 {
        let message = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
            .expect("the job is in the queue");
        message
            .delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
    }
    let _ = conn.close(200, "done".into()).await;

    let app = h.start_app().await;
    let events = h.until_terminal(job.task_id, Duration::from_secs(30)).await;
    assert_eq!(events.len(), 1, "no work is attempted: {events:#?}");
    match &events[0].0.kind {
        StatusKind::Failed { error } => assert_eq!(
            error,
            "Video generation was interrupted 3 times (worker lost); giving up"
        ),
        other => panic!("expected a failure, got {other:?}"),
    }
    app.stop().await;
    h.cleanup().await;
}
