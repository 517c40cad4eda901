//! `fal`: fal's queue API, as fal documents it (docs.fal.ai, "Queue"), which fronts the
//! video models fal hosts (Kling, Wan, Seedance, Hailuo, Veo, ...).
//!
//! 1. `POST {base}/{model_id}` with the model's input as JSON and `Authorization: Key ...`
//!    answers `request_id`, `status_url`, `response_url` and `cancel_url`;
//! 2. `GET status_url` is polled while `status` is `IN_QUEUE` (with `queue_position`) or
//!    `IN_PROGRESS`, until `COMPLETED` (a run that failed says so in `error`);
//! 3. `GET response_url` is the model's output, whose `video.url` is downloaded.
//!
//! The input is `prompt`, `duration` (seconds, as a string, as fal's video models take
//! it), `aspect_ratio` (`16:9`, `9:16` or `1:1`, from the requested size) and, for an
//! image-to-video request, the image under the model's `image_field` (`image_url` by
//! default); fal takes an `https` URL or a data URI there. A model entry's
//! `image_upstream_model` names the image-to-video endpoint when it differs.
//!
//! A task that is cancelled or times out sends `PUT cancel_url`, which fal honours while
//! the request is still queued. The request id and its three URLs are the attempt's
//! upstream checkpoint: a run that takes the attempt over polls the same request.

use std::collections::BTreeMap;

use async_trait::async_trait;
use conduit_core::{
    config::{ModelSettings, ProviderAccount},
    messages::{JobMessage, UpstreamJob},
};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{
    http::{Auth, Poller, ProgressEstimate, Reply, Step, Upstream},
    GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider,
};

const NAME: &str = "fal";
/// The provider name jobs carry.
const PROVIDER: &str = "fal";
const KEY_SETTING: &str = "CONDUIT__PROVIDERS__FAL__API_KEY";

pub struct FalProvider {
    up: Upstream,
    models: BTreeMap<String, ModelSettings>,
}

/// The answer of a submit.
#[derive(Debug, Deserialize)]
struct Queued {
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    status_url: String,
    #[serde(default)]
    response_url: String,
    #[serde(default)]
    cancel_url: String,
}

/// Where a submit's URLs are kept in the attempt's checkpoint.
const STATUS_URL: &str = "status_url";
const RESPONSE_URL: &str = "response_url";
const CANCEL_URL: &str = "cancel_url";

impl Queued {
    /// The submit's answer as the attempt's checkpoint keeps it.
    fn from_checkpoint(job: &UpstreamJob) -> Self {
        let url = |key: &str| job.extra.get(key).cloned().unwrap_or_default();
        Self {
            request_id: job.id.clone(),
            status_url: url(STATUS_URL),
            response_url: url(RESPONSE_URL),
            cancel_url: url(CANCEL_URL),
        }
    }
}

