//! `openai`: any server that speaks the `/v1/videos` protocol OpenAI defined for its
//! Videos API. OpenAI shut that API down on 2026-09-24; servers that copied the protocol
//! (LiteLLM's proxy in front of other video models, several hosted gateways) still speak
//! it, so the adapter has no default server or model: both are configured.
//!
//! 1. `POST /v1/videos` (`multipart/form-data`: `model`, `prompt`, `seconds`, `size`, and
//!    for image-to-video the image file as `input_reference`) answers a video job with its
//!    `id` and `status`;
//! 2. `GET /v1/videos/{id}` is polled while `status` is `queued` or `in_progress` (with a
//!    numeric `progress`), until `completed` or `failed` (with `error.code` and
//!    `error.message`);
//! 3. `GET /v1/videos/{id}/content` is the MP4 itself.
//!
//! The API has no cancel endpoint; its documented `DELETE /v1/videos/{id}` removes a
//! video job, and is what a cancelled or timed-out task sends, best effort.

use std::collections::BTreeMap;

use async_trait::async_trait;
use conduit_core::{
    config::{ModelSettings, ProviderAccount},
    messages::{JobMessage, UpstreamJob},
};
use reqwest::{
    multipart::{Form, Part},
    Method,
};
use serde::Deserialize;

use super::{
    http::{Poller, Reply, Step, Upstream},
    GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider,
};

const NAME: &str = "The OpenAI-compatible server";
/// The provider name jobs carry.
const PROVIDER: &str = "openai";

pub struct OpenAiProvider {
    up: Upstream,
    models: BTreeMap<String, ModelSettings>,
}

/// The `Video` object.
#[derive(Debug, Deserialize)]
struct Video {
    #[serde(default)]
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    progress: Option<f64>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: ApiError,
}

impl ApiError {
    fn describe(&self) -> String {
        match (self.message.as_deref(), self.code.as_deref()) {
            (Some(m), Some(c)) => format!("{m} ({c})"),
            (Some(m), None) => m.to_owned(),
            (None, Some(c)) => c.to_owned(),
            (None, None) => "no reason given".to_owned(),
        }
    }
}

impl OpenAiProvider {
    pub fn new(
        account: &ProviderAccount,
        models: &BTreeMap<String, ModelSettings>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            up: Upstream::new(NAME, "CONDUIT__PROVIDERS__OPENAI__API_KEY", account)?,
            models: models.clone(),
        })
    }

    fn upstream_model(&self, job: &JobMessage) -> Result<String, GenerationError> {
        job.upstream_model
            .clone()
            .or_else(|| self.models.get(&job.model)?.upstream_model.clone())
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| {
                self.up.failed(format!(
                    "Model '{}' names no model of the /v1/videos server; set its upstream_model",
                    job.model
                ))
            })
    }
}

/// The handling every answer shares: 2xx goes on, rate limits and server failures are
/// retried (but not an exhausted quota, which waiting does not fix), the rest fails
/// with the server's own `error.message`.
fn http_step<T>(reply: &Reply) -> Option<Step<T>> {
    let status = reply.status.as_u16();
    if (200..300).contains(&status) {
        return None;
    }
    let error = reply
        .json::<ErrorBody>()
        .map(|b| b.error)
        .unwrap_or_default();
    if status == 429 && error.code.as_deref() == Some("insufficient_quota") {
        return Some(Step::Fail(format!(
            "{NAME} refused the request: the account's quota is exhausted ({})",
            error.describe()
        )));
    }
    if let Some(step) = reply.transient() {
        return Some(step);
    }
    Some(match status {
        // The message of a refused key repeats part of it; say only what to fix.
        401 | 403 => Step::Fail(format!(
            "{NAME} refused the API key (HTTP {status}); check CONDUIT__PROVIDERS__OPENAI__API_KEY"
        )),
        _ if error.message.is_some() || error.code.is_some() => Step::Fail(format!(
            "{NAME} refused the request (HTTP {status}): {}",
            error.describe()
        )),
        _ => Step::Fail(format!(
            "{NAME} answered HTTP {status}: {}",
            reply.snippet()
        )),
    })
}

