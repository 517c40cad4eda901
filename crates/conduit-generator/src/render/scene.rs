//! The picture of a local-video: a two-colour gradient, a handful of discs and squares
//! moving on Lissajous paths, and the prompt as a caption. Everything (palette, shapes,
//! paths) comes from one PRNG seeded with a hash of the prompt and seed, so the same
//! request always draws the same frames.
//!
//! Drawing happens directly in the 4:2:0 planes: the static part (gradient and caption)
//! is drawn once into a base frame, and each frame is that base plus the moving shapes.
//! Colours are converted to YUV once per palette entry, never per pixel.

use sha2::{Digest, Sha256};

/// One 4:2:0 picture: full-resolution luma, half-resolution chroma.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl Frame {
    fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            y: vec![16; width * height],
            u: vec![128; (width / 2) * (height / 2)],
            v: vec![128; (width / 2) * (height / 2)],
        }
    }

    fn copy_from(&mut self, other: &Frame) {
        self.y.copy_from_slice(&other.y);
        self.u.copy_from_slice(&other.u);
        self.v.copy_from_slice(&other.v);
    }
}

impl openh264::formats::YUVSource for Frame {
    fn dimensions(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    fn strides(&self) -> (usize, usize, usize) {
        (self.width, self.width / 2, self.width / 2)
    }

    fn y(&self) -> &[u8] {
        &self.y
    }

    fn u(&self) -> &[u8] {
        &self.u
    }

    fn v(&self) -> &[u8] {
        &self.v
    }
}

/// A colour in limited-range BT.601 YUV, as H.264 players expect by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Yuv {
    y: u8,
    u: u8,
    v: u8,
}

impl Yuv {
    fn from_rgb(r: f32, g: f32, b: f32) -> Self {
        let y = 16.0 + 65.481 * r + 128.553 * g + 24.966 * b;
        let u = 128.0 - 37.797 * r - 74.203 * g + 112.0 * b;
        let v = 128.0 + 112.0 * r - 93.786 * g - 18.214 * b;
        Self {
            y: clamp_u8(y),
            u: clamp_u8(u),
            v: clamp_u8(v),
        }
    }

    fn from_hsv(hue: f32, saturation: f32, value: f32) -> Self {
        let h = hue.rem_euclid(360.0) / 60.0;
        let c = value * saturation;
        let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
        let (r, g, b) = match h as u32 {
            0 => (c, x, 0.0),
            1 => (x, c, 0.0),
            2 => (0.0, c, x),
            3 => (0.0, x, c),
            4 => (x, 0.0, c),
            _ => (c, 0.0, x),
        };
        let m = value - c;
        Self::from_rgb(r + m, g + m, b + m)
    }

    fn mix(self, other: Yuv, t: f32) -> Yuv {
        let lerp = |a: u8, b: u8| clamp_u8(f32::from(a) + (f32::from(b) - f32::from(a)) * t);
        Yuv {
            y: lerp(self.y, other.y),
            u: lerp(self.u, other.u),
            v: lerp(self.v, other.v),
        }
    }
}

fn clamp_u8(x: f32) -> u8 {
    x.round().clamp(0.0, 255.0) as u8
}

/// SplitMix64: tiny, fast and, unlike a library PRNG, guaranteed never to change its
/// sequence under us, which the byte-identical promise depends on.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[derive(Debug, Clone, Copy)]
enum ShapeKind {
    Disc,
    Square,
}

/// A shape moving on `centre + amplitude * sin(2π f t + phase)` in each axis.
#[derive(Debug, Clone)]
struct Shape {
    kind: ShapeKind,
    colour: Yuv,
    /// Radius (half side for squares) in pixels.
    radius: f32,
    centre: (f32, f32),
    amplitude: (f32, f32),
    frequency: (f32, f32),
    phase: (f32, f32),
}

/// Everything needed to draw any frame of one video.
pub struct Scene {
    /// The first frame when it is the user's image, untouched by caption and shapes.
    first: Option<Frame>,
    base: Frame,
    shapes: Vec<Shape>,
    fps: f32,
    /// Shapes stay above this row so the caption stays readable.
    caption_top: usize,
}

impl Scene {
    pub fn new(prompt: &str, seed: Option<i64>, width: usize, height: usize, fps: u32) -> Self {
        Self::with_background(prompt, seed, width, height, fps, None)
    }