/// The answer of a status poll.
#[derive(Debug, Deserialize)]
struct Status {
    #[serde(default)]
    status: String,
    #[serde(default)]
    queue_position: Option<u64>,
    #[serde(default)]
    response_url: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

/// fal's error body: `{"detail": "..."}` or `{"detail": [{"msg", "type", "loc"}]}`.
fn detail(reply: &Reply) -> Option<String> {
    let body: Value = reply.json().ok()?;
    describe(body.get("detail")?)
}

fn describe(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Array(items) => {
            let parts: Vec<String> = items
                .iter()
                .filter_map(|i| {
                    let msg = i.get("msg").and_then(Value::as_str)?;
                    Some(match i.get("type").and_then(Value::as_str) {
                        Some(t) => format!("{msg} ({t})"),
                        None => msg.to_owned(),
                    })
                })
                .collect();
            (!parts.is_empty()).then(|| parts.join("; "))
        }
        Value::Object(o) => o.get("msg").or_else(|| o.get("message")).and_then(describe),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn http_step<T>(reply: &Reply) -> Option<Step<T>> {
    let status = reply.status.as_u16();
    if (200..300).contains(&status) {
        return None;
    }
    if let Some(step) = reply.transient() {
        return Some(step);
    }
    Some(match status {
        401 | 403 => Step::Fail(format!(
            "fal refused the API key (HTTP {status}); check {KEY_SETTING}"
        )),
        _ => match detail(reply) {
            Some(d) => Step::Fail(format!("fal refused the request (HTTP {status}): {d}")),
            None => Step::Fail(format!("fal answered HTTP {status}: {}", reply.snippet())),
        },
    })
}

/// The aspect ratio of a size, as fal's video models name it.
fn aspect_ratio(width: u32, height: u32) -> &'static str {
    use std::cmp::Ordering::*;
    match width.cmp(&height) {
        Greater => "16:9",
        Less => "9:16",
        Equal => "1:1",
    }
}

impl FalProvider {
    pub fn new(
        account: &ProviderAccount,
        models: &BTreeMap<String, ModelSettings>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            up: Upstream::new(NAME, KEY_SETTING, account)?.with_auth(Auth::Key),
            models: models.clone(),
        })
    }

    /// The endpoint id and the input of `job`.
    fn submit_request(&self, job: &JobMessage) -> Result<(String, Value), GenerationError> {
        let settings = self.models.get(&job.model);
        let model = match (&job.image_url, settings) {
            (Some(_), Some(m)) if m.image_upstream_model.is_some() => {
                m.image_upstream_model.clone()
            }
            _ => job
                .upstream_model
                .clone()
                .or_else(|| settings?.upstream_model.clone()),
        }
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| {
            self.up.failed(format!(
                "Model '{}' names no fal endpoint; set its upstream_model (for example fal-ai/kling-video/v2.1/standard/text-to-video)",
                job.model
            ))
        })?;
        let mut input = Map::new();
        input.insert("prompt".into(), json!(job.prompt));
        input.insert(
            "duration".into(),
            json!(job.spec.duration_seconds.to_string()),
        );
        input.insert(
            "aspect_ratio".into(),
            json!(aspect_ratio(job.spec.width, job.spec.height)),
        );
        if let Some(seed) = job.spec.seed {
            input.insert("seed".into(), json!(seed));
        }
        if let Some(image) = &job.image_url {
            let field = settings
                .and_then(|m| m.image_field.clone())
                .unwrap_or_else(|| "image_url".to_owned());
            input.insert(field, json!(image));
        }
        Ok((model.trim_matches('/').to_owned(), Value::Object(input)))
    }

    /// A URL fal handed out, checked to be on fal's own host before the key goes there.
    fn own_url(&self, url: &str, what: &str) -> Result<String, GenerationError> {
        if self.up.is_own(url) {
            Ok(url.to_owned())
        } else {
            Err(self.up.failed(format!(
                "fal answered with a {what} outside its API host ({url}); not sending the key there"
            )))
        }
    }
}

