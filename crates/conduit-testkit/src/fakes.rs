//! Fake video providers on 127.0.0.1 that implement each provider's documented HTTP
//! protocol closely enough to catch a wrong field name, status spelling or URL: MiniMax
//! (`/v1/video_generation`, `/v1/query/video_generation`, `/v1/files/retrieve`), an
//! OpenAI-compatible Videos API (`/v1/videos`, multipart create) and Replicate
//! (`/v1/models/{owner}/{name}/predictions`, `/v1/predictions/{id}`, `.../cancel`).
//!
//! Each job follows a [`Scenario`] chosen by its prompt: rate-limited submits, a number
//! of polls that find it still running, success or failure, downloads that fail first,
//! a refused credential. Every request is recorded for the test to inspect.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    sync::{Arc, Mutex},
};

use actix_web::{dev::ServerHandle, web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

/// Which provider's protocol a fake speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    MiniMax,
    OpenAi,
    Replicate,
}

/// How a job ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Succeed,
    /// Fails with this provider error code (MiniMax `base_resp.status_code`, OpenAI
    /// `error.code`; unused by Replicate) and message.
    Fail {
        code: String,
        message: String,
    },
}

/// What happens to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Submits answered with the provider's rate limit before one is accepted
    /// (MiniMax `base_resp` 1002, HTTP 429 for the others).
    pub rate_limited_submits: u32,
    /// Polls after the first (which finds the job queued) that find it still running
    /// (MiniMax: `Queueing`, then `Processing`); `u32::MAX` never ends.
    pub running_polls: u32,
    pub ending: Ending,
    /// Downloads answered HTTP 500 before the file is served.
    pub failed_downloads: u32,
    /// Refuse the credential at submit, repeating it in the message as a careless
    /// server might.
    pub refuse_credential: bool,
    /// Refuse the submit itself with this (code, message): MiniMax `base_resp`, OpenAI
    /// HTTP 400 `error`, Replicate HTTP 422 `detail`.
    pub refuse_submit: Option<(String, String)>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            rate_limited_submits: 0,
            running_polls: 1,
            ending: Ending::Succeed,
            failed_downloads: 0,
            refuse_credential: false,
            refuse_submit: None,
        }
    }
}

impl Scenario {
    pub fn failing(code: &str, message: &str) -> Self {
        Self {
            ending: Ending::Fail {
                code: code.into(),
                message: message.into(),
            },
            ..Self::default()
        }
    }

    /// A job that keeps running until it is cancelled.
    pub fn endless() -> Self {
        Self {
            running_polls: u32::MAX,
            ..Self::default()
        }
    }
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
}

/// One job the fake accepted.
#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: String,
    pub prompt: String,
    /// The submitted fields: JSON for MiniMax and Replicate, the form's text fields
    /// (as JSON strings) for OpenAI.
    pub params: Value,
    pub polls: u32,
    pub downloads: u32,
    /// Replicate: `POST /v1/predictions/{id}/cancel` was called.
    pub cancelled: bool,
    /// OpenAI: `DELETE /v1/videos/{id}` was called.
    pub deleted: bool,
    scenario: Scenario,
}

/// What the shared fake server needs of a fake's job record.
pub trait FakeJobRecord: Clone + Send + 'static {
    fn id(&self) -> &str;
    fn prompt(&self) -> &str;
}

impl FakeJobRecord for FakeJob {
    fn id(&self) -> &str {
        &self.id
    }

    fn prompt(&self) -> &str {
        &self.prompt
    }
}

/// The state every fake provider keeps: the key it accepts, the scenarios chosen by
/// prompt, the rate-limited submits still to answer, its jobs and every request seen.
/// `P` tells apart fakes that share one handler (the protocol of a [`FakeProvider`]).
pub struct FakeState<J, P = ()> {
    pub(crate) protocol: P,
    pub(crate) key: String,
    pub(crate) base_url: String,
    default: Scenario,
    rules: Vec<(String, Scenario)>,
    /// Rate-limited submits still to answer, by prompt.
    pub(crate) limited: BTreeMap<String, u32>,
    pub(crate) jobs: Vec<J>,
    pub(crate) requests: Vec<Recorded>,
    pub(crate) next_id: u64,
}

