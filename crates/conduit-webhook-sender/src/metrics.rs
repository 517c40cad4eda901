//! The sender's Prometheus metrics.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Label values of `conduit_webhook_attempts_total`.
pub mod outcome {
    pub const DELIVERED: &str = "delivered";
    pub const FAILED: &str = "failed";
    pub const DROPPED: &str = "dropped";
    pub const REFUSED: &str = "refused";
}

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// By outcome: `delivered`, `failed`, `dropped` (410) or `refused` (target guard).
    pub attempts: IntCounterVec,
    /// Duration of each attempt's HTTP exchange, by the same outcomes.
    pub attempt_duration: HistogramVec,
    /// From the event (`occurred_at`) to its 2xx, by event.
    pub event_to_delivery: HistogramVec,
    pub in_flight: IntGauge,
    /// Deliveries put back in a wait queue, by reason: `scheduled`, `host_busy`, `task_busy`.
    pub parked: IntCounterVec,
    /// Progress webhooks not sent because their task's terminal webhook went first.
    pub superseded: IntCounter,
    /// Deliveries that exhausted their schedule and went to the dead-letter queue.
    pub dead_lettered: IntCounter,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let attempts = IntCounterVec::new(
            Opts::new(
                "conduit_webhook_attempts_total",
                "Webhook attempts, by outcome",
            ),
            &["outcome"],
        )?;
        let event_to_delivery = HistogramVec::new(
            HistogramOpts::new(
                "conduit_webhook_event_to_delivery_seconds",
                "Time from an event to the 2xx of its webhook, retries included",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                1_800.0, 7_200.0, 36_000.0, 108_000.0,
            ]),
            &["event"],
        )?;
        let attempt_duration = HistogramVec::new(
            HistogramOpts::new(
                "conduit_webhook_attempt_duration_seconds",
                "Time one webhook attempt took (request and answer), by outcome",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["outcome"],
        )?;
        let in_flight = IntGauge::new(
            "conduit_webhook_deliveries_in_flight",
            "Webhook requests in flight in this process",
        )?;
        let parked = IntCounterVec::new(
            Opts::new(
                "conduit_webhook_parked_total",
                "Deliveries parked in a wait queue, by reason",
            ),
            &["reason"],
        )?;
        let superseded = IntCounter::new(
            "conduit_webhook_progress_superseded_total",
            "Progress webhooks not sent because the task's terminal webhook was delivered",
        )?;
        let dead_lettered = IntCounter::new(
            "conduit_webhook_dead_lettered_total",
            "Deliveries moved to the dead-letter queue",
        )?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(event_to_delivery.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(parked.clone()))?;
        registry.register(Box::new(superseded.clone()))?;
        registry.register(Box::new(dead_lettered.clone()))?;
        registry.register(Box::new(attempt_duration.clone()))?;
        conduit_core::ops::register_process_metrics(&registry)?;
        // Every outcome and reason is served from the start, so rates and ratios over
        // them have series before the first event.
        for o in [
            outcome::DELIVERED,
            outcome::FAILED,
            outcome::DROPPED,
            outcome::REFUSED,
        ] {
            attempts.with_label_values(&[o]);
            attempt_duration.with_label_values(&[o]);
        }
        for reason in ["scheduled", "task_busy", "host_busy"] {
            parked.with_label_values(&[reason]);
        }
        for event in ["progress", "completed", "failed", "cancelled"] {
            event_to_delivery.with_label_values(&[event]);
        }
        Ok(Self {
            registry,
            attempts,
            attempt_duration,
            event_to_delivery,
            in_flight,
            parked,
            superseded,
            dead_lettered,
        })
    }
}
