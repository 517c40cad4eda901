use conduit_core::{config::ProviderAccount, Secret};
use conduit_generator::providers::{GenerationError, VeoProvider};
use conduit_testkit::{
    fake_veo::FakeVeo,
    fakes::{fake_video, Scenario},
};
use serde_json::json;

use crate::{assert_no_key, job, models, run, KEY};

fn start() -> (FakeVeo, VeoProvider) {
    let fake = FakeVeo::start(KEY);
    let account = ProviderAccount {
        api_key: Some(Secret::new(KEY)),
        base_url: fake.base_url(),
        poll_interval_seconds: 0.02,
    };
    let provider = VeoProvider::new(&account, &models()).expect("adapter builds");
    (fake, provider)
}

#[tokio::test]
async fn an_operation_is_started_polled_until_done_and_its_sample_downloaded_with_the_key() {
    let (fake, provider) = start();
    fake.set_default(Scenario {
        running_polls: 3,
        ..Scenario::default()
    });
    let j = job("veo-video", "veo", "waves on basalt", 8, (1280, 720));
    let run = run(&provider, &j).await;
    let op = fake
        .job_for("waves on basalt")
        .expect("the fake got the job");
    assert_eq!(run.video().bytes.as_ref(), fake_video(&op.id).as_slice());
    assert_eq!(op.model, "veo-3.1-generate-preview");
    assert_eq!(
        op.body,
        json!({"instances": [{"prompt": "waves on basalt"}],
               "parameters": {"aspectRatio": "16:9", "resolution": "720p", "durationSeconds": 8}})
    );
    let requests = fake.requests();
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some(KEY)));
    assert!(requests.iter().any(|r| r.method == "POST"
        && r.path == "/v1beta/models/veo-3.1-generate-preview:predictLongRunning"));
    assert!(requests.iter().any(|r| r.method == "GET"
        && r.path
            == format!(
                "/v1beta/models/veo-3.1-generate-preview/operations/{}",
                op.id
            )));
    assert!(requests
        .iter()
        .any(|r| r.path == format!("/v1beta/files/{}:download", op.id) && r.query == "alt=media"));
    run.assert_progress_monotonic();
    let messages = run.messages();
    for expected in [
        "Submitted to Veo",
        "Generating at Veo",
        "Downloading the video from Veo",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "{expected}: {messages:?}"
        );
    }
}

#[tokio::test]
async fn safety_filters_errors_and_a_bad_key_become_clear_errors() {
    let (fake, provider) = start();
    fake.on_prompt(
        "filtered",
        Scenario::failing(
            "RAI",
            "The prompt could not be submitted. It may violate our policies.",
        ),
    );
    fake.on_prompt(
        "broken",
        Scenario::failing("INTERNAL", "The model crashed."),
    );
    fake.on_prompt(
        "revoked",
        Scenario {
            refuse_credential: true,
            ..Scenario::default()
        },
    );
    fake.on_prompt(
        "busy",
        Scenario {
            rate_limited_submits: 2,
            ..Scenario::default()
        },
    );
    let filtered = run(
        &provider,
        &job("veo-video", "veo", "filtered", 8, (1280, 720)),
    )
    .await;
    assert_eq!(
        filtered.error(),
        "Veo's safety filters withheld the generated video: The prompt could not be submitted. It may violate our policies."
    );
    assert!(matches!(filtered.result, Err(GenerationError::Failed(_))));
    let broken = run(
        &provider,
        &job("veo-video", "veo", "broken", 8, (1280, 720)),
    )
    .await;
    assert_eq!(
        broken.error(),
        "Veo could not generate the video: The model crashed. (INTERNAL)"
    );
    let revoked = run(
        &provider,
        &job("veo-video", "veo", "revoked", 8, (1280, 720)),
    )
    .await;
    let error = revoked.error();
    assert!(
        error.contains("CONDUIT__PROVIDERS__VEO__API_KEY"),
        "{error}"
    );
    assert_no_key(&error);
    let busy = run(&provider, &job("veo-video", "veo", "busy", 8, (720, 1280))).await;
    assert!(busy.result.is_ok());
    let op = fake.job_for("busy").expect("job");
    assert_eq!(op.body["parameters"]["aspectRatio"], "9:16");
}

#[tokio::test]
async fn an_image_is_sent_inline_as_the_first_frame() {
    let (fake, provider) = start();
    let mut j = job("veo-video", "veo", "the statue turns", 6, (1920, 1080));
    j.image_url = Some(format!("data:image/png;base64,{}", crate::images::PNG_1X1));
    let run = run(&provider, &j).await;
    assert!(run.result.is_ok(), "{:?}", run.result.as_ref().err());
    let op = fake.job_for("the statue turns").expect("job");
    assert_eq!(
        op.body["instances"][0]["image"],
        json!({"bytesBase64Encoded": crate::images::PNG_1X1, "mimeType": "image/png"})
    );
    assert_eq!(op.body["parameters"]["resolution"], "1080p");
}
