//! The API's broker consumers: generators' status events and webhook senders' attempt
//! outcomes, each handed to the [`TaskLedger`](crate::ledger::TaskLedger). A delivery is
//! acknowledged only once the ledger committed its effect; while the database is away it
//! stays unacknowledged and is retried.

use std::{sync::Arc, time::Duration};

use conduit_core::{
    messages::{AttemptOutcome, StatusEvent, SCHEMA_VERSION},
    topology::route,
    Broker, ConsumeLimits, Disposition, Incoming, Source,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::{
    ledger::{Applied, LedgerError, TaskLedger},
    metrics::Metrics,
};

/// What the consumers share.
#[derive(Clone)]
pub(crate) struct Consumers {
    pub(crate) ledger: Arc<TaskLedger>,
    pub(crate) broker: Broker,
    pub(crate) metrics: Metrics,
    pub(crate) limits: ConsumeLimits,
}

/// Retries `work` while the database is away (keeping the delivery unacknowledged) and
/// a few times on other errors, then hands the delivery back.
async fn with_retries<T, F, Fut>(what: &str, shutdown: &CancellationToken, mut work: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0;
    loop {
        match work().await {
            Ok(v) => return Some(v),
            Err(err) => {
                let transient = err.is_unavailable();
                failures += 1;
                warn!(error = %format!("{err:#}"), transient, "{what} failed");
                if !transient && failures >= 3 {
                    return None;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn on_status(
    state: Consumers,
    incoming: Incoming,
    shutdown: CancellationToken,
) -> Disposition {
    let event: StatusEvent = match serde_json::from_slice(&incoming.body) {
        Ok(e) => e,
        Err(err) => {
            warn!(error = %err, "unreadable status event; rejecting it");
            return Disposition::Reject;
        }
    };
    if event.v > SCHEMA_VERSION {
        warn!(
            v = event.v,
            "status event of an unknown schema version; rejecting it"
        );
        return Disposition::Reject;
    }
    let span = tracing::info_span!("status_event", task_id = %event.task_id, attempt = event.attempt, seq = event.seq);
    async {
        let Some(applied) = with_retries("applying a status event", &shutdown, || {
            state.ledger.apply_status(&event)
        })
        .await
        else {
            return Disposition::Requeue;
        };
        match applied {
            Applied::Applied { recorded } => {
                state
                    .metrics
                    .ledger_events
                    .with_label_values(&["applied"])
                    .inc();
                debug!(recorded, "applied status event");
                if event.kind.is_terminal() {
                    info!("task reached its terminal state");
                }
            }
            Applied::Dropped(why) => {
                state
                    .metrics
                    .ledger_events
                    .with_label_values(&[why.as_str()])
                    .inc();
                debug!(reason = why.as_str(), "dropped status event");
            }
        }
        Disposition::Ack
    }
    .instrument(span)
    .await
}

async fn on_outcome(
    state: Consumers,
    incoming: Incoming,
    shutdown: CancellationToken,
) -> Disposition {
    let outcome: AttemptOutcome = match serde_json::from_slice(&incoming.body) {
        Ok(o) => o,
        Err(err) => {
            warn!(error = %err, "unreadable webhook outcome; rejecting it");
            return Disposition::Reject;
        }
    };
    if outcome.v > SCHEMA_VERSION {
        return Disposition::Reject;
    }
    let span = tracing::info_span!("webhook_outcome", task_id = %outcome.task_id, webhook_id = %outcome.webhook_id);
    async {
        match with_retries("recording a webhook outcome", &shutdown, || {
            state.ledger.record_outcome(&outcome)
        })
        .await
        {
            Some(_) => {
                state
                    .metrics
                    .webhook_outcomes
                    .with_label_values(&[outcome.state.as_str()])
                    .inc();
                Disposition::Ack
            }
            None => Disposition::Requeue,
        }
    }
    .instrument(span)
    .await
}

/// Each consumer may hold a quarter of the pool, so a burst of events never starves the
/// HTTP handlers of connections.
pub(crate) fn limits(pool_size: usize, prefetch: u16) -> ConsumeLimits {
    let concurrency = (pool_size / 4).max(1);
    ConsumeLimits {
        prefetch: prefetch
            .min(u16::try_from(concurrency * 4).unwrap_or(u16::MAX))
            .max(1),
        concurrency,
    }
}

impl Consumers {
    /// Consumes status events until `shutdown`.
    pub(crate) async fn run_status(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let broker = self.broker.clone();
        let limits = self.limits;
        broker
            .consume(
                Source::Queue(route::STATUS.into()),
                limits,
                shutdown,
                move |incoming, token| on_status(self.clone(), incoming, token),
            )
            .await
    }

    /// Consumes webhook attempt outcomes until `shutdown`.
    pub(crate) async fn run_outcomes(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let broker = self.broker.clone();
        let limits = self.limits;
        broker
            .consume(
                Source::Queue(route::OUTCOMES.into()),
                limits,
                shutdown,
                move |incoming, token| on_outcome(self.clone(), incoming, token),
            )
            .await
    }
}