impl<J: FakeJobRecord, P> FakeState<J, P> {
    pub(crate) fn scenario(&self, prompt: &str) -> Scenario {
        self.rules
            .iter()
            .find(|(needle, _)| prompt.contains(needle.as_str()))
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| self.default.clone())
    }

    pub(crate) fn job(&mut self, id: &str) -> Option<&mut J> {
        self.jobs.iter_mut().find(|j| j.id() == id)
    }

    /// Records `req`, its credential read from the header `credential`, and returns
    /// that credential (empty when absent).
    pub(crate) fn record(&mut self, req: &HttpRequest, credential: &str) -> String {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.requests.push(Recorded {
            method: req.method().to_string(),
            path: req.path().to_owned(),
            query: req.query_string().to_owned(),
            authorization: header(credential),
            content_type: header("content-type"),
        });
        header(credential).unwrap_or_default()
    }
}

/// A fake provider's HTTP server on 127.0.0.1 (one worker, any free port) around a
/// [`FakeState`]; stops when dropped.
pub struct FakeServer<J, P = ()> {
    port: u16,
    state: Arc<Mutex<FakeState<J, P>>>,
    handle: ServerHandle,
}

/// The state as a handler receives it.
pub(crate) type Shared<J, P = ()> = web::Data<Mutex<FakeState<J, P>>>;

impl<J: FakeJobRecord, P: Send + 'static> FakeServer<J, P> {
    /// Serves `handler` for every request, with bodies up to `body_limit` bytes.
    pub(crate) fn serve<H, F>(protocol: P, key: &str, body_limit: usize, handler: H) -> Self
    where
        H: Fn(HttpRequest, web::Bytes, Shared<J, P>) -> F + Clone + Send + 'static,
        F: std::future::Future<Output = HttpResponse> + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake provider");
        let port = listener.local_addr().expect("fake provider address").port();
        let state = Arc::new(Mutex::new(FakeState {
            protocol,
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
                .app_data(web::PayloadConfig::new(body_limit))
                .default_service(web::to(handler.clone()))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .expect("fake provider listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            port,
            state,
            handle,
        }
    }

    /// The base URL to configure (`CONDUIT__PROVIDERS__...__BASE_URL`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Jobs whose prompt contains `needle` follow `scenario` (first match wins).
    pub fn on_prompt(&self, needle: &str, scenario: Scenario) {
        self.lock().rules.push((needle.to_owned(), scenario));
    }

    /// Jobs no rule matches follow `scenario`.
    pub fn set_default(&self, scenario: Scenario) {
        self.lock().default = scenario;
    }

    pub fn jobs(&self) -> Vec<J> {
        self.lock().jobs.clone()
    }

    /// The job whose prompt is exactly `prompt`.
    pub fn job_for(&self, prompt: &str) -> Option<J> {
        self.lock()
            .jobs
            .iter()
            .find(|j| j.prompt() == prompt)
            .cloned()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState<J, P>> {
        self.state.lock().expect("fake provider state")
    }
}

impl<J, P> Drop for FakeServer<J, P> {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(self.handle.stop(false));
        }
    }
}

/// A fake of MiniMax, an OpenAI-compatible Videos API or Replicate.
pub type FakeProvider = FakeServer<FakeJob, Protocol>;

impl FakeServer<FakeJob, Protocol> {
    /// Starts a fake that accepts `key` as `Authorization: Bearer <key>`.
    pub fn start(protocol: Protocol, key: &str) -> Self {
        Self::serve(protocol, key, 1 << 20, handle)
    }

    pub fn protocol(&self) -> Protocol {
        self.lock().protocol
    }