#[async_trait]
impl Provider for FalProvider {
    async fn generate(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError> {
        let up = &self.up;
        let cancel = &ctx.cancel;
        let (model, input) = self.submit_request(job)?;
        let path = format!("/{model}");
        let (path, input) = (&path, &input);
        let (upstream, _resumed) = ctx
            .upstream
            .submit_once(job, PROVIDER, cancel, || async move {
                let queued: Queued = up
                    .call(
                        cancel,
                        "queue the request",
                        || up.request(Method::POST, path).json(input),
                        |reply| {
                            if let Some(step) = http_step(reply) {
                                return step;
                            }
                            match reply.json::<Queued>() {
                                Err(e) => Step::Fail(format!("fal answered the submit with {e}")),
                                Ok(q) if q.request_id.is_empty() || q.status_url.is_empty() => {
                                    Step::Fail(
                                        "fal answered the submit without a request_id or status_url"
                                            .into(),
                                    )
                                }
                                Ok(q) => Step::Done(q),
                            }
                        },
                    )
                    .await?;
                // The URLs fal answered are what polling needs, on a takeover too.
                Ok(UpstreamJob::new(PROVIDER, queued.request_id)
                    .with_extra(STATUS_URL, queued.status_url)
                    .with_extra(RESPONSE_URL, queued.response_url)
                    .with_extra(CANCEL_URL, queued.cancel_url))
            })
            .await?;
        let queued = Queued::from_checkpoint(&upstream);
        let id = queued.request_id.clone();
        let status_url = self.own_url(&queued.status_url, "status_url")?;
        // From here on, a task the worker stops waiting for cancels the request.
        let mut stop = if queued.cancel_url.is_empty() {
            None
        } else {
            let cancel_url = self.own_url(&queued.cancel_url, "cancel_url")?;
            Some(up.stop_on_drop(
                &ctx,
                format!("cancelling fal request {id}"),
                up.stop_request_url(Method::PUT, &cancel_url),
            ))
        };
        ctx.progress.report(ProgressUpdate {
            percent: 2,
            message: "Submitted to fal".into(),
            eta_seconds: None,
        });

        let mut poller = Poller::new(up);
        let mut estimate = ProgressEstimate::default();
        let mut response_url = queued.response_url;
        loop {
            poller.wait(cancel).await?;
            let status: Status = up
                .call(
                    cancel,
                    "check the request",
                    || up.request_url(Method::GET, &status_url),
                    |reply| {
                        if let Some(step) = http_step(reply) {
                            return step;
                        }
                        match reply.json::<Status>() {
                            Err(e) => {
                                Step::Fail(format!("fal answered the status request with {e}"))
                            }
                            Ok(s) => Step::Done(s),
                        }
                    },
                )
                .await?;
            let (percent, message) = match status.status.as_str() {
                "COMPLETED" => {
                    if let Some(s) = &mut stop {
                        s.disarm();
                    }
                    if let Some(error) = status.error.as_ref().and_then(describe) {
                        return Err(up.failed(format!("fal could not generate the video: {error}")));
                    }
                    if let Some(url) = status.response_url.filter(|u| !u.is_empty()) {
                        response_url = url;
                    }
                    break;
                }
                "IN_QUEUE" => (
                    5,
                    match status.queue_position {
                        Some(p) => format!("Queued at fal (position {p})"),
                        None => "Queued at fal".to_owned(),
                    },
                ),
                "IN_PROGRESS" => estimate.generating(up.name),
                other => (5, format!("Waiting for fal (status {other:?})")),
            };
            ctx.progress.report(ProgressUpdate {
                percent,
                message,
                eta_seconds: None,
            });
        }

        if response_url.is_empty() {
            return Err(up.failed("fal reported COMPLETED without a response_url"));
        }
        let response_url = self.own_url(&response_url, "response_url")?;
        let url: String = up
            .call(
                cancel,
                "read the result",
                || up.request_url(Method::GET, &response_url),
                |reply| {
                    if let Some(step) = http_step(reply) {
                        return match step {
                            Step::Fail(why) => Step::Fail(why.replace(
                                "fal refused the request",
                                "fal could not generate the video",
                            )),
                            other => other,
                        };
                    }
                    match reply.json::<Value>() {
                        Err(e) => Step::Fail(format!("fal answered the result request with {e}")),
                        Ok(body) => match body
                            .pointer("/video/url")
                            .and_then(Value::as_str)
                            .filter(|u| !u.is_empty())
                        {
                            Some(url) => Step::Done(url.to_owned()),
                            None => Step::Fail(format!(
                                "fal's result has no video.url ({})",
                                reply.snippet()
                            )),
                        },
                    }
                },
            )
            .await?;
        up.fetch_video(&ctx, &url, "fal", &id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_read_as_sentences() {
        assert_eq!(
            describe(&json!("bad prompt")).as_deref(),
            Some("bad prompt")
        );
        assert_eq!(
            describe(&json!([{"loc": ["body", "prompt"], "msg": "flagged", "type": "content_policy_violation"}]))
                .as_deref(),
            Some("flagged (content_policy_violation)")
        );
        assert_eq!(describe(&Value::Null), None);
        assert_eq!(aspect_ratio(1280, 720), "16:9");
        assert_eq!(aspect_ratio(720, 1280), "9:16");
        assert_eq!(aspect_ratio(512, 512), "1:1");
    }
}
