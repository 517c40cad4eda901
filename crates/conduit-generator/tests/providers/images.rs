//! `image_url` through each adapter: the field each provider documents receives the
//! image (as the URL or data URI it was given, or as its bytes), an image on a local
//! HTTP server is fetched, and the built-in renderer's first frame is the image.

use conduit_generator::providers::{
    ImageLoader, LocalProvider, MiniMaxProvider, OpenAiProvider, ReplicateProvider,
};
use conduit_testkit::{
    fakes::{FakeProvider, Protocol},
    video::{first_frame_rgb, mean_difference, test_picture},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{account, job, models, run, KEY};

/// A 1x1 PNG.
pub const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

/// Serves `body` as `image/png` to every request on 127.0.0.1; returns the URL.
async fn serve_image(body: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            });
        }
    });
    format!("http://127.0.0.1:{port}/first.png")
}

#[tokio::test]
async fn minimax_and_replicate_get_the_image_in_their_first_frame_field() {
    let image = format!("data:image/png;base64,{PNG_1X1}");
    let fake = FakeProvider::start(Protocol::MiniMax, KEY);
    let provider = MiniMaxProvider::new(&account(&fake, KEY), &models()).expect("adapter");
    let mut j = job("minimax-video", "minimax", "a waking cat", 6, (1280, 720));
    j.image_url = Some(image.clone());
    assert!(run(&provider, &j).await.result.is_ok());
    let got = fake.job_for("a waking cat").expect("job");
    assert_eq!(got.params["first_frame_image"], image.as_str());

    let fake = FakeProvider::start(Protocol::Replicate, KEY);
    let provider = ReplicateProvider::new(&account(&fake, KEY), &models()).expect("adapter");
    let mut j = job(
        "replicate-video",
        "replicate",
        "a waking dog",
        6,
        (1280, 720),
    );
    j.image_url = Some("https://images.example/dog.jpg".into());
    assert!(run(&provider, &j).await.result.is_ok());
    let got = fake.job_for("a waking dog").expect("job");
    assert_eq!(
        got.params["input"],
        serde_json::json!({"prompt": "a waking dog", "first_frame_image": "https://images.example/dog.jpg"})
    );
}

#[tokio::test]
async fn the_videos_protocol_gets_the_image_file_fetched_from_its_url() {
    let (_, png) = test_picture(32, 16);
    let url = serve_image(png.clone()).await;
    let fake = FakeProvider::start(Protocol::OpenAi, KEY);
    let provider = OpenAiProvider::new(&account(&fake, KEY), &models()).expect("adapter");
    let mut j = job("openai-video", "openai", "a moving picture", 8, (1280, 720));
    j.image_url = Some(url);
    let run = run(&provider, &j).await;
    assert!(run.result.is_ok(), "{:?}", run.result.as_ref().err());
    let got = fake.job_for("a moving picture").expect("job");
    use base64::Engine;
    let expected = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    );
    assert_eq!(got.params["input_reference"], expected.as_str());
}

#[tokio::test]
async fn an_image_on_an_internal_address_is_refused_unless_allowed() {
    let (_, png) = test_picture(8, 8);
    let url = serve_image(png).await;
    let refused = ImageLoader::new(false)
        .load(&url, &CancellationToken::new())
        .await
        .expect_err("loopback refused");
    assert!(
        refused.to_string().contains("internal address"),
        "{refused}"
    );
    let loaded = ImageLoader::new(true)
        .load(&url, &CancellationToken::new())
        .await
        .expect("allowed");
    assert_eq!(loaded.mime, "image/png");
}

#[tokio::test]
async fn local_video_starts_with_the_image_and_keeps_it_as_background() {
    let (rgb, png) = test_picture(160, 96);
    use base64::Engine;
    let mut j = job(
        "local-video",
        "local",
        "a picture comes alive",
        1,
        (160, 96),
    );
    j.spec.fps = 6;
    j.image_url = Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    ));
    let with_image = run(&LocalProvider, &j).await;
    let (w, h, first) = first_frame_rgb(&with_image.video().bytes);
    assert_eq!((w, h), (160, 96));
    let difference = mean_difference(&first, &rgb);
    assert!(
        difference < 8.0,
        "first frame differs from the image by {difference}"
    );
    // Without the image the first frame is the gradient scene, far from the picture.
    j.image_url = None;
    let plain = run(&LocalProvider, &j).await;
    let (_, _, plain_first) = first_frame_rgb(&plain.video().bytes);
    assert!(mean_difference(&plain_first, &rgb) > 30.0);
}