    /// Submit requests seen for `prompt`'s job, rate-limited ones included.
    pub fn submits(&self) -> usize {
        let path = match self.protocol() {
            Protocol::MiniMax => "/v1/video_generation",
            Protocol::OpenAi => "/v1/videos",
            Protocol::Replicate => "/predictions",
        };
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with(path))
            .count()
    }
}

/// The bytes a fake serves as job `id`'s video: a tiny file with an MP4 `ftyp` box.
pub fn fake_video(id: &str) -> Vec<u8> {
    let mut bytes = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom".to_vec();
    bytes.extend_from_slice(format!("fake video of job {id}").as_bytes());
    bytes
}

type State = FakeState<FakeJob, Protocol>;

async fn handle(
    req: HttpRequest,
    body: web::Bytes,
    state: Shared<FakeJob, Protocol>,
) -> HttpResponse {
    let mut s = state.lock().expect("fake provider state");
    let presented = s.record(&req, "authorization");
    // Files are served without a credential, like a CDN (OpenAI's content aside).
    if req.method() == "GET" && req.path().starts_with("/files/") {
        let id = req
            .path()
            .trim_start_matches("/files/")
            .trim_end_matches(".mp4")
            .to_owned();
        return download(&mut s, &id);
    }
    let authorized = presented == format!("Bearer {}", s.key);
    let query: BTreeMap<String, String> = url_query(req.query_string());
    match s.protocol {
        Protocol::MiniMax => minimax(&mut s, &req, &body, &query, authorized, &presented),
        Protocol::OpenAi => openai(&mut s, &req, &body, authorized, &presented),
        Protocol::Replicate => replicate(&mut s, &req, &body, authorized, &presented),
    }
}

fn url_query(raw: &str) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn new_job(s: &mut State, prompt: &str, params: Value, scenario: Scenario) -> String {
    let id = match s.protocol {
        Protocol::MiniMax => format!("{}", 106_916_112_212_000 + s.next_id),
        Protocol::OpenAi => format!("video_{:024x}", s.next_id),
        Protocol::Replicate => format!("pred{:020}", s.next_id),
    };
    s.next_id += 1;
    s.jobs.push(FakeJob {
        id: id.clone(),
        prompt: prompt.to_owned(),
        params,
        polls: 0,
        downloads: 0,
        cancelled: false,
        deleted: false,
        scenario,
    });
    id
}

/// Consumes one rate-limited submit of `prompt`, if any are left.
fn rate_limited(s: &mut State, prompt: &str, scenario: &Scenario) -> bool {
    let left = s
        .limited
        .entry(prompt.to_owned())
        .or_insert(scenario.rate_limited_submits);
    if *left > 0 {
        *left -= 1;
        true
    } else {
        false
    }
}

fn download(s: &mut State, id: &str) -> HttpResponse {
    let Some(job) = s.job(id) else {
        return HttpResponse::NotFound().finish();
    };
    job.downloads += 1;
    if job.downloads <= job.scenario.failed_downloads {
        return HttpResponse::InternalServerError().body("storage hiccup");
    }
    HttpResponse::Ok()
        .content_type("video/mp4")
        .body(fake_video(id))
}

fn with_retry_after(mut response: HttpResponse) -> HttpResponse {
    response.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from_static("0"),
    );
    response
}

/// Where a poll finds a job: `running` while it runs (with its poll number), then how it ended.
enum Phase {
    Running(u32),
    Ended(Ending),
}

fn poll(job: &mut FakeJob) -> Phase {
    job.polls += 1;
    if job.polls <= job.scenario.running_polls.saturating_add(1) {
        Phase::Running(job.polls)
    } else {
        Phase::Ended(job.scenario.ending.clone())
    }
}

// ---- MiniMax ----------------------------------------------------------------------

fn base_resp(code: i64, msg: &str) -> Value {
    json!({"status_code": code, "status_msg": msg})
}