    /// A scene over `background` (RGB, 3 bytes a pixel, already `width`x`height`) instead
    /// of the gradient: frame 0 is the image itself, the others add caption and shapes.
    pub fn with_background(
        prompt: &str,
        seed: Option<i64>,
        width: usize,
        height: usize,
        fps: u32,
        background: Option<&[u8]>,
    ) -> Self {
        let mut rng = SplitMix64(scene_seed(prompt, seed));
        let hue = rng.range(0.0, 360.0);
        // Analogous or complementary schemes, chosen by the prompt too.
        let spread = [30.0, 60.0, 150.0, 180.0][rng.below(4) as usize];
        let top = Yuv::from_hsv(hue, rng.range(0.5, 0.9), rng.range(0.25, 0.45));
        let bottom = Yuv::from_hsv(hue + spread, rng.range(0.5, 0.9), rng.range(0.05, 0.2));
        let accents: Vec<Yuv> = (0..4)
            .map(|i| {
                Yuv::from_hsv(
                    hue + spread * 0.5 + 90.0 * i as f32 + rng.range(-20.0, 20.0),
                    rng.range(0.6, 1.0),
                    rng.range(0.75, 1.0),
                )
            })
            .collect();

        let mut base = Frame::new(width, height);
        let first = match background.filter(|rgb| rgb.len() == width * height * 3) {
            Some(rgb) => {
                fill_rgb(&mut base, rgb);
                Some(base.clone())
            }
            None => {
                fill_gradient(&mut base, top, bottom);
                None
            }
        };
        let caption_top = draw_caption(&mut base, prompt);

        let side = width.min(height) as f32;
        let area_h = caption_top.max(2) as f32;
        let shapes = (0..3 + rng.below(4))
            .map(|i| {
                let radius = side * rng.range(0.05, 0.14);
                Shape {
                    kind: if rng.below(3) == 0 {
                        ShapeKind::Square
                    } else {
                        ShapeKind::Disc
                    },
                    colour: accents[i as usize % accents.len()],
                    radius,
                    centre: (
                        width as f32 * rng.range(0.3, 0.7),
                        area_h * rng.range(0.35, 0.65),
                    ),
                    amplitude: (
                        width as f32 * rng.range(0.1, 0.3),
                        area_h * rng.range(0.1, 0.3),
                    ),
                    frequency: (rng.range(0.05, 0.4), rng.range(0.05, 0.4)),
                    phase: (
                        rng.range(0.0, std::f32::consts::TAU),
                        rng.range(0.0, std::f32::consts::TAU),
                    ),
                }
            })
            .collect();
        Self {
            first,
            base,
            shapes,
            fps: fps.max(1) as f32,
            caption_top,
        }
    }

    /// A frame buffer of the right size, to be passed to [`Scene::draw`].
    pub fn blank_frame(&self) -> Frame {
        self.base.clone()
    }

    /// Draws frame number `index` into `frame`.
    pub fn draw(&self, index: u32, frame: &mut Frame) {
        if let (0, Some(first)) = (index, &self.first) {
            frame.copy_from(first);
            return;
        }
        frame.copy_from(&self.base);
        let t = index as f32 / self.fps;
        for s in &self.shapes {
            let phase = |f: f32, p: f32| (std::f32::consts::TAU * f * t + p).sin();
            let cx = s.centre.0 + s.amplitude.0 * phase(s.frequency.0, s.phase.0);
            let cy = s.centre.1 + s.amplitude.1 * phase(s.frequency.1, s.phase.1);
            match s.kind {
                ShapeKind::Disc => fill_disc(frame, self.caption_top, cx, cy, s.radius, s.colour),
                ShapeKind::Square => {
                    fill_square(frame, self.caption_top, cx, cy, s.radius, s.colour)
                }
            }
        }
    }
}

