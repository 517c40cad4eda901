use std::{io::Cursor, time::Duration};

use conduit_core::{messages::StatusKind, storage::video_key};

use crate::Harness;

#[tokio::test]
async fn a_job_completes_with_processing_progress_and_a_stored_video() {
    let mut h = Harness::new(|_| {}).await;
    let app = h.start_app().await;
    // Long enough (several seconds) to show the progress cadence.
    let job = h.job("a lighthouse at dusk, waves crashing", 1280, 720, 30, 30);
    h.submit(&job).await;

    let events = h
        .until_terminal(job.task_id, Duration::from_secs(120))
        .await;
    let kinds: Vec<_> = events.iter().map(|(e, _)| &e.kind).collect();
    assert!(
        matches!(kinds[0], StatusKind::Processing { .. }),
        "{kinds:#?}"
    );
    let StatusKind::Completed {
        video_key: key,
        generation_duration_seconds,
        ..
    } = kinds[kinds.len() - 1]
    else {
        panic!("last event is not completed: {kinds:#?}");
    };
    assert_eq!(*key, video_key(job.task_id, job.attempt));
    assert!(*generation_duration_seconds > 0.0);
    for pair in events.windows(2) {
        assert!(pair[1].0.seq > pair[0].0.seq, "sequence increases");
        assert_eq!(pair[1].0.attempt, job.attempt);
    }

    // Progress cadence: after the processing event (0 %), each progress event comes at
    // least a second after the previous one and either 10 points further or 5 s later.
    let progress: Vec<_> = events
        .iter()
        .filter_map(|(e, _)| match &e.kind {
            StatusKind::Progress { percent, .. } => Some((*percent, e.at)),
            _ => None,
        })
        .collect();
    assert!(
        !progress.is_empty(),
        "a multi-second render reports progress"
    );
    let mut last = (0u8, events[0].0.at);
    for (percent, at) in &progress {
        let gap = (*at - last.1).num_milliseconds();
        assert!(gap >= 950, "progress events {gap} ms apart");
        assert!(
            *percent >= last.0 + 10 || gap >= 4950,
            "progress {} → {percent} after {gap} ms",
            last.0
        );
        assert!(*percent <= 100);
        last = (*percent, *at);
    }

    let file = std::fs::read(h.stored_path(key)).expect("stored video exists");
    let reader = mp4::Mp4Reader::read_header(Cursor::new(&file), file.len() as u64)
        .expect("stored video parses");
    let track = reader.tracks().values().next().expect("one track");
    assert_eq!(track.sample_count(), 900);
    assert_eq!((track.width(), track.height()), (1280, 720));
    assert!(app.metric("conduit_generator_jobs_completed_total").await >= 1.0);

    app.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_task_past_its_timeout_fails_saying_so() {
    let mut h = Harness::new(|s| s.generator.task_timeout_seconds = 1).await;
    let app = h.start_app().await;
    let job = h.long_job("this takes far too long");
    h.submit(&job).await;

    let events = h.until_terminal(job.task_id, Duration::from_secs(30)).await;
    let (last, _) = events.last().expect("terminal event");
    match &last.kind {
        StatusKind::Failed { error } => {
            assert_eq!(error, "Video generation timed out after 1 seconds")
        }
        other => panic!("expected a timeout failure, got {other:?}"),
    }
    assert!(!h.stored_path(&video_key(job.task_id, job.attempt)).exists());
    app.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_job_for_an_unconfigured_provider_fails_clearly() {
    let mut h = Harness::new(|_| {}).await;
    let app = h.start_app().await;
    let mut job = h.job("remote", 160, 96, 1, 4);
    job.model = "minimax-video".into();
    job.provider = "minimax".into();
    h.submit(&job).await;
    let events = h.until_terminal(job.task_id, Duration::from_secs(30)).await;
    match &events.last().expect("terminal").0.kind {
        StatusKind::Failed { error } => assert!(error.contains("minimax"), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    app.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn shutdown_hands_a_running_job_back_without_counting_a_lost_attempt() {
    // With one attempt allowed, a hand-back counted as a lost delivery would fail the task.
    let mut h = Harness::new(|s| s.generator.max_attempts = 1).await;
    let first = h.start_app().await;
    let job = h.job("handed back at shutdown", 1280, 720, 20, 30);
    h.submit(&job).await;
    let processing = h
        .until_processing(job.task_id, Duration::from_secs(30))
        .await;
    first.stop().await;

    let second = h.start_app().await;
    let events = h
        .until_terminal(job.task_id, Duration::from_secs(120))
        .await;
    assert!(matches!(events[0].0.kind, StatusKind::Processing { .. }));
    assert!(
        events[0].0.seq > processing.seq,
        "the re-run's events are newer"
    );
    assert!(
        matches!(
            events.last().expect("terminal").0.kind,
            StatusKind::Completed { .. }
        ),
        "{events:#?}"
    );
    second.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn serves_health_readiness_and_metrics() {
    let h = Harness::new(|_| {}).await;
    let app = h.start_app().await;
    let base = format!("http://127.0.0.1:{}", app.port);
    let health = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = reqwest::get(format!("{base}/readyz"))
            .await
            .expect("readyz");
        if ready.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains("conduit_generator_jobs_in_flight"),
        "{metrics}"
    );
    app.stop().await;
    h.cleanup().await;
}
