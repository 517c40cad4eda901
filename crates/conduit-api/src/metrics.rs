//! The API's Prometheus metrics, registered in the registry `/metrics` serves.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    pub(crate) http_requests: IntCounterVec,
    pub(crate) http_duration: HistogramVec,
    pub(crate) tasks_submitted: IntCounterVec,
    pub(crate) submit_batch_size: Histogram,
    pub(crate) outbox_depth: IntGauge,
    pub(crate) outbox_oldest_age_seconds: IntGauge,
    pub(crate) outbox_published: IntCounter,
    pub(crate) outbox_publish_failures: IntCounter,
    pub(crate) stream_unnumbered: IntGauge,
    pub(crate) ledger_events: IntCounterVec,
    pub(crate) webhook_outcomes: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "conduit_api_http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "conduit_api_http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["route", "method"],
        )?;
        let tasks_submitted = IntCounterVec::new(
            Opts::new(
                "conduit_api_tasks_submitted_total",
                "Tasks accepted (202) by model",
            ),
            &["model"],
        )?;
        let submit_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "conduit_api_submit_batch_size",
                "Submits written per transaction by the group-commit writer",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )?;
        let outbox_depth = IntGauge::new(
            "conduit_api_outbox_depth",
            "Outbox rows written but not yet published",
        )?;
        let outbox_oldest_age_seconds = IntGauge::new(
            "conduit_api_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row",
        )?;
        let stream_unnumbered = IntGauge::new(
            "conduit_api_stream_unnumbered",
            "Committed stream events the sequencer has not numbered (and published) yet",
        )?;
        let outbox_published = IntCounter::new(
            "conduit_api_outbox_published_total",
            "Outbox messages published to RabbitMQ (confirmed)",
        )?;
        let outbox_publish_failures = IntCounter::new(
            "conduit_api_outbox_publish_failures_total",
            "Outbox batches RabbitMQ did not confirm (retried)",
        )?;
        let ledger_events = IntCounterVec::new(
            Opts::new(
                "conduit_api_ledger_events_total",
                "Status events by result: applied, or dropped as stale, duplicate or after a terminal state",
            ),
            &["result"],
        )?;
        let webhook_outcomes = IntCounterVec::new(
            Opts::new(
                "conduit_api_webhook_outcomes_total",
                "Webhook attempt outcomes recorded, by state",
            ),
            &["state"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(tasks_submitted.clone()))?;
        registry.register(Box::new(submit_batch_size.clone()))?;
        registry.register(Box::new(outbox_depth.clone()))?;
        registry.register(Box::new(outbox_oldest_age_seconds.clone()))?;
        registry.register(Box::new(outbox_published.clone()))?;
        registry.register(Box::new(outbox_publish_failures.clone()))?;
        registry.register(Box::new(stream_unnumbered.clone()))?;
        registry.register(Box::new(ledger_events.clone()))?;
        registry.register(Box::new(webhook_outcomes.clone()))?;
        conduit_core::ops::register_process_metrics(&registry)?;
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            tasks_submitted,
            submit_batch_size,
            outbox_depth,
            outbox_oldest_age_seconds,
            outbox_published,
            outbox_publish_failures,
            stream_unnumbered,
            ledger_events,
            webhook_outcomes,
        })
    }
}
