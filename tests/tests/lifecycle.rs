//! The lifecycle promises that must hold across replicas and takeovers (CONTRACT.md §3
//! and §5), with the real binaries: a cancel holds for generators started after it, a
//! provider job (MiniMax, OpenAI-compatible, Replicate, fal, Veo) is submitted upstream
//! once per attempt even when the generator polling it is killed, the task timeout counts from the attempt's first start, and every
//! `video_url` a client receives lives for the URL lifetime after it was sent.

use std::time::{Duration, Instant};

use conduit_testkit::{
    eventually,
    fake_fal::FakeFal,
    fake_veo::FakeVeo,
    fakes::{fake_video, FakeProvider, Protocol, Scenario},
    ReceivedWebhook, Receiver, Reply, Stack, StackOptions,
};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);
const KEY: &str = "sk-e2e-5d41402abc4b2a76b9719d911017c592";

/// The generator environment that points `provider` (`MINIMAX`, `OPENAI`, `REPLICATE`,
/// `FAL`, `VEO`) at the fake at `base_url`, polling every 50 ms.
fn provider_env(base_url: &str, provider: &str) -> Vec<(String, String)> {
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
            base_url.to_owned(),
        ),
        (
            format!("CONDUIT__PROVIDERS__{provider}__POLL_INTERVAL_SECONDS"),
            "0.05".to_owned(),
        ),
    ]
}

fn hooks_of(receiver: &Receiver, task_id: &str) -> Vec<ReceivedWebhook> {
    receiver
        .received()
        .into_iter()
        .filter(|h| h.json()["task_id"] == task_id)
        .collect()
}

async fn cancel(stack: &Stack, task_id: &str) {
    let r = stack
        .http
        .delete(stack.api_url(&format!("/v1/videos/generations/{task_id}")))
        .bearer_auth(&stack.key)
        .send()
        .await
        .expect("cancel request");
    assert_eq!(r.status(), 204);
}

/// Status of a GET of a video URL (redirects not followed).
async fn fetch_status(url: &str) -> u16 {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(url)
        .send()
        .await
        .expect("video URL reachable")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_holds_for_generators_started_after_it() {
    let mut stack = Stack::start_with(StackOptions {
        generators: 0,
        ..StackOptions::default()
    })
    .await;
    let receiver = Receiver::start().await;
    let cancelled = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "A render cancelled before any generator ran",
            "duration": 20,
            "size": "640x360",
            "webhook_url": receiver.url("/hook"),
        }))
        .await;
    cancel(&stack, &cancelled).await;
    let hook = eventually("the cancelled webhook", LONG, || async {
        hooks_of(&receiver, &cancelled).into_iter().next()
    })
    .await
    .json();
    assert_eq!(hook["status"], "cancelled");

    // A task submitted after the cancel sits behind the cancelled job in the queue:
    // once it completes, the generators have taken the cancelled job too.
    let after = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "A short render after the cancel",
            "duration": 1,
            "size": "320x240",
            "fps": 8,
        }))
        .await;
    stack.add_generator().await;
    stack.add_generator().await;
    stack.wait_status(&after, "completed", LONG).await;

    let folder = stack.storage.join("videos").join(&cancelled);
    assert!(
        !folder.exists(),
        "a video of the cancelled task appeared: {}",
        folder.display()
    );
    let logs: String = stack.generators.iter().map(|g| g.logs()).collect();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains(&cancelled)).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("cancelled before it started")),
        "no generator skipped the cancelled job: {lines:#?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("video generated") || l.contains("taking over")),
        "a generator started the cancelled task: {lines:#?}"
    );
    let task = stack.task(&cancelled).await;
    assert_eq!(task["status"], "cancelled");
    assert_eq!(hooks_of(&receiver, &cancelled).len(), 1);
    stack.stop().await;
}

/// What the kill -9 test needs of a fake provider: its base URL, the submits it saw and
/// its job for a prompt (id and polls so far).
struct Upstream<'a> {
    base_url: String,
    submits: Box<dyn Fn() -> usize + 'a>,
    job: Box<JobLookup<'a>>,
}

/// A fake's job for a prompt: its id and the polls it saw so far.
type JobLookup<'a> = dyn Fn(&str) -> Option<(String, u32)> + 'a;

impl<'a> Upstream<'a> {
    fn of(fake: &'a FakeProvider) -> Self {
        Self {
            base_url: fake.base_url(),
            submits: Box::new(|| fake.submits()),
            job: Box::new(|prompt| fake.job_for(prompt).map(|j| (j.id, j.polls))),
        }
    }

