//! The remote provider adapters against local fake servers that speak each provider's
//! documented protocol (`conduit_testkit::fakes`): the requests they make, the
//! progress they report, how they map failures, retry rate limits and downloads, and
//! how a stopped task reaches the provider. No broker here: the adapters are called
//! directly, as the worker calls them.

mod fal;
mod images;
mod minimax;
mod openai;
mod replicate;
mod veo;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use conduit_core::{
    config::{ProviderAccount, Settings},
    messages::{JobMessage, RenderSpec, SCHEMA_VERSION},
    Secret, Service,
};
use conduit_generator::providers::{
    GeneratedVideo, GenerationContext, GenerationError, ImageLoader, ProgressReporter,
    ProgressUpdate, Provider, UpstreamCheckpoint,
};
use conduit_testkit::fakes::FakeProvider;
use tokio_util::sync::CancellationToken;

pub const KEY: &str = "sk-test-9f8e7d6c5b4a39281706";

/// The upstream model the `/v1/videos` fake is configured with (there is no default).
pub const VIDEOS_MODEL: &str = "wan-2.5-t2v";

/// The settings' models (their limits, upstream names), as the generator loads them,
/// with `openai-video` configured as an operator would for a `/v1/videos` server.
pub fn models() -> std::collections::BTreeMap<String, conduit_core::config::ModelSettings> {
    let mut models = Settings::load(Service::Generator, None)
        .expect("default settings")
        .models;
    if let Some(m) = models.get_mut("openai-video") {
        m.upstream_model = Some(VIDEOS_MODEL.into());
    }
    models
}

/// An account pointing at `fake`, polling every 20 ms.
pub fn account(fake: &FakeProvider, key: &str) -> ProviderAccount {
    ProviderAccount {
        api_key: Some(Secret::new(key)),
        base_url: fake.base_url(),
        poll_interval_seconds: 0.02,
    }
}

pub fn job(
    model: &str,
    provider: &str,
    prompt: &str,
    seconds: u32,
    size: (u32, u32),
) -> JobMessage {
    JobMessage {
        v: SCHEMA_VERSION,
        task_id: uuid::Uuid::new_v4(),
        attempt: 1,
        model: model.into(),
        provider: provider.into(),
        upstream_model: None,
        prompt: prompt.into(),
        spec: RenderSpec {
            duration_seconds: seconds,
            width: size.0,
            height: size.1,
            fps: 24,
            seed: None,
        },
        submitted_at: conduit_core::time::now_millis(),
        image_url: None,
        checkpoint: None,
    }
}

/// What one run of an adapter produced.
pub struct Run {
    pub result: Result<GeneratedVideo, GenerationError>,
    pub progress: Vec<ProgressUpdate>,
}

impl Run {
    pub fn video(&self) -> &GeneratedVideo {
        match &self.result {
            Ok(video) => video,
            Err(err) => panic!("expected a video, got the error {err}"),
        }
    }

    pub fn error(&self) -> String {
        match &self.result {
            Ok(_) => panic!("expected an error, got a video"),
            Err(GenerationError::Failed(message) | GenerationError::Unavailable(message)) => {
                message.clone()
            }
            Err(GenerationError::Cancelled) => panic!("expected a failure, got a cancel"),
        }
    }

    /// Progress percentages never go down.
    pub fn assert_progress_monotonic(&self) {
        let percents: Vec<u8> = self.progress.iter().map(|p| p.percent).collect();
        assert!(
            percents.windows(2).all(|w| w[0] <= w[1]),
            "progress went down: {percents:?}"
        );
        assert!(percents.iter().all(|p| *p <= 100), "{percents:?}");
    }

    pub fn messages(&self) -> Vec<String> {
        self.progress.iter().map(|p| p.message.clone()).collect()
    }
}

pub fn context(cancel: CancellationToken) -> (GenerationContext, Arc<Mutex<Vec<ProgressUpdate>>>) {
    let progress = Arc::new(Mutex::new(Vec::new()));
    let sink = progress.clone();
    let ctx = GenerationContext {
        progress: ProgressReporter::new(move |update| {
            sink.lock().expect("progress").push(update);
        }),
        cancel,
        images: ImageLoader::new(true),
        upstream: UpstreamCheckpoint::none(),
    };
    (ctx, progress)
}

/// Runs `provider` on `job` to the end (at most 60 s).
pub async fn run(provider: &dyn Provider, job: &JobMessage) -> Run {
    let (ctx, progress) = context(CancellationToken::new());
    let result = tokio::time::timeout(Duration::from_secs(60), provider.generate(job, ctx))
        .await
        .expect("the adapter finishes within 60 s");
    let progress = progress.lock().expect("progress").clone();
    Run { result, progress }
}

/// Runs `provider` on `job` until `fake` has seen `polls` status polls of it, then
/// fires the cancel token the way the worker does on a cancel, and returns the result.
pub async fn run_and_cancel(
    provider: &dyn Provider,
    job: &JobMessage,
    fake: &FakeProvider,
    polls: u32,
) -> Result<GeneratedVideo, GenerationError> {
    let cancel = CancellationToken::new();
    let (ctx, _) = context(cancel.clone());
    let watcher = async {
        conduit_testkit::eventually("polls of the fake job", Duration::from_secs(30), || async {
            fake.job_for(&job.prompt)
                .filter(|j| j.polls >= polls)
                .map(|_| ())
        })
        .await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(provider.generate(job, ctx), watcher);
    result
}

/// Runs `provider` on `job` until `fake` has seen `polls` status polls of it, then drops
/// the run without firing its token, the way the worker stops waiting on a timeout.
pub async fn run_and_drop(
    provider: &dyn Provider,
    job: &JobMessage,
    fake: &FakeProvider,
    polls: u32,
) {
    let (ctx, _) = context(CancellationToken::new());
    let generation = provider.generate(job, ctx);
    let watcher =
        conduit_testkit::eventually("polls of the fake job", Duration::from_secs(30), || async {
            fake.job_for(&job.prompt)
                .filter(|j| j.polls >= polls)
                .map(|_| ())
        });
    tokio::select! {
        result = generation => panic!("the endless job ended: {:?}", result.map(|v| v.bytes.len())),
        () = watcher => {}
    }
}

/// Waits until the upstream stops the adapters sent have been answered.
pub async fn settle() {
    conduit_generator::providers::settle_upstream_stops(Duration::from_secs(10)).await;
}

/// The credential shows in no error message.
pub fn assert_no_key(text: &str) {
    assert!(!text.contains(KEY), "the credential leaked: {text}");
    assert!(!text.contains(&KEY[3..]), "the credential leaked: {text}");
}
