use conduit_generator::providers::{GenerationError, ReplicateProvider};
use conduit_testkit::fakes::{fake_video, FakeProvider, Protocol, Scenario};
use serde_json::json;

use crate::{account, assert_no_key, job, models, run, run_and_cancel, run_and_drop, settle, KEY};

fn start() -> (FakeProvider, ReplicateProvider) {
    let fake = FakeProvider::start(Protocol::Replicate, KEY);
    let provider = ReplicateProvider::new(&account(&fake, KEY), &models()).expect("adapter builds");
    (fake, provider)
}

#[tokio::test]
async fn a_prediction_is_created_for_the_official_model_polled_and_downloaded() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        running_polls: 3,
        ..Scenario::default()
    });
    let j = job(
        "replicate-video",
        "replicate",
        "a paper boat on a river",
        6,
        (1280, 720),
    );
    let run = run(&provider, &j).await;
    let fake_job = fake
        .job_for("a paper boat on a river")
        .expect("the fake got the job");
    assert_eq!(
        run.video().bytes.as_ref(),
        fake_video(&fake_job.id).as_slice()
    );
    assert_eq!(
        fake_job.params["input"],
        json!({"prompt": "a paper boat on a river"})
    );
    assert_eq!(fake_job.params["_model"], "minimax/video-01");
    let requests = fake.requests();
    assert!(requests
        .iter()
        .any(|r| r.method == "POST" && r.path == "/v1/models/minimax/video-01/predictions"));
    assert!(requests
        .iter()
        .any(|r| r.method == "GET" && r.path == format!("/v1/predictions/{}", fake_job.id)));
    assert!(requests
        .iter()
        .filter(|r| r.path.starts_with("/v1/"))
        .all(|r| r.authorization.as_deref() == Some(format!("Bearer {KEY}").as_str())));

    run.assert_progress_monotonic();
    let messages = run.messages();
    for expected in [
        "Starting at Replicate",
        "Generating at Replicate",
        "Downloading the video from Replicate",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no {expected:?} in {messages:?}"
        );
    }
}

#[tokio::test]
async fn a_throttled_create_is_retried() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        rate_limited_submits: 2,
        ..Scenario::default()
    });
    run(
        &provider,
        &job("replicate-video", "replicate", "busy", 6, (1280, 720)),
    )
    .await
    .video();
    assert_eq!(fake.submits(), 3);
}

#[tokio::test]
async fn failures_say_why() {
    let (fake, provider) = start();
    fake.on_prompt("fails", Scenario::failing("", "CUDA out of memory"));
    fake.on_prompt(
        "invalid",
        Scenario {
            refuse_submit: Some(("".into(), "input.prompt: too long".into())),
            ..Scenario::default()
        },
    );
    let error = run(
        &provider,
        &job("replicate-video", "replicate", "this fails", 6, (1280, 720)),
    )
    .await
    .error();
    assert_eq!(
        error,
        "Replicate could not generate the video: CUDA out of memory"
    );
    let error = run(
        &provider,
        &job(
            "replicate-video",
            "replicate",
            "invalid input",
            6,
            (1280, 720),
        ),
    )
    .await
    .error();
    assert!(
        error.contains("refused the model's input") && error.contains("input.prompt: too long"),
        "{error}"
    );
}

#[tokio::test]
async fn a_refused_token_names_the_setting_and_never_the_token() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        refuse_credential: true,
        ..Scenario::default()
    });
    let error = run(
        &provider,
        &job("replicate-video", "replicate", "who am i", 6, (1280, 720)),
    )
    .await
    .error();
    assert!(
        error.contains("CONDUIT__PROVIDERS__REPLICATE__API_TOKEN"),
        "{error}"
    );
    assert_no_key(&error);
}

#[tokio::test]
async fn an_output_download_that_fails_once_is_retried() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        failed_downloads: 1,
        ..Scenario::default()
    });
    let run = run(
        &provider,
        &job("replicate-video", "replicate", "flaky", 6, (1280, 720)),
    )
    .await;
    let flaky = fake.job_for("flaky").expect("job");
    assert_eq!(run.video().bytes.as_ref(), fake_video(&flaky.id).as_slice());
    assert_eq!(flaky.downloads, 2);
}

#[tokio::test]
async fn a_cancel_or_a_timeout_cancels_the_prediction() {
    let (fake, provider) = start();
    fake.set_default(Scenario::endless());
    let cancelled = job("replicate-video", "replicate", "cancelled", 6, (1280, 720));
    let result = run_and_cancel(&provider, &cancelled, &fake, 2).await;
    assert!(matches!(result, Err(GenerationError::Cancelled)));
    let timed_out = job("replicate-video", "replicate", "timed out", 6, (1280, 720));
    run_and_drop(&provider, &timed_out, &fake, 2).await;
    settle().await;
    for prompt in ["cancelled", "timed out"] {
        let fake_job = fake.job_for(prompt).expect("job");
        assert!(fake_job.cancelled, "{prompt}");
        assert!(fake
            .requests()
            .iter()
            .any(|r| r.method == "POST"
                && r.path == format!("/v1/predictions/{}/cancel", fake_job.id)));
    }
}

#[tokio::test]
async fn a_finished_prediction_is_not_cancelled() {
    let (fake, provider) = start();
    fake.on_prompt("fails", Scenario::failing("", "boom"));
    run(
        &provider,
        &job("replicate-video", "replicate", "done", 6, (1280, 720)),
    )
    .await
    .video();
    let _ = run(
        &provider,
        &job("replicate-video", "replicate", "fails too", 6, (1280, 720)),
    )
    .await;
    settle().await;
    assert!(fake.jobs().iter().all(|j| !j.cancelled));
}

#[tokio::test]
async fn a_model_version_uses_the_predictions_endpoint() {
    let (fake, provider) = start();
    let mut j = job("replicate-video", "replicate", "versioned", 6, (1280, 720));
    j.upstream_model =
        Some("acme/vid:5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa".into());
    // The fake only serves official models, so this create is refused with a 404 that
    // names Replicate; the path shows the version form was used.
    let error = run(&provider, &j).await.error();
    assert!(error.contains("Replicate"), "{error}");
    assert!(fake
        .requests()
        .iter()
        .any(|r| r.method == "POST" && r.path == "/v1/predictions"));
}
