use std::{io::Cursor, sync::atomic::AtomicBool, time::Duration};

use openh264::{decoder::Decoder, formats::YUVSource};
use sha2::{Digest, Sha256};

use super::*;

fn request(prompt: &str) -> RenderRequest {
    RenderRequest {
        prompt: prompt.into(),
        seed: Some(42),
        width: 160,
        height: 96,
        duration_seconds: 2,
        fps: 12,
    }
}

fn render_ok(r: &RenderRequest) -> Vec<u8> {
    render(r, &mut |_, _| {}, &AtomicBool::new(false)).expect("render succeeds")
}

/// Top-level box types in file order.
fn top_level_boxes(file: &[u8]) -> Vec<String> {
    let mut types = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= file.len() {
        let size = u32::from_be_bytes(file[pos..pos + 4].try_into().unwrap()) as usize;
        types.push(String::from_utf8_lossy(&file[pos + 4..pos + 8]).into_owned());
        assert!(size >= 8, "box of size {size}");
        pos += size;
    }
    assert_eq!(pos, file.len(), "boxes cover the file exactly");
    types
}

/// Decodes every sample and returns a checksum per decoded picture.
fn decoded_frame_checksums(file: &[u8]) -> Vec<[u8; 32]> {
    let mut reader = mp4::Mp4Reader::read_header(Cursor::new(file), file.len() as u64).unwrap();
    let track = reader.tracks().values().next().unwrap();
    let (track_id, count) = (track.track_id(), track.sample_count());
    let mut prefix = Vec::new();
    for ps in [
        track.sequence_parameter_set().unwrap(),
        track.picture_parameter_set().unwrap(),
    ] {
        prefix.extend_from_slice(&[0, 0, 0, 1]);
        prefix.extend_from_slice(ps);
    }
    let mut decoder = Decoder::new().unwrap();
    let mut sums = Vec::new();
    for id in 1..=count {
        let sample = reader.read_sample(track_id, id).unwrap().unwrap();
        // AVCC (length-prefixed) back to Annex B for the decoder.
        let mut annex_b = if id == 1 { prefix.clone() } else { Vec::new() };
        let mut rest = &sample.bytes[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            annex_b.extend_from_slice(&[0, 0, 0, 1]);
            annex_b.extend_from_slice(&rest[4..4 + len]);
            rest = &rest[4 + len..];
        }
        if let Some(pic) = decoder.decode(&annex_b).unwrap() {
            let mut h = Sha256::new();
            let (w, hgt) = pic.dimensions();
            let (sy, su, sv) = pic.strides();
            for row in 0..hgt {
                h.update(&pic.y()[row * sy..row * sy + w]);
            }
            for row in 0..hgt / 2 {
                h.update(&pic.u()[row * su..row * su + w / 2]);
                h.update(&pic.v()[row * sv..row * sv + w / 2]);
            }
            sums.push(h.finalize().into());
        }
    }
    for pic in decoder.flush_remaining().unwrap() {
        let _ = pic;
        sums.push([0; 32]);
    }
    sums
}

#[test]
fn renders_a_streamable_h264_mp4_of_the_requested_shape() {
    let r = request("a lighthouse at dusk");
    let file = render_ok(&r);

    let boxes = top_level_boxes(&file);
    assert_eq!(boxes, ["ftyp", "moov", "mdat"]);

    let reader = mp4::Mp4Reader::read_header(Cursor::new(&file), file.len() as u64).unwrap();
    assert_eq!(reader.tracks().len(), 1);
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.box_type().unwrap().value, *b"avc1");
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    assert_eq!((track.width(), track.height()), (160, 96));
    assert_eq!(track.sample_count(), r.total_frames());
    assert_eq!(track.duration(), Duration::from_secs(2));
    assert_eq!(reader.duration(), Duration::from_secs(2));
    // The 4:2:0 profiles of H.264 (baseline here) carry yuv420p.
    assert_eq!(track.sequence_parameter_set().unwrap()[1], 66);
}

#[test]
fn every_sample_decodes_to_a_picture() {
    let r = request("decode me");
    let sums = decoded_frame_checksums(&render_ok(&r));
    assert_eq!(sums.len(), r.total_frames() as usize);
    assert_ne!(sums[0], sums[sums.len() - 1], "the picture moves");
}

#[test]
fn identical_requests_give_identical_bytes() {
    let r = request("same prompt, same bytes");
    assert_eq!(render_ok(&r), render_ok(&r));
}

#[test]
fn different_prompts_give_different_pictures() {
    let a = render_ok(&request("a red fox in the snow"));
    let b = render_ok(&request("a submarine under the ice"));
    assert_ne!(Sha256::digest(&a), Sha256::digest(&b));
    let (fa, fb) = (decoded_frame_checksums(&a), decoded_frame_checksums(&b));
    assert_ne!(fa[0], fb[0]);
    let mut seeded = request("a red fox in the snow");
    seeded.seed = Some(43);
    assert_ne!(decoded_frame_checksums(&render_ok(&seeded))[0], fa[0]);
}

#[test]
fn reports_true_progress_per_frame() {
    let r = request("progress");
    let mut seen = Vec::new();
    render(
        &r,
        &mut |done, total| seen.push((done, total)),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(seen.len(), r.total_frames() as usize);
    assert_eq!(seen.first(), Some(&(1, 24)));
    assert_eq!(seen.last(), Some(&(24, 24)));
}

#[test]
fn stops_when_cancelled() {
    let r = request("cancel me");
    let cancel = AtomicBool::new(false);
    let mut frames = 0;
    let result = render(
        &r,
        &mut |done, _| {
            frames = done;
            if done == 3 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(matches!(result, Err(RenderError::Cancelled)));
    assert_eq!(frames, 3);
}

#[test]
fn refuses_sizes_the_encoder_cannot_take() {
    for (w, h) in [(161, 96), (160, 0), (4000, 96), (2200, 2200)] {
        let mut r = request("bad");
        (r.width, r.height) = (w, h);
        assert!(matches!(
            render(&r, &mut |_, _| {}, &AtomicBool::new(false)),
            Err(RenderError::Invalid(_))
        ));
    }
}
