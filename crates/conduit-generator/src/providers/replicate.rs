//! `replicate`: Replicate predictions, as Replicate's HTTP API documents them.
//!
//! 1. `POST /v1/models/{owner}/{name}/predictions` with `{"input": {"prompt": ...}}` (an
//!    image-to-video request adds the image, URL or data URI, under the model entry's
//!    `image_field`, `image` by default: `first_frame_image` for `minimax/video-01`)
//!    (for an upstream model written `owner/name:version`, `POST /v1/predictions` with
//!    that `version`) answers a prediction with its `id` and `status`;
//! 2. `GET /v1/predictions/{id}` is polled while `status` is `starting` or `processing`,
//!    until `succeeded` (the video's URL in `output`), `failed` (with `error`) or
//!    `canceled`;
//! 3. the output URL is downloaded.
//!
//! A task that is cancelled or times out sends `POST /v1/predictions/{id}/cancel`, so
//! Replicate stops (and stops billing) the run. At shutdown the prediction is left
//! running: its id is the attempt's upstream checkpoint, and the run that takes the
//! attempt over polls it.

use std::collections::BTreeMap;

use async_trait::async_trait;
use conduit_core::{
    config::{ModelSettings, ProviderAccount},
    messages::{JobMessage, UpstreamJob},
};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    http::{Poller, ProgressEstimate, Reply, Step, Upstream},
    GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider,
};

/// The provider name jobs carry.
const PROVIDER: &str = "replicate";

pub struct ReplicateProvider {
    up: Upstream,
    models: BTreeMap<String, ModelSettings>,
}

/// The prediction object.
#[derive(Debug, Deserialize)]
struct Prediction {
    #[serde(default)]
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    output: Value,
    #[serde(default)]
    error: Value,
}

/// Replicate's error body: `{"title", "detail", "status"}`.
#[derive(Debug, Default, Deserialize)]
struct Problem {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    detail: Option<String>,
}

impl Problem {
    fn describe(&self, fallback: String) -> String {
        match (self.title.as_deref(), self.detail.as_deref()) {
            (Some(t), Some(d)) => format!("{t}: {d}"),
            (None, Some(d)) => d.to_owned(),
            (Some(t), None) => t.to_owned(),
            (None, None) => fallback,
        }
    }
}

impl ReplicateProvider {
    pub fn new(
        account: &ProviderAccount,
        models: &BTreeMap<String, ModelSettings>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            up: Upstream::new(
                "Replicate",
                "CONDUIT__PROVIDERS__REPLICATE__API_TOKEN",
                account,
            )?,
            models: models.clone(),
        })
    }

    /// Where to create the prediction, and its body.
    fn create_request(&self, job: &JobMessage) -> Result<(String, Value), GenerationError> {
        let model = job
            .upstream_model
            .clone()
            .or_else(|| self.models.get(&job.model)?.upstream_model.clone())
            .ok_or_else(|| {
                self.up.failed(format!(
                    "Model '{}' names no Replicate model (set models.{}.upstream_model to owner/name)",
                    job.model, job.model
                ))
            })?;
        let mut input = json!({ "prompt": job.prompt });
        if let Some(image) = &job.image_url {
            // Replicate file inputs take a URL or a data URI; the field is the model's own.
            let field = self
                .models
                .get(&job.model)
                .and_then(|m| m.image_field.clone())
                .unwrap_or_else(|| "image".to_owned());
            input[field] = json!(image);
        }
        if let Some((_, version)) = model.split_once(':') {
            return Ok((
                "/v1/predictions".into(),
                json!({ "version": version, "input": input }),
            ));
        }
        match model.split_once('/') {
            Some((owner, name)) if !owner.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok((
                    format!("/v1/models/{owner}/{name}/predictions"),
                    json!({ "input": input }),
                ))
            }
            _ => Err(self.up.failed(format!(
                "The Replicate model of '{}' must look like owner/name (got {model:?})",
                job.model
            ))),
        }
    }
}

fn http_step<T>(reply: &Reply) -> Option<Step<T>> {
    if let Some(step) = reply.transient() {
        return Some(step);
    }
    let status = reply.status.as_u16();
    if (200..300).contains(&status) {
        return None;
    }
    let problem = reply.json::<Problem>().unwrap_or_default();
    Some(Step::Fail(match status {
        401 | 403 => format!(
            "Replicate refused the API token (HTTP {status}); check CONDUIT__PROVIDERS__REPLICATE__API_TOKEN"
        ),
        402 => format!(
            "Replicate refused to run the model: the account needs credit ({})",
            problem.describe("payment required".into())
        ),
        404 => format!(
            "Replicate does not know the model or prediction (HTTP 404: {})",
            problem.describe("not found".into())
        ),
        422 => format!(
            "Replicate refused the model's input ({})",
            problem.describe("invalid input".into())
        ),
        _ => format!(
            "Replicate answered HTTP {status}: {}",
            problem.describe(reply.snippet())
        ),
    }))
}

