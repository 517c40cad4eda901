//! `minimax`: MiniMax (Hailuo) video generation, as its API documents it.
//!
//! 1. `POST /v1/video_generation` with `model`, `prompt`, `duration` and `resolution`
//!    (and `first_frame_image`, a URL or data URI, for image-to-video) answers a `task_id`;
//! 2. `GET /v1/query/video_generation?task_id=` is polled while the task's `status` is
//!    `Preparing`, `Queueing` or `Processing`, until `Success` (with a `file_id`) or `Fail`;
//! 3. `GET /v1/files/retrieve?file_id=` gives `file.download_url`, which is downloaded.
//!
//! Every answer carries `base_resp.status_code` (0 is success) and `status_msg`. Codes
//! 1000, 1001, 1002 (rate limit) and 1024 mean "try again later" and are retried with
//! back-off; the others become the task's error. MiniMax has no cancel endpoint: a
//! cancelled or timed-out task just stops being polled.

use std::collections::BTreeMap;

use async_trait::async_trait;
use conduit_core::{
    config::{ModelSettings, ProviderAccount, ResolutionTier},
    messages::{JobMessage, UpstreamJob},
};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    http::{Poller, ProgressEstimate, Reply, Step, Upstream},
    GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider,
};

/// The upstream model when neither the job nor the model entry names one.
pub const DEFAULT_MODEL: &str = "MiniMax-Hailuo-02";

/// MiniMax-Hailuo-02's text-to-video resolutions, for a model entry that lists none.
fn default_tiers() -> Vec<ResolutionTier> {
    [
        ("512P", 512, None),
        ("768P", 768, None),
        ("1080P", 1080, Some(6)),
    ]
    .into_iter()
    .map(|(name, height, max_duration)| ResolutionTier {
        name: name.into(),
        height,
        max_duration,
    })
    .collect()
}

pub struct MiniMaxProvider {
    up: Upstream,
    models: BTreeMap<String, ModelSettings>,
}

#[derive(Debug, Default, Deserialize)]
struct BaseResp {
    #[serde(default)]
    status_code: i64,
    #[serde(default)]
    status_msg: String,
}

#[derive(Debug, Deserialize)]
struct Created {
    #[serde(default)]
    task_id: String,
    #[serde(default)]
    base_resp: BaseResp,
}

#[derive(Debug, Deserialize)]
struct Query {
    #[serde(default)]
    status: String,
    /// A string in the documentation; some deployments send a number.
    #[serde(default)]
    file_id: Value,
    #[serde(default)]
    base_resp: BaseResp,
}

#[derive(Debug, Deserialize)]
struct Retrieved {
    #[serde(default)]
    file: Option<FileObject>,
    #[serde(default)]
    base_resp: BaseResp,
}

#[derive(Debug, Deserialize)]
struct FileObject {
    #[serde(default)]
    download_url: String,
}

impl MiniMaxProvider {
    pub fn new(
        account: &ProviderAccount,
        models: &BTreeMap<String, ModelSettings>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            up: Upstream::new("MiniMax", "CONDUIT__PROVIDERS__MINIMAX__API_KEY", account)?,
            models: models.clone(),
        })
    }

    /// The `resolution` for the job's size: the smallest of the model's resolutions at
    /// least as tall as the requested height (the API has refused anything else).
    fn resolution(&self, job: &JobMessage) -> Result<String, GenerationError> {
        let (w, h) = (job.spec.width, job.spec.height);
        let configured = self
            .models
            .get(&job.model)
            .filter(|m| m.resolutions.as_deref().is_some_and(|t| !t.is_empty()))
            .cloned();
        let settings = configured.unwrap_or_else(|| ModelSettings {
            provider: "minimax".into(),
            resolutions: Some(default_tiers()),
            ..ModelSettings::default()
        });
        settings
            .resolution_for(w, h)
            .map(|tier| tier.name.clone())
            .ok_or_else(|| {
                self.up.failed(format!(
                    "MiniMax cannot render a {w}x{h} video: it renders landscape videos up to 1080P"
                ))
            })
    }

    fn upstream_model(&self, job: &JobMessage) -> String {
        job.upstream_model
            .clone()
            .or_else(|| self.models.get(&job.model)?.upstream_model.clone())
            .unwrap_or_else(|| DEFAULT_MODEL.to_owned())
    }
}

/// What a non-zero `base_resp.status_code` means for the task.
fn base_resp_step<T>(base: &BaseResp) -> Step<T> {
    let msg = if base.status_msg.is_empty() {
        "no message".to_owned()
    } else {
        base.status_msg.clone()
    };
    let code = base.status_code;
    match code {
        1002 => Step::Retry {
            after: None,
            why: format!("MiniMax rate limit ({code} {msg})"),
        },
        1000 | 1001 | 1024 => Step::Retry {
            after: None,
            why: format!("MiniMax asked to try again later ({code} {msg})"),
        },
        1004 => Step::Fail(format!(
            "MiniMax refused the API key ({code} {msg}); check CONDUIT__PROVIDERS__MINIMAX__API_KEY"
        )),
        1008 => Step::Fail(format!(
            "The MiniMax account's balance is insufficient ({code} {msg})"
        )),
        1026 => Step::Fail(format!(
            "MiniMax refused the prompt under its content policy ({code} {msg})"
        )),
        1027 => Step::Fail(format!(
            "MiniMax withheld the generated video under its content policy ({code} {msg})"
        )),
        2013 => Step::Fail(format!(
            "MiniMax refused the request's parameters ({code} {msg})"
        )),
        _ => Step::Fail(format!("MiniMax answered with error {code}: {msg}")),
    }
}