fn minimax(
    s: &mut State,
    req: &HttpRequest,
    body: &[u8],
    query: &BTreeMap<String, String>,
    authorized: bool,
    presented: &str,
) -> HttpResponse {
    let refused = || {
        HttpResponse::Ok().json(json!({
            "base_resp": base_resp(1004, &format!("login fail: invalid api key in the 'Authorization' header ({presented})"))
        }))
    };
    match (req.method().as_str(), req.path()) {
        ("POST", "/v1/video_generation") => {
            let Ok(params) = serde_json::from_slice::<Value>(body) else {
                return HttpResponse::Ok().json(json!({"task_id": "", "base_resp": base_resp(2013, "invalid params, body is not JSON")}));
            };
            let prompt = params["prompt"].as_str().unwrap_or_default().to_owned();
            let scenario = s.scenario(&prompt);
            if !authorized || scenario.refuse_credential {
                return refused();
            }
            if rate_limited(s, &prompt, &scenario) {
                return HttpResponse::Ok()
                    .json(json!({"task_id": "", "base_resp": base_resp(1002, "rate limit")}));
            }
            if let Err(why) = minimax_params(&params) {
                return HttpResponse::Ok()
                    .json(json!({"task_id": "", "base_resp": base_resp(2013, &format!("invalid params, {why}"))}));
            }
            if let Some((code, msg)) = &scenario.refuse_submit {
                return HttpResponse::Ok().json(json!({
                    "task_id": "",
                    "base_resp": base_resp(code.parse().unwrap_or(1000), msg)
                }));
            }
            let id = new_job(s, &prompt, params, scenario);
            HttpResponse::Ok().json(json!({"task_id": id, "base_resp": base_resp(0, "success")}))
        }
        ("GET", "/v1/query/video_generation") => {
            if !authorized {
                return refused();
            }
            let id = query.get("task_id").cloned().unwrap_or_default();
            let Some(job) = s.job(&id) else {
                return HttpResponse::Ok().json(json!({"task_id": id, "status": "", "base_resp": base_resp(1013, "task not found")}));
            };
            let body = match poll(job) {
                Phase::Running(1) => {
                    json!({"task_id": id, "status": "Preparing", "base_resp": base_resp(0, "success")})
                }
                Phase::Running(2) => {
                    json!({"task_id": id, "status": "Queueing", "base_resp": base_resp(0, "success")})
                }
                Phase::Running(_) => {
                    json!({"task_id": id, "status": "Processing", "base_resp": base_resp(0, "success")})
                }
                Phase::Ended(Ending::Succeed) => json!({
                    "task_id": id, "status": "Success", "file_id": format!("{id}01"),
                    "video_width": 1366, "video_height": 768,
                    "base_resp": base_resp(0, "success")
                }),
                Phase::Ended(Ending::Fail { code, message }) => json!({
                    "task_id": id, "status": "Fail",
                    "base_resp": base_resp(code.parse().unwrap_or(1000), &message)
                }),
            };
            HttpResponse::Ok().json(body)
        }
        ("GET", "/v1/files/retrieve") => {
            if !authorized {
                return refused();
            }
            let file_id = query.get("file_id").cloned().unwrap_or_default();
            let Some(task_id) = file_id.strip_suffix("01").map(str::to_owned) else {
                return HttpResponse::Ok()
                    .json(json!({"base_resp": base_resp(1013, "file not found")}));
            };
            if s.job(&task_id).is_none() {
                return HttpResponse::Ok()
                    .json(json!({"base_resp": base_resp(1013, "file not found")}));
            }
            let url = format!("{}/files/{task_id}.mp4", s.base_url);
            HttpResponse::Ok().json(json!({
                "file": {
                    "file_id": file_id, "bytes": fake_video(&task_id).len(), "created_at": 1_700_469_398,
                    "filename": "output.mp4", "purpose": "video_generation", "download_url": url
                },
                "base_resp": base_resp(0, "success")
            }))
        }
        _ => HttpResponse::NotFound().json(json!({"base_resp": base_resp(404, "not found")})),
    }
}

