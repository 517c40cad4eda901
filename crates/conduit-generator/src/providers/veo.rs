//! `veo`: Google's Veo through the Gemini API, as its documentation describes video
//! generation (ai.google.dev, "Generate videos with Veo"): long-running operations.
//!
//! 1. `POST /v1beta/models/{model}:predictLongRunning` with `x-goog-api-key` and
//!    `{"instances": [{"prompt", "image"?}], "parameters": {"aspectRatio", "resolution",
//!    "durationSeconds", "seed"?}}` answers an operation whose `name` is
//!    `models/{model}/operations/{id}`;
//! 2. `GET /v1beta/{name}` is polled until `done` is true, then holds either `error`
//!    (`code`, `message`, `status`) or `response.generateVideoResponse`;
//! 3. `generatedSamples[0].video.uri` is downloaded with the same key (it is on the API
//!    host). No sample but `raiMediaFilteredReasons` means Google's safety filters
//!    withheld the video, which the task's error says.
//!
//! An image-to-video request sends the image inline, as `instances[0].image` with
//! `bytesBase64Encoded` and `mimeType`. The Gemini API has no way to cancel an
//! operation: a cancelled task just stops polling. The operation's name is the
//! attempt's upstream checkpoint: a run that takes the attempt over polls it.

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
    http::{Auth, Poller, ProgressEstimate, Reply, Step, Upstream},
    GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider,
};

const NAME: &str = "Veo";
/// The provider name jobs carry.
const PROVIDER: &str = "veo";
const KEY_SETTING: &str = "CONDUIT__PROVIDERS__VEO__API_KEY";

pub struct VeoProvider {
    up: Upstream,
    models: BTreeMap<String, ModelSettings>,
}

/// A `google.longrunning.Operation`.
#[derive(Debug, Deserialize)]
struct Operation {
    #[serde(default)]
    name: String,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    error: Option<RpcStatus>,
    #[serde(default)]
    response: Option<Value>,
}

/// A `google.rpc.Status`, the error of an operation or of a request.
#[derive(Debug, Default, Deserialize)]
struct RpcStatus {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

impl RpcStatus {
    fn describe(&self) -> String {
        let message = self
            .message
            .clone()
            .unwrap_or_else(|| "no reason given".into());
        match (&self.status, self.code) {
            (Some(s), _) => format!("{message} ({s})"),
            (None, Some(c)) => format!("{message} (code {c})"),
            (None, None) => message,
        }
    }
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: RpcStatus,
}

fn http_step<T>(reply: &Reply) -> Option<Step<T>> {
    let status = reply.status.as_u16();
    if (200..300).contains(&status) {
        return None;
    }
    if let Some(step) = reply.transient() {
        return Some(step);
    }
    let error = reply.json::<ErrorBody>().map(|b| b.error).ok();
    // Google answers a bad key with 400 and the reason `API_KEY_INVALID`.
    let bad_key = String::from_utf8_lossy(&reply.body).contains("API_KEY_INVALID");
    Some(match (status, error) {
        _ if bad_key => Step::Fail(format!(
            "Veo refused the API key (HTTP {status}); check {KEY_SETTING}"
        )),
        (401 | 403, _) => Step::Fail(format!(
            "Veo refused the API key (HTTP {status}); check {KEY_SETTING}"
        )),
        (_, Some(e)) if e.message.is_some() => Step::Fail(format!(
            "Veo refused the request (HTTP {status}): {}",
            e.describe()
        )),
        _ => Step::Fail(format!("Veo answered HTTP {status}: {}", reply.snippet())),
    })
}

fn operation_step(reply: &Reply, what: &str) -> Step<Operation> {
    if let Some(step) = http_step(reply) {
        return step;
    }
    match reply.json::<Operation>() {
        Err(e) => Step::Fail(format!("Veo answered the {what} with {e}")),
        Ok(op) if op.name.is_empty() => {
            Step::Fail(format!("Veo answered the {what} without an operation name"))
        }
        Ok(op) => Step::Done(op),
    }
}

/// The video's URI in a finished operation's `response`, or why there is none.
fn video_uri(response: &Value) -> Result<String, String> {
    let generated = response.get("generateVideoResponse").unwrap_or(response);
    if let Some(uri) = generated
        .pointer("/generatedSamples/0/video/uri")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        return Ok(uri.to_owned());
    }
    let reasons: Vec<String> = generated
        .get("raiMediaFilteredReasons")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let filtered = generated
        .get("raiMediaFilteredCount")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if !reasons.is_empty() || filtered > 0 {
        let why = if reasons.is_empty() {
            "no reason given".to_owned()
        } else {
            reasons.join("; ")
        };
        return Err(format!(
            "Veo's safety filters withheld the generated video: {why}"
        ));
    }
    Err("Veo finished without a generated video".into())
}

