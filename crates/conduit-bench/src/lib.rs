//! `conduit-bench` owns the performance measurements of Conduit: it starts the real
//! service binaries against the machine's RabbitMQ and PostgreSQL, loads them, and puts
//! each figure next to a baseline measured on the same machine in the same run (pgbench,
//! wrk, a bare RabbitMQ consumer, ffmpeg), as a ratio. `full` writes the JSON result and
//! regenerates docs/benchmarks.md; `smoke` runs the same code with tiny counts so CI
//! keeps it working, and asserts nothing about speed.

pub mod baseline;
pub mod cpu;
pub mod phases;
pub mod report;
pub mod stats;
pub mod stream;

use std::{path::PathBuf, time::Duration};

pub use report::Report;

/// One measurement of the run, selectable on its own with `conduit-bench only`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Submit rate against pgbench (figure 1).
    Submit,
    /// A generator rendering queued jobs, for its peak RSS (figure 6). Without `submit`
    /// in the same run, the jobs are published straight to the jobs queue.
    Generator,
    /// The sender's drain rate against a bare consumer and wrk (figure 2).
    Delivery,
    /// Event→webhook latency at half the sustainable rate (figure 3).
    Paced,
    /// The same with a hanging receiver (figure 4).
    Isolation,
    /// Two senders against one (figure 7).
    ScaleOut,
    /// Render speed against ffmpeg (figure 5).
    Render,
    /// Idle WebSocket connections on one API process, and status event → stream client
    /// latency beside the webhook latency of the same events (figure 8).
    Stream,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Submit,
        Phase::Generator,
        Phase::Delivery,
        Phase::Paced,
        Phase::Isolation,
        Phase::ScaleOut,
        Phase::Render,
        Phase::Stream,
    ];
}

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Jobs queued for the generator when no submit run queued them.
    pub generator_jobs: usize,
    pub deliveries: usize,
    pub wrk_secs: u64,
    pub paced_secs: u64,
    /// Published before the measured part of a paced or sustained run, and not counted.
    pub paced_warmup: Duration,
    /// Measured part of the sustained-rate run.
    pub sustain_secs: u64,
    /// Paced and isolation runs, taking turns, pooled per kind.
    pub latency_rounds: usize,
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
                generator_jobs: 100,
                deliveries: 20_000,
                wrk_secs: 10,
                paced_secs: 15,
                paced_warmup: Duration::from_secs(2),
                sustain_secs: 8,
                latency_rounds: 2,
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
                generator_jobs: 2,
                deliveries: 200,
                wrk_secs: 1,
                paced_secs: 1,
                paced_warmup: Duration::from_millis(200),
                sustain_secs: 1,
                latency_rounds: 1,
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
    /// The phases to run (all of them for `full` and `smoke`).
    pub phases: Vec<Phase>,
    /// Events per second of the paced runs; measured in the run when not given.
    pub pace: Option<f64>,
}

impl Options {
    pub fn runs(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }

    /// A smoke run against the debug binaries of the workspace's target folder, writing
    /// nothing but returning the report.
    pub fn smoke(bin_dir: PathBuf) -> Self {
        Self {
            mode: Mode::Smoke,
            bin_dir,
            json: None,
            docs: None,
            command: "conduit-bench smoke".into(),
            phases: Phase::ALL.to_vec(),
            pace: None,
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
