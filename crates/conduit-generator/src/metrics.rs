//! The generator's Prometheus metrics.

use anyhow::Context;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub jobs_started: IntCounter,
    pub jobs_completed: IntCounter,
    /// By reason: `error`, `timeout`, `interrupted`, `storage`.
    pub jobs_failed: IntCounterVec,
    pub jobs_cancelled: IntCounter,
    pub jobs_in_flight: IntGauge,
    pub render_fps: Histogram,
    pub generation_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let jobs_started = IntCounter::new(
            "conduit_generator_jobs_started_total",
            "Generation jobs started",
        )?;
        let jobs_completed = IntCounter::new(
            "conduit_generator_jobs_completed_total",
            "Generation jobs that produced a stored video",
        )?;
        let jobs_failed = IntCounterVec::new(
            Opts::new(
                "conduit_generator_jobs_failed_total",
                "Generation jobs that failed, by reason",
            ),
            &["reason"],
        )?;
        let jobs_cancelled = IntCounter::new(
            "conduit_generator_jobs_cancelled_total",
            "Generation jobs stopped or skipped because the user cancelled them",
        )?;
        let jobs_in_flight = IntGauge::new(
            "conduit_generator_jobs_in_flight",
            "Generation jobs running in this process",
        )?;
        let render_fps = Histogram::with_opts(
            HistogramOpts::new(
                "conduit_generator_render_frames_per_second",
                "Frames per second of local renders",
            )
            .buckets(vec![
                10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0,
            ]),
        )?;
        let generation_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "conduit_generator_generation_seconds",
                "Wall-clock time of successful generations",
            )
            .buckets(prometheus::exponential_buckets(0.25, 2.0, 14)?),
        )?;
        for c in [
            Box::new(jobs_started.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(jobs_completed.clone()),
            Box::new(jobs_failed.clone()),
            Box::new(jobs_cancelled.clone()),
            Box::new(jobs_in_flight.clone()),
            Box::new(render_fps.clone()),
            Box::new(generation_seconds.clone()),
        ] {
            registry.register(c).context("registering metric")?;
        }
        Ok(Self {
            registry,
            jobs_started,
            jobs_completed,
            jobs_failed,
            jobs_cancelled,
            jobs_in_flight,
            render_fps,
            generation_seconds,
        })
    }
}