/// The PRNG seed: a hash of the prompt and the request's seed, so different prompts (or
/// seeds) give unrelated scenes.
fn scene_seed(prompt: &str, seed: Option<i64>) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(b"conduit-local-video/1\0");
    hasher.update(prompt.as_bytes());
    hasher.update([0]);
    match seed {
        Some(s) => hasher.update(s.to_be_bytes()),
        None => hasher.update(b"none"),
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Converts an RGB picture of the frame's size into the frame's planes (BT.601, limited
/// range, as the rest of the scene); each chroma sample averages its 2x2 block.
fn fill_rgb(frame: &mut Frame, rgb: &[u8]) {
    let (w, h) = (frame.width, frame.height);
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        (
            f32::from(rgb[i]) / 255.0,
            f32::from(rgb[i + 1]) / 255.0,
            f32::from(rgb[i + 2]) / 255.0,
        )
    };
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = px(x, y);
            frame.y[y * w + x] = Yuv::from_rgb(r, g, b).y;
        }
    }
    let cw = w / 2;
    for cy in 0..h / 2 {
        for cx in 0..cw {
            let (mut r, mut g, mut b) = (0.0, 0.0, 0.0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (pr, pg, pb) = px(cx * 2 + dx, cy * 2 + dy);
                r += pr / 4.0;
                g += pg / 4.0;
                b += pb / 4.0;
            }
            let c = Yuv::from_rgb(r, g, b);
            frame.u[cy * cw + cx] = c.u;
            frame.v[cy * cw + cx] = c.v;
        }
    }
}

fn fill_gradient(frame: &mut Frame, top: Yuv, bottom: Yuv) {
    let (w, h) = (frame.width, frame.height);
    for row in 0..h {
        let c = top.mix(bottom, row as f32 / (h.max(2) - 1) as f32);
        frame.y[row * w..(row + 1) * w].fill(c.y);
        if row & 1 == 0 {
            let (cw, cr) = (w / 2, row / 2);
            frame.u[cr * cw..(cr + 1) * cw].fill(c.u);
            frame.v[cr * cw..(cr + 1) * cw].fill(c.v);
        }
    }
}

/// Fills the pixel span `[x0, x1)` of one row of each plane touched by luma row `row`.
fn fill_span(frame: &mut Frame, row: usize, x0: usize, x1: usize, c: Yuv) {
    if x0 >= x1 {
        return;
    }
    let w = frame.width;
    frame.y[row * w + x0..row * w + x1].fill(c.y);
    if row & 1 == 0 {
        let cw = w / 2;
        let (c0, c1) = (x0 / 2, x1.div_ceil(2).min(cw));
        let start = (row / 2) * cw;
        frame.u[start + c0..start + c1].fill(c.u);
        frame.v[start + c0..start + c1].fill(c.v);
    }
}

fn row_range(cy: f32, r: f32, limit: usize) -> std::ops::Range<usize> {
    let top = (cy - r).floor().max(0.0) as usize;
    let bottom = ((cy + r).ceil().max(0.0) as usize).min(limit);
    top..bottom.max(top)
}

fn clip_x(x: f32, width: usize) -> usize {
    (x.round().max(0.0) as usize).min(width)
}

fn fill_disc(frame: &mut Frame, limit: usize, cx: f32, cy: f32, r: f32, c: Yuv) {
    for row in row_range(cy, r, limit) {
        let dy = row as f32 + 0.5 - cy;
        let half = r * r - dy * dy;
        if half <= 0.0 {
            continue;
        }
        let dx = half.sqrt();
        let (x0, x1) = (clip_x(cx - dx, frame.width), clip_x(cx + dx, frame.width));
        fill_span(frame, row, x0, x1, c);
    }
}

fn fill_square(frame: &mut Frame, limit: usize, cx: f32, cy: f32, r: f32, c: Yuv) {
    let (x0, x1) = (clip_x(cx - r, frame.width), clip_x(cx + r, frame.width));
    for row in row_range(cy, r, limit) {
        fill_span(frame, row, x0, x1, c);
    }
}

/// Draws the prompt, word-wrapped on up to three lines, in a dark band at the bottom and
/// returns the band's first row.
fn draw_caption(frame: &mut Frame, prompt: &str) -> usize {
    let (w, h) = (frame.width, frame.height);
    let scale = (w.min(h) / 240).max(1);
    let glyph = 8 * scale;
    let pad = glyph / 2;
    let columns = (w.saturating_sub(2 * pad) / glyph).max(1);
    let max_lines = if h >= 8 * glyph { 3 } else { 1 };
    let lines = wrap(prompt, columns, max_lines);
    let band = (lines.len() * (glyph + scale * 2) + 2 * pad).min(h / 2);
    let top = (h - band) & !1;
    let shade = Yuv {
        y: 24,
        u: 128,
        v: 128,
    };
    for row in top..h {
        fill_span(frame, row, 0, w, shade);
    }
    for (n, line) in lines.iter().enumerate() {
        let y0 = top + pad + n * (glyph + scale * 2);
        for (i, ch) in line.chars().enumerate() {
            draw_glyph(frame, pad + i * glyph, y0, scale, ch);
        }
    }
    top
}

