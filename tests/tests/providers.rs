//! The remote providers end to end: the real API, broker, generator and webhook sender,
//! with the generator pointed at a local fake of MiniMax, an OpenAI-compatible Videos
//! server or Replicate (`conduit_testkit::fakes`). Each test submits over HTTP and
//! checks what a user sees (status, webhooks, the stored video, error strings) and
//! what the provider saw (fields, polls, downloads, cancels).

use std::time::Duration;

use conduit_testkit::{
    eventually,
    fake_fal::FakeFal,
    fake_veo::FakeVeo,
    fakes::{fake_video, FakeProvider, Protocol, Scenario},
    video::{first_frame_rgb, mean_difference},
    ReceivedWebhook, Receiver, Stack, StackOptions,
};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);
const KEY: &str = "sk-e2e-5d41402abc4b2a76b9719d911017c592";
/// The model a `/v1/videos` server is configured with in these tests (there is no default).
const VIDEOS_MODEL: &str = "wan-2.5-t2v";
/// `openai-video` as an operator configures it for a `/v1/videos` server.
const VIDEOS_CONFIG: &str = r#"
[models.openai-video]
provider = "openai"
upstream_model = "wan-2.5-t2v"
durations = [4, 8, 12]
sizes = ["1280x720", "720x1280"]
"#;