impl VeoProvider {
    pub fn new(
        account: &ProviderAccount,
        models: &BTreeMap<String, ModelSettings>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            up: Upstream::new(NAME, KEY_SETTING, account)?
                .with_auth(Auth::Header("x-goog-api-key")),
            models: models.clone(),
        })
    }

    fn upstream_model(&self, job: &JobMessage) -> Result<String, GenerationError> {
        job.upstream_model
            .clone()
            .or_else(|| self.models.get(&job.model)?.upstream_model.clone())
            .map(|m| m.trim_start_matches("models/").to_owned())
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                self.up.failed(format!(
                    "Model '{}' names no Veo model; set its upstream_model (for example veo-3.1-generate-preview)",
                    job.model
                ))
            })
    }
}

#[async_trait]
impl Provider for VeoProvider {
    async fn generate(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError> {
        let up = &self.up;
        let cancel = &ctx.cancel;
        let model = self.upstream_model(job)?;
        let images = &ctx.images;
        let model = &model;
        // The first answer, for an operation started by this run.
        let mut first: Option<Operation> = None;
        let slot = &mut first;
        let (upstream, _resumed) = ctx
            .upstream
            .submit_once(job, PROVIDER, cancel, || async move {
                let mut instance = json!({"prompt": job.prompt});
                if let Some(image_url) = &job.image_url {
                    let image = images.load(image_url, cancel).await?;
                    instance["image"] = json!({
                        "bytesBase64Encoded": image.base64(),
                        "mimeType": image.mime,
                    });
                }
                let (w, h) = (job.spec.width, job.spec.height);
                let mut parameters = json!({
                    "aspectRatio": if w >= h { "16:9" } else { "9:16" },
                    "resolution": if w.min(h) >= 1080 { "1080p" } else { "720p" },
                    "durationSeconds": job.spec.duration_seconds,
                });
                if let Some(seed) = job.spec.seed {
                    parameters["seed"] = json!(seed);
                }
                let body = json!({"instances": [instance], "parameters": parameters});
                let path = format!("/v1beta/models/{model}:predictLongRunning");
                let operation = up
                    .call(
                        cancel,
                        "start the generation",
                        || up.request(Method::POST, &path).json(&body),
                        |reply| operation_step(reply, "generation request"),
                    )
                    .await?;
                let upstream = UpstreamJob::new(PROVIDER, operation.name.clone());
                *slot = Some(operation);
                Ok(upstream)
            })
            .await?;
        let name = upstream.id;
        // A resumed operation's state is unknown until the first poll.
        let mut operation = first.unwrap_or_else(|| Operation {
            name: name.clone(),
            done: false,
            error: None,
            response: None,
        });
        ctx.progress.report(ProgressUpdate {
            percent: 2,
            message: "Submitted to Veo".into(),
            eta_seconds: None,
        });

        let poll_path = format!("/v1beta/{}", name.trim_start_matches('/'));
        let mut poller = Poller::new(up);
        let mut estimate = ProgressEstimate::default();
        while !operation.done {
            let (percent, message) = estimate.generating(up.name);
            ctx.progress.report(ProgressUpdate {
                percent,
                message,
                eta_seconds: None,
            });
            poller.wait(cancel).await?;
            operation = up
                .call(
                    cancel,
                    "check the operation",
                    || up.request(Method::GET, &poll_path),
                    |reply| operation_step(reply, "operation request"),
                )
                .await?;
        }
        if let Some(error) = &operation.error {
            return Err(up.failed(format!(
                "Veo could not generate the video: {}",
                error.describe()
            )));
        }
        let uri = video_uri(operation.response.as_ref().unwrap_or(&Value::Null))
            .map_err(|why| up.failed(why))?;
        up.fetch_video(&ctx, &uri, "Veo", &name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_operations_give_a_uri_or_say_why_not() {
        let ok = json!({"@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
            "generateVideoResponse": {"generatedSamples": [{"video": {"uri": "https://x/v1beta/files/a:download?alt=media"}}]}});
        assert_eq!(
            video_uri(&ok).as_deref(),
            Ok("https://x/v1beta/files/a:download?alt=media")
        );
        let filtered = json!({"generateVideoResponse": {"raiMediaFilteredCount": 1,
            "raiMediaFilteredReasons": ["The prompt could not be submitted."]}});
        let why = video_uri(&filtered).unwrap_err();
        assert!(
            why.contains("safety filters") && why.contains("could not be submitted"),
            "{why}"
        );
        assert!(video_uri(&json!({})).is_err());
    }
}