fn prediction_step(reply: &Reply, what: &str) -> Step<Prediction> {
    if let Some(step) = http_step(reply) {
        return step;
    }
    match reply.json::<Prediction>() {
        Err(e) => Step::Fail(format!("Replicate answered the {what} with {e}")),
        Ok(p) if p.id.is_empty() => {
            Step::Fail(format!("Replicate answered the {what} without an id"))
        }
        Ok(p) => Step::Done(p),
    }
}

/// The video's URL in a prediction's `output`: a URL, or a list of them (the first
/// `.mp4` one, else the first).
fn output_url(output: &Value) -> Option<String> {
    match output {
        Value::String(url) if !url.is_empty() => Some(url.clone()),
        Value::Array(items) => {
            let urls: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            urls.iter()
                .find(|u| {
                    url::Url::parse(u)
                        .map(|p| p.path().to_ascii_lowercase().ends_with(".mp4"))
                        .unwrap_or(false)
                })
                .or_else(|| urls.first())
                .map(|u| (*u).to_owned())
        }
        _ => None,
    }
}

fn error_text(error: &Value) -> String {
    match error {
        Value::Null => "no reason given".into(),
        Value::String(s) if s.is_empty() => "no reason given".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[async_trait]
impl Provider for ReplicateProvider {
    async fn generate(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError> {
        let up = &self.up;
        let cancel = &ctx.cancel;
        let (create_path, body) = self.create_request(job)?;
        let mut first: Option<Prediction> = None;
        let slot = &mut first;
        let (create_path, body) = (&create_path, &body);
        let (upstream, _resumed) = ctx
            .upstream
            .submit_once(job, PROVIDER, cancel, || async move {
                let created = up
                    .call(
                        cancel,
                        "create the prediction",
                        || up.request(Method::POST, create_path).json(body),
                        |reply| prediction_step(reply, "create request"),
                    )
                    .await?;
                let upstream = UpstreamJob::new(PROVIDER, created.id.clone());
                *slot = Some(created);
                Ok(upstream)
            })
            .await?;
        let id = upstream.id;
        // From here on, a task the worker stops waiting for cancels the prediction.
        let mut stop = up.stop_on_drop(
            &ctx,
            format!("cancelling prediction {id}"),
            up.stop_request(Method::POST, &format!("/v1/predictions/{id}/cancel")),
        );

        let path = format!("/v1/predictions/{id}");
        let mut prediction = match first {
            Some(created) => created,
            // A resumed prediction: where it stands now.
            None => {
                up.call(
                    cancel,
                    "check the prediction",
                    || up.request(Method::GET, &path),
                    |reply| prediction_step(reply, "status request"),
                )
                .await?
            }
        };
        let mut poller = Poller::new(up);
        let mut estimate = ProgressEstimate::default();
        let url = loop {
            match prediction.status.as_str() {
                "succeeded" => {
                    stop.disarm();
                    match output_url(&prediction.output) {
                        Some(url) => break url,
                        None => {
                            return Err(up.failed(format!(
                                "Replicate finished without a video URL in its output ({})",
                                prediction.output
                            )))
                        }
                    }
                }
                "failed" => {
                    stop.disarm();
                    return Err(up.failed(format!(
                        "Replicate could not generate the video: {}",
                        error_text(&prediction.error)
                    )));
                }
                "canceled" => {
                    stop.disarm();
                    return Err(up.failed("The prediction was canceled at Replicate"));
                }
                _ => {}
            }
            let (percent, message) = match prediction.status.as_str() {
                "starting" => (5, "Starting at Replicate".to_owned()),
                "processing" => estimate.generating(up.name),
                other => (5, format!("Waiting for Replicate (status {other:?})")),
            };
            ctx.progress.report(ProgressUpdate {
                percent,
                message,
                eta_seconds: None,
            });
            poller.wait(cancel).await?;
            prediction = up
                .call(
                    cancel,
                    "check the prediction",
                    || up.request(Method::GET, &path),
                    |reply| prediction_step(reply, "status request"),
                )
                .await?;
        };

        up.fetch_video(&ctx, &url, "Replicate", &id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_a_url_or_a_list_of_them() {
        assert_eq!(
            output_url(&json!("https://replicate.delivery/a/out.mp4")).as_deref(),
            Some("https://replicate.delivery/a/out.mp4")
        );
        assert_eq!(
            output_url(&json!([
                "https://replicate.delivery/a/poster.png",
                "https://replicate.delivery/a/out.MP4"
            ]))
            .as_deref(),
            Some("https://replicate.delivery/a/out.MP4")
        );
        assert_eq!(
            output_url(&json!(["https://replicate.delivery/a/x"])).as_deref(),
            Some("https://replicate.delivery/a/x")
        );
        assert_eq!(output_url(&Value::Null), None);
        assert_eq!(output_url(&json!({"video": 1})), None);
    }
}
