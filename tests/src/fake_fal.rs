//! A fake of fal's queue API on 127.0.0.1, as fal documents it: `POST /{model_id}` with
//! `Authorization: Key <key>` queues a request and answers `request_id`, `status_url`,
//! `response_url` and `cancel_url`; `GET .../requests/{id}/status` answers `IN_QUEUE`
//! (with `queue_position`), `IN_PROGRESS`, then `COMPLETED`; `GET .../requests/{id}` is
//! the model's output (`{"video": {"url": ...}}`, or the error of a failed run);
//! `PUT .../requests/{id}/cancel` cancels. The video itself is served without a
//! credential, like fal's CDN.
//!
//! Requests follow a [`Scenario`] chosen by prompt, as in [`crate::fakes`]: rate-limited
//! submits (HTTP 429), polls that find the request queued or running, a failure (the
//! result answers HTTP 422 with `detail`), a refused key, a refused submit (HTTP 422).

use std::{
    collections::BTreeMap,
    net::TcpListener,
    sync::{Arc, Mutex},
};

use actix_web::{dev::ServerHandle, web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

use crate::fakes::{fake_video, Ending, Recorded, Scenario};

/// One request the fake queued.
#[derive(Debug, Clone)]
pub struct FalJob {
    pub id: String,
    /// The endpoint id the request was queued for (`fal-ai/kling-video/...`).
    pub model: String,
    pub prompt: String,
    /// The JSON input as received.
    pub input: Value,
    pub polls: u32,
    pub downloads: u32,
    pub cancelled: bool,
    scenario: Scenario,
}

struct State {
    key: String,
    base_url: String,
    default: Scenario,
    rules: Vec<(String, Scenario)>,
    limited: BTreeMap<String, u32>,
    jobs: Vec<FalJob>,
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

    fn job(&mut self, id: &str) -> Option<&mut FalJob> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }
}

/// A running fake of fal's queue; stops when dropped.
pub struct FakeFal {
    port: u16,
    state: Arc<Mutex<State>>,
    handle: ServerHandle,
}

impl FakeFal {
    /// Starts a fake that accepts `Authorization: Key <key>`.
    pub fn start(key: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake fal");
        let port = listener.local_addr().expect("fake fal address").port();
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
        .expect("fake fal listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            port,
            state,
            handle,
        }
    }

    /// `CONDUIT__PROVIDERS__FAL__BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn on_prompt(&self, needle: &str, scenario: Scenario) {
        self.lock().rules.push((needle.to_owned(), scenario));
    }

    pub fn set_default(&self, scenario: Scenario) {
        self.lock().default = scenario;
    }

    pub fn jobs(&self) -> Vec<FalJob> {
        self.lock().jobs.clone()
    }

    pub fn job_for(&self, prompt: &str) -> Option<FalJob> {
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
        self.state.lock().expect("fake fal state")
    }
}

impl Drop for FakeFal {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(self.handle.stop(false));
        }
    }
}

