use std::time::Duration;

use conduit_core::{config::ProviderAccount, Secret};
use conduit_generator::providers::{FalProvider, GenerationError, Provider};
use conduit_testkit::{
    fake_fal::FakeFal,
    fakes::{fake_video, Scenario},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{assert_no_key, context, job, models, run, settle, KEY};

fn start() -> (FakeFal, FalProvider) {
    let fake = FakeFal::start(KEY);
    let account = ProviderAccount {
        api_key: Some(Secret::new(KEY)),
        base_url: fake.base_url(),
        poll_interval_seconds: 0.02,
    };
    let provider = FalProvider::new(&account, &models()).expect("adapter builds");
    (fake, provider)
}

#[tokio::test]
async fn a_request_is_queued_polled_through_its_states_and_its_video_downloaded() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        running_polls: 3,
        ..Scenario::default()
    });
    let j = job("fal-video", "fal", "a kite over dunes", 5, (1280, 720));
    let run = run(&provider, &j).await;
    let fal_job = fake
        .job_for("a kite over dunes")
        .expect("the fake got the job");
    assert_eq!(
        run.video().bytes.as_ref(),
        fake_video(&fal_job.id).as_slice()
    );
    assert_eq!(
        fal_job.model,
        "fal-ai/kling-video/v2.1/standard/text-to-video"
    );
    assert_eq!(
        fal_job.input,
        json!({"prompt": "a kite over dunes", "duration": "5", "aspect_ratio": "16:9"})
    );
    let requests = fake.requests();
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some(format!("Key {KEY}").as_str())));
    assert!(requests.iter().any(|r| r.method == "GET"
        && r.path
            .ends_with(&format!("/requests/{}/status", fal_job.id))));
    assert!(requests
        .iter()
        .any(|r| r.method == "GET" && r.path.ends_with(&format!("/requests/{}", fal_job.id))));
    assert_eq!(fal_job.downloads, 1);
    run.assert_progress_monotonic();
    let messages = run.messages();
    for expected in [
        "Submitted to fal",
        "Queued at fal (position 3)",
        "Generating at fal",
        "Downloading the video from fal",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "{expected}: {messages:?}"
        );
    }
}

#[tokio::test]
async fn rate_limits_are_retried_and_refusals_are_clear() {
    let (fake, provider) = start();
    fake.on_prompt(
        "busy",
        Scenario {
            rate_limited_submits: 2,
            ..Scenario::default()
        },
    );
    fake.on_prompt(
        "flagged",
        Scenario::failing("content_policy_violation", "The content was flagged"),
    );
    fake.on_prompt(
        "revoked",
        Scenario {
            refuse_credential: true,
            ..Scenario::default()
        },
    );
    let busy = run(&provider, &job("fal-video", "fal", "busy", 5, (1280, 720))).await;
    assert!(busy.result.is_ok());
    assert_eq!(
        fake.requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        3
    );
    let flagged = run(
        &provider,
        &job("fal-video", "fal", "flagged", 5, (1280, 720)),
    )
    .await;
    let error = flagged.error();
    assert!(
        error.contains("fal could not generate the video")
            && error.contains("The content was flagged (content_policy_violation)"),
        "{error}"
    );
    assert!(matches!(flagged.result, Err(GenerationError::Failed(_))));
    let revoked = run(
        &provider,
        &job("fal-video", "fal", "revoked", 5, (1280, 720)),
    )
    .await;
    let error = revoked.error();
    assert!(
        error.contains("CONDUIT__PROVIDERS__FAL__API_KEY"),
        "{error}"
    );
    assert_no_key(&error);
}

#[tokio::test]
async fn a_rate_limit_that_never_clears_leaves_the_provider_unavailable() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        rate_limited_submits: 100,
        ..Scenario::default()
    });
    let run = run(
        &provider,
        &job("fal-video", "fal", "always busy", 5, (1280, 720)),
    )
    .await;
    match &run.result {
        Err(GenerationError::Unavailable(why)) => {
            assert!(why.contains("after 8 attempts"), "{why}")
        }
        other => panic!(
            "expected an unavailable provider, got {:?}",
            other.as_ref().err()
        ),
    }
}

#[tokio::test]
async fn an_image_goes_to_the_image_to_video_endpoint_as_image_url() {
    let (fake, provider) = start();
    let mut j = job("fal-video", "fal", "the cat wakes up", 5, (1280, 720));
    j.image_url = Some("https://images.example/cat.png".into());
    let run = run(&provider, &j).await;
    assert!(run.result.is_ok());
    let fal_job = fake.job_for("the cat wakes up").expect("job");
    assert_eq!(
        fal_job.model,
        "fal-ai/kling-video/v2.1/standard/image-to-video"
    );
    assert_eq!(fal_job.input["image_url"], "https://images.example/cat.png");
}

#[tokio::test]
async fn a_cancel_puts_the_cancel_url() {
    let (fake, provider) = start();
    fake.set_default(Scenario::endless());
    let j = job("fal-video", "fal", "cancelled", 5, (1280, 720));
    let cancel = CancellationToken::new();
    let (ctx, _) = context(cancel.clone());
    let watcher = async {
        conduit_testkit::eventually("polls", Duration::from_secs(30), || async {
            fake.job_for("cancelled")
                .filter(|j| j.polls >= 2)
                .map(|_| ())
        })
        .await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(provider.generate(&j, ctx), watcher);
    assert!(matches!(result, Err(GenerationError::Cancelled)));
    settle().await;
    let fal_job = fake.job_for("cancelled").expect("job");
    assert!(fal_job.cancelled);
    assert!(fake.requests().iter().any(|r| r.method == "PUT"
        && r.path
            .ends_with(&format!("/requests/{}/cancel", fal_job.id))));
}
