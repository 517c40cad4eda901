//! `conduit-bench` owns the performance measurements of Conduit: it starts the real
//! service binaries against the machine's RabbitMQ and PostgreSQL, loads them, and puts
//! each figure next to a baseline measured on the same machine in the same run (pgbench,
//! wrk, a bare RabbitMQ consumer, ffmpeg), as a ratio. `full` writes the JSON result and
//! regenerates docs/benchmarks.md; `smoke` runs the same code with tiny counts so CI
//! keeps it working, and asserts nothing about speed.

pub mod baseline;
pub mod phases;
pub mod receiver;
pub mod report;
pub mod stack;
pub mod stats;

use std::{path::PathBuf, time::Duration};

pub use report::Report;

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Full,
    Smoke,
}

/// Counts and durations of one run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub submit_clients: Vec<usize>,
    pub submit_warmup: Duration,
    pub submit_secs: u64,
    pub generator_secs: u64,
    pub deliveries: usize,
    pub wrk_secs: u64,
    pub paced_secs: u64,
    pub hang: Duration,
    pub render_size: (u32, u32),
    pub render_seconds: u32,
    pub drain_timeout: Duration,
}

impl Sizes {
    pub fn for_mode(mode: Mode) -> Self {
        match mode {
            Mode::Full => Self {
                submit_clients: vec![32, 128],
                submit_warmup: Duration::from_secs(2),
                submit_secs: 15,
                generator_secs: 15,
                deliveries: 20_000,
                wrk_secs: 10,
                paced_secs: 20,
                hang: Duration::from_secs(30),
                render_size: (1280, 720),
                render_seconds: 10,
                drain_timeout: Duration::from_secs(120),
            },
            Mode::Smoke => Self {
                submit_clients: vec![2, 4],
                submit_warmup: Duration::from_millis(200),
                submit_secs: 1,
                generator_secs: 1,
                deliveries: 200,
                wrk_secs: 1,
                paced_secs: 1,
                hang: Duration::from_secs(30),
                render_size: (320, 240),
                render_seconds: 1,
                drain_timeout: Duration::from_secs(60),
            },
        }
    }
}

/// What to run and where to write.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Folder holding conduit-api, conduit-generator and conduit-webhook-sender.
    pub bin_dir: PathBuf,
    /// Where the JSON result goes.
    pub json: Option<PathBuf>,
    /// docs/benchmarks.md to regenerate.
    pub docs: Option<PathBuf>,
    /// The command line recorded in the docs.
    pub command: String,
}

impl Options {
    /// A smoke run against the debug binaries of the workspace's target folder, writing
    /// nothing but returning the report.
    pub fn smoke(bin_dir: PathBuf) -> Self {
        Self {
            mode: Mode::Smoke,
            bin_dir,
            json: None,
            docs: None,
            command: "conduit-bench smoke".into(),
        }
    }
}

/// Runs every measurement, writes the JSON and the docs if asked, returns the report.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let report = phases::run_all(&options).await?;
    if let Some(path) = &options.json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = &options.docs {
        report::write_docs(&report, path)?;
    }
    Ok(report)
}