fn video_step(reply: &Reply, what: &str) -> Step<Video> {
    if let Some(step) = http_step(reply) {
        return step;
    }
    match reply.json::<Video>() {
        Err(e) => Step::Fail(format!("{NAME} answered the {what} with {e}")),
        Ok(v) if v.id.is_empty() => Step::Fail(format!("{NAME} answered the {what} without an id")),
        Ok(v) => Step::Done(v),
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    async fn generate(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError> {
        let up = &self.up;
        let cancel = &ctx.cancel;
        let model = self.upstream_model(job)?;
        let seconds = job.spec.duration_seconds.to_string();
        let size = format!("{}x{}", job.spec.width, job.spec.height);
        // The create answer's state, for a job created by this run.
        let mut first: Option<Video> = None;
        let slot = &mut first;
        let (model, seconds, size) = (&model, &seconds, &size);
        let images = &ctx.images;
        let (upstream, _resumed) = ctx
            .upstream
            .submit_once(job, PROVIDER, cancel, || async move {
                let image = match &job.image_url {
                    Some(url) => Some(images.load(url, cancel).await?),
                    None => None,
                };
                let created = up
                    .call(
                        cancel,
                        "create the video",
                        || {
                            let mut form = Form::new()
                                .text("model", model.clone())
                                .text("prompt", job.prompt.clone())
                                .text("seconds", seconds.clone())
                                .text("size", size.clone());
                            if let Some(image) = &image {
                                let part = Part::stream(image.bytes.clone())
                                    .file_name(image.file_name())
                                    .mime_str(image.mime)
                                    .unwrap_or_else(|_| Part::stream(image.bytes.clone()));
                                form = form.part("input_reference", part);
                            }
                            up.request(Method::POST, "/v1/videos").multipart(form)
                        },
                        |reply| video_step(reply, "create request"),
                    )
                    .await?;
                let upstream = UpstreamJob::new(PROVIDER, created.id.clone());
                *slot = Some(created);
                Ok(upstream)
            })
            .await?;
        let id = upstream.id;
        // From here on, a task the worker stops waiting for deletes its upstream job.
        let mut stop = up.stop_on_drop(
            &ctx,
            format!("deleting video job {id} upstream"),
            up.stop_request(Method::DELETE, &format!("/v1/videos/{id}")),
        );

        let path = format!("/v1/videos/{id}");
        // A resumed job's state is unknown until the first poll: wait for it as queued.
        let (mut status, mut progress, mut error) = match first {
            Some(created) => (created.status, created.progress, created.error),
            None => ("queued".to_owned(), None, None),
        };
        let mut poller = Poller::new(up);
        loop {
            match status.as_str() {
                "completed" => break,
                "failed" => {
                    stop.disarm();
                    return Err(up.failed(format!(
                        "{NAME} could not generate the video: {}",
                        error.unwrap_or_default().describe()
                    )));
                }
                _ => {}
            }
            let p = progress.unwrap_or(0.0).clamp(0.0, 100.0);
            let (percent, message) = match status.as_str() {
                "queued" => (5, "Queued at the video server".to_owned()),
                "in_progress" => (
                    10 + (p * 0.8).floor() as u8,
                    format!("Generating at the video server ({}%)", p.floor()),
                ),
                other => (
                    5,
                    format!("Waiting for the video server (status {other:?})"),
                ),
            };
            ctx.progress.report(ProgressUpdate {
                percent,
                message,
                eta_seconds: None,
            });
            poller.wait(cancel).await?;
            let video = up
                .call(
                    cancel,
                    "check the video job",
                    || up.request(Method::GET, &path),
                    |reply| video_step(reply, "status request"),
                )
                .await?;
            status = video.status;
            progress = video.progress;
            error = video.error;
        }
        stop.disarm();

        let content = up.url(&format!("/v1/videos/{id}/content"));
        up.fetch_video(&ctx, &content, "the video server", &id)
            .await
    }
}
