//! Observability of a running stack: one trace per task across the three services,
//! exported over OTLP/HTTP to a receiver in the test, and every metric
//! docs/operations.md lists served on `/metrics` (and nothing undocumented).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use actix_web::{web, App, HttpResponse, HttpServer};
use conduit_testkit::{eventually, ReceivedWebhook, Receiver, Stack, StackOptions};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value,
};
use prost::Message;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct SpanRecord {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// An OTLP/HTTP (protobuf) trace receiver on a free loopback port.
struct Collector {
    port: u16,
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    server: actix_web::dev::ServerHandle,
}

impl Collector {
    fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let shared = web::Data::new(spans.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind collector");
        let port = listener.local_addr().expect("collector address").port();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::default().limit(16 << 20))
                .route("/v1/traces", web::post().to(export))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("collector listens")
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            port,
            spans,
            server: handle,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn trace(&self, trace_id: &str) -> Vec<SpanRecord> {
        self.spans
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

async fn export(spans: web::Data<Arc<Mutex<Vec<SpanRecord>>>>, body: web::Bytes) -> HttpResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body.as_ref()) else {
        return HttpResponse::BadRequest().finish();
    };
    let mut out = spans.lock().expect("collector lock");
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(SpanRecord {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_terminal(hook: &ReceivedWebhook, task_id: &str) -> bool {
    let b = hook.json();
    b["task_id"] == task_id && b["webhook_type"] == "video_generation_completed"
}

#[tokio::test]
async fn one_task_is_one_trace_across_the_three_services() {
    let collector = Collector::start();
    let receiver = Receiver::start().await;
    let stack = Stack::start_with(StackOptions {
        env: vec![
            (
                "CONDUIT__TELEMETRY__OTLP_ENDPOINT".into(),
                collector.endpoint(),
            ),
            // Export within a fraction of a second rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            // The sender logs a delivery at debug level.
            (
                "RUST_LOG".into(),
                "info,conduit_webhook_sender=debug".into(),
            ),
        ],
        ..StackOptions::default()
    })
    .await;

    let trace_id = format!("{:032x}", rand_u128());
    let caller_span = format!("{:016x}", rand_u128() as u64 | 1);
    let response = stack
        .http
        .post(stack.api_url("/v1/videos/generations/async"))
        .bearer_auth(&stack.key)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({
            "model": "local-video",
            "prompt": "a traced lighthouse",
            "duration": 1,
            "size": "160x90",
            "fps": 8,
            "webhook_url": receiver.url("/hook"),
        }))
        .send()
        .await
        .expect("submit");
    assert_eq!(response.status().as_u16(), 202);
    let body: Value = response.json().await.expect("submit body");
    let task_id = body["task_id"].as_str().expect("task_id").to_owned();

    eventually("the completed webhook", LONG, || async {
        receiver
            .received()
            .iter()
            .any(|h| is_terminal(h, &task_id))
            .then_some(())
    })
    .await;

    // Spans arrive in batches; wait for a closed trace: spans of all three services,
    // the render, a webhook attempt and the ledger recording its outcome, and every
    // parent present.
    let spans = eventually("a complete trace", LONG, || async {
        let spans = collector.trace(&trace_id);
        let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let linked = spans
            .iter()
            .all(|s| s.parent_span_id == caller_span || ids.contains(s.parent_span_id.as_str()));
        let complete = ["conduit-api", "conduit-generator", "conduit-webhook-sender"]
            .iter()
            .all(|s| services.contains(s))
            && ["render", "webhook POST"].iter().all(|n| names.contains(n))
            && names
                .iter()
                .any(|n| n.ends_with(".webhook-outcomes process"));
        (complete && linked).then_some(spans)
    })
    .await;

    // The request's own span continues the caller's traceparent.
    let roots: Vec<&SpanRecord> = spans
        .iter()
        .filter(|s| s.parent_span_id == caller_span)
        .collect();
    assert_eq!(roots.len(), 1, "one span continues the caller: {spans:#?}");
    assert_eq!(roots[0].service, "conduit-api");
    assert!(roots[0].name.starts_with("POST "), "{:?}", roots[0]);

    // Parent chain of the webhook attempt: sender ← API relay ← API ledger ← generator
    // ← API relay ← submit request.
    let by_id: HashMap<&str, &SpanRecord> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let attempt = spans
        .iter()
        .find(|s| s.name == "webhook POST")
        .expect("webhook attempt span");
    let mut chain = vec![attempt.service.clone()];
    let mut at = attempt;
    while let Some(parent) = by_id.get(at.parent_span_id.as_str()) {
        if chain.last() != Some(&parent.service) {
            chain.push(parent.service.clone());
        }
        at = parent;
    }
    assert_eq!(
        chain,
        [
            "conduit-webhook-sender",
            "conduit-api",
            "conduit-generator",
            "conduit-api"
        ],
        "service chain from the webhook attempt up to the submit: {spans:#?}"
    );
    assert_eq!(at.parent_span_id, caller_span);

    // Logs carry the trace id.
    assert!(
        stack.api.logs().contains(&trace_id),
        "the API's log lines carry the trace id"
    );
    assert!(stack.generators[0].logs().contains(&trace_id));
    assert!(stack.senders[0].logs().contains(&trace_id));

    stack.stop().await;
    collector.server.stop(false).await;
}

fn rand_u128() -> u128 {
    let a = uuid::Uuid::new_v4().as_u128();
    a.max(1)
}

/// `service → metric names` of the table in docs/operations.md ("The metric names").
fn documented_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .expect("read docs/operations.md");
    let mut table: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[2].starts_with('`') {
            continue;
        }
        let service = cells[1];
        if !["API", "generator", "sender", "all"].contains(&service) {
            continue;
        }
        let name = cells[2].trim_matches('`');
        if !(name.starts_with("conduit_") || name.starts_with("process_")) {
            continue;
        }
        let services: &[&str] = if service == "all" {
            &["API", "generator", "sender"]
        } else {
            std::slice::from_ref(&service)
        };
        for s in services {
            table
                .entry((*s).to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }
    table
}

/// The metric families a `/metrics` page declares (`# TYPE name kind`).
fn served(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_documented_metric_is_served_and_every_served_one_documented() {
    let documented = documented_metrics();
    assert!(
        documented.get("API").is_some_and(|m| m.len() >= 10),
        "the metric table of docs/operations.md was not found: {documented:?}"
    );
    let receiver = Receiver::start().await;
    // A provider account, never called, so the provider-error series exist.
    let stack = Stack::start_with(StackOptions {
        env: vec![
            (
                "CONDUIT__PROVIDERS__MINIMAX__API_KEY".into(),
                "unused".into(),
            ),
            (
                "CONDUIT__PROVIDERS__MINIMAX__BASE_URL".into(),
                "http://127.0.0.1:9".into(),
            ),
        ],
        ..StackOptions::default()
    })
    .await;
    // One task through everything, so every labelled series has a child.
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "metrics",
            "duration": 1,
            "size": "160x90",
            "fps": 8,
            "webhook_url": receiver.url("/hook"),
        }))
        .await;
    eventually("the completed webhook", LONG, || async {
        receiver
            .received()
            .iter()
            .any(|h| is_terminal(h, &task_id))
            .then_some(())
    })
    .await;
    let services = [
        ("API", stack.api.url("/metrics")),
        ("generator", stack.generators[0].url("/metrics")),
        ("sender", stack.senders[0].url("/metrics")),
    ];
    for (service, url) in services {
        let want = documented.get(service).cloned().unwrap_or_default();
        // The webhook outcome reaches the API's ledger a moment after the webhook.
        let (text, missing) = eventually(&format!("{service} metrics"), LONG, || {
            let url = url.clone();
            let want = want.clone();
            let http = stack.http.clone();
            async move {
                let text = http.get(&url).send().await.ok()?.text().await.ok()?;
                let got = served(&text);
                let missing: Vec<String> = want.difference(&got).cloned().collect();
                if missing.is_empty() {
                    Some((text, missing))
                } else {
                    None
                }
            }
        })
        .await;
        assert!(missing.is_empty());
        let got = served(&text);
        let undocumented: Vec<&String> = got
            .iter()
            .filter(|n| n.starts_with("conduit_") || n.starts_with("process_"))
            .filter(|n| !want.contains(*n))
            .collect();
        assert!(
            undocumented.is_empty(),
            "{service} serves metrics docs/operations.md does not list: {undocumented:?}"
        );
    }
    stack.stop().await;
}