/// The HTTP-level handling MiniMax answers share: rate limits and server failures are
/// retried, a refused credential is said so, anything else non-2xx is an error.
fn http_step<T>(reply: &Reply) -> Option<Step<T>> {
    if let Some(step) = reply.transient() {
        return Some(step);
    }
    match reply.status.as_u16() {
        200..=299 => None,
        401 | 403 => Some(Step::Fail(format!(
            "MiniMax refused the API key (HTTP {}); check CONDUIT__PROVIDERS__MINIMAX__API_KEY",
            reply.status.as_u16()
        ))),
        status => Some(Step::Fail(format!(
            "MiniMax answered HTTP {status}: {}",
            reply.snippet()
        ))),
    }
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[async_trait]
impl Provider for MiniMaxProvider {
    async fn generate(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError> {
        let up = &self.up;
        let cancel = &ctx.cancel;
        let resolution = self.resolution(job)?;
        let mut body = json!({
            "model": self.upstream_model(job),
            "prompt": job.prompt,
            "duration": job.spec.duration_seconds,
            "resolution": resolution,
        });
        if let Some(image) = &job.image_url {
            // MiniMax takes a public URL or a data URI as the first frame.
            body["first_frame_image"] = json!(image);
        }
        let body = &body;
        let (upstream, _resumed) = ctx
            .upstream
            .submit_once(job, "minimax", cancel, || async {
                let task_id: String = up
                    .call(
                        cancel,
                        "submit the video task",
                        || up.request(Method::POST, "/v1/video_generation").json(body),
                        |reply| {
                            if let Some(step) = http_step(reply) {
                                return step;
                            }
                            match reply.json::<Created>() {
                                Err(e) => {
                                    Step::Fail(format!("MiniMax answered the submit with {e}"))
                                }
                                Ok(c) if c.base_resp.status_code != 0 => {
                                    base_resp_step(&c.base_resp)
                                }
                                Ok(c) if c.task_id.is_empty() => Step::Fail(
                                    "MiniMax answered the submit without a task_id".into(),
                                ),
                                Ok(c) => Step::Done(c.task_id),
                            }
                        },
                    )
                    .await?;
                Ok(UpstreamJob::new("minimax", task_id))
            })
            .await?;
        let task_id = upstream.id;
        ctx.progress.report(ProgressUpdate {
            percent: 2,
            message: "Submitted to MiniMax".into(),
            eta_seconds: None,
        });

        // Poll until Success or Fail. MiniMax reports no numeric progress, so while it
        // is processing the percentage is an estimate that creeps towards 90.
        let mut poller = Poller::new(up);
        let mut estimate = ProgressEstimate::default();
        let file_id = loop {
            poller.wait(cancel).await?;
            let query: Query = up
                .call(
                    cancel,
                    "query the video task",
                    || {
                        up.request(Method::GET, "/v1/query/video_generation")
                            .query(&[("task_id", &task_id)])
                    },
                    |reply| {
                        if let Some(step) = http_step(reply) {
                            return step;
                        }
                        match reply.json::<Query>() {
                            Err(e) => Step::Fail(format!("MiniMax answered the query with {e}")),
                            Ok(q) if q.base_resp.status_code != 0 && q.status != "Fail" => {
                                base_resp_step(&q.base_resp)
                            }
                            Ok(q) => Step::Done(q),
                        }
                    },
                )
                .await?;
            let (percent, message) = match query.status.as_str() {
                "Success" => match id_string(&query.file_id) {
                    Some(id) => break id,
                    None => {
                        return Err(up.failed("MiniMax reported Success without a file_id"));
                    }
                },
                "Fail" => {
                    return Err(match base_resp_step::<()>(&query.base_resp) {
                        Step::Fail(why) | Step::Retry { why, .. }
                            if query.base_resp.status_code != 0 =>
                        {
                            up.failed(format!("MiniMax could not generate the video: {why}"))
                        }
                        _ => up.failed(format!(
                            "MiniMax could not generate the video (status Fail{})",
                            if query.base_resp.status_msg.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", query.base_resp.status_msg)
                            }
                        )),
                    });
                }
                "Preparing" => (5, "Preparing at MiniMax".to_owned()),
                "Queueing" => (10, "Queued at MiniMax".to_owned()),
                "Processing" => estimate.generating(up.name),
                other => (5, format!("Waiting for MiniMax (status {other:?})")),
            };
            ctx.progress.report(ProgressUpdate {
                percent,
                message,
                eta_seconds: None,
            });
        };

        let download_url: String = up
            .call(
                cancel,
                "look up the video file",
                || {
                    up.request(Method::GET, "/v1/files/retrieve")
                        .query(&[("file_id", &file_id)])
                },
                |reply| {
                    if let Some(step) = http_step(reply) {
                        return step;
                    }
                    match reply.json::<Retrieved>() {
                        Err(e) => Step::Fail(format!("MiniMax answered the file lookup with {e}")),
                        Ok(r) if r.base_resp.status_code != 0 => base_resp_step(&r.base_resp),
                        Ok(r) => match r.file.map(|f| f.download_url).filter(|u| !u.is_empty()) {
                            Some(url) => Step::Done(url),
                            None => {
                                Step::Fail("MiniMax's file lookup gave no file.download_url".into())
                            }
                        },
                    }
                },
            )
            .await?;
        up.fetch_video(&ctx, &download_url, "MiniMax", &task_id)
            .await
    }
}
