use conduit_generator::providers::{GenerationError, OpenAiProvider};
use conduit_testkit::fakes::{fake_video, FakeProvider, Protocol, Scenario};
use serde_json::json;

use crate::{
    account, assert_no_key, job, models, run, run_and_cancel, run_and_drop, settle, KEY,
    VIDEOS_MODEL,
};

fn start() -> (FakeProvider, OpenAiProvider) {
    let fake = FakeProvider::start(Protocol::OpenAi, KEY);
    let provider = OpenAiProvider::new(&account(&fake, KEY), &models()).expect("adapter builds");
    (fake, provider)
}

#[tokio::test]
async fn a_video_is_made_with_a_multipart_create_numeric_progress_and_the_content_endpoint() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        running_polls: 4,
        ..Scenario::default()
    });
    let j = job(
        "openai-video",
        "openai",
        "a lighthouse at dusk",
        8,
        (1280, 720),
    );
    let run = run(&provider, &j).await;
    let fake_job = fake
        .job_for("a lighthouse at dusk")
        .expect("the fake got the job");
    assert_eq!(
        run.video().bytes.as_ref(),
        fake_video(&fake_job.id).as_slice()
    );
    assert_eq!(
        fake_job.params,
        json!({"model": VIDEOS_MODEL, "prompt": "a lighthouse at dusk", "seconds": "8", "size": "1280x720"})
    );
    let requests = fake.requests();
    let create = requests
        .iter()
        .find(|r| r.method == "POST" && r.path == "/v1/videos")
        .expect("a create request");
    assert!(create
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("multipart/form-data")));
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some(format!("Bearer {KEY}").as_str())));
    assert!(requests
        .iter()
        .any(|r| r.method == "GET" && r.path == format!("/v1/videos/{}/content", fake_job.id)));

    run.assert_progress_monotonic();
    let messages = run.messages();
    assert!(
        messages.iter().any(|m| m == "Queued at the video server"),
        "{messages:?}"
    );
    // The server's numeric progress shows through, scaled into 10..90.
    let generating: Vec<u8> = run
        .progress
        .iter()
        .filter(|p| p.message.starts_with("Generating at the video server ("))
        .map(|p| p.percent)
        .collect();
    assert!(generating.len() >= 3, "{messages:?}");
    assert!(generating.windows(2).any(|w| w[0] < w[1]), "{generating:?}");
    assert!(
        generating.iter().all(|p| (10..=90).contains(p)),
        "{generating:?}"
    );
}

#[tokio::test]
async fn a_rate_limit_is_retried() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        rate_limited_submits: 2,
        ..Scenario::default()
    });
    run(
        &provider,
        &job("openai-video", "openai", "busy", 4, (720, 1280)),
    )
    .await
    .video();
    assert_eq!(fake.submits(), 3);
}

#[tokio::test]
async fn a_failed_video_and_a_refused_request_say_why() {
    let (fake, provider) = start();
    fake.on_prompt(
        "fails",
        Scenario::failing(
            "moderation_blocked",
            "The request was blocked by moderation.",
        ),
    );
    fake.on_prompt(
        "refused",
        Scenario {
            refuse_submit: Some(("invalid_prompt".into(), "The prompt is too vague.".into())),
            ..Scenario::default()
        },
    );
    let error = run(
        &provider,
        &job("openai-video", "openai", "this fails", 4, (1280, 720)),
    )
    .await
    .error();
    assert!(error.contains("could not generate the video"), "{error}");
    assert!(
        error.contains("The request was blocked by moderation. (moderation_blocked)"),
        "{error}"
    );

    let error = run(
        &provider,
        &job("openai-video", "openai", "this is refused", 4, (1280, 720)),
    )
    .await
    .error();
    assert!(
        error.contains("refused the request (HTTP 400): The prompt is too vague."),
        "{error}"
    );
}

#[tokio::test]
async fn a_refused_key_names_the_setting_and_never_the_key() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        refuse_credential: true,
        ..Scenario::default()
    });
    let error = run(
        &provider,
        &job("openai-video", "openai", "who am i", 4, (1280, 720)),
    )
    .await
    .error();
    assert!(
        error.contains("CONDUIT__PROVIDERS__OPENAI__API_KEY"),
        "{error}"
    );
    assert!(error.contains("HTTP 401"), "{error}");
    assert_no_key(&error);
}

#[tokio::test]
async fn a_content_download_that_fails_once_is_retried() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        failed_downloads: 1,
        ..Scenario::default()
    });
    let run = run(
        &provider,
        &job("openai-video", "openai", "flaky", 4, (1280, 720)),
    )
    .await;
    let flaky = fake.job_for("flaky").expect("job");
    assert_eq!(run.video().bytes.as_ref(), fake_video(&flaky.id).as_slice());
    assert_eq!(flaky.downloads, 2);
}

#[tokio::test]
async fn a_cancel_or_a_timeout_deletes_the_upstream_job() {
    let (fake, provider) = start();
    fake.set_default(Scenario::endless());
    let cancelled = job("openai-video", "openai", "cancelled", 4, (1280, 720));
    let result = run_and_cancel(&provider, &cancelled, &fake, 2).await;
    assert!(matches!(result, Err(GenerationError::Cancelled)));
    let timed_out = job("openai-video", "openai", "timed out", 4, (1280, 720));
    run_and_drop(&provider, &timed_out, &fake, 2).await;
    settle().await;
    assert!(fake.job_for("cancelled").expect("job").deleted);
    assert!(fake.job_for("timed out").expect("job").deleted);
    assert!(fake
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .all(|r| r.authorization.as_deref() == Some(format!("Bearer {KEY}").as_str())));
}

#[tokio::test]
async fn a_finished_job_is_not_deleted() {
    let (fake, provider) = start();
    run(
        &provider,
        &job("openai-video", "openai", "kept", 4, (1280, 720)),
    )
    .await
    .video();
    settle().await;
    assert!(!fake.job_for("kept").expect("job").deleted);
}