/// MiniMax-Hailuo-02's text-to-video parameters, as documented.
fn minimax_params(p: &Value) -> Result<(), String> {
    let Some(obj) = p.as_object() else {
        return Err("body must be an object".into());
    };
    for key in obj.keys() {
        if ![
            "model",
            "prompt",
            "duration",
            "resolution",
            "prompt_optimizer",
            "fast_pretreatment",
            "callback_url",
            "aigc_watermark",
            "first_frame_image",
        ]
        .contains(&key.as_str())
        {
            return Err(format!("unknown field {key}"));
        }
    }
    if p["model"].as_str().is_none_or(str::is_empty) {
        return Err("model is required".into());
    }
    if p["prompt"].as_str().is_none_or(str::is_empty) {
        return Err("prompt is required".into());
    }
    let duration = p["duration"]
        .as_u64()
        .ok_or("duration must be an integer")?;
    let resolution = p["resolution"].as_str().ok_or("resolution is required")?;
    match (resolution, duration) {
        ("512P" | "768P", 6 | 10) | ("1080P", 6) => Ok(()),
        _ => Err(format!("{duration} s at {resolution} is not supported")),
    }
}

// ---- OpenAI ------------------------------------------------------------------------

fn openai_error(status: u16, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::BAD_REQUEST))
        .json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}}))
}

fn video_object(job: &FakeJob, status: &str, progress: u32, error: Option<Value>) -> Value {
    let mut v = json!({
        "id": job.id, "object": "video", "model": job.params["model"],
        "status": status, "progress": progress, "created_at": 1_760_000_000,
        "size": job.params["size"], "seconds": job.params["seconds"], "quality": "standard"
    });
    if status == "completed" {
        v["completed_at"] = json!(1_760_000_100);
        v["expires_at"] = json!(1_760_086_500);
    }
    if let Some(e) = error {
        v["error"] = e;
    }
    v
}

