use conduit_generator::providers::{GenerationError, MiniMaxProvider};
use conduit_testkit::fakes::{fake_video, FakeProvider, Protocol, Scenario};
use serde_json::json;

use crate::{account, assert_no_key, job, models, run, run_and_cancel, KEY};

fn start() -> (FakeProvider, MiniMaxProvider) {
    let fake = FakeProvider::start(Protocol::MiniMax, KEY);
    let provider = MiniMaxProvider::new(&account(&fake, KEY), &models()).expect("adapter builds");
    (fake, provider)
}

#[tokio::test]
async fn a_video_is_made_with_the_documented_requests_and_progress() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        running_polls: 3,
        ..Scenario::default()
    });
    let j = job(
        "minimax-video",
        "minimax",
        "a red fox in the snow",
        6,
        (1280, 720),
    );
    let run = run(&provider, &j).await;
    let fake_job = fake
        .job_for("a red fox in the snow")
        .expect("the fake got the job");
    assert_eq!(
        run.video().bytes.as_ref(),
        fake_video(&fake_job.id).as_slice()
    );
    assert_eq!(run.video().frames_rendered, None);

    // `duration` and `resolution` as MiniMax documents them; 1280x720 maps to 768P.
    assert_eq!(
        fake_job.params,
        json!({"model": "MiniMax-Hailuo-02", "prompt": "a red fox in the snow", "duration": 6, "resolution": "768P"})
    );
    // Preparing, Queueing, twice Processing, then Success.
    assert_eq!(fake_job.polls, 5);
    let requests = fake.requests();
    let api: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/v1/"))
        .collect();
    assert!(api
        .iter()
        .all(|r| r.authorization.as_deref() == Some(format!("Bearer {KEY}").as_str())));
    assert!(api
        .iter()
        .any(|r| r.path == "/v1/query/video_generation"
            && r.query == format!("task_id={}", fake_job.id)));
    assert!(
        api.iter()
            .any(|r| r.path == "/v1/files/retrieve"
                && r.query == format!("file_id={}01", fake_job.id))
    );

    run.assert_progress_monotonic();
    let messages = run.messages();
    for expected in [
        "Submitted to MiniMax",
        "Preparing at MiniMax",
        "Queued at MiniMax",
        "Generating at MiniMax",
        "Downloading the video from MiniMax",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no {expected:?} in {messages:?}"
        );
    }
    assert_eq!(run.progress.last().map(|p| p.percent), Some(95));
}

#[tokio::test]
async fn the_size_picks_the_resolution_by_height() {
    let (fake, provider) = start();
    for (prompt, seconds, size, resolution) in [
        ("small", 10, (640, 360), "512P"),
        ("exact 768", 10, (1366, 768), "768P"),
        ("full hd", 6, (1920, 1080), "1080P"),
    ] {
        let run = run(
            &provider,
            &job("minimax-video", "minimax", prompt, seconds, size),
        )
        .await;
        run.video();
        let params = fake.job_for(prompt).expect("job").params;
        assert_eq!(params["resolution"], resolution, "{prompt}");
        assert_eq!(params["duration"], seconds, "{prompt}");
    }
}

#[tokio::test]
async fn the_rate_limit_is_backed_off_and_retried() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        rate_limited_submits: 3,
        ..Scenario::default()
    });
    let run = run(
        &provider,
        &job("minimax-video", "minimax", "busy", 6, (1280, 720)),
    )
    .await;
    run.video();
    assert_eq!(fake.submits(), 4);
    assert_eq!(fake.jobs().len(), 1);
}

#[tokio::test]
async fn a_rate_limit_that_never_clears_ends_in_a_clear_error() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        rate_limited_submits: 100,
        ..Scenario::default()
    });
    let error = run(
        &provider,
        &job("minimax-video", "minimax", "always busy", 6, (1280, 720)),
    )
    .await
    .error();
    assert_eq!(
        error,
        "Gave up trying to submit the video task at MiniMax after 8 attempts: MiniMax rate limit (1002 rate limit)"
    );
    assert_eq!(fake.submits(), 8);
}