fn draw_glyph(frame: &mut Frame, x0: usize, y0: usize, scale: usize, ch: char) {
    use font8x8::UnicodeFonts;
    let bitmap = font8x8::BASIC_FONTS
        .get(ch)
        .or_else(|| font8x8::LATIN_FONTS.get(ch))
        .or_else(|| font8x8::GREEK_FONTS.get(ch))
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8]);
    let w = frame.width;
    for (gy, bits) in bitmap.iter().enumerate() {
        for gx in 0..8 {
            if bits & (1 << gx) == 0 {
                continue;
            }
            for sy in 0..scale {
                let row = y0 + gy * scale + sy;
                let x = x0 + gx * scale;
                if row >= frame.height || x + scale > w {
                    continue;
                }
                frame.y[row * w + x..row * w + x + scale].fill(235);
            }
        }
    }
}

/// Greedy word wrap to `columns` characters, at most `max_lines` lines; what does not
/// fit ends in an ellipsis.
fn wrap(text: &str, columns: usize, max_lines: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut overflow = false;
    let words = text.split_whitespace().flat_map(|word| {
        // Words longer than a line are cut into line-sized pieces.
        let chars: Vec<char> = word.chars().collect();
        chars
            .chunks(columns)
            .map(|c| c.iter().collect::<String>())
            .collect::<Vec<_>>()
    });
    for word in words {
        let needed = if current.is_empty() {
            word.chars().count()
        } else {
            current.chars().count() + 1 + word.chars().count()
        };
        if needed > columns {
            lines.push(std::mem::take(&mut current));
            if lines.len() == max_lines {
                overflow = true;
                break;
            }
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(&word);
    }
    if !overflow && !current.is_empty() {
        lines.push(current);
    }
    if overflow {
        if let Some(last) = lines.last_mut() {
            let keep = columns.saturating_sub(3);
            let mut cut: String = last.chars().take(keep).collect();
            cut.push_str("...");
            *last = cut;
        }
    }
    if lines.is_empty() {
        lines.push(String::new());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(f: &Frame) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&f.y);
        h.update(&f.u);
        h.update(&f.v);
        h.finalize().into()
    }

    fn frame_of(prompt: &str, seed: Option<i64>, index: u32) -> Frame {
        let scene = Scene::new(prompt, seed, 160, 96, 24);
        let mut f = scene.blank_frame();
        scene.draw(index, &mut f);
        f
    }

    #[test]
    fn same_inputs_draw_the_same_frame() {
        assert_eq!(
            checksum(&frame_of("a red fox", Some(7), 10)),
            checksum(&frame_of("a red fox", Some(7), 10))
        );
    }

    #[test]
    fn prompt_and_seed_change_the_picture() {
        let base = checksum(&frame_of("a red fox", None, 0));
        assert_ne!(base, checksum(&frame_of("a blue whale", None, 0)));
        assert_ne!(base, checksum(&frame_of("a red fox", Some(1), 0)));
    }

    #[test]
    fn shapes_move_between_frames() {
        assert_ne!(
            checksum(&frame_of("motion", None, 0)),
            checksum(&frame_of("motion", None, 12))
        );
    }

    #[test]
    fn odd_sizes_and_edges_do_not_panic() {
        for (w, h) in [(64, 64), (66, 64), (3840, 64), (64, 2160)] {
            let scene = Scene::new("edge case with a long prompt that wraps", Some(-1), w, h, 1);
            let mut f = scene.blank_frame();
            for i in 0..5 {
                scene.draw(i * 7, &mut f);
            }
        }
    }

    #[test]
    fn wraps_words_and_marks_overflow() {
        assert_eq!(wrap("one two three", 8, 3), vec!["one two", "three"]);
        assert_eq!(wrap("abcdefghij", 4, 3), vec!["abcd", "efgh", "ij"]);
        let cut = wrap("one two three four five", 7, 2);
        assert_eq!(cut.len(), 2);
        assert!(cut[1].ends_with("..."));
        assert_eq!(wrap("", 5, 2), vec![String::new()]);
    }

    #[test]
    fn palette_colours_are_legal_video_levels() {
        let c = Yuv::from_rgb(1.0, 1.0, 1.0);
        assert_eq!((c.y, c.u, c.v), (235, 128, 128));
        let k = Yuv::from_rgb(0.0, 0.0, 0.0);
        assert_eq!((k.y, k.u, k.v), (16, 128, 128));
    }
}
