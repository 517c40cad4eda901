//! The providers that turn a job into a video. `local` is the built-in renderer; remote
//! adapters (MiniMax, OpenAI-compatible, Replicate, fal, Veo) implement the same trait: they
//! submit, poll, report progress through the context and download the finished file.
//! A model maps to its provider through `settings.models[model].provider`, resolved by
//! the API at submit time and carried in the job. A remote provider is registered only
//! once its credential is configured.
//!
//! A remote adapter submits at most one upstream job per attempt: it gets its upstream
//! job through [`UpstreamCheckpoint::submit_once`], which hands back the job an earlier
//! run of the attempt submitted (a takeover after a crash or a hand-back) or runs the
//! submit and makes the new job's id durable before the adapter polls it.

mod fal;
mod http;
mod image;
mod local;
mod minimax;
mod openai;
mod replicate;
mod veo;

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use conduit_core::{
    config::ModelSettings,
    messages::{JobMessage, UpstreamJob},
    Settings,
};
use tokio_util::sync::CancellationToken;

pub use fal::FalProvider;
pub use http::settle_upstream_stops;
pub use image::{ImageLoader, InputImage};
pub use local::LocalProvider;
pub use minimax::MiniMaxProvider;
pub use openai::OpenAiProvider;
pub use replicate::ReplicateProvider;
pub use veo::VeoProvider;

/// One progress report of a running generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressUpdate {
    /// 0 to 100.
    pub percent: u8,
    pub message: String,
    pub eta_seconds: Option<u64>,
}

/// Where a provider reports progress. Reporting never blocks and never fails: the worker
/// keeps only the latest report and decides when to publish it.
#[derive(Clone)]
pub struct ProgressReporter(Arc<dyn Fn(ProgressUpdate) + Send + Sync>);

impl ProgressReporter {
    pub fn new(report: impl Fn(ProgressUpdate) + Send + Sync + 'static) -> Self {
        Self(Arc::new(report))
    }

    /// A reporter that drops every report (tools, tests).
    pub fn ignore() -> Self {
        Self::new(|_| {})
    }

    pub fn report(&self, update: ProgressUpdate) {
        (self.0)(update);
    }
}

/// What a provider gets besides the job.
#[derive(Clone)]
pub struct GenerationContext {
    pub progress: ProgressReporter,
    /// Fires when the task is cancelled, timed out or the process shuts down; the
    /// provider stops as soon as it can (the worker also stops waiting for it).
    pub cancel: CancellationToken,
    /// Reads the job's `image_url` for providers that need the image's bytes.
    pub images: ImageLoader,
    /// The attempt's upstream job, durable across takeovers.
    pub upstream: UpstreamCheckpoint,
}

type RecordFn =
    dyn Fn(UpstreamJob) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send + Sync;