#[tokio::test]
async fn a_failed_task_says_why() {
    let (fake, provider) = start();
    fake.on_prompt("policy", Scenario::failing("1026", "input new_sensitive"));
    fake.on_prompt("plain", Scenario::failing("0", ""));
    let error = run(
        &provider,
        &job("minimax-video", "minimax", "policy breach", 6, (1280, 720)),
    )
    .await
    .error();
    assert!(error.contains("content policy"), "{error}");
    assert!(
        error.contains("1026") && error.contains("input new_sensitive"),
        "{error}"
    );

    let error = run(
        &provider,
        &job("minimax-video", "minimax", "plain failure", 6, (1280, 720)),
    )
    .await
    .error();
    assert!(
        error.contains("MiniMax could not generate the video"),
        "{error}"
    );
}

#[tokio::test]
async fn base_resp_errors_at_submit_are_mapped() {
    let (fake, provider) = start();
    for (needle, code, words) in [
        ("broke", "1008", "balance is insufficient"),
        ("naughty", "1026", "content policy"),
        ("odd", "1013", "MiniMax answered with error 1013: weird"),
    ] {
        fake.on_prompt(
            needle,
            Scenario {
                refuse_submit: Some((code.into(), "weird".into())),
                ..Scenario::default()
            },
        );
        let error = run(
            &provider,
            &job("minimax-video", "minimax", needle, 6, (1280, 720)),
        )
        .await
        .error();
        assert!(error.contains(words), "{needle}: {error}");
    }
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
        &job("minimax-video", "minimax", "who am i", 6, (1280, 720)),
    )
    .await
    .error();
    assert!(
        error.contains("CONDUIT__PROVIDERS__MINIMAX__API_KEY"),
        "{error}"
    );
    assert!(error.contains("1004"), "{error}");
    assert_no_key(&error);

    // A wrong key is refused the same way (the fake expects another one).
    let other = MiniMaxProvider::new(&account(&fake, "sk-wrong-0000"), &models()).expect("adapter");
    fake.set_default(Scenario::default());
    let error = run(
        &other,
        &job("minimax-video", "minimax", "wrong key", 6, (1280, 720)),
    )
    .await
    .error();
    assert!(!error.contains("sk-wrong-0000"), "{error}");
}

#[tokio::test]
async fn a_download_that_fails_once_is_retried_and_one_that_keeps_failing_is_an_error() {
    let (fake, provider) = start();
    fake.on_prompt(
        "flaky",
        Scenario {
            failed_downloads: 1,
            ..Scenario::default()
        },
    );
    fake.on_prompt(
        "broken",
        Scenario {
            failed_downloads: 5,
            ..Scenario::default()
        },
    );
    let run_ok = run(
        &provider,
        &job("minimax-video", "minimax", "flaky cdn", 6, (1280, 720)),
    )
    .await;
    let flaky = fake.job_for("flaky cdn").expect("job");
    assert_eq!(
        run_ok.video().bytes.as_ref(),
        fake_video(&flaky.id).as_slice()
    );
    assert_eq!(flaky.downloads, 2);

    let error = run(
        &provider,
        &job("minimax-video", "minimax", "broken cdn", 6, (1280, 720)),
    )
    .await
    .error();
    assert!(
        error.contains("failed twice") && error.contains("HTTP 500"),
        "{error}"
    );
    assert_eq!(fake.job_for("broken cdn").expect("job").downloads, 2);
}

#[tokio::test]
async fn a_cancel_stops_the_polling() {
    let (fake, provider) = start();
    fake.set_default(Scenario::endless());
    let j = job("minimax-video", "minimax", "forever", 6, (1280, 720));
    let result = run_and_cancel(&provider, &j, &fake, 3).await;
    assert!(matches!(result, Err(GenerationError::Cancelled)));
    let polls = fake.job_for("forever").expect("job").polls;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(fake.job_for("forever").expect("job").polls, polls);
}
