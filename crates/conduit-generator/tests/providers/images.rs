//! `image_url` through each adapter: the field each provider documents receives the
//! image (as the URL or data URI it was given, or as its bytes), an image on a local
//! HTTP server is fetched, and the built-in renderer's first frame is the image.

use std::io::Cursor;

use conduit_generator::providers::{
    ImageLoader, LocalProvider, MiniMaxProvider, OpenAiProvider, ReplicateProvider,
};
use conduit_testkit::fakes::{FakeProvider, Protocol};
use openh264::{decoder::Decoder, formats::YUVSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{account, job, models, run, KEY};

/// A 1x1 PNG.
pub const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

/// A `width`x`height` PNG with four coloured quarters and a gradient, as RGB and as file.
pub fn test_picture(width: u32, height: u32) -> (Vec<u8>, Vec<u8>) {
    let picture = image::RgbImage::from_fn(width, height, |x, y| {
        let (left, top) = (x < width / 2, y < height / 2);
        let shade = (x * 255 / width.max(1)) as u8;
        match (left, top) {
            (true, true) => image::Rgb([220, 40, 40]),
            (false, true) => image::Rgb([40, 200, 60]),
            (true, false) => image::Rgb([30, 60, 210]),
            (false, false) => image::Rgb([shade, shade, 40]),
        }
    });
    let mut file = Vec::new();
    picture
        .write_to(&mut Cursor::new(&mut file), image::ImageFormat::Png)
        .expect("PNG encodes");
    (picture.into_raw(), file)
}

/// The first picture of an H.264 MP4, as RGB.
pub fn first_frame_rgb(file: &[u8]) -> (usize, usize, Vec<u8>) {
    let mut reader =
        mp4::Mp4Reader::read_header(Cursor::new(file), file.len() as u64).expect("an MP4");
    let track = reader.tracks().values().next().expect("a track");
    let track_id = track.track_id();
    let mut annex_b = Vec::new();
    for ps in [
        track.sequence_parameter_set().expect("SPS"),
        track.picture_parameter_set().expect("PPS"),
    ] {
        annex_b.extend_from_slice(&[0, 0, 0, 1]);
        annex_b.extend_from_slice(ps);
    }
    let sample = reader
        .read_sample(track_id, 1)
        .expect("sample read")
        .expect("a first sample");
    let mut rest = &sample.bytes[..];
    while rest.len() >= 4 {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        annex_b.extend_from_slice(&[0, 0, 0, 1]);
        annex_b.extend_from_slice(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    let mut decoder = Decoder::new().expect("decoder");
    let picture = decoder
        .decode(&annex_b)
        .expect("the first frame decodes")
        .expect("a picture");
    let (w, h) = picture.dimensions();
    let mut rgb = vec![0; w * h * 3];
    picture.write_rgb8(&mut rgb);
    (w, h, rgb)
}

/// Mean absolute difference per channel.
pub fn mean_difference(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let total: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.len().max(1) as f64
}

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
