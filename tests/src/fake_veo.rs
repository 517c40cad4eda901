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

use std::{
    collections::BTreeMap,
    net::TcpListener,
    sync::{Arc, Mutex},
};

use actix_web::{dev::ServerHandle, web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

use crate::fakes::{fake_video, Ending, Recorded, Scenario};

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

struct State {
    key: String,
    base_url: String,
    default: Scenario,
    rules: Vec<(String, Scenario)>,
    limited: BTreeMap<String, u32>,
    jobs: Vec<VeoJob>,
    requests: Vec<Recorded>,
    next_id: u64,
}

impl State {
    fn scenario(&self, prompt: &str) -> Scenario {
        self.rules
            .iter()
            .find(|(needle, _)| prompt.contains(needle.as_str()))
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| self.default.clone())
    }

    fn job(&mut self, id: &str) -> Option<&mut VeoJob> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }
}

/// A running fake of the Gemini API's Veo endpoints; stops when dropped.
pub struct FakeVeo {
    port: u16,
    state: Arc<Mutex<State>>,
    handle: ServerHandle,
}

impl FakeVeo {
    /// Starts a fake that accepts `x-goog-api-key: <key>`.
    pub fn start(key: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake Veo");
        let port = listener.local_addr().expect("fake Veo address").port();
        let state = Arc::new(Mutex::new(State {
            key: key.to_owned(),
            base_url: format!("http://127.0.0.1:{port}"),
            default: Scenario::default(),
            rules: Vec::new(),
            limited: BTreeMap::new(),
            jobs: Vec::new(),
            requests: Vec::new(),
            next_id: 1,
        }));
        let shared = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(32 << 20))
                .default_service(web::to(handle))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .expect("fake Veo listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            port,
            state,
            handle,
        }
    }

    /// `CONDUIT__PROVIDERS__VEO__BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn on_prompt(&self, needle: &str, scenario: Scenario) {
        self.lock().rules.push((needle.to_owned(), scenario));
    }

    pub fn set_default(&self, scenario: Scenario) {
        self.lock().default = scenario;
    }

    pub fn jobs(&self) -> Vec<VeoJob> {
        self.lock().jobs.clone()
    }

    pub fn job_for(&self, prompt: &str) -> Option<VeoJob> {
        self.lock()
            .jobs
            .iter()
            .find(|j| j.prompt == prompt)
            .cloned()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake Veo state")
    }
}

impl Drop for FakeVeo {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(self.handle.stop(false));
        }
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

async fn handle(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Mutex<State>>,
) -> HttpResponse {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut s = state.lock().expect("fake Veo state");
    s.requests.push(Recorded {
        method: req.method().to_string(),
        path: req.path().to_owned(),
        query: req.query_string().to_owned(),
        authorization: header("x-goog-api-key"),
        content_type: header("content-type"),
    });
    if header("x-goog-api-key").as_deref() != Some(s.key.as_str()) {
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
