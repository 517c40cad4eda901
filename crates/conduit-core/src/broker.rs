//! One RabbitMQ connection per process, shared by every publisher and consumer in it.
//!
//! The connection is opened in the background, so a service starts (and answers
//! `/readyz` 503) while the broker is away. Once up, lapin's auto-recovery reconnects and
//! replays the topology. Recovery is supervised, never trusted: a connection (or its
//! publish channel) still unusable [`RECOVERY_GRACE`] after it broke is abandoned for a
//! fresh one, and so is a connection on which a consumer's channel did not come back
//! within the same grace (new channels on a connection whose recovery stalled stall
//! too), so a recovery that raced with work in flight and stalled part-way cannot leave
//! a consumer dead while the process lives. Every consumer loop beats a
//! [`crate::health::Heartbeat`] while it can take deliveries, which `/healthz` watches.
//! Every publish waits for the broker's confirm: a nack, an unroutable message or a lost
//! connection is an error the caller sees, never a silent drop. Every consume uses manual
//! acks, a bounded prefetch and a bounded number of handlers in flight.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    tcp::OwnedTLSConfig,
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
};
use serde::Serialize;
use tokio::{
    sync::{mpsc, watch, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};
use uuid::Uuid;

use crate::{
    config::AmqpSettings,
    health::{Health, Heartbeat, IDLE_TICK},
    topology::Topology,
};

/// How long a handler may take to hand its delivery back once shutdown began.
const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// How long a publish may wait for the broker to take and confirm its messages. A
/// broker that is blocked (memory or disk alarm) or a connection that dies without lapin
/// noticing would otherwise hold the caller forever; past this the caller sees an error
/// and republishes later (consumers drop duplicates by id).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a broken connection, its publish channel or a consumer's channel may stay
/// unusable before it is given up and replaced. lapin retries at most every 5 s, so a
/// recovery that works completes well within this once the broker is back; one that
/// stalled part-way never does.
const RECOVERY_GRACE: Duration = Duration::from_secs(12);

/// Longest a settle (ack, nack, reject) may take. On a channel stuck in a recovery it
/// would otherwise wait forever and keep its handler's slot.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Live {
    conn: Arc<Connection>,
    publish: Channel,
}

/// A process's handle on RabbitMQ. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Topology,
    live: watch::Receiver<Option<Live>>,
    health: Health,
    /// Connections a consumer gave up on (a channel of theirs did not recover), for the
    /// supervisor to replace.
    abandon: mpsc::UnboundedSender<Arc<Connection>>,
}

/// Where a message goes: a work queue of the namespace's direct exchange, every
/// generator through the control fanout, or every API process through the stream fanout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Queue(String),
    Control,
    /// Not mandatory: with no API process bound, nobody is listening live.
    Stream,
}

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub target: Target,
    pub body: Vec<u8>,
    pub task_id: Option<Uuid>,
    pub message_id: Option<String>,
    /// W3C trace context carried in the `traceparent` header, so the consumer's spans
    /// continue the producer's trace. Taken from the current span when the message is
    /// made (tracing on only); the outbox keeps it with the row.
    pub traceparent: Option<String>,
}

impl Outgoing {
    /// A JSON message for the work queue with routing key `route`.
    pub fn json<T: Serialize>(route: &str, message: &T) -> anyhow::Result<Self> {
        Ok(Self {
            target: Target::Queue(route.to_owned()),
            body: serde_json::to_vec(message).context("serialising message")?,
            task_id: None,
            message_id: None,
            traceparent: crate::telemetry::current_traceparent(),
        })
    }

    /// A JSON message for the control fanout, which feeds the lifecycle stream (and any
    /// exclusive control queue bound to it).
    pub fn control<T: Serialize>(message: &T) -> anyhow::Result<Self> {
        Ok(Self {
            target: Target::Control,
            body: serde_json::to_vec(message).context("serialising control message")?,
            task_id: None,
            message_id: None,
            traceparent: crate::telemetry::current_traceparent(),
        })
    }

    pub fn for_task(mut self, task_id: Uuid) -> Self {
        self.task_id = Some(task_id);
        self
    }

    pub fn with_message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }
}

/// A message taken from a queue, handed to a consumer's handler.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub redelivered: bool,
    /// How often the broker handed this message out before (quorum queues count
    /// deliveries that were returned or lost with their consumer).
    pub delivery_count: u32,
    pub traceparent: Option<String>,
}

/// What a handler wants done with its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The effect is durable: remove the message.
    Ack,
    /// Not done here: give it back to the queue for another consumer.
    Requeue,
    /// Unprocessable (bad schema): drop it without requeueing.
    Reject,
}

