//! The API against its own OpenAPI document: a short schemathesis pass (`--checks all`)
//! over every operation of a running API finds no failure. scripts/test installs
//! schemathesis from PyPI. Also: the reference page and the `Allow` header of a 405.

use std::process::Command;

use conduit_testkit::{Stack, StackOptions};

/// An API alone: no generator renders the tasks the fuzzer submits and no sender
/// delivers their webhooks anywhere (the jobs wait in the stack's own queues).
async fn api_only() -> Stack {
    Stack::start_with(StackOptions {
        generators: 0,
        senders: 0,
        ..StackOptions::default()
    })
    .await
}

#[tokio::test]
async fn schemathesis_finds_nothing() {
    let stack = api_only().await;
    let dir = std::env::temp_dir().join(format!("conduit-schemathesis-{}", stack.namespace));
    std::fs::create_dir_all(&dir).expect("schemathesis folder");
    let out = Command::new("schemathesis")
        .current_dir(&dir)
        .args([
            "run",
            &stack.api_url("/openapi.json"),
            "--checks",
            "all",
            // Two known gaps left open (see the note in docs/api.md): a well-formed
            // `after` that is not one of the caller's tasks is a 400, and a
            // `webhook_url` the schema allows (any string) can be refused as not an
            // absolute http(s) URL.
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "8",
            "--seed",
            "1",
            "--no-color",
            "-H",
            &format!("Authorization: Bearer {}", stack.key),
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("schemathesis runs (scripts/test installs it from PyPI)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    stack.stop().await;
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
}

#[tokio::test]
async fn every_route_answers_unsupported_methods_with_405_and_allow() {
    let stack = api_only().await;
    let id = "00000000-0000-4000-8000-000000000000";
    let cases: &[(&str, &str, &str)] = &[
        ("TRACE", "/healthz", "GET, HEAD"),
        ("POST", "/readyz", "GET, HEAD"),
        ("DELETE", "/metrics", "GET, HEAD"),
        ("PUT", "/openapi.json", "GET"),
        ("POST", "/docs", "GET"),
        ("POST", "/console", "GET"),
        ("DELETE", "/console/console.js", "GET"),
        ("GET", "/v1/videos/generations/async", "POST"),
        ("TRACE", "/v1/videos/generations/tasks", "GET"),
        (
            "PATCH",
            &format!("/v1/videos/generations/tasks/{id}"),
            "GET",
        ),
        ("GET", &format!("/v1/videos/generations/{id}"), "DELETE"),
        ("PUT", "/v1/models", "GET"),
    ];
    for (method, path, allow) in cases {
        let r = stack
            .http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                stack.api_url(path),
            )
            .bearer_auth(&stack.key)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        assert_eq!(
            r.headers().get("allow").and_then(|v| v.to_str().ok()),
            Some(*allow),
            "Allow of {method} {path}"
        );
        let body: serde_json::Value = r.json().await.expect("JSON error body");
        assert_eq!(
            body["error"]["code"], "method_not_allowed",
            "{method} {path}"
        );
    }
    let page = stack
        .http
        .get(stack.api_url("/docs"))
        .send()
        .await
        .expect("docs page");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html")));
    assert!(page.text().await.expect("page").contains("openapi.json"));
    stack.stop().await;
}
