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

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::fakes::{fake_video, Ending, FakeJobRecord, FakeServer, Scenario, Shared};

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

impl FakeJobRecord for FalJob {
    fn id(&self) -> &str {
        &self.id
    }

    fn prompt(&self) -> &str {
        &self.prompt
    }
}

/// A fake of fal's queue.
pub type FakeFal = FakeServer<FalJob>;

impl FakeServer<FalJob> {
    /// Starts a fake that accepts `Authorization: Key <key>`.
    pub fn start(key: &str) -> Self {
        Self::serve((), key, 32 << 20, handle)
    }
}

fn error(status: u16, detail: Value) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({ "detail": detail }))
}

async fn handle(req: HttpRequest, body: web::Bytes, state: Shared<FalJob>) -> HttpResponse {
    let mut s = state.lock().expect("fake fal state");
    let presented = s.record(&req, "authorization");
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