/// What a consumer reads from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A shared work queue, by routing key of [`crate::topology::route`].
    Queue(String),
    /// This process's own exclusive queue on the control fanout.
    Control,
    /// A stream queue, by routing key, read from its first retained message on every
    /// (re)open.
    Stream(String),
    /// This process's own exclusive queue on the `{ns}.stream` fanout of committed task events.
    EventFanout,
}

/// Limits of one consumer.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeLimits {
    pub prefetch: u16,
    pub concurrency: usize,
}

impl Broker {
    /// Starts connecting in the background and returns at once. Topology is declared on
    /// every fresh connection. Stops trying when `shutdown` fires.
    pub fn start(settings: &AmqpSettings, name: &str, shutdown: CancellationToken) -> Self {
        let topology = Topology::new(settings.namespace.clone());
        let (tx, rx) = watch::channel(None);
        let (abandon, abandoned) = mpsc::unbounded_channel();
        let target = Endpoint {
            url: settings.url.expose().to_owned(),
            ca_file: settings.ca_file().map(Path::to_path_buf),
        };
        let conn_name = format!("{name} ({})", settings.namespace);
        let task_topology = topology.clone();
        tokio::spawn(async move {
            supervise(target, conn_name, task_topology, tx, abandoned, shutdown).await;
        });
        Self {
            inner: Arc::new(Inner {
                topology,
                live: rx,
                health: Health::default(),
                abandon,
            }),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The heartbeats of this process's consumers; other work loops (the API's outbox
    /// relay) register here too, so `/healthz` watches them all.
    pub fn health(&self) -> &Health {
        &self.inner.health
    }

    /// True while the connection to the broker is up and messages can be published.
    pub fn is_ready(&self) -> bool {
        self.inner
            .live
            .borrow()
            .as_ref()
            .is_some_and(|l| healthy(&l.conn, &l.publish))
    }

    /// Waits until a connection exists (it may still be recovering).
    async fn live(&self) -> anyhow::Result<Live> {
        let mut rx = self.inner.live.clone();
        let live = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| anyhow!("broker connection supervisor stopped"))?;
        live.clone()
            .ok_or_else(|| anyhow!("broker connection not established"))
    }

    /// Gives up on `current`'s connection: one of its channels did not recover within
    /// the grace, and a new channel on a connection stuck in recovery would not either
    /// (seen after broker restarts racing with work in flight). The supervisor replaces
    /// it; this waits (a few seconds at most) until it did.
    async fn abandon(&self, current: &Live) {
        let _ = self.inner.abandon.send(current.conn.clone());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.replaced(current)).await;
    }

    /// Resolves once the supervisor dropped `current` (for a new connection or none).
    async fn replaced(&self, current: &Live) {
        let mut rx = self.inner.live.clone();
        loop {
            let same = rx
                .borrow_and_update()
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(&l.conn, &current.conn));
            if !same {
                return;
            }
            if rx.changed().await.is_err() {
                // The supervisor is gone (runtime shutting down): nothing will change.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits for a connection for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = tokio::time::Instant::now();
        while !self.is_ready() {
            if start.elapsed() > timeout {
                bail!("RabbitMQ not reachable within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: Outgoing) -> anyhow::Result<()> {
        self.publish_batch(std::slice::from_ref(&message)).await
    }

    /// Publishes all messages back to back, then waits for every confirm. Succeeds only
    /// if the broker took every one of them; a caller that sees an error republishes
    /// the batch (consumers drop duplicates by id). Never waits longer than
    /// [`CONFIRM_TIMEOUT`] for the broker.
    pub async fn publish_batch(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        if !self.is_ready() {
            bail!("RabbitMQ is not connected");
        }
        tokio::time::timeout(CONFIRM_TIMEOUT, self.publish_and_confirm(messages))
            .await
            .map_err(|_| {
                anyhow!(
                    "RabbitMQ did not confirm {} message(s) within {CONFIRM_TIMEOUT:?}",
                    messages.len()
                )
            })?
    }

    async fn publish_and_confirm(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        let live = self.live().await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let exchange = match &m.target {
                Target::Queue(_) => self.inner.topology.exchange(),
                Target::Control => self.inner.topology.control_exchange(),
                Target::Stream => self.inner.topology.stream_exchange(),
            };
            let routing_key = match &m.target {
                Target::Queue(route) => route.as_str(),
                Target::Control | Target::Stream => "",
            };
            let confirm = live
                .publish
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: matches!(m.target, Target::Queue(_)),
                        ..Default::default()
                    },
                    &m.body,
                    properties(m),
                )
                .await
                .context("publishing to RabbitMQ")?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            match confirm
                .await
                .context("waiting for RabbitMQ publisher confirm")?
            {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(returned)) => bail!(
                    "RabbitMQ could not route a message to {} (reply {})",
                    returned.delivery.routing_key,
                    returned.reply_code
                ),
                Confirmation::Nack(_) => bail!("RabbitMQ refused (nacked) a published message"),
            }
        }
        Ok(())
    }

