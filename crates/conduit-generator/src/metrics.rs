//! The generator's Prometheus metrics.

use anyhow::Context;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

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
    /// Successful generations, by `model` and `provider`.
    pub generation_seconds: HistogramVec,
    /// Tasks this process finished, by `model`, `provider` and `outcome`
    /// (`completed`, `failed`, `timed_out`, `cancelled`).
    pub tasks_finished: IntCounterVec,
    /// Failures the provider reported, by `provider` and `kind` (see [`error_kind`]).
    pub provider_errors: IntCounterVec,
    /// Jobs given back to the queue at shutdown.
    pub jobs_handed_back: IntCounter,
}

/// The kinds of provider error `conduit_generator_provider_errors_total` counts.
pub const ERROR_KINDS: [&str; 6] = [
    "rate_limit",
    "auth",
    "balance",
    "content_policy",
    "timeout",
    "other",
];

/// Classifies a provider failure by its message, for the provider-error metric.
pub fn error_kind(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| m.contains(w));
    if any(&["rate limit", "429", "too many requests", "try again later"]) {
        "rate_limit"
    } else if any(&[
        "401",
        "403",
        "unauthori",
        "forbidden",
        "api key",
        "authenticat",
        "invalid token",
    ]) {
        "auth"
    } else if any(&[
        "balance",
        "quota",
        "insufficient",
        "billing",
        "payment",
        "credit",
    ]) {
        "balance"
    } else if any(&[
        "content",
        "policy",
        "moderation",
        "safety",
        "sensitive",
        "nsfw",
    ]) {
        "content_policy"
    } else if any(&["timed out", "timeout"]) {
        "timeout"
    } else {
        "other"
    }
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
        let generation_seconds = HistogramVec::new(
            HistogramOpts::new(
                "conduit_generator_generation_seconds",
                "Wall-clock time of successful generations, by model and provider",
            )
            .buckets(prometheus::exponential_buckets(0.25, 2.0, 14)?),
            &["model", "provider"],
        )?;
        let tasks_finished = IntCounterVec::new(
            Opts::new(
                "conduit_generator_tasks_finished_total",
                "Tasks finished by this process, by model, provider and outcome",
            ),
            &["model", "provider", "outcome"],
        )?;
        let provider_errors = IntCounterVec::new(
            Opts::new(
                "conduit_generator_provider_errors_total",
                "Generations the provider failed, by provider and error kind",
            ),
            &["provider", "kind"],
        )?;
        let jobs_handed_back = IntCounter::new(
            "conduit_generator_jobs_handed_back_total",
            "Unfinished jobs given back to the queue at shutdown",
        )?;
        // Every reason and kind is served from the start, so a rate or an alert over
        // them has a series before the first failure.
        for reason in ["error", "timeout", "storage", "interrupted"] {
            jobs_failed.with_label_values(&[reason]);
        }
        for c in [
            Box::new(jobs_started.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(jobs_completed.clone()),
            Box::new(jobs_failed.clone()),
            Box::new(jobs_cancelled.clone()),
            Box::new(jobs_in_flight.clone()),
            Box::new(render_fps.clone()),
            Box::new(generation_seconds.clone()),
            Box::new(tasks_finished.clone()),
            Box::new(provider_errors.clone()),
            Box::new(jobs_handed_back.clone()),
        ] {
            registry.register(c).context("registering metric")?;
        }
        conduit_core::ops::register_process_metrics(&registry)?;
        Ok(Self {
            registry,
            jobs_started,
            jobs_completed,
            jobs_failed,
            jobs_cancelled,
            jobs_in_flight,
            render_fps,
            generation_seconds,
            tasks_finished,
            provider_errors,
            jobs_handed_back,
        })
    }

    /// Starts the per-provider series at 0 for the remote providers this process runs.
    pub fn init_providers<'a>(&self, providers: impl IntoIterator<Item = &'a str>) {
        for provider in providers.into_iter().filter(|p| *p != "local") {
            for kind in ERROR_KINDS {
                self.provider_errors.with_label_values(&[provider, kind]);
            }
        }
    }
}
