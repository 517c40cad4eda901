//! `local`: the built-in renderer, run on a blocking thread so the async workers stay
//! responsive. Its progress is the true share of frames rendered. A job with an
//! `image_url` renders over that image (scaled to the video's size): it is the first
//! frame as it is, and the background of the others.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use async_trait::async_trait;
use conduit_core::messages::JobMessage;

use super::{
    image::InputImage, GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider,
};
use crate::render::{self, RenderError, RenderRequest};

/// Largest width or height of an input image, before scaling.
const MAX_IMAGE_SIDE: u32 = 8192;

/// Decodes a PNG or JPEG and scales it to `width`x`height`, as RGB.
fn background(image: &InputImage, width: u32, height: u32) -> Result<Vec<u8>, String> {
    let format = if image.mime == "image/png" {
        image::ImageFormat::Png
    } else {
        image::ImageFormat::Jpeg
    };
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(image.bytes.as_ref()), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(512 << 20);
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|e| format!("the image could not be decoded ({e})"))?
        .to_rgb8();
    let scaled = if decoded.dimensions() == (width, height) {
        decoded
    } else {
        image::imageops::resize(
            &decoded,
            width,
            height,
            image::imageops::FilterType::Triangle,
        )
    };
    Ok(scaled.into_raw())
}

pub struct LocalProvider;

/// Sets the renderer's cancel flag when dropped, so a caller that stops waiting (timeout,
/// cancellation) also stops the blocking render.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl Provider for LocalProvider {
    async fn generate(
        &self,
        job: &JobMessage,
        ctx: GenerationContext,
    ) -> Result<GeneratedVideo, GenerationError> {
        let request = RenderRequest {
            prompt: job.prompt.clone(),
            seed: job.spec.seed,
            width: job.spec.width,
            height: job.spec.height,
            duration_seconds: job.spec.duration_seconds,
            fps: job.spec.fps,
        };
        let image = match &job.image_url {
            Some(url) => Some(ctx.images.load(url, &ctx.cancel).await?),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = StopOnDrop(stop.clone());
        let watcher = {
            let (stop, token) = (stop.clone(), ctx.cancel.clone());
            tokio::spawn(async move {
                token.cancelled().await;
                stop.store(true, Ordering::Relaxed);
            })
        };
        let span = tracing::Span::current();
        let progress = ctx.progress.clone();
        let rendering = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let background = match &image {
                Some(image) => Some(
                    background(image, request.width, request.height)
                        .map_err(|why| RenderError::Invalid(format!("image_url: {why}")))?,
                ),
                None => None,
            };
            let started = Instant::now();
            let mut last_percent = None;
            let mut report = |done: u32, total: u32| {
                let percent = (u64::from(done) * 100 / u64::from(total.max(1))) as u8;
                if last_percent == Some(percent) {
                    return;
                }
                last_percent = Some(percent);
                let elapsed = started.elapsed().as_secs_f64();
                let eta = elapsed / f64::from(done.max(1)) * f64::from(total - done.min(total));
                progress.report(ProgressUpdate {
                    percent,
                    message: format!("Rendering frame {done} of {total}"),
                    eta_seconds: Some(eta.ceil() as u64),
                });
            };
            render::render_over(&request, background.as_deref(), &mut report, &stop)
                .map(|bytes| (bytes, request.total_frames()))
        });
        let result = rendering.await;
        watcher.abort();
        match result {
            Ok(Ok((bytes, frames))) => Ok(GeneratedVideo {
                bytes: bytes.into(),
                frames_rendered: Some(frames),
            }),
            Ok(Err(RenderError::Cancelled)) => Err(GenerationError::Cancelled),
            Ok(Err(err)) => Err(GenerationError::Failed(format!(
                "Local rendering failed: {err}"
            ))),
            Err(join) => Err(GenerationError::Failed(format!(
                "Local rendering crashed: {join}"
            ))),
        }
    }
}
