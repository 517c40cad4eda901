//! The remote providers end to end: the real API, broker, generator and webhook sender,
//! with the generator pointed at a local fake of MiniMax, an OpenAI-compatible Videos
//! server or Replicate (`conduit_testkit::fakes`). Each test submits over HTTP and
//! checks what a user sees (status, webhooks, the stored video, error strings) and
//! what the provider saw (fields, polls, downloads, cancels).

use std::time::Duration;

use conduit_testkit::{
    eventually,
    fakes::{fake_video, FakeProvider, Protocol, Scenario},
    ReceivedWebhook, Receiver, Stack, StackOptions,
};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);
const KEY: &str = "sk-e2e-5d41402abc4b2a76b9719d911017c592";

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
    let stack = stack_for(&fake, "OPENAI", &[]).await;
    let receiver = Receiver::start().await;

    // sora-2 makes 4, 8 or 12 seconds at 1280x720 or 720x1280 only.
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
        json!({"model": "sora-2", "prompt": prompt, "seconds": "8", "size": "720x1280"})
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
