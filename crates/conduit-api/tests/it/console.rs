//! `/console`: the page and its two files, embedded in the binary, served without a key
//! and with a Content-Security-Policy that keeps the page to this API.

use crate::helpers::TestApp;

#[tokio::test]
async fn console_files_are_served_with_security_headers() {
    let app = TestApp::spawn().await;
    let host = format!("127.0.0.1:{}", app.port());
    for (path, kind, marker) in [
        ("/console", "text/html", "<title>Conduit console</title>"),
        ("/console/console.css", "text/css", "--accent"),
        ("/console/console.js", "text/javascript", "conduit.key."),
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        let policy = header("content-security-policy");
        assert!(policy.contains("default-src 'none'"), "{path}: {policy}");
        assert!(policy.contains("script-src 'self';"), "{path}: {policy}");
        assert!(
            policy.contains(&format!("connect-src 'self' ws://{host} wss://{host};")),
            "{path}: {policy}"
        );
        assert!(r.text().await.unwrap().contains(marker), "{path}");
    }
    // The console is a client like any other: the API still wants a key.
    let r = app
        .http
        .get(app.url("/v1/videos/generations/tasks"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app.http.post(app.url("/console")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");
    app.stop().await;
}