/// A configuration file with `toml` in it, as the `CONDUIT_CONFIG` variable for a stack.
fn config_file(toml: &str) -> (String, String) {
    let path =
        std::env::temp_dir().join(format!("conduit-providers-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, toml).expect("config file written");
    ("CONDUIT_CONFIG".to_owned(), path.display().to_string())
}

/// A stack whose generator talks to `fake` for `provider` (`MINIMAX`, `OPENAI`,
/// `REPLICATE`), polling every 50 ms.
async fn stack_for(fake: &FakeProvider, provider: &str, extra: &[(&str, &str)]) -> Stack {
    let key_name = if provider == "REPLICATE" {
        "API_TOKEN"
    } else {
        "API_KEY"
    };
    let mut env = vec![
        (
            format!("CONDUIT__PROVIDERS__{provider}__{key_name}"),
            KEY.to_owned(),
        ),
        (
            format!("CONDUIT__PROVIDERS__{provider}__BASE_URL"),
            fake.base_url(),
        ),
        (
            format!("CONDUIT__PROVIDERS__{provider}__POLL_INTERVAL_SECONDS"),
            "0.05".to_owned(),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Stack::start_with(StackOptions {
        env,
        ..StackOptions::default()
    })
    .await
}

async fn terminal_webhook(receiver: &Receiver, task_id: &str) -> ReceivedWebhook {
    eventually(&format!("terminal webhook of {task_id}"), LONG, || async {
        receiver.received().into_iter().find(|h| {
            let b = h.json();
            b["task_id"] == task_id && b["webhook_type"] == "video_generation_completed"
        })
    })
    .await
}

/// Submits `body` (with the receiver as webhook target) and returns the task id.
async fn submit(stack: &Stack, receiver: &Receiver, mut body: Value) -> String {
    body["webhook_url"] = json!(receiver.url("/hook"));
    stack.submit_ok(&body).await
}

/// The video the API serves for a completed task.
async fn served_video(task: &Value) -> Vec<u8> {
    let url = task["video_url"].as_str().expect("a video_url");
    let response = reqwest::get(url).await.expect("video reachable");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "video/mp4");
    response.bytes().await.expect("video body").to_vec()
}

/// A refused submit: (status, code, param, message).
async fn refused(stack: &Stack, body: Value) -> (u16, String, String, String) {
    let (status, json) = stack.submit(&body).await;
    let e = &json["error"];
    (
        status,
        e["code"].as_str().unwrap_or_default().to_owned(),
        e["param"].as_str().unwrap_or_default().to_owned(),
        e["message"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The credential shows in no task, webhook or service log.
async fn assert_key_never_shown(stack: &Stack, receiver: &Receiver) {
    let (_, tasks) = stack.get("/v1/videos/generations/tasks?limit=100").await;
    assert!(!tasks.to_string().contains(KEY), "a task shows the key");
    for hook in receiver.received() {
        assert!(!hook.body.contains(KEY), "a webhook shows the key");
    }
    for proc in std::iter::once(&stack.api)
        .chain(&stack.generators)
        .chain(&stack.senders)
    {
        assert!(!proc.logs().contains(KEY), "a service log shows the key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimax_end_to_end() {
    let fake = FakeProvider::start(Protocol::MiniMax, KEY);
    fake.on_prompt(
        "slow",
        Scenario {
            rate_limited_submits: 2,
            running_polls: 5,
            failed_downloads: 1,
            ..Scenario::default()
        },
    );
    fake.on_prompt("policy", Scenario::failing("1026", "input new_sensitive"));
    fake.on_prompt(
        "revoked",
        Scenario {
            refuse_credential: true,
            ..Scenario::default()
        },
    );
    let stack = stack_for(&fake, "MINIMAX", &[]).await;
    let receiver = Receiver::start().await;

    let (_, models) = stack.get("/v1/models").await;
    let minimax = models["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == "minimax-video"))
        .cloned()
        .expect("minimax-video listed");
    assert_eq!(minimax["available"], true);

    // What MiniMax-Hailuo-02 cannot make is refused at submit, naming the field.
    for (duration, size, param, words) in [
        (10, "1920x1080", "duration", "1080P"),
        (8, "1280x720", "duration", "6 or 10"),
        (6, "720x1280", "size", "512P, 768P or 1080P"),
        (6, "3840x2160", "size", "at most 1080 high"),
    ] {
        let (status, code, p, message) = refused(
            &stack,
            json!({"model": "minimax-video", "prompt": "p", "duration": duration, "size": size}),
        )
        .await;
        assert_eq!(
            (status, code.as_str(), p.as_str()),
            (400, "invalid_value", param),
            "{message}"
        );
        assert!(message.contains(words), "{message}");
    }
    assert_eq!(fake.submits(), 0);

    // A slow job: rate limited twice, several polls, a download that fails once.
    let prompt = "a slow sunrise over the sea";
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "minimax-video", "prompt": prompt}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "completed", "{hook}");
    let job = fake.job_for(prompt).expect("MiniMax got the job");
    assert_eq!(
        job.params,
        json!({"model": "MiniMax-Hailuo-02", "prompt": prompt, "duration": 6, "resolution": "768P"})
    );
    assert_eq!(fake.submits(), 3);
    assert_eq!(job.polls, 7);
    assert_eq!(job.downloads, 2);
    let task = stack.task(&task_id).await;
    assert_eq!(task["status"], "completed");
    assert_eq!(task["progress"], 100);
    assert_eq!(served_video(&task).await, fake_video(&job.id));
    assert_eq!(served_video(&hook).await, fake_video(&job.id));

    // A 10-second 512P job.
    let small = submit(
        &stack,
        &receiver,
        json!({"model": "minimax-video", "prompt": "small and long", "duration": 10, "size": "640x360"}),
    )
    .await;
    assert_eq!(
        terminal_webhook(&receiver, &small).await.json()["status"],
        "completed"
    );
    let params = fake.job_for("small and long").expect("job").params;
    assert_eq!(
        (params["duration"].clone(), params["resolution"].clone()),
        (json!(10), json!("512P"))
    );

    // A failure at MiniMax and a refused key become clear errors.
    let policy = submit(
        &stack,
        &receiver,
        json!({"model": "minimax-video", "prompt": "a policy breach"}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &policy).await.json();
    assert_eq!(hook["status"], "failed");
    let error = hook["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("content policy") && error.contains("1026"),
        "{error}"
    );
    assert_eq!(stack.task(&policy).await["error"], hook["error"]);

    let revoked = submit(
        &stack,
        &receiver,
        json!({"model": "minimax-video", "prompt": "a revoked key"}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &revoked).await.json();
    assert_eq!(hook["status"], "failed");
    let error = hook["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("CONDUIT__PROVIDERS__MINIMAX__API_KEY"),
        "{error}"
    );
    assert!(!error.contains(KEY), "{error}");

    assert_key_never_shown(&stack, &receiver).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_compatible_end_to_end() {
    let fake = FakeProvider::start(Protocol::OpenAi, KEY);
    fake.on_prompt(
        "slow",
        Scenario {
            rate_limited_submits: 1,
            running_polls: 5,
            failed_downloads: 1,
            ..Scenario::default()
        },
    );
    fake.on_prompt(
        "blocked",
        Scenario::failing(
            "moderation_blocked",
            "Your request was blocked by our moderation system.",
        ),
    );
    fake.on_prompt("endless", Scenario::endless());
    let (config_key, config_path) = config_file(VIDEOS_CONFIG);
    let stack = stack_for(&fake, "OPENAI", &[(&config_key, &config_path)]).await;
    let receiver = Receiver::start().await;

    // The configured model makes 4, 8 or 12 seconds at 1280x720 or 720x1280 only.
    let (status, code, param, message) =
        refused(&stack, json!({"model": "openai-video", "prompt": "p"})).await;
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "invalid_value", "duration")
    );
    assert!(message.contains("4, 8 or 12"), "{message}");
    let (status, _, param, _) = refused(
        &stack,
        json!({"model": "openai-video", "prompt": "p", "duration": 8, "size": "1920x1080"}),
    )
    .await;
    assert_eq!((status, param.as_str()), (400, "size"));

    let prompt = "a slow tide in a harbour";
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "openai-video", "prompt": prompt, "duration": 8, "size": "720x1280"}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "completed", "{hook}");
    let job = fake.job_for(prompt).expect("the server got the job");
    assert_eq!(
        job.params,
        json!({"model": VIDEOS_MODEL, "prompt": prompt, "seconds": "8", "size": "720x1280"})
    );
    assert_eq!(job.downloads, 2);
    assert_eq!(served_video(&hook).await, fake_video(&job.id));

    let blocked = submit(
        &stack,
        &receiver,
        json!({"model": "openai-video", "prompt": "a blocked idea", "duration": 4}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &blocked).await.json();
    assert_eq!(hook["status"], "failed");
    let error = hook["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("Your request was blocked by our moderation system. (moderation_blocked)"),
        "{error}"
    );

    // A cancel deletes the job at the server.
    let endless = submit(
        &stack,
        &receiver,
        json!({"model": "openai-video", "prompt": "an endless job", "duration": 4}),
    )
    .await;
    eventually("the server to be polled", LONG, || async {
        fake.job_for("an endless job")
            .filter(|j| j.polls >= 2)
            .map(|_| ())
    })
    .await;
    cancel(&stack, &endless).await;
    assert_eq!(
        terminal_webhook(&receiver, &endless).await.json()["status"],
        "cancelled"
    );
    eventually("the job to be deleted upstream", LONG, || async {
        fake.job_for("an endless job")
            .filter(|j| j.deleted)
            .map(|_| ())
    })
    .await;

    assert_key_never_shown(&stack, &receiver).await;
    stack.stop().await;
}

async fn cancel(stack: &Stack, task_id: &str) {
    let response = stack
        .http
        .delete(stack.api_url(&format!("/v1/videos/generations/{task_id}")))
        .bearer_auth(&stack.key)
        .send()
        .await
        .expect("cancel request");
    assert_eq!(response.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_end_to_end_with_cancel() {
    let fake = FakeProvider::start(Protocol::Replicate, KEY);
    fake.on_prompt(
        "slow",
        Scenario {
            rate_limited_submits: 1,
            running_polls: 5,
            failed_downloads: 1,
            ..Scenario::default()
        },
    );
    fake.on_prompt("oom", Scenario::failing("", "CUDA out of memory"));
    fake.on_prompt("endless", Scenario::endless());
    let stack = stack_for(&fake, "REPLICATE", &[]).await;
    let receiver = Receiver::start().await;

    let prompt = "a slow paper boat";
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "replicate-video", "prompt": prompt}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "completed", "{hook}");
    let job = fake.job_for(prompt).expect("Replicate got the prediction");
    assert_eq!(job.params["input"], json!({"prompt": prompt}));
    assert_eq!(job.params["_model"], "minimax/video-01");
    assert_eq!(job.downloads, 2);
    assert_eq!(served_video(&hook).await, fake_video(&job.id));

    let oom = submit(
        &stack,
        &receiver,
        json!({"model": "replicate-video", "prompt": "oom please"}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &oom).await.json();
    assert_eq!(hook["status"], "failed");
    assert_eq!(
        hook["error"],
        "Replicate could not generate the video: CUDA out of memory"
    );

    // A cancel reaches Replicate's cancel endpoint.
    let endless = submit(
        &stack,
        &receiver,
        json!({"model": "replicate-video", "prompt": "an endless prediction"}),
    )
    .await;
    eventually("the prediction to be polled", LONG, || async {
        fake.job_for("an endless prediction")
            .filter(|j| j.polls >= 2)
            .map(|_| ())
    })
    .await;
    cancel(&stack, &endless).await;
    let hook = terminal_webhook(&receiver, &endless).await.json();
    assert_eq!(hook["status"], "cancelled");
    assert_eq!(
        hook["error"],
        "Video generation was cancelled by user request"
    );
    let id = fake.job_for("an endless prediction").expect("job").id;
    eventually("the cancel to reach Replicate", LONG, || async {
        fake.requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == format!("/v1/predictions/{id}/cancel"))
            .then_some(())
    })
    .await;

    assert_key_never_shown(&stack, &receiver).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_timeout_cancels_the_prediction() {
    let fake = FakeProvider::start(Protocol::Replicate, KEY);
    fake.set_default(Scenario::endless());
    let stack = stack_for(
        &fake,
        "REPLICATE",
        &[("CONDUIT__GENERATOR__TASK_TIMEOUT_SECONDS", "2")],
    )
    .await;
    let receiver = Receiver::start().await;
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "replicate-video", "prompt": "never done"}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "failed");
    let error = hook["error"].as_str().unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    eventually("the cancel to reach Replicate", LONG, || async {
        fake.job_for("never done")
            .filter(|j| j.cancelled)
            .map(|_| ())
    })
    .await;
    stack.stop().await;
}

/// The variables that point the stack's `provider` (`FAL`, `VEO`, ...) at `base_url`.
fn provider_env(provider: &str, base_url: String) -> Vec<(String, String)> {
    let key_name = if provider == "REPLICATE" {
        "API_TOKEN"
    } else {
        "API_KEY"
    };
    vec![
        (
            format!("CONDUIT__PROVIDERS__{provider}__{key_name}"),
            KEY.to_owned(),
        ),
        (
            format!("CONDUIT__PROVIDERS__{provider}__BASE_URL"),
            base_url,
        ),
        (
            format!("CONDUIT__PROVIDERS__{provider}__POLL_INTERVAL_SECONDS"),
            "0.05".to_owned(),
        ),
    ]
}

async fn stack_with(env: Vec<(String, String)>) -> Stack {
    Stack::start_with(StackOptions {
        env,
        ..StackOptions::default()
    })
    .await
}

fn listed(models: &Value, id: &str) -> Value {
    models["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("{id} listed in {models}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_and_veo_end_to_end() {
    let fal = FakeFal::start(KEY);
    fal.on_prompt(
        "slow",
        Scenario {
            rate_limited_submits: 1,
            running_polls: 4,
            failed_downloads: 1,
            ..Scenario::default()
        },
    );
    fal.on_prompt(
        "flagged",
        Scenario::failing("content_policy_violation", "The prompt was flagged"),
    );
    fal.on_prompt("endless", Scenario::endless());
    let veo = FakeVeo::start(KEY);
    veo.on_prompt(
        "slow",
        Scenario {
            running_polls: 4,
            ..Scenario::default()
        },
    );
    veo.on_prompt(
        "unsafe",
        Scenario::failing(
            "RAI",
            "The video could not be generated: it may violate our policies.",
        ),
    );
    let mut env = provider_env("FAL", fal.base_url());
    env.extend(provider_env("VEO", veo.base_url()));
    let stack = stack_with(env).await;
    let receiver = Receiver::start().await;

    let (_, models) = stack.get("/v1/models").await;
    for id in ["fal-video", "veo-video"] {
        let m = listed(&models, id);
        assert_eq!(m["available"], true, "{m}");
        assert_eq!(m["image_input"], true, "{m}");
    }
    // What the model cannot make is refused at submit.
    let (status, code, param, _) = refused(
        &stack,
        json!({"model": "veo-video", "prompt": "p", "duration": 5}),
    )
    .await;
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "invalid_value", "duration")
    );

    // fal: queued, polled, result read, video downloaded into Conduit's storage.
    let prompt = "a slow kite over dunes";
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "fal-video", "prompt": prompt, "duration": 5}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "completed", "{hook}");
    assert_eq!(hook["model"], "fal-video");
    let job = fal.job_for(prompt).expect("fal got the request");
    assert_eq!(job.model, "fal-ai/kling-video/v2.1/standard/text-to-video");
    assert_eq!(
        job.input,
        json!({"prompt": prompt, "duration": "5", "aspect_ratio": "16:9"})
    );
    assert_eq!(job.downloads, 2);
    assert_eq!(served_video(&hook).await, fake_video(&job.id));

    let flagged = submit(
        &stack,
        &receiver,
        json!({"model": "fal-video", "prompt": "a flagged idea", "duration": 5}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &flagged).await.json();
    assert_eq!(hook["status"], "failed");
    assert_eq!(
        hook["error"],
        "fal could not generate the video (HTTP 422): The prompt was flagged (content_policy_violation)"
    );

    // A cancel reaches fal's cancel_url.
    let endless = submit(
        &stack,
        &receiver,
        json!({"model": "fal-video", "prompt": "an endless request", "duration": 5}),
    )
    .await;
    eventually("fal to be polled", LONG, || async {
        fal.job_for("an endless request")
            .filter(|j| j.polls >= 2)
            .map(|_| ())
    })
    .await;
    cancel(&stack, &endless).await;
    assert_eq!(
        terminal_webhook(&receiver, &endless).await.json()["status"],
        "cancelled"
    );
    eventually("the cancel to reach fal", LONG, || async {
        fal.job_for("an endless request")
            .filter(|j| j.cancelled)
            .map(|_| ())
    })
    .await;

    // Veo: an operation polled until done, its sample downloaded with the key.
    let prompt = "slow waves on basalt";
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "veo-video", "prompt": prompt, "duration": 8, "size": "720x1280"}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "completed", "{hook}");
    let op = veo.job_for(prompt).expect("Veo got the request");
    assert_eq!(
        op.body,
        json!({"instances": [{"prompt": prompt}],
               "parameters": {"aspectRatio": "9:16", "resolution": "720p", "durationSeconds": 8}})
    );
    assert_eq!(op.downloads, 1);
    assert_eq!(served_video(&hook).await, fake_video(&op.id));
    assert!(veo
        .requests()
        .iter()
        .all(|r| r.authorization.as_deref() == Some(KEY)));

    let unsafe_task = submit(
        &stack,
        &receiver,
        json!({"model": "veo-video", "prompt": "something unsafe", "duration": 4}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &unsafe_task).await.json();
    assert_eq!(hook["status"], "failed");
    assert_eq!(
        hook["error"],
        "Veo's safety filters withheld the generated video: The video could not be generated: it may violate our policies."
    );

    assert_key_never_shown(&stack, &receiver).await;
    stack.stop().await;
}

/// The kit's 160x96 test picture, as RGB and as a data URI.
fn test_picture() -> (Vec<u8>, String) {
    use base64::Engine;
    let (rgb, file) = conduit_testkit::video::test_picture(160, 96);
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&file)
    );
    (rgb, uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_url_reaches_every_provider_that_takes_one() {
    let minimax = FakeProvider::start(Protocol::MiniMax, KEY);
    let videos = FakeProvider::start(Protocol::OpenAi, KEY);
    let replicate = FakeProvider::start(Protocol::Replicate, KEY);
    let fal = FakeFal::start(KEY);
    let veo = FakeVeo::start(KEY);
    let mut env = provider_env("MINIMAX", minimax.base_url());
    env.extend(provider_env("OPENAI", videos.base_url()));
    env.extend(provider_env("REPLICATE", replicate.base_url()));
    env.extend(provider_env("FAL", fal.base_url()));
    env.extend(provider_env("VEO", veo.base_url()));
    let (config_key, config_path) = config_file(&format!(
        "{VIDEOS_CONFIG}\n[models.text-only]\nprovider = \"local\"\nimage_input = false\n"
    ));
    env.push((config_key, config_path));
    let stack = stack_with(env).await;
    let receiver = Receiver::start().await;
    let (_, image) = test_picture();
    use base64::Engine;
    let image_bytes = base64::engine::general_purpose::STANDARD
        .decode(image.trim_start_matches("data:image/png;base64,"))
        .expect("base64");

    let (_, models) = stack.get("/v1/models").await;
    assert_eq!(listed(&models, "text-only")["image_input"], false);
    assert_eq!(listed(&models, "minimax-video")["image_input"], true);

    // A model that cannot take an image refuses one; so does a bad image.
    let (status, code, param, message) = refused(
        &stack,
        json!({"model": "text-only", "prompt": "p", "image_url": image}),
    )
    .await;
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "invalid_value", "image_url")
    );
    assert!(message.contains("text-only"), "{message}");
    let (status, code, param, _) = refused(
        &stack,
        json!({"model": "local-video", "prompt": "p", "image_url": "data:image/gif;base64,R0lGOD=="}),
    )
    .await;
    assert_eq!(
        (status, code.as_str(), param.as_str()),
        (400, "invalid_value", "image_url")
    );
    // More than 64 KiB besides the image is still too large.
    let (status, json) = stack
        .submit(
            &json!({"model": "local-video", "prompt": "p", "image_url": image,
            "webhook_headers": {"X-Pad": "x".repeat(70 * 1024)}}),
        )
        .await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    let submits = [
        (
            "minimax-video",
            "minimax first frame",
            json!({"duration": 6}),
        ),
        ("openai-video", "videos first frame", json!({"duration": 8})),
        ("replicate-video", "replicate first frame", json!({})),
        ("fal-video", "fal first frame", json!({"duration": 5})),
        ("veo-video", "veo first frame", json!({"duration": 8})),
    ];
    let mut tasks = Vec::new();
    for (model, prompt, extra) in &submits {
        let mut body = json!({"model": model, "prompt": prompt, "image_url": image});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        tasks.push(submit(&stack, &receiver, body).await);
    }
    for task_id in &tasks {
        let hook = terminal_webhook(&receiver, task_id).await.json();
        assert_eq!(hook["status"], "completed", "{hook}");
    }
    // Each provider received the image in its own documented field.
    let got = minimax.job_for("minimax first frame").expect("MiniMax job");
    assert_eq!(got.params["first_frame_image"], image.as_str());
    let got = videos
        .job_for("videos first frame")
        .expect("/v1/videos job");
    assert_eq!(got.params["input_reference"], image.as_str());
    let got = replicate
        .job_for("replicate first frame")
        .expect("Replicate job");
    assert_eq!(got.params["input"]["first_frame_image"], image.as_str());
    let got = fal.job_for("fal first frame").expect("fal job");
    assert_eq!(got.model, "fal-ai/kling-video/v2.1/standard/image-to-video");
    assert_eq!(got.input["image_url"], image.as_str());
    let got = veo.job_for("veo first frame").expect("Veo job");
    assert_eq!(got.body["instances"][0]["image"]["mimeType"], "image/png");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(
                got.body["instances"][0]["image"]["bytesBase64Encoded"]
                    .as_str()
                    .unwrap_or_default()
            )
            .expect("base64"),
        image_bytes
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_video_starts_with_the_image() {
    let stack = stack_with(Vec::new()).await;
    let receiver = Receiver::start().await;
    let (rgb, image) = test_picture();
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "local-video", "prompt": "the picture comes alive", "size": "160x96",
               "duration": 1, "fps": 6, "image_url": image}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "completed", "{hook}");
    let video = served_video(&hook).await;
    let (w, h, first) = first_frame_rgb(&video);
    assert_eq!((w, h), (160, 96));
    let difference = mean_difference(&first, &rgb);
    assert!(
        difference < 8.0,
        "the first frame differs from the image by {difference} per channel"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_model_falls_back_to_the_next_one() {
    let videos = FakeProvider::start(Protocol::OpenAi, KEY);
    videos.set_default(Scenario {
        rate_limited_submits: 1000,
        ..Scenario::default()
    });
    videos.on_prompt(
        "blocked",
        Scenario::failing("moderation_blocked", "Your request was blocked."),
    );
    let veo = FakeVeo::start(KEY);
    let mut env = provider_env("OPENAI", videos.base_url());
    env.extend(provider_env("VEO", veo.base_url()));
    let (config_key, config_path) =
        config_file(&format!("{VIDEOS_CONFIG}fallback = [\"veo-video\"]\n"));
    env.push((config_key, config_path));
    let stack = stack_with(env).await;
    let receiver = Receiver::start().await;

    let (_, models) = stack.get("/v1/models").await;
    assert_eq!(
        listed(&models, "openai-video")["fallback"],
        json!(["veo-video"])
    );

    let prompt = "a harbour at night";
    let task_id = submit(
        &stack,
        &receiver,
        json!({"model": "openai-video", "prompt": prompt, "duration": 8}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &task_id).await.json();
    assert_eq!(hook["status"], "completed", "{hook}");
    assert_eq!(hook["model"], "veo-video", "{hook}");
    // The /v1/videos server was tried until its retries ran out; Veo made the video.
    assert_eq!(
        videos
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/v1/videos")
            .count(),
        8
    );
    let op = veo.job_for(prompt).expect("Veo got the fallback");
    assert_eq!(served_video(&hook).await, fake_video(&op.id));
    let (_, task) = stack
        .get(&format!("/v1/videos/generations/tasks/{task_id}"))
        .await;
    assert_eq!(task["model"], "openai-video");
    let message = task["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("fallback model veo-video") && message.contains("openai-video"),
        "{message}"
    );

    // A refusal is final: no fallback.
    let blocked = submit(
        &stack,
        &receiver,
        json!({"model": "openai-video", "prompt": "a blocked idea", "duration": 8}),
    )
    .await;
    let hook = terminal_webhook(&receiver, &blocked).await.json();
    assert_eq!(hook["status"], "failed", "{hook}");
    assert!(veo.job_for("a blocked idea").is_none());
    stack.stop().await;
}