    /// Consumes `source` until `shutdown` fires, running up to `limits.concurrency`
    /// handlers at once. Each handler gets its own child of `shutdown`; once shutdown
    /// begins no new delivery is taken, and deliveries whose handler has not finished
    /// within the grace period go back to the queue.
    pub async fn consume<F, Fut>(
        &self,
        source: Source,
        limits: ConsumeLimits,
        shutdown: CancellationToken,
        handler: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(Incoming, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Disposition> + Send + 'static,
    {
        self.consume_signalling(source, limits, shutdown, None, handler)
            .await
    }

    /// As [`Broker::consume`], and `on_open` is notified each time the consumer is in
    /// place (its queue declared and bound), so a caller can hold other work until then:
    /// a generator takes no job before it reads the lifecycle stream, where it waits for
    /// its marks.
    pub async fn consume_signalling<F, Fut>(
        &self,
        source: Source,
        limits: ConsumeLimits,
        shutdown: CancellationToken,
        on_open: Option<Arc<tokio::sync::Notify>>,
        handler: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(Incoming, CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Disposition> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let permits = Arc::new(Semaphore::new(limits.concurrency.max(1)));
        let mut in_flight = JoinSet::new();
        let label = match &source {
            Source::Queue(r) | Source::Stream(r) => self.inner.topology.queue(r),
            Source::Control => self.inner.topology.control_exchange(),
            Source::EventFanout => self.inner.topology.stream_exchange(),
        };
        // Beats while a delivery can be taken (a delivery handled, or an idle tick on a
        // usable channel); silent while the consumer is gone: no connection, a channel
        // that is not open or still recovering.
        let heartbeat = self.inner.health.heartbeat(format!("consumer {label}"));
        let mut ticks = tokio::time::interval(IDLE_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'session: while !shutdown.is_cancelled() {
            let live = tokio::select! {
                live = self.live() => live?,
                () = shutdown.cancelled() => break,
            };
            // Bounded: on a connection whose recovery is stuck, opening a channel never
            // completes until the supervisor replaces it.
            let opening = tokio::time::timeout(
                Duration::from_secs(10),
                self.open_consumer(&live, &source, limits),
            );
            let opened = tokio::select! {
                opened = opening => opened.unwrap_or_else(|_| Err(anyhow!("timed out opening the consumer"))),
                () = shutdown.cancelled() => break 'session,
            };
            let (channel, mut consumer) = match opened {
                Ok(opened) => opened,
                Err(err) => {
                    warn!(queue = %label, error = %format!("{err:#}"), "cannot consume yet; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue 'session,
                        () = shutdown.cancelled() => break 'session,
                    }
                }
            };
            debug!(queue = %label, "consuming");
            if let Some(on_open) = &on_open {
                on_open.notify_one();
            }
            // Delivery tags restart on a recovered channel, so each recovery gets a
            // settler of its own; the old one settles (or finds poisoned) what is left.
            let mut settler = (!matches!(source, Source::Control | Source::EventFanout))
                .then(|| Settler::spawn(channel.clone()));
            heartbeat.beat();
            // Since when the channel has been seen unusable, if it is now.
            let mut broken_since: Option<tokio::time::Instant> = None;
            loop {
                // Waiting for a free slot (every handler busy) is not a stall while
                // the channel stays usable: the idle tick keeps beating.
                let permit = loop {
                    tokio::select! {
                        p = permits.clone().acquire_owned() => break p.context("consumer semaphore closed")?,
                        () = shutdown.cancelled() => break 'session,
                        _ = ticks.tick() => {
                            if !check_channel(&heartbeat, &channel, &mut broken_since, &label) {
                                self.abandon(&live).await;
                                continue 'session;
                            }
                        }
                    }
                };
                let next = loop {
                    tokio::select! {
                        next = consumer.next() => break next,
                        () = shutdown.cancelled() => {
                            let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
                            let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
                            break 'session;
                        }
                        () = self.replaced(&live) => {
                            warn!(queue = %label, "RabbitMQ connection replaced; consuming on the new one");
                            continue 'session;
                        }
                        _ = ticks.tick() => {
                            if !check_channel(&heartbeat, &channel, &mut broken_since, &label) {
                                self.abandon(&live).await;
                                continue 'session;
                            }
                        }
                    }
                };
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(err)) => {
                        warn!(queue = %label, error = %err, "consumer interrupted; waiting for recovery");
                        // A recovery that does not complete within the grace is given
                        // up: the consumer opens a fresh channel (on a fresh connection,
                        // if the supervisor replaced this one meanwhile).
                        let recovered = tokio::select! {
                            r = tokio::time::timeout(RECOVERY_GRACE, channel.wait_for_recovery(err)) => {
                                match r {
                                    Ok(r) => r.is_ok(),
                                    Err(_) => {
                                        warn!(queue = %label, grace_s = RECOVERY_GRACE.as_secs(), "consumer channel did not recover; replacing the connection");
                                        self.abandon(&live).await;
                                        false
                                    }
                                }
                            }
                            () = self.replaced(&live) => false,
                            () = shutdown.cancelled() => break 'session,
                        };
                        if recovered {
                            heartbeat.beat();
                            broken_since = None;
                            // The recovered channel re-declared this consumer's queue; an
                            // exclusive one lost what was published meanwhile.
                            if let (Some(on_open), true) =
                                (&on_open, matches!(source, Source::EventFanout))
                            {
                                on_open.notify_one();
                            }
                            if settler.is_some() {
                                settler = Some(Settler::spawn(channel.clone()));
                            }
                            continue;
                        }
                        continue 'session;
                    }
                    None => {
                        warn!(queue = %label, "consumer stream ended; reopening");
                        continue 'session;
                    }
                };
                heartbeat.beat();
                broken_since = None;
                let mut delivery = delivery;
                let incoming = incoming(&mut delivery);
                let span = tracing::info_span!("delivery", otel.name = %format!("{label} process"), otel.kind = "consumer", queue = %label, trace_id = tracing::field::Empty);
                crate::telemetry::continue_trace(&span, incoming.traceparent.as_deref());
                let handler = handler.clone();
                let token = shutdown.child_token();
                // lapin closes a channel when its last handle goes, which hands every
                // unsettled delivery back to the queue (counting as a lost delivery). Each
                // handler keeps the channel open until it has settled its own delivery,
                // so one that finishes during the shutdown drain still acks.
                let settle_on = channel.clone();
                let pending = settler.as_ref().map(|s| s.register(&delivery));
                drop(delivery);
                in_flight.spawn(
                    async move {
                        let disposition = handler(incoming, token).await;
                        if let Some(pending) = pending {
                            pending.settle(disposition).await;
                        }
                        drop(settle_on);
                        drop(permit);
                    }
                    .instrument(span),
                );
                while in_flight.try_join_next().is_some() {}
            }
        }
        drain(in_flight, &label).await;
        heartbeat.retire();
        Ok(())
    }

    async fn open_consumer(
        &self,
        live: &Live,
        source: &Source,
        limits: ConsumeLimits,
    ) -> anyhow::Result<(Channel, lapin::Consumer)> {
        let channel = live
            .conn
            .create_channel()
            .await
            .context("opening channel")?;
        channel
            .basic_qos(limits.prefetch, BasicQosOptions::default())
            .await
            .context("setting prefetch")?;
        let (queue, no_ack) = match source {
            Source::Queue(route) | Source::Stream(route) => {
                (self.inner.topology.queue(route), false)
            }
            Source::Control | Source::EventFanout => {
                let exchange = match source {
                    Source::EventFanout => self.inner.topology.stream_exchange(),
                    _ => self.inner.topology.control_exchange(),
                };
                // Named here, not by the server: lapin's recovery re-declares every queue
                // of a channel by name, and the broker refuses a client declaring an
                // `amq.gen-*` name, which would leave the recovery half done.
                let name = format!("{exchange}.{}", Uuid::new_v4().simple());
                channel
                    .queue_declare(
                        name.as_str().into(),
                        QueueDeclareOptions {
                            exclusive: true,
                            auto_delete: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .context("declaring control queue")?;
                channel
                    .queue_bind(
                        name.as_str().into(),
                        exchange.as_str().into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .context("binding control queue")?;
                (name, true)
            }
        };
        let mut consume_args = FieldTable::default();
        if matches!(source, Source::Stream(_)) {
            consume_args.insert(
                "x-stream-offset".into(),
                AMQPValue::LongString("first".into()),
            );
        }
        let consumer = channel
            .basic_consume(
                ShortString::from(queue.as_str()),
                ShortString::from(format!("conduit-{}", Uuid::new_v4().simple())),
                BasicConsumeOptions {
                    no_ack,
                    ..Default::default()
                },
                consume_args,
            )
            .await
            .with_context(|| format!("consuming {queue}"))?;
        Ok((channel, consumer))
    }

    /// Number of messages ready in a work queue (for tests, metrics and benchmarks).
    pub async fn queue_depth(&self, route: &str) -> anyhow::Result<u32> {
        let live = self.live().await?;
        let channel = live
            .conn
            .create_channel()
            .await
            .context("opening channel")?;
        let q = channel
            .queue_declare(
                self.inner.topology.queue(route).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("inspecting queue {route}"))?;
        let _ = channel.close(200, "done".into()).await;
        Ok(q.message_count())
    }
}

/// Longest an ack waits for the deliveries before it to finish too, so that one
/// `multiple` ack settles them all. Only acks wait, never a webhook or a job: the effect
/// is already durable, and the delivery stays unacked (so redelivered after a crash).
const ACK_COALESCE: Duration = Duration::from_millis(5);

/// Settles the deliveries of one consumer channel. Handlers hand their dispositions to
/// it; acks whose deliveries, and every earlier unsettled one, are all done go out as a
/// single `multiple` ack (RabbitMQ then takes one settle command for the lot instead of
/// one per message), the rest one by one once [`ACK_COALESCE`] has passed. A multiple
/// ack never covers a delivery whose handler has not asked for an ack.
struct Settler {
    tx: tokio::sync::mpsc::UnboundedSender<Settle>,
    /// Delivery tags handed to a handler and not yet settled, in order.
    outstanding: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
}

struct Settle {
    tag: u64,
    acker: lapin::Acker,
    disposition: Disposition,
    done: tokio::sync::oneshot::Sender<()>,
    /// When the handler asked; an ack waits at most [`ACK_COALESCE`] after this.
    asked: tokio::time::Instant,
}

/// One delivery's claim on its settler.
struct PendingSettle {
    tag: u64,
    acker: Option<lapin::Acker>,
    tx: tokio::sync::mpsc::UnboundedSender<Settle>,
}

impl Settler {
    fn spawn(channel: Channel) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let outstanding = Arc::<std::sync::Mutex<std::collections::BTreeSet<u64>>>::default();
        tokio::spawn(settle_loop(rx, outstanding.clone(), channel));
        Self { tx, outstanding }
    }

    /// Records `delivery` as handed out; the returned claim settles it.
    fn register(&self, delivery: &lapin::message::Delivery) -> PendingSettle {
        lock(&self.outstanding).insert(delivery.delivery_tag);
        PendingSettle {
            tag: delivery.delivery_tag,
            acker: Some(delivery.acker.clone()),
            tx: self.tx.clone(),
        }
    }
}

impl PendingSettle {
    /// Settles the delivery as `disposition` and waits until that went to the broker.
    async fn settle(mut self, disposition: Disposition) {
        let Some(acker) = self.acker.take() else {
            return;
        };
        let (done, settled) = tokio::sync::oneshot::channel();
        let sent = self.tx.send(Settle {
            tag: self.tag,
            acker,
            disposition,
            done,
            asked: tokio::time::Instant::now(),
        });
        // The settler gives up on each settle after SETTLE_TIMEOUT; this bound is a
        // backstop so a slot is never held by a settle that cannot finish.
        let settled = tokio::time::timeout(SETTLE_TIMEOUT * 2, settled).await;
        if sent.is_err() || !matches!(settled, Ok(Ok(()))) {
            warn!(
                ?disposition,
                "delivery's channel was lost before settling; the broker will redeliver it"
            );
        }
    }
}

impl Drop for PendingSettle {
    /// A handler that never settled (it panicked or was aborted) hands its delivery
    /// back, so a later multiple ack cannot cover it.
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            let (done, _) = tokio::sync::oneshot::channel();
            let _ = self.tx.send(Settle {
                tag: self.tag,
                acker,
                disposition: Disposition::Requeue,
                done,
                asked: tokio::time::Instant::now(),
            });
        }
    }
}

async fn settle_loop(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Settle>,
    outstanding: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
    channel: Channel,
) {
    // Acks asked for but not sent yet, by delivery tag.
    let mut acks: std::collections::BTreeMap<u64, Settle> = std::collections::BTreeMap::new();
    loop {
        let oldest = acks.values().map(|a| a.asked).min();
        let next = match oldest {
            Some(asked) => tokio::select! {
                next = rx.recv() => next,
                () = tokio::time::sleep_until(asked + ACK_COALESCE) => None,
            },
            None => match rx.recv().await {
                Some(next) => Some(next),
                None => break,
            },
        };
        let mut batch: Vec<Settle> = next.into_iter().collect();
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        // Requeues and rejects first (all of them sent before going on): a multiple ack
        // sent after them no longer covers them.
        let mut others = Vec::new();
        for s in batch {
            if s.disposition == Disposition::Ack {
                acks.insert(s.tag, s);
            } else {
                others.push(s);
            }
        }
        settle_each(others, &outstanding).await;
        // The highest tag up to which every unsettled delivery asked for an ack.
        let upto = {
            let outstanding = lock(&outstanding);
            let mut upto = None;
            for tag in outstanding.iter() {
                if !acks.contains_key(tag) {
                    break;
                }
                upto = Some(*tag);
            }
            upto
        };
        if let Some(upto) = upto {
            let covered: Vec<Settle> = {
                let rest = acks.split_off(&(upto + 1));
                std::mem::replace(&mut acks, rest).into_values().collect()
            };
            if let Some(last) = covered.last() {
                let multiple = covered.len() > 1;
                let result = tokio::time::timeout(
                    SETTLE_TIMEOUT,
                    last.acker.ack(BasicAckOptions { multiple }),
                )
                .await
                .unwrap_or_else(|_| Ok(false));
                report_settle(result, Disposition::Ack);
            }
            let mut outstanding = lock(&outstanding);
            for s in covered {
                outstanding.remove(&s.tag);
                let _ = s.done.send(());
            }
        }
        // Acks that waited long enough for the gap before them go out alone.
        let now = tokio::time::Instant::now();
        let due: Vec<u64> = acks
            .iter()
            .filter(|(_, s)| now >= s.asked + ACK_COALESCE)
            .map(|(tag, _)| *tag)
            .collect();
        let due: Vec<Settle> = due.iter().filter_map(|tag| acks.remove(tag)).collect();
        settle_each(due, &outstanding).await;
    }
    // Every handler is gone; settle what was asked for.
    settle_each(
        std::mem::take(&mut acks).into_values().collect(),
        &outstanding,
    )
    .await;
    drop(channel);
}

/// Settles each one on its own, all at once, and tells their handlers.
async fn settle_each(
    settles: Vec<Settle>,
    outstanding: &std::sync::Mutex<std::collections::BTreeSet<u64>>,
) {
    if settles.is_empty() {
        return;
    }
    futures::future::join_all(settles.iter().map(|s| settle_one(&s.acker, s.disposition))).await;
    let mut outstanding = lock(outstanding);
    for s in settles {
        outstanding.remove(&s.tag);
        let _ = s.done.send(());
    }
}

async fn settle_one(acker: &lapin::Acker, disposition: Disposition) {
    let settle = async {
        match disposition {
            Disposition::Ack => acker.ack(BasicAckOptions::default()).await,
            Disposition::Requeue => {
                acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
            }
            Disposition::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
        }
    };
    // A settle that cannot go out in time counts as lost with its channel.
    let result = tokio::time::timeout(SETTLE_TIMEOUT, settle)
        .await
        .unwrap_or(Ok(false));
    report_settle(result, disposition);
}

fn report_settle(result: lapin::Result<bool>, disposition: Disposition) {
    match result {
        Ok(true) => {}
        // lapin poisons the ackers of a channel that closed or was recovered: the
        // delivery tag means nothing on the new channel, and the broker already took the
        // delivery back and hands it out again.
        Ok(false) => {
            warn!(
                ?disposition,
                "delivery's channel was lost before settling; the broker will redeliver it"
            );
        }
        Err(err) => {
            warn!(error = %err, ?disposition, "could not settle delivery; the broker will redeliver it");
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The sets stay consistent even if a holder panicked; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn drain(mut in_flight: JoinSet<()>, label: &str) {
    if in_flight.is_empty() {
        return;
    }
    info!(queue = %label, in_flight = in_flight.len(), "draining in-flight deliveries");
    let finished = tokio::time::timeout(DRAIN_GRACE, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        // Aborted handlers never settle: their deliveries return to the queue when the
        // channel closes.
        warn!(queue = %label, "handlers did not finish in time; their deliveries go back to the queue");
        in_flight.abort_all();
    }
}

/// What the handler gets; the body moves out of the delivery (only its acker is kept).
fn incoming(delivery: &mut lapin::message::Delivery) -> Incoming {
    let headers = delivery.properties.headers().as_ref();
    let header = |name: &str| headers.and_then(|h| h.inner().get(name));
    let delivery_count = header("x-delivery-count").and_then(as_u32).unwrap_or(0);
    let traceparent = header("traceparent").and_then(|v| match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    });
    Incoming {
        body: std::mem::take(&mut delivery.data),
        routing_key: delivery.routing_key.to_string(),
        redelivered: delivery.redelivered,
        delivery_count,
        traceparent,
    }
}

fn as_u32(v: &AMQPValue) -> Option<u32> {
    let n: i64 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => *n,
        _ => return None,
    };
    u32::try_from(n).ok()
}

fn properties(m: &Outgoing) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "schema-version".into(),
        AMQPValue::LongInt(crate::messages::SCHEMA_VERSION.into()),
    );
    if let Some(traceparent) = &m.traceparent {
        headers.insert(
            crate::telemetry::TRACEPARENT.into(),
            AMQPValue::LongString(traceparent.as_str().into()),
        );
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0))
        .with_headers(headers);
    if let Some(id) = &m.message_id {
        props = props.with_message_id(id.as_str().into());
    }
    props
}

