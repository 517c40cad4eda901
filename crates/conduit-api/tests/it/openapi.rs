//! `GET /openapi.json`: OpenAPI 3.1, and every route the server answers is described.

use serde_json::Value;

use crate::helpers::TestApp;

const ROUTES: [(&str, &str); 18] = [
    ("get", "/v1/videos/generations/tasks/{task_id}/events"),
    ("get", "/v1/stream"),
    ("post", "/v1/videos/generations/async"),
    ("get", "/v1/videos/generations/tasks"),
    ("get", "/v1/videos/generations/tasks/{task_id}"),
    ("delete", "/v1/videos/generations/{task_id}"),
    ("post", "/v1/videos/generations/tasks/{task_id}/retry"),
    ("get", "/v1/videos/generations/tasks/{task_id}/webhooks"),
    (
        "post",
        "/v1/videos/generations/tasks/{task_id}/webhooks/redeliver",
    ),
    ("get", "/v1/webhooks/secret"),
    ("post", "/v1/webhooks/secret/rotate"),
    ("get", "/v1/models"),
    ("get", "/v1/videos/files/{task_id}"),
    ("get", "/openapi.json"),
    ("get", "/docs"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

#[tokio::test]
async fn openapi_is_3_1_and_covers_every_route() {
    let app = TestApp::spawn().await;
    let r = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = r.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let paths = doc["paths"].as_object().unwrap();
    for (method, path) in ROUTES {
        let op = &paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not described"))[method];
        assert!(op.is_object(), "{method} {path} is not described");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{method} {path} has no responses"
        );
        // Path parameters are declared.
        if path.contains("{task_id}") {
            let params = op["parameters"].as_array().unwrap();
            assert!(
                params
                    .iter()
                    .any(|p| p["name"] == "task_id" && p["in"] == "path"),
                "{method} {path}"
            );
        }
    }
    let described: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        described,
        ROUTES.len(),
        "every described operation is a real route"
    );
    // Every schema reference resolves.
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert!(schemes.contains_key("bearer") && schemes.contains_key("api_key"));
    // The routes described really exist: none answers 404 for an unknown route.
    for (method, path) in ROUTES {
        let concrete = path.replace("{task_id}", &uuid::Uuid::now_v7().to_string());
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (status, json) = app.request(m, &concrete, Some(&app.key)).await;
        assert!(
            status != 405
                && !(status == 404
                    && json["error"]["message"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("No route")),
            "{method} {path} is not served: {status} {json}"
        );
    }
    app.stop().await;
}
