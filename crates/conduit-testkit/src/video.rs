//! Pictures and videos for the `image_url` tests: a test picture to send, and the first
//! frame of an MP4 a renderer made from it, to compare.

use std::io::Cursor;

use openh264::{decoder::Decoder, formats::YUVSource};

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

/// The first picture of an H.264 MP4, as RGB, with its width and height.
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

/// Mean absolute difference per channel of two pictures of the same size.
pub fn mean_difference(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let total: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.len().max(1) as f64
}