/// The connection is up and the publish channel is usable (lapin recovers channels one
/// by one after the connection, and a channel the broker closed never comes back).
fn healthy(conn: &Connection, publish: &Channel) -> bool {
    conn.status().connected() && publish.status().connected()
}

/// Where the broker is: its URL and, for `amqps://`, an extra CA file.
struct Endpoint {
    url: String,
    ca_file: Option<PathBuf>,
}

impl Endpoint {
    /// The TLS settings of one connection attempt: the CA file, read afresh (so a rotated
    /// file is picked up), trusted next to the system roots.
    fn tls(&self) -> anyhow::Result<OwnedTLSConfig> {
        let Some(path) = &self.ca_file else {
            return Ok(OwnedTLSConfig::default());
        };
        // Checks the file the same way configuration loading did; lapin parses it again.
        crate::tls::read_pem_certificates(path, "amqp.ca_file")?;
        let pem = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("amqp.ca_file: cannot read {}: {e}", path.display()))?;
        Ok(OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pem),
        })
    }

    /// Says what was refused when the broker's certificate is not trusted.
    fn refusal(&self, err: &anyhow::Error) -> Option<String> {
        let tls = err.chain().find_map(crate::tls::rustls_error)?;
        let trust = match &self.ca_file {
            Some(path) => format!("amqp.ca_file {} and the system roots", path.display()),
            None => "the system roots (amqp.ca_file is not set)".to_owned(),
        };
        Some(if crate::tls::is_certificate_refusal(tls) {
            format!("the broker's TLS certificate was refused ({tls}); trusted: {trust}")
        } else {
            format!("the TLS handshake with the broker failed ({tls}); trusted: {trust}")
        })
    }
}