fn openai(
    s: &mut State,
    req: &HttpRequest,
    body: &[u8],
    authorized: bool,
    presented: &str,
) -> HttpResponse {
    let refused = || {
        openai_error(
            401,
            "invalid_api_key",
            &format!(
                "Incorrect API key provided: {}.",
                presented.trim_start_matches("Bearer ")
            ),
        )
    };
    let path = req.path().to_owned();
    let method = req.method().as_str().to_owned();
    if method == "POST" && path == "/v1/videos" {
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let Some(mut fields) = multipart_fields(&content_type, body) else {
            return openai_error(
                400,
                "invalid_request",
                "expected a multipart/form-data body",
            );
        };
        let prompt = fields.get("prompt").cloned().unwrap_or_default();
        let scenario = s.scenario(&prompt);
        if !authorized || scenario.refuse_credential {
            return refused();
        }
        if rate_limited(s, &prompt, &scenario) {
            return with_retry_after(openai_error(
                429,
                "rate_limit_exceeded",
                "Rate limit reached for requests",
            ));
        }
        let seconds = fields.get("seconds").map(String::as_str).unwrap_or("4");
        let size = fields.get("size").map(String::as_str).unwrap_or("720x1280");
        if !["4", "8", "12"].contains(&seconds) {
            return openai_error(
                400,
                "invalid_value",
                &format!("Invalid value for seconds: {seconds}"),
            );
        }
        if !["720x1280", "1280x720", "1024x1792", "1792x1024"].contains(&size) {
            return openai_error(
                400,
                "invalid_value",
                &format!("Invalid value for size: {size}"),
            );
        }
        if prompt.is_empty() {
            return openai_error(
                400,
                "missing_required_parameter",
                "Missing required parameter: 'prompt'.",
            );
        }
        if let Some((code, message)) = &scenario.refuse_submit {
            return openai_error(400, code, message);
        }
        // The first frame arrives as a file part: recorded as base64 of its exact bytes.
        if let Some((mime, bytes)) = multipart_file(&content_type, body, "input_reference") {
            use base64::Engine;
            let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
            fields.insert(
                "input_reference".into(),
                format!("data:{mime};base64,{encoded}"),
            );
        }
        let params = json!(fields);
        let id = new_job(s, &prompt, params, scenario);
        let job = s.job(&id).cloned().expect("job just created");
        return HttpResponse::Ok().json(video_object(&job, "queued", 0, None));
    }
    let Some(rest) = path.strip_prefix("/v1/videos/") else {
        return openai_error(404, "not_found", "Unknown route");
    };
    if !authorized {
        return refused();
    }
    let (id, content) = match rest.strip_suffix("/content") {
        Some(id) => (id.to_owned(), true),
        None => (rest.to_owned(), false),
    };
    let Some(job) = s.job(&id) else {
        return openai_error(404, "not_found", &format!("Video {id} not found"));
    };
    if job.deleted {
        return openai_error(404, "not_found", &format!("Video {id} was deleted"));
    }
    match (method.as_str(), content) {
        ("GET", true) => {
            let finished = job.polls > job.scenario.running_polls.saturating_add(1)
                && job.scenario.ending == Ending::Succeed;
            if !finished {
                return openai_error(400, "video_not_ready", "The video is not ready");
            }
            download(s, &id)
        }
        ("GET", false) => {
            let running = job.scenario.running_polls;
            let body = match poll(job) {
                Phase::Running(1) => video_object(job, "queued", 0, None),
                Phase::Running(n) => {
                    let progress = if running == u32::MAX {
                        50
                    } else {
                        (n - 1) * 100 / (running + 1)
                    };
                    video_object(job, "in_progress", progress, None)
                }
                Phase::Ended(Ending::Succeed) => video_object(job, "completed", 100, None),
                Phase::Ended(Ending::Fail { code, message }) => video_object(
                    job,
                    "failed",
                    0,
                    Some(json!({"code": code, "message": message})),
                ),
            };
            HttpResponse::Ok().json(body)
        }
        ("DELETE", false) => {
            job.deleted = true;
            HttpResponse::Ok().json(json!({"id": id, "object": "video.deleted", "deleted": true}))
        }
        _ => openai_error(405, "method_not_allowed", "Method not allowed"),
    }
}

/// The text fields of a `multipart/form-data` body.
fn multipart_fields(content_type: &str, body: &[u8]) -> Option<BTreeMap<String, String>> {
    let boundary = content_type
        .strip_prefix("multipart/form-data")?
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))?
        .trim_matches('"')
        .to_owned();
    let body = String::from_utf8_lossy(body);
    let mut fields = BTreeMap::new();
    for part in body.split(&format!("--{boundary}")) {
        let Some((headers, value)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let name = headers
            .split("\r\n")
            .find(|h| h.to_ascii_lowercase().starts_with("content-disposition:"))
            .and_then(|h| h.split(';').find_map(|p| p.trim().strip_prefix("name=")))
            .map(|n| n.trim_matches('"').to_owned())?;
        fields.insert(name, value.strip_suffix("\r\n").unwrap_or(value).to_owned());
    }
    Some(fields)
}

/// The content type and exact bytes of the file part `name` of a `multipart/form-data` body.
fn multipart_file(content_type: &str, body: &[u8], name: &str) -> Option<(String, Vec<u8>)> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))?
        .trim_matches('"');
    let delimiter = format!("\r\n--{boundary}").into_bytes();
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let marker = format!("name=\"{name}\"").into_bytes();
    let at = find(body, &marker, 0)?;
    let headers_end = find(body, b"\r\n\r\n", at)?;
    let headers = String::from_utf8_lossy(&body[at..headers_end]).to_string();
    let mime = headers
        .split("\r\n")
        .find_map(|h| {
            h.strip_prefix("Content-Type: ")
                .or_else(|| h.strip_prefix("content-type: "))
        })
        .unwrap_or("application/octet-stream")
        .to_owned();
    let start = headers_end + 4;
    let end = find(body, &delimiter, start)?;
    Some((mime, body[start..end].to_vec()))
}

