//! One test per validation rule of the submit body: each asserts the status, `code`,
//! `param`, and that no task (and no job) was recorded.

use serde_json::{json, Value};

use crate::helpers::{body, TestApp};

fn with(field: &str, value: Value) -> Value {
    let mut b = body();
    b[field] = value;
    b
}

fn without(field: &str) -> Value {
    let mut b = body();
    b.as_object_mut().unwrap().remove(field);
    b
}

/// Submits every body and checks each is refused with `code` on `param`.
async fn assert_refused(app: &TestApp, bodies: Vec<Value>, code: &str, param: &str) {
    for b in bodies {
        let (status, json) = app.submit(&b).await;
        assert_eq!(status, 400, "{b} answered {status}: {json}");
        assert_eq!(json["error"]["code"], code, "{b}: {json}");
        assert_eq!(json["error"]["param"], param, "{b}: {json}");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert!(json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        app.count("SELECT count(*) FROM tasks").await,
        0,
        "no task may be created"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM outbox").await,
        0,
        "no job may be queued"
    );
}

macro_rules! rule {
    ($name:ident, $code:expr, $param:expr, [$($body:expr),+ $(,)?]) => {
        rule!($name, |_s| {}, $code, $param, [$($body),+]);
    };
    ($name:ident, $configure:expr, $code:expr, $param:expr, [$($body:expr),+ $(,)?]) => {
        #[tokio::test]
        async fn $name() {
            let app = TestApp::spawn_with($configure).await;
            assert_refused(&app, vec![$($body),+], $code, $param).await;
            app.stop().await;
        }
    };
}

rule!(
    model_is_required,
    "missing_parameter",
    "model",
    [without("model"), with("model", Value::Null)]
);
rule!(
    prompt_is_required,
    "missing_parameter",
    "prompt",
    [without("prompt")]
);
rule!(
    unknown_fields_are_refused_by_name,
    "unknown_parameter",
    "webhookurl",
    [with("webhookurl", json!("https://example.com/hook"))]
);
rule!(
    model_must_be_configured,
    "unsupported_model",
    "model",
    [with("model", json!("no-such-model"))]
);
rule!(
    model_must_be_a_string,
    "invalid_value",
    "model",
    [with("model", json!(42))]
);
rule!(
    prompt_must_be_1_to_4000_characters,
    "invalid_value",
    "prompt",
    [
        with("prompt", json!("")),
        with("prompt", json!("   ")),
        with("prompt", json!("x".repeat(4001))),
        with("prompt", json!("nul \u{0} inside")),
        with("prompt", json!(["a"])),
    ]
);
rule!(
    duration_must_be_an_integer_from_1_to_60,
    "invalid_value",
    "duration",
    [
        with("duration", json!("6")),
        with("duration", json!(6.5)),
        with("duration", json!(0)),
        with("duration", json!(61)),
        with("duration", json!(-1)),
    ]
);
rule!(
    duration_respects_the_model_maximum,
    |s: &mut conduit_core::Settings| s.providers.minimax.api_key =
        Some(conduit_core::Secret::new("k")),
    "invalid_value",
    "duration",
    [json!({"model": "minimax-video", "prompt": "p", "duration": 11})]
);
rule!(
    size_must_be_even_width_by_height_in_range,
    "invalid_value",
    "size",
    [
        with("size", json!("1280by720")),
        with("size", json!("1281x720")),
        with("size", json!("62x64")),
        with("size", json!("3842x720")),
        with("size", json!("x720")),
        with("size", json!(1280)),
    ]
);
rule!(
    fps_must_be_an_integer_from_1_to_60,
    "invalid_value",
    "fps",
    [
        with("fps", json!(0)),
        with("fps", json!(61)),
        with("fps", json!("24")),
        with("fps", json!(23.976)),
    ]
);
rule!(
    seed_must_be_an_integer,
    "invalid_value",
    "seed",
    [
        with("seed", json!("7")),
        with("seed", json!(1.5)),
        with("seed", json!(18446744073709551615u64)),
    ]
);
rule!(
    webhook_url_must_be_an_absolute_http_url,
    "invalid_value",
    "webhook_url",
    [
        with("webhook_url", json!("not a url")),
        with("webhook_url", json!("/relative/hook")),
        with("webhook_url", json!("ftp://example.com/hook")),
        with("webhook_url", json!(7)),
    ]
);
rule!(
    webhook_url_may_not_carry_user_info,
    "invalid_value",
    "webhook_url",
    [
        with("webhook_url", json!("https://user:secret@example.com/hook")),
        with("webhook_url", json!("https://user@example.com/hook")),
    ]
);
rule!(
    webhook_url_is_at_most_2048_characters,
    "invalid_value",
    "webhook_url",
    [with(
        "webhook_url",
        json!(format!("https://example.com/{}", "a".repeat(2040)))
    )]
);
rule!(
    webhook_url_may_not_target_internal_addresses,
    |s: &mut conduit_core::Settings| s.webhooks.allow_private_targets = false,
    "invalid_value",
    "webhook_url",
    [
        with("webhook_url", json!("http://127.0.0.1:9/hook")),
        with("webhook_url", json!("http://127.1.2.3/hook")),
        with("webhook_url", json!("http://[::1]:9/hook")),
        with("webhook_url", json!("http://[::ffff:127.0.0.1]/hook")),
        with("webhook_url", json!("http://2130706433/hook")),
        with("webhook_url", json!("http://0.0.0.0/hook")),
        with("webhook_url", json!("http://localhost:9/hook")),
    ]
);
rule!(
    webhook_headers_must_map_tokens_to_clean_strings,
    "invalid_value",
    "webhook_headers",
    [
        with("webhook_headers", json!(["Authorization"])),
        with("webhook_headers", json!({"X-Num": 1})),
        with("webhook_headers", json!({"Bad Name": "v"})),
        with("webhook_headers", json!({"X-A": "a\r\nInjected: 1"})),
        with("webhook_headers", json!({"X-A": "a\u{0}b"})),
    ]
);
rule!(
    webhook_headers_may_not_set_reserved_names,
    "invalid_value",
    "webhook_headers",
    [
        with("webhook_headers", json!({"Host": "x"})),
        with("webhook_headers", json!({"content-length": "1"})),
        with("webhook_headers", json!({"Content-Type": "text/plain"})),
        with("webhook_headers", json!({"Transfer-Encoding": "chunked"})),
        with("webhook_headers", json!({"Connection": "close"})),
        with("webhook_headers", json!({"User-Agent": "x"})),
        with("webhook_headers", json!({"webhook-signature": "v1,x"})),
    ]
);
rule!(
    webhook_headers_are_bounded,
    "invalid_value",
    "webhook_headers",
    [
        with(
            "webhook_headers",
            Value::Object((0..21).map(|i| (format!("X-H{i}"), json!("v"))).collect())
        ),
        with("webhook_headers", json!({"X-Big": "v".repeat(8 * 1024)})),
    ]
);
rule!(
    webhook_events_must_be_a_subset_of_the_four,
    "invalid_value",
    "webhook_events",
    [
        with("webhook_events", json!(["completed", "finished"])),
        with("webhook_events", json!("completed")),
        with("webhook_events", json!([1])),
    ]
);

#[tokio::test]
async fn unconfigured_provider_names_the_missing_setting() {
    let app = TestApp::spawn().await;
    let (status, json) = app.submit(&with("model", json!("minimax-video"))).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["error"]["code"], "unsupported_model");
    assert_eq!(json["error"]["param"], "model");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("CONDUIT__PROVIDERS__MINIMAX__API_KEY"),
        "{message}"
    );
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn body_must_be_valid_json_object() {
    let app = TestApp::spawn().await;
    for raw in ["{\"model\":", "", "not json"] {
        let r = app
            .http
            .post(app.url("/v1/videos/generations/async"))
            .bearer_auth(&app.key)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{raw:?}");
        let json: Value = r.json().await.unwrap();
        assert_eq!(json["error"]["code"], "invalid_json", "{raw:?}: {json}");
    }
    let (status, json) = app.submit(&json!(["model"])).await;
    assert_eq!(status, 400);
    assert_eq!(json["error"]["code"], "invalid_value");
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn body_over_64_kib_is_refused() {
    let app = TestApp::spawn().await;
    let big = json!({"model": "local-video", "prompt": "p", "seed": 1, "webhook_headers": {"X-Pad": "a".repeat(70 * 1024)}});
    let (status, json) = app.submit(&big).await;
    assert_eq!(status, 413, "{json}");
    assert_eq!(json["error"]["code"], "payload_too_large");
    // Without a Content-Length (chunked), the limit holds too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(big.to_string().into_bytes())];
    let r = app
        .http
        .post(app.url("/v1/videos/generations/async"))
        .bearer_auth(&app.key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let json: Value = r.json().await.unwrap();
    assert_eq!(json["error"]["code"], "payload_too_large");
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn body_must_be_sent_as_json() {
    let app = TestApp::spawn().await;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = app
            .http
            .post(app.url("/v1/videos/generations/async"))
            .bearer_auth(&app.key)
            .body(body().to_string());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 415, "{content_type:?}");
        let json: Value = r.json().await.unwrap();
        assert_eq!(json["error"]["code"], "unsupported_media_type");
    }
    assert_eq!(app.count("SELECT count(*) FROM tasks").await, 0);
    app.stop().await;
}