async fn supervise(
    target: Endpoint,
    name: String,
    topology: Topology,
    tx: watch::Sender<Option<Live>>,
    mut abandoned: mpsc::UnboundedReceiver<Arc<Connection>>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = connect(&target, &name, &topology);
        let result = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(10), attempt) => r.unwrap_or_else(|_| Err(anyhow!("timed out connecting"))),
            () = shutdown.cancelled() => return,
        };
        match result {
            Ok(live) => {
                info!(connection = %name, "connected to RabbitMQ");
                let conn = live.conn.clone();
                let publish = live.publish.clone();
                tx.send_replace(Some(live));
                delay = Duration::from_millis(100);
                // lapin recovers the connection by itself. Replaced here: a connection it
                // gave up on, and one whose recovery has not made it (and its publish
                // channel) usable within the grace, which a recovery racing with work in
                // flight was seen to leave stalled for good. While the broker is down the
                // replacement simply fails to connect and retries.
                let mut broken_since: Option<tokio::time::Instant> = None;
                loop {
                    let given_up = tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => false,
                        // Requests about connections already replaced are stale.
                        Some(by_consumer) = abandoned.recv() => Arc::ptr_eq(&by_consumer, &conn),
                        () = shutdown.cancelled() => {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                conn.close(200, "shutting down".into()),
                            )
                            .await;
                            return;
                        }
                    };
                    if given_up {
                        warn!(connection = %name, "a consumer channel did not recover on this RabbitMQ connection; replacing it");
                        break;
                    }
                    let status = conn.status();
                    if status.closed() || (status.errored() && !status.reconnecting()) {
                        warn!(connection = %name, "RabbitMQ connection lost for good; reconnecting");
                        break;
                    }
                    if healthy(&conn, &publish) {
                        broken_since = None;
                        continue;
                    }
                    let since = *broken_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= RECOVERY_GRACE {
                        warn!(
                            connection = %name,
                            grace_s = RECOVERY_GRACE.as_secs(),
                            connection_status = ?status,
                            publish_channel_status = ?publish.status(),
                            "RabbitMQ connection did not recover; replacing it"
                        );
                        break;
                    }
                }
                // Publishers fail fast and consumers wait for the new connection instead
                // of working on the old one.
                tx.send_replace(None);
                tokio::spawn(retire(conn, name.clone()));
            }
            Err(err) => {
                // A refused certificate is retried like an outage (the broker's
                // certificate or the CA file may be fixed without restarting the
                // service; /readyz says 503 meanwhile), but logged as the error it is
                // when lapin hands it back. (While lapin retries the handshake itself,
                // rustls' verifier logs each refusal at ERROR.)
                if let Some(refusal) = target.refusal(&err) {
                    error!(connection = %name, error = %format!("{err:#}"), retry_in_ms = delay.as_millis() as u64, "RabbitMQ refused: {refusal}");
                } else {
                    warn!(connection = %name, error = %format!("{err:#}"), retry_in_ms = delay.as_millis() as u64, "RabbitMQ not reachable");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Closes a replaced connection. One still recovering cannot be closed now (lapin only
/// closes a connected one), and if its recovery completed later, the consumers it
/// replays would hold deliveries nobody handles: so it is watched and closed as soon
/// as it is connected again, or dropped once lapin gave it up.
async fn retire(conn: Arc<Connection>, name: String) {
    let watch_for = Duration::from_secs(600);
    let started = tokio::time::Instant::now();
    while started.elapsed() < watch_for {
        let status = conn.status();
        if status.closed() || (status.errored() && !status.reconnecting()) {
            return;
        }
        if status.connected() {
            let closed =
                tokio::time::timeout(Duration::from_secs(5), conn.close(200, "replaced".into()))
                    .await;
            if matches!(closed, Ok(Ok(()))) {
                debug!(connection = %name, "replaced RabbitMQ connection closed");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    warn!(connection = %name, "replaced RabbitMQ connection never closed; dropping it");
}

/// Beats `heartbeat` while `channel` is usable. False once it has been unusable for
/// longer than [`RECOVERY_GRACE`]: the consumer then opens a new one.
fn check_channel(
    heartbeat: &Heartbeat,
    channel: &Channel,
    broken_since: &mut Option<tokio::time::Instant>,
    label: &str,
) -> bool {
    if channel.status().connected() {
        *broken_since = None;
        heartbeat.beat();
        return true;
    }
    let since = *broken_since.get_or_insert_with(tokio::time::Instant::now);
    if since.elapsed() < RECOVERY_GRACE {
        return true;
    }
    warn!(
        queue = %label,
        grace_s = RECOVERY_GRACE.as_secs(),
        channel_status = ?channel.status(),
        "consumer channel did not recover; replacing the connection"
    );
    false
}

async fn connect(target: &Endpoint, name: &str, topology: &Topology) -> anyhow::Result<Live> {
    let tls = target.tls()?;
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .enable_auto_recover()
        .configure_backoff(|b| {
            b.with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times()
        });
    crate::tls::install_crypto_provider();
    let runtime = lapin::runtime::default_runtime().context("starting the AMQP runtime")?;
    let conn = Connection::connect_with_config(&target.url, props, tls, runtime)
        .await
        .context("connecting to RabbitMQ")?;
    let publish = conn.create_channel().await.context("opening channel")?;
    topology.declare(&publish).await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(Live {
        conn: Arc::new(conn),
        publish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traceparent_header_is_the_message_s_own() {
        let mut m = Outgoing::json("jobs", &serde_json::json!({})).expect("serialises");
        assert!(properties(&m)
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("traceparent"))
            .is_none());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        m.traceparent = Some(tp.to_owned());
        let props = properties(&m);
        let header = props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("traceparent"));
        assert!(matches!(header, Some(AMQPValue::LongString(s)) if s.to_string() == tp));
    }

    #[test]
    fn delivery_counts_parse_from_any_integer() {
        assert_eq!(as_u32(&AMQPValue::LongLongInt(3)), Some(3));
        assert_eq!(as_u32(&AMQPValue::LongInt(2)), Some(2));
        assert_eq!(as_u32(&AMQPValue::LongLongInt(-1)), None);
        assert_eq!(as_u32(&AMQPValue::Boolean(true)), None);
    }
}
