//! A provider shaped like a remote one (reports progress rarely, ignores its cancel
//! token), to check the worker's side of the contract for every provider.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use conduit_core::messages::{JobMessage, StatusKind};
use conduit_generator::{
    providers::{GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider},
    App, Providers,
};

use conduit_testkit::RunningApp;

use crate::Harness;

/// Reports 5 % once and then waits forever, deaf to cancellation.
struct Stalled;

#[async_trait]
impl Provider for Stalled {
    async fn generate(
        &self,
        _job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError> {
        loop {
            ctx.progress.report(ProgressUpdate {
                percent: 5,
                message: "Queueing at the provider".into(),
                eta_seconds: None,
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn start_with_stalled(h: &Harness) -> RunningApp {
    let providers = Providers::from_settings(&h.settings).with("stalled", Arc::new(Stalled));
    let app = App::build_with_providers(h.settings.clone(), providers)
        .await
        .expect("generator builds");
    RunningApp::spawn("generator", app.port(), |stop| app.run_until_stopped(stop))
}

#[tokio::test]
async fn a_quiet_provider_gets_a_progress_heartbeat_and_still_stops_on_cancel() {
    let mut h = Harness::new(|_| {}).await;
    let app = start_with_stalled(&h).await;
    let mut job = h.job("slow upstream", 640, 360, 5, 24);
    job.provider = "stalled".into();
    h.submit(&job).await;
    let processing = h
        .until_processing(job.task_id, Duration::from_secs(30))
        .await;

    // No 10-point step ever comes, so the first progress event is the 5 s heartbeat.
    let (progress, _) = h
        .next_event(Duration::from_secs(10))
        .await
        .expect("a heartbeat progress event");
    let StatusKind::Progress { percent, .. } = progress.kind else {
        panic!("expected progress, got {progress:?}");
    };
    assert_eq!(percent, 5);
    let gap = (progress.at - processing.at).num_milliseconds();
    assert!((4950..8000).contains(&gap), "heartbeat after {gap} ms");

    h.cancel(&job).await;
    let cancelled_at = Instant::now();
    while app.metric("conduit_generator_jobs_in_flight").await > 0.0 {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(1),
            "a provider deaf to its token still holds the slot after a second"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Some((event, _)) = h.next_event(Duration::from_secs(1)).await {
        assert!(
            !event.kind.is_terminal(),
            "cancelled task published {event:?}"
        );
    }
    app.stop().await;
    h.cleanup().await;
}
