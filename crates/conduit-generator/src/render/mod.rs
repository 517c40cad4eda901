//! The local-video renderer: a pure function from a request (prompt, seed, size,
//! duration, fps) to the bytes of an H.264 MP4 (yuv420p, `moov` before `mdat`, exactly
//! `duration * fps` frames). It is synchronous and CPU-bound; callers run it on a
//! blocking thread. It reports the share of frames done and stops at the next frame once
//! its cancel flag is set.
//!
//! Byte-identical output for identical input rests on three things: the scene is drawn
//! from a PRNG seeded by a hash of the request, the encoder runs single-threaded with
//! no time-dependent decisions, and the container carries no wall-clock time.

mod mux;
mod scene;

use std::sync::atomic::{AtomicBool, Ordering};

use openh264::{
    encoder::{
        BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, QpRange,
        RateControlMode, SpsPpsStrategy, UsageType,
    },
    OpenH264API, Timestamp,
};

pub use scene::{Frame, Scene};

/// What to render. Sizes must be even (4:2:0), as the API guarantees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderRequest {
    pub prompt: String,
    pub seed: Option<i64>,
    pub width: u32,
    pub height: u32,
    pub duration_seconds: u32,
    pub fps: u32,
}

impl RenderRequest {
    pub fn total_frames(&self) -> u32 {
        self.duration_seconds.saturating_mul(self.fps)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("rendering was cancelled")]
    Cancelled,
    #[error("invalid render request: {0}")]
    Invalid(String),
    #[error("H.264 encoder failed: {0}")]
    Encoder(String),
    #[error("MP4 muxing failed: {0:#}")]
    Mux(anyhow::Error),
}

/// Largest side openh264 accepts (level 5.2).
const MAX_SIDE: u32 = 3840;

/// Renders the whole video. `progress(done, total)` is called after every frame.
pub fn render(
    request: &RenderRequest,
    progress: &mut dyn FnMut(u32, u32),
    cancel: &AtomicBool,
) -> Result<Vec<u8>, RenderError> {
    render_over(request, None, progress, cancel)
}

/// Like [`render`], over `background` (RGB, 3 bytes a pixel, the request's size) when
/// given: the first frame is that image, the rest draw the scene over it.
pub fn render_over(
    request: &RenderRequest,
    background: Option<&[u8]>,
    progress: &mut dyn FnMut(u32, u32),
    cancel: &AtomicBool,
) -> Result<Vec<u8>, RenderError> {
    validate(request)?;
    let (width, height) = (request.width as usize, request.height as usize);
    if background.is_some_and(|rgb| rgb.len() != width * height * 3) {
        return Err(RenderError::Invalid(
            "the background image does not match the video's size".into(),
        ));
    }
    let total = request.total_frames();
    let scene = Scene::with_background(
        &request.prompt,
        request.seed,
        width,
        height,
        request.fps,
        background,
    );
    let mut frame = scene.blank_frame();
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), encoder_config(request))
        .map_err(|e| RenderError::Encoder(e.to_string()))?;
    let mut muxer = mux::Muxer::new(
        request.width as u16,
        request.height as u16,
        request.fps,
        total as usize,
    );
    for index in 0..total {
        if cancel.load(Ordering::Relaxed) {
            return Err(RenderError::Cancelled);
        }
        scene.draw(index, &mut frame);
        let timestamp = Timestamp::from_millis(u64::from(index) * 1000 / u64::from(request.fps));
        let bitstream = encoder
            .encode_at(&frame, timestamp)
            .map_err(|e| RenderError::Encoder(e.to_string()))?;
        muxer.begin_frame();
        for layer in (0..bitstream.num_layers()).filter_map(|l| bitstream.layer(l)) {
            for nal in (0..layer.nal_count()).filter_map(|n| layer.nal_unit(n)) {
                muxer.push_nal(nal);
            }
        }
        progress(index + 1, total);
    }
    if muxer.frames() != total as usize {
        return Err(RenderError::Encoder(format!(
            "encoded {} frames instead of {total}",
            muxer.frames()
        )));
    }
    // The encoder (about 18 MiB of openh264 state at 1280x720) and the two pictures are
    // done with: free them before the file is assembled rather than after, so the
    // process never holds both.
    drop(encoder);
    drop(frame);
    drop(scene);
    muxer.finish().map_err(RenderError::Mux)
}

fn validate(r: &RenderRequest) -> Result<(), RenderError> {
    let fail = |m: String| Err(RenderError::Invalid(m));
    if (r.width | r.height) & 1 != 0 {
        return fail(format!("size {}x{} must be even", r.width, r.height));
    }
    if !(16..=MAX_SIDE).contains(&r.width) || !(16..=MAX_SIDE).contains(&r.height) {
        return fail(format!("size {}x{} out of range", r.width, r.height));
    }
    if r.width.max(r.height) > MAX_SIDE || r.width.min(r.height) > 2160 {
        return fail(format!("size {}x{} exceeds 3840x2160", r.width, r.height));
    }
    if !(1..=120).contains(&r.fps) {
        return fail(format!("fps {} out of range", r.fps));
    }
    if r.total_frames() == 0 {
        return fail("a video needs at least one frame".into());
    }
    Ok(())
}

/// Tuned for speed and determinism: one thread, low complexity, fixed quantiser (no rate
/// control, which would also make frame skipping possible), no scene-change detection
/// and a keyframe every ten seconds. Background detection stays on: it lets the encoder
/// skip the static gradient cheaply (about a third faster at 1280x720).
fn encoder_config(r: &RenderRequest) -> EncoderConfig {
    EncoderConfig::new()
        .num_threads(1)
        .usage_type(UsageType::CameraVideoRealTime)
        .complexity(Complexity::Low)
        .rate_control_mode(RateControlMode::Off)
        .bitrate(BitRate::from_bps(4_000_000))
        .qp(QpRange::new(24, 30))
        .skip_frames(false)
        .max_frame_rate(FrameRate::from_hz(r.fps as f32))
        .scene_change_detect(false)
        .adaptive_quantization(false)
        .background_detection(true)
        .sps_pps_strategy(SpsPpsStrategy::ConstantId)
        .intra_frame_period(IntraFramePeriod::from_num_frames(r.fps * 10))
}

#[cfg(test)]
mod tests;
