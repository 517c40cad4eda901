//! The browser console (`/console`) driven in headless Chromium through chromedriver, as
//! a user would: paste a key, submit a `local-video` task, watch its progress bar move to
//! 100 from the WebSocket stream, play the video, open the delivery log and redeliver.
//! It also saves the screenshots that docs/console.md shows.
//!
//! scripts/test installs Debian's `chromium` and `chromium-driver`; without them the
//! test tries to install them and skips, saying so, only when that fails.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use conduit_testkit::{eventually, stack::free_port, Receiver, Stack};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);

/// chromedriver as a child process, ended when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver and a Chromium to drive, installed from Debian's packages when missing.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let found = || {
        let driver = in_path("chromedriver")?;
        let chromium = in_path("chromium").or_else(|| in_path("chromium-browser"))?;
        Some((driver, chromium))
    };
    if let Some(found) = found() {
        return Some(found);
    }
    eprintln!("console test: chromedriver or chromium missing; installing Debian's chromium and chromium-driver");
    let installed = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver",
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("console test: could not install chromium and chromium-driver");
    }
    found()
}

async fn start_driver(path: &Path) -> Driver {
    let port = free_port().expect("a free port");
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver { child, port };
    let http = reqwest::Client::new();
    let status = format!("http://127.0.0.1:{port}/status");
    eventually("chromedriver to be ready", Duration::from_secs(30), || {
        let request = http.get(&status).send();
        async move {
            let body: Value = request.await.ok()?.json().await.ok()?;
            body["value"]["ready"].as_bool().filter(|r| *r)
        }
    })
    .await;
    driver
}

async fn open_browser(driver: &Driver, chromium: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium.to_string_lossy(),
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--autoplay-policy=no-user-gesture-required",
                "--lang=en-US",
            ],
        }),
    );
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .expect("native roots")
        .https_or_http()
        .enable_http1()
        .build();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session in headless Chromium")
}

