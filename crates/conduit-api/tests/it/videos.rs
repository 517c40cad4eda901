//! Signed, expiring video URLs served with Range support and no API key.

use bytes::Bytes;
use conduit_core::{
    messages::StatusKind,
    storage::{video_key, VideoStore},
    Secret,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::helpers::{body, TestApp};

const SIGNING_KEY: &str = "test-signing-key";

fn sign(id: Uuid, expires: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_KEY.as_bytes()).unwrap();
    mac.update(format!("{id}.{expires}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

async fn completed_with_video(app: &TestApp, bytes: &'static [u8]) -> (Uuid, String) {
    let id = app.submit_ok(&body()).await;
    let store = VideoStore::from_url(&app.settings.storage.url).unwrap();
    store
        .put(&video_key(id, 1), Bytes::from_static(bytes))
        .await
        .unwrap();
    app.status_event(
        id,
        1,
        1,
        StatusKind::Completed {
            video_key: video_key(id, 1),
            generation_duration_seconds: 1.0,
            model: None,
        },
    )
    .await;
    let task = app.wait_status(id, "completed").await;
    (id, task["video_url"].as_str().unwrap().to_owned())
}

async fn spawn() -> TestApp {
    TestApp::spawn_with(|s| {
        s.storage.signing_key = Some(Secret::new(SIGNING_KEY));
        s.public_base_url = "http://127.0.0.1:1".into();
    })
    .await
}

/// The app's own address in place of the public base URL the test configured.
fn local(app: &TestApp, url: &str) -> String {
    url.replace("http://127.0.0.1:1", &app.url(""))
}

#[tokio::test]
async fn videos_download_whole_and_by_range_without_a_key() {
    let app = spawn().await;
    let content: &[u8] = b"\x00\x00\x00\x18ftypmp42-the-rest-of-a-small-video";
    let (id, url) = completed_with_video(&app, content).await;
    assert!(url.starts_with(&format!("http://127.0.0.1:1/v1/videos/files/{id}?expires=")));
    let url = local(&app, &url);

    let whole = app.http.get(&url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["content-type"], "video/mp4");
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(&whole.bytes().await.unwrap()[..], content);
    let head = app.http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], content.len().to_string());
    assert!(head.bytes().await.unwrap().is_empty());

    for (range, first, last) in [
        ("bytes=0-7", 0, 7),
        ("bytes=4-", 4, content.len() - 1),
        ("bytes=-5", content.len() - 5, content.len() - 1),
    ] {
        let r = app
            .http
            .get(&url)
            .header("Range", range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes {first}-{last}/{}", content.len())
        );
        assert_eq!(
            &r.bytes().await.unwrap()[..],
            &content[first..=last],
            "{range}"
        );
    }
    let r = app
        .http
        .get(&url)
        .header("Range", "bytes=1000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", content.len())
    );
    let json: serde_json::Value = r.json().await.unwrap();
    assert!(json["error"]["code"].is_string());
    app.stop().await;
}

#[tokio::test]
async fn bad_signatures_are_403_and_expired_urls_410() {
    let app = spawn().await;
    let (id, url) = completed_with_video(&app, b"video-bytes").await;
    let url = local(&app, &url);
    let tampered = format!("{}0", url);
    let r = app.http.get(&tampered).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"]["code"], "invalid_signature");
    let other = url.replace(&id.to_string(), &Uuid::now_v7().to_string());
    assert_eq!(app.http.get(&other).send().await.unwrap().status(), 403);
    let bare = app.url(&format!("/v1/videos/files/{id}"));
    assert_eq!(app.http.get(&bare).send().await.unwrap().status(), 403);

    let past = chrono::Utc::now().timestamp() - 10;
    let expired = app.url(&format!(
        "/v1/videos/files/{id}?expires={past}&signature={}",
        sign(id, past)
    ));
    let r = app.http.get(&expired).send().await.unwrap();
    assert_eq!(r.status(), 410);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"]["code"], "expired");

    // A correctly signed URL for a task without a video is a 404.
    let pending = app.submit_ok(&body()).await;
    let future = chrono::Utc::now().timestamp() + 600;
    let r = app
        .http
        .get(app.url(&format!(
            "/v1/videos/files/{pending}?expires={future}&signature={}",
            sign(pending, future)
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn without_a_configured_key_one_is_generated_and_kept() {
    let mut app = TestApp::spawn().await;
    let id = app.submit_ok(&body()).await;
    app.status_event(
        id,
        1,
        1,
        StatusKind::Completed {
            video_key: video_key(id, 1),
            generation_duration_seconds: 1.0,
            model: None,
        },
    )
    .await;
    let first = app.wait_status(id, "completed").await["video_url"].clone();
    app.restart_with(app.settings.clone()).await;
    assert_eq!(
        app.task(id).await["video_url"],
        first,
        "the key survives a restart"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM settings WHERE key = 'video_url_signing_key'")
            .await,
        1
    );
    app.stop().await;
}
