//! Every exchange and queue of a Conduit stack, named under its namespace, and the one
//! function that declares them. Declaring is idempotent, so every service declares the
//! whole topology at start-up and the start order never matters.
//!
//! ```text
//!  {ns}            direct exchange; each queue below is bound with its short name
//!   ├─ {ns}.jobs              quorum   API outbox → generators
//!   ├─ {ns}.status            quorum   generators → API ledger
//!   ├─ {ns}.webhooks          quorum   API outbox → webhook senders
//!   ├─ {ns}.webhook-outcomes  quorum   webhook senders → API delivery log
//!   ├─ {ns}.webhooks.dead     quorum   deliveries that exhausted their schedule
//!   └─ {ns}.webhooks.wait.N   classic  TTL N ms, dead-letters back to {ns}.webhooks
//!   └─ {ns}.lifecycle         stream   cancels, checkpoints, marks (also bound to
//!                                        {ns}.control); every generator reads it whole
//!  {ns}.control    fanout exchange the API publishes cancels on
//!  {ns}.stream     fanout exchange of committed task events; each API process binds its
//!                  own exclusive, auto-delete queue and forwards to its stream clients
//! ```

use std::time::Duration;

use anyhow::Context;
use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
    Channel, ExchangeKind,
};

/// Routing keys (and queue-name suffixes) of the direct exchange.
pub mod route {
    pub const JOBS: &str = "jobs";
    pub const STATUS: &str = "status";
    pub const WEBHOOKS: &str = "webhooks";
    pub const OUTCOMES: &str = "webhook-outcomes";
    pub const DEAD_WEBHOOKS: &str = "webhooks.dead";
    /// The stream of attempt lifecycle records (cancels, checkpoints, marks).
    pub const LIFECYCLE: &str = "lifecycle";

    /// Every durable quorum queue of a stack: all queues but the wait buckets
    /// ([`super::WAIT_BUCKETS`]) and the generators' own control queues.
    pub const QUORUM_QUEUES: [&str; 5] = [JOBS, STATUS, WEBHOOKS, OUTCOMES, DEAD_WEBHOOKS];
}

/// How long the lifecycle stream keeps its records: longer than any job waits in the
/// queue or any attempt runs.
pub const LIFECYCLE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Delays of the webhook wait queues. A delivery due later than the largest bucket is
/// parked repeatedly; one due sooner than the smallest goes straight to delivery. With
/// queue-wide TTLs each bucket is strictly FIFO, so no message waits behind a longer one.
pub const WAIT_BUCKETS: [Duration; 8] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(300),
    Duration::from_secs(1_800),
    Duration::from_secs(7_200),
];

/// The largest wait bucket not longer than `remaining`, or `None` when the delivery is due.
pub fn wait_bucket_for(remaining: Duration) -> Option<Duration> {
    WAIT_BUCKETS
        .iter()
        .rev()
        .find(|b| **b <= remaining)
        .copied()
}

/// Names of one stack's exchanges and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    namespace: String,
}

impl Topology {
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The direct exchange every work queue hangs off.
    pub fn exchange(&self) -> String {
        self.namespace.clone()
    }

    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.namespace)
    }

    /// The fanout of committed task events for the real-time stream.
    pub fn stream_exchange(&self) -> String {
        format!("{}.stream", self.namespace)
    }

    /// Full queue name for a routing key of [`route`].
    pub fn queue(&self, route: &str) -> String {
        format!("{}.{route}", self.namespace)
    }

    pub fn wait_route(delay: Duration) -> String {
        format!("webhooks.wait.{}", delay.as_millis())
    }

    /// Declares everything idempotently on `channel`.
    pub async fn declare(&self, channel: &Channel) -> anyhow::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                self.exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {}", self.exchange()))?;
        channel
            .exchange_declare(
                self.control_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {}", self.control_exchange()))?;
        channel
            .exchange_declare(
                self.stream_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange {}", self.stream_exchange()))?;

        for r in route::QUORUM_QUEUES {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            self.declare_bound_queue(channel, r, args).await?;
        }
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert(
            "x-max-age".into(),
            AMQPValue::LongString(format!("{}s", LIFECYCLE_RETENTION.as_secs()).into()),
        );
        self.declare_bound_queue(channel, route::LIFECYCLE, args)
            .await?;
        let lifecycle = self.queue(route::LIFECYCLE);
        channel
            .queue_bind(
                lifecycle.as_str().into(),
                self.control_exchange().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding queue {lifecycle} to the control fanout"))?;
        for delay in WAIT_BUCKETS {
            let mut args = FieldTable::default();
            let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.exchange().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(route::WEBHOOKS.into()),
            );
            self.declare_bound_queue(channel, &Self::wait_route(delay), args)
                .await?;
        }
        Ok(())
    }

    async fn declare_bound_queue(
        &self,
        channel: &Channel,
        route: &str,
        args: FieldTable,
    ) -> anyhow::Result<()> {
        let name = self.queue(route);
        channel
            .queue_declare(
                ShortString::from(name.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .with_context(|| format!("declaring queue {name}"))?;
        channel
            .queue_bind(
                name.as_str().into(),
                self.exchange().into(),
                route.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding queue {name}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_live_under_the_namespace() {
        let t = Topology::new("ns1");
        assert_eq!(t.exchange(), "ns1");
        assert_eq!(t.queue(route::JOBS), "ns1.jobs");
        assert_eq!(t.control_exchange(), "ns1.control");
        assert_eq!(t.stream_exchange(), "ns1.stream");
        assert_eq!(
            t.queue(&Topology::wait_route(Duration::from_secs(5))),
            "ns1.webhooks.wait.5000"
        );
    }

    #[test]
    fn picks_the_largest_bucket_that_fits() {
        assert_eq!(wait_bucket_for(Duration::from_millis(10)), None);
        assert_eq!(
            wait_bucket_for(Duration::from_millis(60)),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            wait_bucket_for(Duration::from_secs(6)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            wait_bucket_for(Duration::from_secs(36_000)),
            Some(Duration::from_secs(7_200))
        );
    }
}