// ---- Replicate ---------------------------------------------------------------------

fn problem(status: u16, title: &str, detail: &str) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .content_type("application/problem+json")
    .json(json!({"title": title, "detail": detail, "status": status}))
}

fn prediction(s: &State, job: &FakeJob, status: &str, output: Value, error: Value) -> Value {
    json!({
        "id": job.id,
        "model": job.params["_model"],
        "version": "hidden",
        "input": job.params["input"],
        "logs": "",
        "output": output,
        "data_removed": false,
        "error": error,
        "status": status,
        "created_at": "2025-01-20T15:29:00.000Z",
        "urls": {
            "get": format!("{}/v1/predictions/{}", s.base_url, job.id),
            "cancel": format!("{}/v1/predictions/{}/cancel", s.base_url, job.id),
        }
    })
}

fn replicate(
    s: &mut State,
    req: &HttpRequest,
    body: &[u8],
    authorized: bool,
    presented: &str,
) -> HttpResponse {
    let refused = || {
        problem(
            401,
            "Unauthenticated",
            &format!("You did not pass a valid authentication token ({presented})"),
        )
    };
    let path = req.path().to_owned();
    let method = req.method().as_str().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "models", owner, name, "predictions"]) => {
            let Ok(mut params) = serde_json::from_slice::<Value>(body) else {
                return problem(400, "Invalid JSON", "The body is not JSON");
            };
            let prompt = params["input"]["prompt"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let scenario = s.scenario(&prompt);
            if !authorized || scenario.refuse_credential {
                return refused();
            }
            if rate_limited(s, &prompt, &scenario) {
                return with_retry_after(problem(
                    429,
                    "Too Many Requests",
                    "Request was throttled. Expected available in 0 seconds.",
                ));
            }
            if !params["input"].is_object() || prompt.is_empty() {
                return problem(422, "Input validation failed", "input: prompt is required");
            }
            if let Some((_, detail)) = &scenario.refuse_submit {
                return problem(422, "Input validation failed", detail);
            }
            params["_model"] = json!(format!("{owner}/{name}"));
            let id = new_job(s, &prompt, params, scenario);
            let job = s.job(&id).cloned().expect("job just created");
            HttpResponse::Created().json(prediction(s, &job, "starting", Value::Null, Value::Null))
        }
        ("GET", ["v1", "predictions", id]) => {
            if !authorized {
                return refused();
            }
            let id = (*id).to_owned();
            let Some(job) = s.job(&id) else {
                return problem(
                    404,
                    "Not found",
                    "The requested resource could not be found.",
                );
            };
            let (status, output, error) = if job.cancelled {
                ("canceled", Value::Null, Value::Null)
            } else {
                match poll(job) {
                    Phase::Running(1) => ("starting", Value::Null, Value::Null),
                    Phase::Running(_) => ("processing", Value::Null, Value::Null),
                    Phase::Ended(Ending::Succeed) => (
                        "succeeded",
                        json!(format!("{}/files/{id}.mp4", s.base_url)),
                        Value::Null,
                    ),
                    Phase::Ended(Ending::Fail { message, .. }) => {
                        ("failed", Value::Null, json!(message))
                    }
                }
            };
            let job = s.job(&id).cloned().expect("job exists");
            HttpResponse::Ok().json(prediction(s, &job, status, output, error))
        }
        ("POST", ["v1", "predictions", id, "cancel"]) => {
            if !authorized {
                return refused();
            }
            let id = (*id).to_owned();
            let Some(job) = s.job(&id) else {
                return problem(
                    404,
                    "Not found",
                    "The requested resource could not be found.",
                );
            };
            job.cancelled = true;
            let job = job.clone();
            HttpResponse::Ok().json(prediction(s, &job, "canceled", Value::Null, Value::Null))
        }
        _ => problem(
            404,
            "Not found",
            "The requested resource could not be found.",
        ),
    }
}
