//! A fake of the Gemini API's Veo video generation on 127.0.0.1, as Google documents it:
//! `POST /v1beta/models/{model}:predictLongRunning` with `x-goog-api-key` and
//! `{"instances": [{"prompt", "image"?}], "parameters": {...}}` answers an operation
//! `models/{model}/operations/{id}`; `GET /v1beta/{name}` answers it with `done: false`
//! while it runs, then `done: true` with `response.generateVideoResponse.generatedSamples`
//! or an `error`; the sample's `video.uri` (`/v1beta/files/{id}:download?alt=media`) needs
//! the key too. Errors are `{"error": {"code", "message", "status"}}`.
//!
//! Requests follow a [`Scenario`] chosen by prompt, as in [`crate::fakes`]: rate-limited
//! submits (429 `RESOURCE_EXHAUSTED`), polls that find the operation running, a failure
//! (`Ending::Fail` with code `RAI`: the safety filters withheld the video, with the
//! message as the filter's reason; any other code: an operation `error` with that status),
//! a refused key (400 `API_KEY_INVALID`), a refused submit (400 `INVALID_ARGUMENT`).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::fakes::{fake_video, Ending, FakeJobRecord, FakeServer, Scenario, Shared};

/// One operation the fake started.
#[derive(Debug, Clone)]
pub struct VeoJob {
    pub id: String,
    /// The model of the request path (`veo-3.1-generate-preview`).
    pub model: String,
    pub prompt: String,
    /// The request body as received.
    pub body: Value,
    pub polls: u32,
    pub downloads: u32,
    scenario: Scenario,
}

impl FakeJobRecord for VeoJob {
    fn id(&self) -> &str {
        &self.id
    }

    fn prompt(&self) -> &str {
        &self.prompt
    }
}

/// A fake of the Gemini API's Veo endpoints.
pub type FakeVeo = FakeServer<VeoJob>;

impl FakeServer<VeoJob> {
    /// Starts a fake that accepts `x-goog-api-key: <key>`.
    pub fn start(key: &str) -> Self {
        Self::serve((), key, 32 << 20, handle)
    }
}

fn error(code: u16, status: &str, message: &str) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(code)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({"error": {"code": code, "message": message, "status": status}}))
}

/// What Veo's documented request allows.
fn check_body(body: &Value) -> Result<(), String> {
    let instance = body
        .pointer("/instances/0")
        .and_then(Value::as_object)
        .ok_or("instances must hold one instance")?;
    for key in instance.keys() {
        if !["prompt", "image", "lastFrame", "referenceImages"].contains(&key.as_str()) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{key}\" at 'instances[0]'"
            ));
        }
    }
    if instance
        .get("prompt")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return Err("instances[0].prompt is required".into());
    }
    if let Some(image) = instance.get("image") {
        let mime = image.get("mimeType").and_then(Value::as_str);
        if !matches!(mime, Some("image/png" | "image/jpeg")) {
            return Err("image.mimeType must be image/png or image/jpeg".into());
        }
        if image
            .get("bytesBase64Encoded")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err("image.bytesBase64Encoded is required".into());
        }
    }
    let p = body.get("parameters").cloned().unwrap_or(json!({}));
    if let Some(ratio) = p.get("aspectRatio") {
        if !matches!(ratio.as_str(), Some("16:9" | "9:16")) {
            return Err(format!("aspectRatio {ratio} is not supported"));
        }
    }
    if let Some(resolution) = p.get("resolution") {
        if !matches!(resolution.as_str(), Some("720p" | "1080p")) {
            return Err(format!("resolution {resolution} is not supported"));
        }
    }
    if let Some(d) = p.get("durationSeconds") {
        if !matches!(d.as_u64(), Some(4 | 6 | 8)) {
            return Err(format!("durationSeconds {d} is out of bounds: 4, 6 or 8"));
        }
    }
    Ok(())
}

