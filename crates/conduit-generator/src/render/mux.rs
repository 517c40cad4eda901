//! MP4 muxing of an H.264 elementary stream with the `mp4` crate, then a "fast start"
//! rewrite that puts `moov` before `mdat` so a player can start before the whole file
//! has arrived. The `mp4` crate writes fixed (zero) creation times, so the file depends
//! only on the samples.

use std::io::Cursor;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use mp4::{
    AvcConfig, FourCC, MediaConfig, Mp4Config, Mp4Sample, Mp4Writer, TrackConfig, TrackType,
    WriteBox,
};

/// Ticks per frame; the timescale is `fps * TICKS_PER_FRAME`, so every duration is exact.
const TICKS_PER_FRAME: u32 = 1000;

/// One coded picture in AVCC form (each NAL unit prefixed by its 4-byte length).
pub struct Sample {
    pub data: Vec<u8>,
    pub is_sync: bool,
}

/// Builds the muxer's input from the encoder's output.
pub struct Muxer {
    width: u16,
    height: u16,
    fps: u32,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    samples: Vec<Sample>,
}

impl Muxer {
    pub fn new(width: u16, height: u16, fps: u32, frames: usize) -> Self {
        Self {
            width,
            height,
            fps,
            sps: None,
            pps: None,
            samples: Vec::with_capacity(frames),
        }
    }

    /// Starts the sample of the next frame.
    pub fn begin_frame(&mut self) {
        self.samples.push(Sample {
            data: Vec::new(),
            is_sync: false,
        });
    }

    /// Adds one Annex B NAL unit (start code included) of the current frame. Parameter
    /// sets go to the sample description (`avcC`), picture data to the sample.
    pub fn push_nal(&mut self, nal: &[u8]) {
        let nal = strip_start_code(nal);
        let Some(header) = nal.first() else { return };
        match header & 0x1f {
            7 => {
                self.sps.get_or_insert_with(|| nal.to_vec());
            }
            8 => {
                self.pps.get_or_insert_with(|| nal.to_vec());
            }
            kind => {
                let Some(sample) = self.samples.last_mut() else {
                    return;
                };
                sample.is_sync |= kind == 5;
                let len = u32::try_from(nal.len()).unwrap_or(u32::MAX);
                sample.data.extend_from_slice(&len.to_be_bytes());
                sample.data.extend_from_slice(nal);
            }
        }
    }

    pub fn frames(&self) -> usize {
        self.samples.len()
    }

    /// The finished file, `ftyp`, `moov`, `mdat` in that order.
    pub fn finish(self) -> anyhow::Result<Vec<u8>> {
        let (Some(sps), Some(pps)) = (self.sps, self.pps) else {
            bail!("the encoder produced no SPS/PPS");
        };
        ensure!(sps.len() >= 4, "the encoder produced a truncated SPS");
        ensure!(
            self.samples.iter().all(|s| !s.data.is_empty()),
            "the encoder skipped a frame"
        );
        let timescale = self.fps * TICKS_PER_FRAME;
        let config = Mp4Config {
            major_brand: fourcc(b"isom"),
            minor_version: 512,
            compatible_brands: vec![
                fourcc(b"isom"),
                fourcc(b"iso2"),
                fourcc(b"avc1"),
                fourcc(b"mp41"),
            ],
            timescale,
        };
        let size: usize = self.samples.iter().map(|s| s.data.len()).sum();
        let mut writer =
            Mp4Writer::write_start(Cursor::new(Vec::with_capacity(size + 4096)), &config)
                .context("starting MP4")?;
        writer
            .add_track(&TrackConfig {
                track_type: TrackType::Video,
                timescale,
                language: "und".into(),
                media_conf: MediaConfig::AvcConfig(AvcConfig {
                    width: self.width,
                    height: self.height,
                    seq_param_set: sps,
                    pic_param_set: pps,
                }),
            })
            .context("adding the video track")?;
        for (i, sample) in self.samples.into_iter().enumerate() {
            let sample = Mp4Sample {
                start_time: i as u64 * u64::from(TICKS_PER_FRAME),
                duration: TICKS_PER_FRAME,
                rendering_offset: 0,
                is_sync: sample.is_sync,
                bytes: Bytes::from(sample.data),
            };
            writer.write_sample(1, &sample).context("writing sample")?;
        }
        writer.write_end().context("finishing MP4")?;
        fast_start(writer.into_writer().into_inner())
    }
}

fn fourcc(code: &[u8; 4]) -> FourCC {
    FourCC { value: *code }
}

fn strip_start_code(nal: &[u8]) -> &[u8] {
    nal.strip_prefix(&[0, 0, 0, 1])
        .or_else(|| nal.strip_prefix(&[0, 0, 1]))
        .unwrap_or(nal)
}

/// Rewrites `ftyp mdat moov` as `ftyp moov mdat`, moving every chunk offset by the size
/// of `moov`.
fn fast_start(file: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let len = file.len() as u64;
    let reader = mp4::Mp4Reader::read_header(Cursor::new(&file), len)
        .context("reading back the MP4 just written")?;
    let ftyp_len = usize::try_from(mp4::Mp4Box::box_size(&reader.ftyp))?;
    let mut moov = reader.moov;
    let moov_len = usize::try_from(mp4::Mp4Box::box_size(&moov))?;
    let moov_start = file
        .len()
        .checked_sub(moov_len)
        .context("MP4 shorter than its moov")?;
    ensure!(
        file.get(moov_start + 4..moov_start + 8) == Some(b"moov".as_slice()),
        "moov is not the last box of the file"
    );
    ensure!(
        file.get(ftyp_len + 4..ftyp_len + 8) == Some(b"mdat".as_slice()),
        "mdat does not follow ftyp"
    );
    let shift = moov_len as u64;
    for trak in &mut moov.traks {
        let stbl = &mut trak.mdia.minf.stbl;
        if let Some(stco) = &mut stbl.stco {
            for offset in &mut stco.entries {
                *offset = u32::try_from(u64::from(*offset) + shift)
                    .context("video too large for 32-bit chunk offsets")?;
            }
        }
        if let Some(co64) = &mut stbl.co64 {
            for offset in &mut co64.entries {
                *offset += shift;
            }
        }
    }
    let mut out = Vec::with_capacity(file.len());
    out.extend_from_slice(&file[..ftyp_len]);
    moov.write_box(&mut out).context("writing moov")?;
    ensure!(out.len() == ftyp_len + moov_len, "moov changed size");
    out.extend_from_slice(&file[ftyp_len..moov_start]);
    Ok(out)
}