    fn fal(fake: &'a FakeFal) -> Self {
        Self {
            base_url: fake.base_url(),
            submits: Box::new(|| {
                fake.requests()
                    .iter()
                    .filter(|r| r.method == "POST" && !r.path.contains("/requests/"))
                    .count()
            }),
            job: Box::new(|prompt| fake.job_for(prompt).map(|j| (j.id, j.polls))),
        }
    }

    fn veo(fake: &'a FakeVeo) -> Self {
        Self {
            base_url: fake.base_url(),
            submits: Box::new(|| {
                fake.requests()
                    .iter()
                    .filter(|r| r.method == "POST" && r.path.ends_with(":predictLongRunning"))
                    .count()
            }),
            job: Box::new(|prompt| fake.job_for(prompt).map(|j| (j.id, j.polls))),
        }
    }
}

/// A scenario whose job runs through 60 polls, long enough to kill its poller.
fn slow() -> Scenario {
    Scenario {
        running_polls: 60,
        ..Scenario::default()
    }
}

/// Kills the generator while it polls `upstream`'s job, starts it again, and checks the
/// attempt completes with the one upstream job it submitted.
async fn a_killed_poller_resumes_the_upstream_job(
    upstream: Upstream<'_>,
    provider: &str,
    body: Value,
    extra_env: &[(&str, &str)],
) {
    let mut env = provider_env(&upstream.base_url, provider);
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let mut stack = Stack::start_with(StackOptions {
        env,
        ..StackOptions::default()
    })
    .await;
    let prompt = body["prompt"].as_str().expect("prompt").to_owned();
    let task_id = stack.submit_ok(&body).await;
    eventually("the upstream job to be polled", LONG, || async {
        (upstream.job)(&prompt)
            .filter(|(_, polls)| *polls >= 3)
            .map(|_| ())
    })
    .await;
    stack.generators[0].kill9();
    stack.generators[0].restart();
    let task = stack.wait_status(&task_id, "completed", LONG).await;

    assert_eq!((upstream.submits)(), 1, "{provider}: upstream submissions");
    let (job_id, polls) = (upstream.job)(&prompt).expect("the upstream job");
    assert!(
        polls > 3,
        "{provider}: the job was not polled after the takeover"
    );
    let url = task["video_url"].as_str().expect("a video_url");
    let video = reqwest::get(url)
        .await
        .expect("video reachable")
        .bytes()
        .await
        .expect("video body");
    assert_eq!(video.to_vec(), fake_video(&job_id), "{provider}: the video");
    let logs = stack.generators[0].logs();
    assert!(
        logs.contains("resuming"),
        "{provider}: the takeover did not resume: {logs}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimax_kill_during_poll_submits_once() {
    let fake = FakeProvider::start(Protocol::MiniMax, KEY);
    fake.set_default(slow());
    a_killed_poller_resumes_the_upstream_job(
        Upstream::of(&fake),
        "MINIMAX",
        json!({"model": "minimax-video", "prompt": "a minimax job outliving its poller"}),
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_kill_during_poll_submits_once() {
    let fake = FakeProvider::start(Protocol::OpenAi, KEY);
    fake.set_default(slow());
    a_killed_poller_resumes_the_upstream_job(
        Upstream::of(&fake),
        "OPENAI",
        json!({"model": "openai-video", "prompt": "an openai job outliving its poller", "duration": 4}),
        // A `/v1/videos` server has no default model.
        &[("CONDUIT__MODELS__OPENAI-VIDEO__UPSTREAM_MODEL", "wan-2.5-t2v")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_kill_during_poll_submits_once() {
    let fake = FakeProvider::start(Protocol::Replicate, KEY);
    fake.set_default(slow());
    a_killed_poller_resumes_the_upstream_job(
        Upstream::of(&fake),
        "REPLICATE",
        json!({"model": "replicate-video", "prompt": "a replicate job outliving its poller"}),
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fal_kill_during_poll_submits_once() {
    let fake = FakeFal::start(KEY);
    fake.set_default(slow());
    a_killed_poller_resumes_the_upstream_job(
        Upstream::fal(&fake),
        "FAL",
        json!({"model": "fal-video", "prompt": "a fal request outliving its poller", "duration": 5}),
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veo_kill_during_poll_submits_once() {
    let fake = FakeVeo::start(KEY);
    fake.set_default(slow());
    a_killed_poller_resumes_the_upstream_job(
        Upstream::veo(&fake),
        "VEO",
        json!({"model": "veo-video", "prompt": "a Veo operation outliving its poller", "duration": 8}),
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_counts_from_the_first_start_across_a_takeover() {
    const TIMEOUT: u64 = 8;
    let fake = FakeProvider::start(Protocol::MiniMax, KEY);
    fake.set_default(Scenario::endless());
    let mut env = provider_env(&fake.base_url(), "MINIMAX");
    env.push((
        "CONDUIT__GENERATOR__TASK_TIMEOUT_SECONDS".into(),
        TIMEOUT.to_string(),
    ));
    let mut stack = Stack::start_with(StackOptions {
        env,
        ..StackOptions::default()
    })
    .await;
    let prompt = "a job that never ends";
    let task_id = stack
        .submit_ok(&json!({"model": "minimax-video", "prompt": prompt}))
        .await;
    stack
        .wait_status(&task_id, "processing", Duration::from_secs(30))
        .await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stack.generators[0].kill9();
    stack.generators[0].restart();
    let task = stack.wait_status(&task_id, "failed", LONG).await;
    let failed_after = started.elapsed();
    assert!(
        task["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{task}"
    );
    // Restarting the clock at the takeover would fail it 4 s + TIMEOUT after the start.
    assert!(
        failed_after < Duration::from_secs(TIMEOUT + 3),
        "failed {failed_after:?} after the first start"
    );
    assert!(
        failed_after >= Duration::from_secs(TIMEOUT - 1),
        "failed early, {failed_after:?} after the first start"
    );
    assert_eq!(fake.submits(), 1);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_attempts_and_redeliveries_carry_a_working_link() {
    const TTL: u64 = 3;
    let stack = Stack::start_with(StackOptions {
        retry_schedule: "0s,8s".into(),
        env: vec![("CONDUIT__STORAGE__URL_TTL_SECONDS".into(), TTL.to_string())],
        ..StackOptions::default()
    })
    .await;
    let receiver = Receiver::scripted(vec![Reply::status(500), Reply::status(200)]).await;
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "A short render whose link must outlive the retries",
            "duration": 1,
            "size": "320x240",
            "fps": 8,
            "webhook_url": receiver.url("/hook"),
        }))
        .await;
    let completed = |h: &ReceivedWebhook| h.json()["status"] == "completed";
    let late = eventually(
        "the second attempt of the completed webhook",
        LONG,
        || async {
            let hooks: Vec<_> = hooks_of(&receiver, &task_id)
                .into_iter()
                .filter(completed)
                .collect();
            (hooks.len() >= 2).then_some(hooks)
        },
    )
    .await;
    let (first, second) = (&late[0], &late[1]);
    let second_url = second.json()["video_url"]
        .as_str()
        .expect("video_url")
        .to_owned();
    assert_eq!(
        fetch_status(&second_url).await,
        200,
        "the late attempt's link"
    );
    let first_url = first.json()["video_url"]
        .as_str()
        .expect("video_url")
        .to_owned();
    assert_ne!(first_url, second_url);
    // The first attempt's link lived its lifetime and is gone now.
    assert_eq!(fetch_status(&first_url).await, 410);
    // Apart from the link, both attempts carry the same event.
    let strip = |h: &ReceivedWebhook| {
        let mut v = h.json();
        v["video_url"] = Value::Null;
        v
    };
    assert_eq!(strip(first), strip(second));
    assert_eq!(first.header("webhook-id"), second.header("webhook-id"));
    assert!(conduit_testkit::signature_is_valid(
        &stack.secret,
        second.header("webhook-id").unwrap_or_default(),
        second.header("webhook-timestamp").unwrap_or_default(),
        &second.body,
        second.header("webhook-signature").unwrap_or_default(),
    ));

    // A redelivery well after the lifetime carries a working link too.
    tokio::time::sleep(Duration::from_secs(TTL + 3)).await;
    assert_eq!(fetch_status(&second_url).await, 410);
    let r = stack
        .http
        .post(stack.api_url(&format!(
            "/v1/videos/generations/tasks/{task_id}/webhooks/redeliver"
        )))
        .bearer_auth(&stack.key)
        .send()
        .await
        .expect("redeliver request");
    assert!(r.status().is_success(), "redeliver answered {}", r.status());
    let again = eventually("the redelivered webhook", LONG, || async {
        hooks_of(&receiver, &task_id)
            .into_iter()
            .filter(completed)
            .nth(2)
    })
    .await;
    let url = again.json()["video_url"]
        .as_str()
        .expect("video_url")
        .to_owned();
    assert_eq!(fetch_status(&url).await, 200, "the redelivery's link");
    assert_eq!(strip(&again), strip(first));
    assert_eq!(again.header("webhook-id"), first.header("webhook-id"));

    // And a poll.
    let task = stack.task(&task_id).await;
    let polled = task["video_url"].as_str().expect("video_url");
    assert_eq!(fetch_status(polled).await, 200);
    stack.stop().await;
}