fn error(status: u16, detail: Value) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({ "detail": detail }))
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
    let mut s = state.lock().expect("fake fal state");
    s.requests.push(Recorded {
        method: req.method().to_string(),
        path: req.path().to_owned(),
        query: req.query_string().to_owned(),
        authorization: header("authorization"),
        content_type: header("content-type"),
    });
    let path = req.path().trim_start_matches('/').to_owned();
    let method = req.method().as_str().to_owned();
    if method == "GET" {
        if let Some(file) = path.strip_prefix("files/") {
            let id = file.trim_end_matches(".mp4").to_owned();
            let Some(job) = s.job(&id) else {
                return HttpResponse::NotFound().finish();
            };
            job.downloads += 1;
            if job.downloads <= job.scenario.failed_downloads {
                return HttpResponse::InternalServerError().body("storage hiccup");
            }
            return HttpResponse::Ok()
                .content_type("video/mp4")
                .body(fake_video(&id));
        }
    }
    let presented = header("authorization").unwrap_or_default();
    if presented != format!("Key {}", s.key) {
        return error(
            401,
            json!(format!(
                "Invalid API key: {}",
                presented.trim_start_matches("Key ")
            )),
        );
    }
    // `{model_id}/requests/{id}[/status|/cancel]`, or a submit to `{model_id}`.
    if let Some((model, rest)) = path.split_once("/requests/") {
        let (id, action) = match rest.split_once('/') {
            Some((id, action)) => (id.to_owned(), action.to_owned()),
            None => (rest.to_owned(), String::new()),
        };
        let base = s.base_url.clone();
        let Some(job) = s.job(&id) else {
            return error(404, json!(format!("Request {id} not found")));
        };
        if job.model != model {
            return error(404, json!(format!("Request {id} not found for {model}")));
        }
        let urls = |id: &str| {
            (
                format!("{base}/{model}/requests/{id}"),
                format!("{base}/{model}/requests/{id}/status"),
                format!("{base}/{model}/requests/{id}/cancel"),
            )
        };
        let (response_url, status_url, cancel_url) = urls(&id);
        return match (method.as_str(), action.as_str()) {
            ("GET", "status") => {
                job.polls += 1;
                let running = job.scenario.running_polls;
                let body = if job.cancelled {
                    json!({"status": "COMPLETED", "response_url": response_url, "status_url": status_url, "cancel_url": cancel_url})
                } else if job.polls == 1 {
                    json!({"status": "IN_QUEUE", "queue_position": 3, "response_url": response_url, "status_url": status_url, "cancel_url": cancel_url})
                } else if job.polls <= running.saturating_add(1) {
                    json!({"status": "IN_PROGRESS", "logs": null, "response_url": response_url, "status_url": status_url, "cancel_url": cancel_url})
                } else {
                    json!({"status": "COMPLETED", "logs": null, "metrics": {"inference_time": 41.2}, "response_url": response_url, "status_url": status_url, "cancel_url": cancel_url})
                };
                HttpResponse::Ok().json(body)
            }
            ("PUT", "cancel") => {
                job.cancelled = true;
                HttpResponse::Accepted().json(json!({"status": "CANCELLATION_REQUESTED"}))
            }
            ("GET", "") => {
                if job.polls <= job.scenario.running_polls.saturating_add(1) {
                    return error(400, json!("Request is still in progress"));
                }
                if job.cancelled {
                    return error(400, json!("Request was cancelled"));
                }
                match job.scenario.ending.clone() {
                    Ending::Succeed => HttpResponse::Ok().json(json!({
                        "video": {
                            "url": format!("{base}/files/{id}.mp4"),
                            "content_type": "video/mp4",
                            "file_name": "output.mp4",
                            "file_size": fake_video(&id).len(),
                        }
                    })),
                    Ending::Fail { code, message } => error(
                        422,
                        json!([{"loc": ["body", "prompt"], "msg": message, "type": code}]),
                    ),
                }
            }
            _ => error(405, json!("Method not allowed")),
        };
    }
    if method != "POST" {
        return error(405, json!("Method not allowed"));
    }
    let Ok(input) = serde_json::from_slice::<Value>(&body) else {
        return error(422, json!("The body is not JSON"));
    };
    let prompt = input["prompt"].as_str().unwrap_or_default().to_owned();
    let scenario = s.scenario(&prompt);
    if scenario.refuse_credential {
        return error(401, json!(format!("Invalid API key: {}", s.key)));
    }
    let left = s
        .limited
        .entry(prompt.clone())
        .or_insert(scenario.rate_limited_submits);
    if *left > 0 {
        *left -= 1;
        let mut response = error(429, json!("Rate limit exceeded"));
        response.headers_mut().insert(
            actix_web::http::header::RETRY_AFTER,
            actix_web::http::header::HeaderValue::from_static("0"),
        );
        return response;
    }
    if prompt.is_empty() {
        return error(
            422,
            json!([{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]),
        );
    }
    if let Some((code, message)) = &scenario.refuse_submit {
        return error(
            422,
            json!([{"loc": ["body", "prompt"], "msg": message, "type": code}]),
        );
    }
    let id = format!("{:08x}-660e-45cd-bd63-580e4f2a94cc", s.next_id);
    s.next_id += 1;
    let base = s.base_url.clone();
    s.jobs.push(FalJob {
        id: id.clone(),
        model: path.clone(),
        prompt,
        input,
        polls: 0,
        downloads: 0,
        cancelled: false,
        scenario,
    });
    HttpResponse::Ok().json(json!({
        "request_id": id,
        "response_url": format!("{base}/{path}/requests/{id}"),
        "status_url": format!("{base}/{path}/requests/{id}/status"),
        "cancel_url": format!("{base}/{path}/requests/{id}/cancel"),
        "queue_position": 0
    }))
}
