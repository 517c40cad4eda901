//! Prints how fast the local renderer encodes: `cargo run --release -p conduit-generator
//! --example render_speed -- [WIDTHxHEIGHT] [SECONDS] [FPS] [OUT.mp4]`.

use std::{sync::atomic::AtomicBool, time::Instant};

use conduit_generator::render::{render, RenderRequest};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = args.first().map_or("1280x720", String::as_str);
    let (w, h) = size
        .split_once('x')
        .ok_or_else(|| anyhow::anyhow!("size must be WIDTHxHEIGHT"))?;
    let request = RenderRequest {
        prompt: "A drone shot over a misty forest at sunrise, cinematic".into(),
        seed: Some(1),
        width: w.parse()?,
        height: h.parse()?,
        duration_seconds: args.get(1).map_or(Ok(6), |s| s.parse())?,
        fps: args.get(2).map_or(Ok(24), |s| s.parse())?,
    };
    let start = Instant::now();
    let bytes = render(&request, &mut |_, _| {}, &AtomicBool::new(false))?;
    let secs = start.elapsed().as_secs_f64();
    let frames = request.total_frames();
    println!(
        "{size}: {frames} frames in {secs:.2} s = {:.1} fps ({:.2}x real time), {} bytes",
        f64::from(frames) / secs,
        f64::from(request.duration_seconds) / secs,
        bytes.len()
    );
    if let Some(out) = args.get(3) {
        std::fs::write(out, &bytes)?;
    }
    Ok(())
}
