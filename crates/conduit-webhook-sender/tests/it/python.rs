//! Python receivers: the seed document's Flask handler (unchanged but for the secret it
//! reads from the environment) accepts Conduit's webhooks, and the reference
//! `standardwebhooks` library verifies their signatures.

use std::{process::Stdio, time::Duration};

use conduit_core::messages::DeliveryState;
use uuid::Uuid;

use crate::{cancelled, completed, delivery_of, failed, progress, Harness};

/// The handler exactly as the webhook documentation shows it, plus the lines any Flask
/// program needs around it (imports, the app, `app.run`).
const SEED_HANDLER: &str = r#"
@app.route('/webhooks/video-complete', methods=['POST'])
def handle_video_webhook():
    # Verify webhook authenticity
    if request.headers.get('Authorization') != f"Bearer {os.environ['WEBHOOK_SECRET']}":
        return 'Unauthorized', 401
    
    data = request.json
    task_id = data['task_id']
    status = data['status']
    
    if status == 'completed':
        video_url = data['video_url']
        # Process completed video
    elif status == 'failed':
        error = data['error']
        # Handle failure
    
    return 'OK', 200
"#;

const PREAMBLE: &str =
    "import os\nimport sys\nfrom flask import Flask, request\n\napp = Flask(__name__)\n";
const MAIN: &str =
    "\nif __name__ == '__main__':\n    app.run(host='127.0.0.1', port=int(sys.argv[1]))\n";

const WEBHOOK_SECRET: &str = "flask-shared-secret";

fn python_available() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn the_seed_flask_handler_accepts_our_webhooks() {
    if !python_available() {
        eprintln!("SKIPPED the_seed_flask_handler_accepts_our_webhooks: python3 is not installed");
        return;
    }
    let flask = std::process::Command::new("python3")
        .args(["-c", "import flask"])
        .status()
        .expect("python3 runs");
    assert!(
        flask.success(),
        "Flask is not installed for python3: run `python3 -m pip install flask` (scripts/test does)"
    );

    let dir = std::env::temp_dir().join(format!("conduit-flask-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let script = dir.join("handler.py");
    std::fs::write(&script, format!("{PREAMBLE}{SEED_HANDLER}{MAIN}")).expect("script written");
    let port = conduit_testkit::stack::free_port().expect("free port");
    let mut child = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("Flask starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "Flask did not listen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s")).await;
    let app = h.start_app().await;
    let url = format!("http://127.0.0.1:{port}/webhooks/video-complete");
    let mut ids = Vec::new();
    for payload in [
        completed(Uuid::new_v4()),
        failed(Uuid::new_v4()),
        cancelled(Uuid::new_v4()),
        progress(Uuid::new_v4(), 50),
    ] {
        let mut d = delivery_of(&url, &payload);
        d.headers
            .insert("Authorization".into(), format!("Bearer {WEBHOOK_SECRET}"));
        ids.push(d.webhook_id.clone());
        h.publish(&d).await;
    }
    // Without the header the example's own check refuses it: the handler really ran.
    let unauthorised = delivery_of(&url, &completed(Uuid::new_v4()));
    h.publish(&unauthorised).await;

    for o in h.finals(&ids, Duration::from_secs(30)).await {
        assert_eq!(o.state, DeliveryState::Delivered, "{o:?}");
        assert_eq!(o.status_code, Some(200));
    }
    let refused = h
        .outcomes_until_final(&unauthorised.webhook_id, Duration::from_secs(30))
        .await;
    assert_eq!(refused.last().and_then(|o| o.status_code), Some(401));

    app.stop().await;
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    h.cleanup().await;
}

/// Checks captured requests with the reference Python `standardwebhooks` library.
const VERIFY_WITH_REFERENCE: &str = r#"
import json, sys
from standardwebhooks import Webhook
cases = json.load(sys.stdin)
for c in cases:
    Webhook(c["secret"]).verify(c["body"].encode(), c["headers"])
print("verified", len(cases))
"#;

#[tokio::test]
async fn the_reference_standardwebhooks_library_verifies_our_signatures() {
    if !python_available() {
        eprintln!("SKIPPED the_reference_standardwebhooks_library_verifies_our_signatures: python3 is not installed");
        return;
    }
    let lib = std::process::Command::new("python3")
        .args(["-c", "import standardwebhooks"])
        .stderr(Stdio::null())
        .status()
        .expect("python3 runs");
    if !lib.success() {
        eprintln!(
            "SKIPPED the_reference_standardwebhooks_library_verifies_our_signatures: \
             `python3 -m pip install standardwebhooks` to run it"
        );
        return;
    }
    let mut h = Harness::new(|_| {}).await;
    let receiver = crate::Receiver::answering(200).await;
    let app = h.start_app().await;
    let mut ids = Vec::new();
    for payload in [completed(Uuid::new_v4()), progress(Uuid::new_v4(), 30)] {
        let d = delivery_of(&receiver.url("/hook"), &payload);
        ids.push(d.webhook_id.clone());
        h.publish(&d).await;
    }
    h.finals(&ids, Duration::from_secs(20)).await;
    let out = run_with_cases(VERIFY_WITH_REFERENCE, crate::SECRET, &receiver.received()).await;
    assert!(
        out.status.success(),
        "the reference library refused our signature: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "verified 2");

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

/// Runs the Python `script` with one case per request on its standard input (a JSON
/// list of `{"secret", "body", "headers"}`), as the reference-library checks read them.
pub(crate) async fn run_with_cases(
    script: &str,
    secret: &str,
    requests: &[conduit_testkit::ReceivedWebhook],
) -> std::process::Output {
    let cases: Vec<serde_json::Value> = requests
        .iter()
        .map(|r| {
            let headers: serde_json::Map<String, serde_json::Value> = r
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone())))
                .collect();
            serde_json::json!({"secret": secret, "body": r.body, "headers": headers})
        })
        .collect();
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(&serde_json::to_vec(&cases).expect("cases encode"))
            .await
            .expect("cases written");
    }
    child.wait_with_output().await.expect("python3 finishes")
}