async fn js(client: &Client, script: &str) -> Value {
    client
        .execute(script, Vec::new())
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Waits until `script` (an expression) returns something truthy, and returns it.
async fn until(client: &Client, what: &str, script: &str) -> Value {
    let body = format!("return ({script});");
    eventually(what, LONG, || async {
        let v = js(client, &body).await;
        let truthy = !(v.is_null() || v == json!(false) || v == json!(0) || v == json!(""));
        truthy.then_some(v)
    })
    .await
}

async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn type_into(client: &Client, css: &str, text: &str) {
    let field = client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    field
        .clear()
        .await
        .unwrap_or_else(|e| panic!("clear {css}: {e}"));
    field
        .send_keys(text)
        .await
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
}

async fn screenshot(client: &Client, name: &str, width: u32, height: u32) {
    client
        .set_window_size(width, height)
        .await
        .expect("window size");
    js(
        client,
        "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); return true;",
    )
    .await;
    // Let the layout settle and the progress bars finish their transition.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let png = client.screenshot().await.expect("screenshot");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console");
    std::fs::create_dir_all(&dir).expect("docs/console");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}

#[tokio::test]
async fn console_follows_a_task_plays_its_video_and_redelivers_its_webhook() {
    let Some((driver_path, chromium)) = browser() else {
        eprintln!(
            "SKIPPED console test: chromedriver is not installed and could not be installed \
             (Debian packages chromium and chromium-driver; scripts/test installs them)"
        );
        return;
    };
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;

    // Earlier tasks, so the list has more than one status to show.
    let done = stack
        .submit_ok(
            &json!({"model": "local-video", "prompt": "Harbour at dawn, gulls over still water",
                           "duration": 1, "size": "320x180", "fps": 12}),
        )
        .await;
    stack
        .wait_status(&done, "completed", Duration::from_secs(60))
        .await;
    let stopped = stack
        .submit_ok(
            &json!({"model": "local-video", "prompt": "A night train crossing a snowy valley",
                           "duration": 30, "size": "1280x720"}),
        )
        .await;
    let r = stack
        .http
        .delete(stack.api_url(&format!("/v1/videos/generations/{stopped}")))
        .bearer_auth(&stack.key)
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status().as_u16(), 204);

    let driver = start_driver(&driver_path).await;
    let client = open_browser(&driver, &chromium).await;
    client
        .goto(&stack.api_url("/console"))
        .await
        .expect("open the console");

    // Paste the key.
    type_into(&client, "#key-input", &stack.key).await;
    click(&client, "#key-submit").await;
    until(
        &client,
        "the task list",
        &format!("document.getElementById('task-row-{done}')"),
    )
    .await;
    until(
        &client,
        "the live stream",
        "document.getElementById('live').dataset.live === 'true'",
    )
    .await;
    let stored = js(
        &client,
        "return [sessionStorage.getItem('conduit.console.key'), location.href];",
    )
    .await;
    assert_eq!(stored[0], json!(stack.key), "the key is in session storage");
    assert!(
        !stored[1].as_str().unwrap_or_default().contains(&stack.key),
        "the key never goes into the URL"
    );

    // The submit form, filled in.
    click(&client, "a[data-route='new']").await;
    until(
        &client,
        "the models",
        "document.getElementById('f-model').value === 'local-video' && document.getElementById('model-limits').textContent",
    )
    .await;
    type_into(
        &client,
        "#f-prompt",
        "A lighthouse on a cliff at sunset, waves rolling in",
    )
    .await;
    // Long enough to render for several seconds, so the bar takes several steps (progress
    // events come at most once a second).
    type_into(&client, "#f-duration", "30").await;
    type_into(&client, "#f-size", "1280x720").await;
    type_into(&client, "#f-fps", "24").await;
    type_into(&client, "#f-webhook", &receiver.url("/hooks/console")).await;
    screenshot(&client, "submit.png", 1280, 1100).await;
    client
        .set_window_size(1280, 900)
        .await
        .expect("window size");

    // Every value the task page's progress bar takes, and what fed it.
    js(
        &client,
        "window.seen = [];
         new MutationObserver((changes) => {
           for (const c of changes) {
             if (c.target.id === 'task-progress') {
               window.seen.push([Number(c.target.getAttribute('aria-valuenow')), c.target.dataset.source]);
             }
           }
         }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['aria-valuenow'] });
         return true;",
    )
    .await;
    click(&client, "#submit-task").await;
    let task_id = until(
        &client,
        "the task page",
        "location.hash.startsWith('#/tasks/') && location.hash.slice(8)",
    )
    .await;
    let task_id = task_id.as_str().expect("task id").to_owned();

    // The bar moves and reaches 100 from the stream.
    until(
        &client,
        "progress 100 from the stream",
        "window.seen.some(([v, s]) => v === 100 && s === 'stream')",
    )
    .await;
    let seen = js(&client, "return window.seen;").await;
    let seen: Vec<(i64, String)> = seen
        .as_array()
        .expect("seen")
        .iter()
        .map(|p| {
            (
                p[0].as_i64().unwrap_or(-1),
                p[1].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    eprintln!("progress bar values and their source: {seen:?}");
    let streamed: Vec<i64> = seen
        .iter()
        .filter(|(_, s)| s == "stream")
        .map(|(v, _)| *v)
        .collect();
    assert!(
        streamed.iter().any(|v| (1..100).contains(v)),
        "the bar moved through values between 0 and 100 from the stream: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "the bar never went back: {seen:?}"
    );
    assert_eq!(
        js(
            &client,
            "return document.getElementById('task-status').textContent;"
        )
        .await,
        json!("completed")
    );

    // The video plays.
    until(
        &client,
        "the video element",
        "document.getElementById('task-video')",
    )
    .await;
    let played = client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const v = document.getElementById('task-video');
             v.muted = true;
             v.play().then(() => done('playing'), (e) => done(`${e.name}: ${e.message}`));",
            Vec::new(),
        )
        .await
        .expect("play()");
    assert_eq!(played, json!("playing"), "the video plays");
    let position = until(
        &client,
        "the video's currentTime to advance",
        "(() => { const v = document.getElementById('task-video'); return !v.error && v.currentTime > 0.5 && v.currentTime; })()",
    )
    .await;
    assert!(position.as_f64().unwrap_or(0.0) > 0.5);

    // The delivery log: the completed webhook, delivered once.
    let completed =
        "document.querySelectorAll(\"article.delivery[data-event='completed'] tr.attempt\").length";
    until(&client, "the completed webhook's first attempt", completed).await;
    until(
        &client,
        "the completed webhook delivered",
        "document.querySelector(\"article.delivery[data-event='completed'] .badge\").textContent === 'delivered'",
    )
    .await;
    js(
        &client,
        "const v = document.getElementById('task-video'); v.pause(); v.currentTime = 2; return true;",
    )
    .await;
    let before = js(&client, &format!("return {completed};")).await;
    assert_eq!(before, json!(1));

    // Redeliver: a second attempt of the same event appears.
    click(&client, "#redeliver").await;
    until(
        &client,
        "the redelivered attempt",
        &format!("{completed} === 2"),
    )
    .await;
    let hooks: Vec<Value> = receiver
        .received()
        .iter()
        .map(|h| h.json())
        .filter(|b| b["task_id"] == task_id.as_str() && b["status"] == "completed")
        .collect();
    assert_eq!(
        hooks.len(),
        2,
        "the receiver got the completed webhook twice"
    );

    screenshot(&client, "task.png", 1280, 1500).await;
    // On a phone: the same page, one column.
    screenshot(&client, "task-phone.png", 390, 1400).await;

    // The list, with a task still running beside the finished ones.
    let running = stack
        .submit_ok(
            &json!({"model": "local-video", "prompt": "Time-lapse of clouds over a mountain lake",
                           "duration": 20, "size": "1280x720", "fps": 24}),
        )
        .await;
    client
        .set_window_size(1280, 900)
        .await
        .expect("window size");
    click(&client, "a[data-route='tasks']").await;
    until(
        &client,
        "the running task's progress in the list",
        &format!(
            "(() => {{ const b = document.getElementById('progress-{running}');
                       return b && Number(b.getAttribute('aria-valuenow')) >= 10; }})()"
        ),
    )
    .await;
    screenshot(&client, "tasks.png", 1280, 820).await;

    // The status filter.
    client
        .find(Locator::Css("#status-filter"))
        .await
        .expect("filter")
        .select_by_value("cancelled")
        .await
        .expect("filter by cancelled");
    until(
        &client,
        "only the cancelled task",
        &format!(
            "document.getElementById('task-row-{stopped}') && !document.getElementById('task-row-{done}')"
        ),
    )
    .await;

    // The webhook secret: shown on demand, rotated after a confirmation.
    click(&client, "a[data-route='secret']").await;
    assert_eq!(
        js(&client, "return document.getElementById('secret-value');").await,
        Value::Null,
        "the secret is not shown before it is asked for"
    );
    click(&client, "#show-secret").await;
    let shown = until(
        &client,
        "the secret",
        "document.getElementById('secret-value') && document.getElementById('secret-value').value",
    )
    .await;
    assert_eq!(shown, json!(stack.secret));
    click(&client, "#rotate-secret").await;
    client.accept_alert().await.expect("confirm the rotation");
    let rotated = until(
        &client,
        "the rotated secret",
        &format!(
            "(() => {{ const v = document.getElementById('secret-value').value;
                       return v !== '{}' && v; }})()",
            stack.secret
        ),
    )
    .await;
    let (_, current) = stack.get("/v1/webhooks/secret").await;
    assert_eq!(current["secret"], rotated, "the page shows the new secret");
    click(&client, "#hide-secret").await;
    assert_eq!(
        js(&client, "return document.getElementById('secret-value');").await,
        Value::Null,
        "hidden again"
    );

    client.close().await.expect("close the browser");
    drop(driver);
    stack.stop().await;
}