async fn handle(req: HttpRequest, body: web::Bytes, state: Shared<VeoJob>) -> HttpResponse {
    let mut s = state.lock().expect("fake Veo state");
    // Veo takes its key in `x-goog-api-key`; it is recorded as the credential.
    let presented = s.record(&req, "x-goog-api-key");
    if presented != s.key {
        return HttpResponse::BadRequest().json(json!({"error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
        }}));
    }
    let path = req.path().to_owned();
    let method = req.method().as_str().to_owned();
    let base = s.base_url.clone();
    if method == "POST" {
        let Some(model) = path
            .strip_prefix("/v1beta/models/")
            .and_then(|p| p.strip_suffix(":predictLongRunning"))
            .map(str::to_owned)
        else {
            return error(404, "NOT_FOUND", "Method not found.");
        };
        let Ok(body) = serde_json::from_slice::<Value>(&body) else {
            return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.");
        };
        let prompt = body
            .pointer("/instances/0/prompt")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let scenario = s.scenario(&prompt);
        if scenario.refuse_credential {
            return HttpResponse::BadRequest().json(json!({"error": {
                "code": 400, "message": "API key expired. Please renew the API key.", "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]
            }}));
        }
        let left = s
            .limited
            .entry(prompt.clone())
            .or_insert(scenario.rate_limited_submits);
        if *left > 0 {
            *left -= 1;
            return error(
                429,
                "RESOURCE_EXHAUSTED",
                "Resource has been exhausted (e.g. check quota).",
            );
        }
        if let Err(why) = check_body(&body) {
            return error(400, "INVALID_ARGUMENT", &why);
        }
        if let Some((_, message)) = &scenario.refuse_submit {
            return error(400, "INVALID_ARGUMENT", message);
        }
        let id = format!("op{:012x}", s.next_id);
        s.next_id += 1;
        s.jobs.push(VeoJob {
            id: id.clone(),
            model: model.clone(),
            prompt,
            body,
            polls: 0,
            downloads: 0,
            scenario,
        });
        return HttpResponse::Ok().json(json!({"name": format!("models/{model}/operations/{id}")}));
    }
    if method != "GET" {
        return error(405, "UNIMPLEMENTED", "Method not allowed.");
    }
    if let Some(file) = path.strip_prefix("/v1beta/files/") {
        let id = file.trim_end_matches(":download").to_owned();
        let Some(job) = s.job(&id) else {
            return error(404, "NOT_FOUND", "File not found.");
        };
        job.downloads += 1;
        if job.downloads <= job.scenario.failed_downloads {
            return error(500, "INTERNAL", "Internal error encountered.");
        }
        return HttpResponse::Ok()
            .content_type("video/mp4")
            .body(fake_video(&id));
    }
    let Some((model, id)) = path
        .strip_prefix("/v1beta/models/")
        .and_then(|p| p.split_once("/operations/"))
        .map(|(m, i)| (m.to_owned(), i.to_owned()))
    else {
        return error(404, "NOT_FOUND", "Not found.");
    };
    let Some(job) = s.job(&id) else {
        return error(404, "NOT_FOUND", "Operation not found.");
    };
    if job.model != model {
        return error(404, "NOT_FOUND", "Operation not found.");
    }
    job.polls += 1;
    let name = format!("models/{model}/operations/{id}");
    if job.polls <= job.scenario.running_polls.saturating_add(1) {
        return HttpResponse::Ok().json(json!({"name": name, "done": false}));
    }
    let body = match job.scenario.ending.clone() {
        Ending::Succeed => json!({
            "name": name, "done": true,
            "response": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {"generatedSamples": [
                    {"video": {"uri": format!("{base}/v1beta/files/{id}:download?alt=media")}}
                ]}
            }
        }),
        Ending::Fail { code, message } if code == "RAI" => json!({
            "name": name, "done": true,
            "response": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {"raiMediaFilteredCount": 1, "raiMediaFilteredReasons": [message]}
            }
        }),
        Ending::Fail { code, message } => json!({
            "name": name, "done": true,
            "error": {"code": 13, "message": message, "status": code}
        }),
    };
    HttpResponse::Ok().json(body)
}