/// An attempt's upstream job: the one an earlier run of the attempt submitted, and the
/// way to make a newly submitted one durable (the worker publishes a checkpoint of the
/// attempt and waits for the broker's confirm).
#[derive(Clone)]
pub struct UpstreamCheckpoint {
    resume: Option<UpstreamJob>,
    record: Arc<RecordFn>,
    handing_back: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl UpstreamCheckpoint {
    /// Nothing to resume; new jobs are recorded nowhere (tools, tests).
    pub fn none() -> Self {
        Self::new(None, |_| async { Ok(()) }, || false)
    }

    /// `resume` is the upstream job of an earlier run; `record` makes a new one durable;
    /// `handing_back` says, when the provider's work is dropped, whether the attempt goes
    /// on elsewhere (then its upstream job must not be stopped).
    pub fn new<R, Fut>(
        resume: Option<UpstreamJob>,
        record: R,
        handing_back: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self
    where
        R: Fn(UpstreamJob) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self {
            resume,
            record: Arc::new(move |job| Box::pin(record(job))),
            handing_back: Arc::new(handing_back),
        }
    }

    /// The upstream job of `provider` for `model` that an earlier run of this attempt
    /// submitted.
    pub fn resumable(&self, provider: &str, model: &str) -> Option<&UpstreamJob> {
        self.resume
            .as_ref()
            .filter(|j| j.provider == provider && j.model.as_deref().is_none_or(|m| m == model))
    }

    /// The model whose upstream job an earlier run of this attempt submitted, if any: a
    /// takeover goes on with that model rather than starting the fallback list over.
    pub fn resumed_model(&self) -> Option<&str> {
        self.resume.as_ref().and_then(|j| j.model.as_deref())
    }

    /// True while the attempt is being handed to another run: an upstream job must then
    /// be left running for it to resume.
    pub fn handing_back(&self) -> bool {
        (self.handing_back)()
    }

    /// The attempt's upstream job at `provider` for `job`'s model: the one an earlier
    /// run submitted, or a new one from `submit`, returned only once its checkpoint is
    /// durable (retried until it is, or `cancel` fires). The flag is true for a resumed
    /// job.
    pub async fn submit_once<F, Fut>(
        &self,
        job: &JobMessage,
        provider: &str,
        cancel: &CancellationToken,
        submit: F,
    ) -> Result<(UpstreamJob, bool), GenerationError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<UpstreamJob, GenerationError>>,
    {
        if let Some(earlier) = self.resumable(provider, &job.model) {
            tracing::info!(provider, upstream_job = %earlier.id, "resuming the upstream job of an earlier run");
            return Ok((earlier.clone(), true));
        }
        let mut job = UpstreamJob {
            model: Some(job.model.clone()),
            ..submit().await?
        };
        job.provider = provider.to_owned();
        let mut delay = Duration::from_millis(200);
        loop {
            match (self.record)(job.clone()).await {
                Ok(()) => {
                    tracing::info!(provider, upstream_job = %job.id, model = ?job.model, "upstream job submitted and recorded");
                    return Ok((job, false));
                }
                Err(err) => {
                    tracing::warn!(provider, upstream_job = %job.id, error = %format!("{err:#}"), "could not record the upstream job yet; retrying before polling it");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return Err(GenerationError::Cancelled),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// A finished video, ready to be stored.
#[derive(Debug, Clone)]
pub struct GeneratedVideo {
    /// The MP4 file.
    pub bytes: Bytes,
    /// Frames rendered locally, for the render-speed metric (`None` for remote providers).
    pub frames_rendered: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The work stopped because its cancel token fired.
    #[error("generation was cancelled")]
    Cancelled,
    /// A clear, user-facing reason; it becomes the task's `error`.
    #[error("{0}")]
    Failed(String),
    /// The provider kept rate-limiting or could not be reached after its retries; a
    /// `fallback` model may still make the video. Otherwise like `Failed`.
    #[error("{0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Provider: Send + Sync {
    async fn generate(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError>;
}

type RemoteBuilder = fn(&Settings) -> anyhow::Result<Arc<dyn Provider>>;

/// The providers this generator can run, by name (`local`, `minimax`, ...).
#[derive(Clone, Default)]
pub struct Providers {
    by_name: HashMap<String, Arc<dyn Provider>>,
    /// Model → provider name, for jobs that do not name their provider.
    models: HashMap<String, String>,
    /// The configured models, for their fallbacks.
    settings: HashMap<String, ModelSettings>,
}

impl Providers {
    /// The providers the settings allow: always `local`; remote ones once their
    /// credential is configured.
    pub fn from_settings(settings: &Settings) -> Self {
        let models = settings
            .models
            .iter()
            .map(|(model, m)| (model.clone(), m.provider.clone()))
            .collect();
        let mut providers = Self {
            by_name: HashMap::new(),
            models,
            settings: settings
                .models
                .iter()
                .map(|(id, m)| (id.clone(), m.clone()))
                .collect(),
        }
        .with("local", Arc::new(LocalProvider));
        let p = &settings.providers;
        let remote: [(&str, bool, RemoteBuilder); 5] = [
            ("minimax", p.minimax.api_key.is_some(), |s| {
                Ok(Arc::new(MiniMaxProvider::new(
                    &s.providers.minimax,
                    &s.models,
                )?))
            }),
            ("openai", p.openai.api_key.is_some(), |s| {
                Ok(Arc::new(OpenAiProvider::new(
                    &s.providers.openai,
                    &s.models,
                )?))
            }),
            ("replicate", p.replicate.api_key.is_some(), |s| {
                Ok(Arc::new(ReplicateProvider::new(
                    &s.providers.replicate,
                    &s.models,
                )?))
            }),
            ("fal", p.fal.api_key.is_some(), |s| {
                Ok(Arc::new(FalProvider::new(&s.providers.fal, &s.models)?))
            }),
            ("veo", p.veo.api_key.is_some(), |s| {
                Ok(Arc::new(VeoProvider::new(&s.providers.veo, &s.models)?))
            }),
        ];
        for (model, m) in &settings.models {
            for fallback in m
                .fallback
                .iter()
                .filter(|f| !settings.models.contains_key(*f))
            {
                tracing::warn!(%model, %fallback, "fallback names a model that is not configured; it is skipped");
            }
        }
        for (name, configured, build) in remote {
            if !configured {
                continue;
            }
            match build(settings) {
                Ok(provider) => providers = providers.with(name, provider),
                Err(err) => {
                    tracing::warn!(provider = name, error = %format!("{err:#}"), "provider not usable; its models will fail")
                }
            }
        }
        providers
    }

    /// Adds (or replaces) the provider called `name`.
    pub fn with(mut self, name: &str, provider: Arc<dyn Provider>) -> Self {
        self.by_name.insert(name.to_owned(), provider);
        self
    }

    /// The provider of `job`, or the user-facing reason it cannot run here.
    /// The names of the providers this generator runs.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The provider name `job` runs on, for metrics and spans (`unknown` if none).
    pub fn name_for(&self, job: &JobMessage) -> String {
        if job.provider.is_empty() {
            self.models
                .get(&job.model)
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned())
        } else {
            job.provider.clone()
        }
    }

    pub fn resolve(&self, job: &JobMessage) -> Result<Arc<dyn Provider>, String> {
        let name = if job.provider.is_empty() {
            self.models.get(&job.model).cloned().ok_or_else(|| {
                format!("Model '{}' is not configured in the generator", job.model)
            })?
        } else {
            job.provider.clone()
        };
        self.by_name.get(&name).cloned().ok_or_else(|| {
            format!(
                "Model '{}' needs provider '{name}', which is not configured in the generator",
                job.model
            )
        })
    }
}

impl Providers {
    /// The jobs to try, in order, when `job`'s provider is unavailable: one per model of
    /// its `fallback` list that this generator can run and that can make what the job
    /// asks for (its duration and size, its image). Each names its own model, provider
    /// and upstream model.
    pub fn fallbacks(&self, job: &JobMessage) -> Vec<JobMessage> {
        let Some(own) = self.settings.get(&job.model) else {
            return Vec::new();
        };
        own.fallback
            .iter()
            .filter(|id| **id != job.model)
            .filter_map(|id| {
                let m = self.settings.get(id)?;
                let fits = m
                    .check_request(
                        id,
                        job.spec.duration_seconds,
                        job.spec.width,
                        job.spec.height,
                    )
                    .is_ok()
                    && (job.image_url.is_none() || m.image_input)
                    && self.by_name.contains_key(&m.provider);
                if !fits {
                    tracing::info!(fallback = %id, "fallback model cannot take this job; skipping it");
                    return None;
                }
                Some(JobMessage {
                    model: id.clone(),
                    provider: m.provider.clone(),
                    upstream_model: m.upstream_model.clone(),
                    ..job.clone()
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(model: &str, provider: &str) -> JobMessage {
        JobMessage {
            v: 1,
            task_id: uuid::Uuid::nil(),
            attempt: 1,
            model: model.into(),
            provider: provider.into(),
            upstream_model: None,
            prompt: "p".into(),
            spec: conduit_core::messages::RenderSpec {
                duration_seconds: 1,
                width: 64,
                height: 64,
                fps: 1,
                seed: None,
            },
            submitted_at: chrono::Utc::now(),
            image_url: None,
            checkpoint: None,
        }
    }

    #[test]
    fn resolves_by_provider_or_model_and_explains_what_is_missing() {
        let settings =
            Settings::load(conduit_core::Service::Generator, None).expect("default settings");
        let providers = Providers::from_settings(&settings);
        assert!(providers.resolve(&job("local-video", "local")).is_ok());
        assert!(providers.resolve(&job("local-video", "")).is_ok());
        let err = providers
            .resolve(&job("minimax-video", "minimax"))
            .err()
            .unwrap_or_default();
        assert!(err.contains("minimax"), "{err}");
        let err = providers
            .resolve(&job("nope", ""))
            .err()
            .unwrap_or_default();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn remote_providers_are_registered_once_their_credential_is_set() {
        let mut settings =
            Settings::load(conduit_core::Service::Generator, None).expect("default settings");
        settings.providers.minimax.api_key = Some(conduit_core::Secret::new("mm"));
        settings.providers.replicate.api_key = Some(conduit_core::Secret::new("r8"));
        settings.providers.openai.api_key = None;
        let providers = Providers::from_settings(&settings);
        assert!(providers.resolve(&job("minimax-video", "minimax")).is_ok());
        assert!(providers.resolve(&job("replicate-video", "")).is_ok());
        assert!(providers.resolve(&job("openai-video", "openai")).is_err());
    }

    #[test]
    fn fallbacks_follow_the_list_and_skip_models_that_cannot_run() {
        let mut settings =
            Settings::load(conduit_core::Service::Generator, None).expect("default settings");
        settings.providers.replicate.api_key = Some(conduit_core::Secret::new("r8"));
        if let Some(m) = settings.models.get_mut("minimax-video") {
            m.fallback = vec![
                "veo-video".into(),
                "replicate-video".into(),
                "local-video".into(),
            ];
        }
        let providers = Providers::from_settings(&settings);
        let mut j = job("minimax-video", "minimax");
        j.spec.duration_seconds = 6;
        j.spec.width = 1280;
        j.spec.height = 720;
        // veo is not configured here; replicate and local are.
        let names: Vec<String> = providers
            .fallbacks(&j)
            .into_iter()
            .map(|f| format!("{}/{}", f.model, f.provider))
            .collect();
        assert_eq!(names, ["replicate-video/replicate", "local-video/local"]);
        // A size replicate-video cannot make leaves only local-video.
        j.spec.width = 640;
        j.spec.height = 360;
        let names: Vec<String> = providers
            .fallbacks(&j)
            .into_iter()
            .map(|f| f.model)
            .collect();
        assert_eq!(names, ["local-video"]);
        assert!(providers.fallbacks(&job("local-video", "local")).is_empty());
    }

    #[tokio::test]
    async fn an_upstream_job_is_resumed_for_its_own_provider_and_model_only() {
        let mut earlier = UpstreamJob::new("minimax", "up-1");
        earlier.model = Some("minimax-video".into());
        let checkpoint = UpstreamCheckpoint::new(Some(earlier), |_| async { Ok(()) }, || false);
        assert_eq!(checkpoint.resumed_model(), Some("minimax-video"));
        assert!(checkpoint.resumable("minimax", "minimax-video").is_some());
        assert!(checkpoint.resumable("minimax", "minimax-fast").is_none());
        assert!(checkpoint.resumable("replicate", "minimax-video").is_none());

        let cancel = CancellationToken::new();
        let own = job("minimax-video", "minimax");
        let (resumed, was) = checkpoint
            .submit_once(&own, "minimax", &cancel, || async {
                Err(GenerationError::Failed("must not submit".into()))
            })
            .await
            .expect("resumed");
        assert!(was);
        assert_eq!(resumed.id, "up-1");

        // Another model: a new job, recorded with its provider and model.
        let recorded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = recorded.clone();
        let checkpoint = UpstreamCheckpoint::new(
            None,
            move |job| {
                sink.lock().expect("recorded").push(job);
                async { Ok(()) }
            },
            || false,
        );
        let (new, was) = checkpoint
            .submit_once(
                &job("replicate-video", "replicate"),
                "replicate",
                &cancel,
                || async { Ok(UpstreamJob::new("replicate", "p-9")) },
            )
            .await
            .expect("submitted");
        assert!(!was);
        assert_eq!(new.model.as_deref(), Some("replicate-video"));
        assert_eq!(recorded.lock().expect("recorded").as_slice(), [new]);
    }
}
