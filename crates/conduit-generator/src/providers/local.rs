//! `local`: the built-in renderer, run on a blocking thread so the async workers stay
//! responsive. Its progress is the true share of frames rendered.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use async_trait::async_trait;
use conduit_core::messages::JobMessage;

use super::{GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate, Provider};
use crate::render::{self, RenderError, RenderRequest};

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
            render::render(&request, &mut report, &stop)
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
