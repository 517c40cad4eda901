//! The `conduit-api` binary: `migrate`, `keys create|list|revoke`, `openapi`, and
//! `serve` stopping cleanly (exit 0) on SIGTERM.

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use conduit_core::config::Settings;
use serde_json::Value;

use crate::helpers::{cleanup, eventually, test_settings, TIMEOUT};

fn command(settings: &Settings) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conduit-api"));
    cmd.env("CONDUIT__DATABASE__URL", settings.database.url.expose())
        .env("CONDUIT__AMQP__NAMESPACE", &settings.amqp.namespace)
        .env("CONDUIT__STORAGE__URL", &settings.storage.url)
        .env("CONDUIT__LOG__FORMAT", "json")
        .env_remove("CONDUIT_CONFIG")
        .stdin(Stdio::null());
    cmd
}

fn run(settings: &Settings, args: &[&str]) -> Output {
    let out = command(settings)
        .args(args)
        .output()
        .expect("run conduit-api");
    assert!(
        out.status.success(),
        "conduit-api {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn migrate_and_the_keys_commands_work_on_a_fresh_database() {
    let settings = test_settings();
    run(&settings, &["migrate"]);
    run(&settings, &["migrate"]); // idempotent

    let out = run(&settings, &["keys", "create", "--name", "ci", "--json"]);
    let key: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let mut fields: Vec<&str> = key
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(fields, ["id", "key", "name", "webhook_secret"]);
    assert!(key["key"].as_str().unwrap().starts_with("condt_"));
    assert!(key["webhook_secret"]
        .as_str()
        .unwrap()
        .starts_with("whsec_"));
    assert_eq!(key["name"], "ci");

    let plain = run(&settings, &["keys", "create", "--name", "second"]);
    let printed = String::from_utf8(plain.stdout).unwrap();
    assert!(
        printed.trim().starts_with("condt_") && printed.trim().lines().count() == 1,
        "{printed}"
    );

    let list = String::from_utf8(run(&settings, &["keys", "list"]).stdout).unwrap();
    assert!(list.contains("ci") && list.contains("second"), "{list}");
    assert!(
        !list.contains(key["key"].as_str().unwrap()),
        "keys are never listed"
    );

    let id = key["id"].as_str().unwrap();
    run(&settings, &["keys", "revoke", id]);
    let list: Value =
        serde_json::from_slice(&run(&settings, &["keys", "list", "--json"]).stdout).unwrap();
    let revoked = list
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap();
    assert!(revoked["revoked_at"].is_string());
    let again = command(&settings)
        .args(["keys", "revoke", id])
        .output()
        .unwrap();
    assert!(!again.status.success(), "revoking twice is an error");

    let doc: Value = serde_json::from_slice(&run(&settings, &["openapi"]).stdout).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    cleanup(&settings).await;
}

#[tokio::test]
async fn serve_exits_0_on_sigterm() {
    let settings = test_settings();
    let port = conduit_testkit::stack::free_port().unwrap();
    let mut child = command(&settings)
        .env("CONDUIT__HTTP__BIND", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start conduit-api");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    eventually("the binary to be ready", TIMEOUT, || async {
        let r = http.get(&url).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = eventually("the binary to exit", Duration::from_secs(30), || {
        let done = child.try_wait().unwrap();
        async move { done }
    })
    .await;
    assert!(exit.success(), "exit status {exit:?}");
    cleanup(&settings).await;
}

#[tokio::test]
async fn concurrent_start_ups_create_and_migrate_the_database_once() {
    let settings = test_settings();
    let results = futures::future::join_all(
        (0..4).map(|_| conduit_api::db::connect_and_migrate(&settings.database)),
    )
    .await;
    for r in &results {
        assert!(r.is_ok(), "{:?}", r.as_ref().err());
    }
    let pool = results.into_iter().next().unwrap().unwrap();
    let client = pool.get().await.unwrap();
    let applied: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    // Every migration file, once.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .is_ok_and(|f| f.file_name().to_string_lossy().ends_with(".sql"))
        })
        .count();
    assert_eq!(applied, i64::try_from(files).unwrap());
    drop(client);
    pool.close();
    cleanup(&settings).await;
}
