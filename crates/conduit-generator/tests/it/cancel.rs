use std::time::{Duration, Instant};

use conduit_core::{storage::video_key, topology::route};

use crate::Harness;

#[tokio::test]
async fn cancelling_a_running_task_stops_it_within_a_second_and_publishes_nothing() {
    let mut h = Harness::new(|_| {}).await;
    let app = h.start_app().await;
    let job = h.long_job("cancel me while I render");
    h.submit(&job).await;
    h.until_processing(job.task_id, Duration::from_secs(30))
        .await;
    assert_eq!(app.metric("conduit_generator_jobs_in_flight").await, 1.0);

    h.cancel(&job).await;
    let cancelled_at = Instant::now();
    while app.metric("conduit_generator_jobs_in_flight").await > 0.0 {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(1),
            "work still running a second after the cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No terminal event (the API already made the task terminal), and the job is gone.
    while let Some((event, _)) = h.next_event(Duration::from_secs(2)).await {
        assert!(
            !event.kind.is_terminal(),
            "cancelled task published {event:?}"
        );
    }
    assert_eq!(h.broker.queue_depth(route::JOBS).await.expect("depth"), 0);
    assert_eq!(
        app.metric("conduit_generator_jobs_cancelled_total").await,
        1.0
    );
    assert!(!h.stored_path(&video_key(job.task_id, job.attempt)).exists());
    app.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_task_cancelled_while_queued_is_never_rendered() {
    let mut h = Harness::new(|s| s.generator.concurrency = 1).await;
    let app = h.start_app().await;
    let busy = h.long_job("keeps the only slot busy");
    let queued = h.job("never rendered", 160, 96, 1, 4);
    h.submit(&busy).await;
    h.until_processing(busy.task_id, Duration::from_secs(30))
        .await;
    h.submit(&queued).await;
    h.cancel(&queued).await;
    // Free the slot; the queued job is delivered next and must be skipped.
    h.cancel(&busy).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    while h.broker.queue_depth(route::JOBS).await.expect("depth") > 0
        || app.metric("conduit_generator_jobs_in_flight").await > 0.0
    {
        assert!(Instant::now() < deadline, "queued job not consumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Some((event, _)) = h.next_event(Duration::from_secs(2)).await {
        assert_ne!(
            event.task_id, queued.task_id,
            "cancelled job ran: {event:?}"
        );
    }
    assert_eq!(
        app.metric("conduit_generator_jobs_started_total").await,
        1.0
    );
    assert_eq!(
        app.metric("conduit_generator_jobs_cancelled_total").await,
        2.0
    );
    assert!(!h
        .stored_path(&video_key(queued.task_id, queued.attempt))
        .exists());
    app.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_cancel_sent_before_any_generator_started_holds() {
    let mut h = Harness::new(|_| {}).await;
    let job = h.job("cancelled before any generator ran", 160, 96, 1, 4);
    h.submit(&job).await;
    h.cancel(&job).await;
    // Started after the cancel: it learns of it from the lifecycle stream.
    let app = h.start_app().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("conduit_generator_jobs_cancelled_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the cancelled job was not skipped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(h.broker.queue_depth(route::JOBS).await.expect("depth"), 0);
    assert!(
        h.next_event(Duration::from_secs(1)).await.is_none(),
        "the cancelled job published an event"
    );
    assert_eq!(
        app.metric("conduit_generator_jobs_started_total").await,
        0.0
    );
    assert!(!h.stored_path(&video_key(job.task_id, job.attempt)).exists());
    app.stop().await;
    h.cleanup().await;
}
