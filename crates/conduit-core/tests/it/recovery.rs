//! A consumer and a publisher outlive the broker closing their connection: readiness
//! comes back by itself and every confirmed message is consumed, none lost.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use conduit_core::{
    broker::{ConsumeLimits, Disposition, Source},
    topology::route,
    Outgoing,
};
use conduit_testkit::eventually;
use tokio_util::sync::CancellationToken;

use crate::support::{body_text, close_connections_named, Namespace, Probe, PATIENCE};

/// Publishes `id` until the broker confirms it, as a service's outbox would.
async fn publish_until_confirmed(broker: &conduit_core::Broker, id: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let message = Outgoing::json(route::JOBS, &id).expect("serialisable");
        match tokio::time::timeout(PATIENCE, broker.publish(message)).await {
            Ok(Ok(())) => return,
            Ok(Err(_)) => {}
            Err(_) => panic!("publish of {id} hung"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never confirmed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_consumer_survives_the_broker_closing_its_connection() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let label = format!("it-recovery-{}", uuid::Uuid::new_v4().simple());
    let broker = ns.ready_broker(&label, &shutdown).await;
    let mut probe = Probe::start(&broker, route::JOBS, |_| Disposition::Ack);

    let mut confirmed = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for i in 0..10 {
        let id = format!("before-{i}");
        publish_until_confirmed(&broker, &id).await;
        confirmed.insert(id);
    }
    while seen.len() < confirmed.len() {
        seen.insert(body_text(&probe.next(PATIENCE).await.expect("delivered")));
    }

    let connection = format!("{label} ({})", ns.name());
    let closed = close_connections_named(&connection)
        .await
        .expect("rabbitmqctl closes the connection");
    assert_eq!(closed, 1, "exactly this test's connection was closed");

    for i in 0..20 {
        let id = format!("after-{i}");
        publish_until_confirmed(&broker, &id).await;
        confirmed.insert(id);
    }
    eventually("the broker is ready again", PATIENCE, || async {
        broker.is_ready().then_some(())
    })
    .await;
    while !confirmed.is_subset(&seen) {
        let got = probe.next(PATIENCE).await.unwrap_or_else(|| {
            panic!(
                "confirmed but never consumed: {:?}",
                confirmed.difference(&seen).collect::<Vec<_>>()
            )
        });
        seen.insert(body_text(&got));
    }
    probe.stop().await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_second_close_is_survived_too() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let label = format!("it-recovery-twice-{}", uuid::Uuid::new_v4().simple());
    let broker = ns.ready_broker(&label, &shutdown).await;
    let mut probe = Probe::start(&broker, route::JOBS, |_| Disposition::Ack);
    let connection = format!("{label} ({})", ns.name());

    for round in 0..2 {
        let id = format!("round-{round}");
        publish_until_confirmed(&broker, &id).await;
        let got = probe.next(PATIENCE).await.expect("delivered");
        assert_eq!(body_text(&got), id);
        assert_eq!(
            close_connections_named(&connection)
                .await
                .expect("rabbitmqctl"),
            1
        );
        eventually("the broker is ready again", PATIENCE, || async {
            broker.is_ready().then_some(())
        })
        .await;
    }
    publish_until_confirmed(&broker, "last").await;
    let got = probe
        .next(PATIENCE)
        .await
        .expect("delivered after two closes");
    assert_eq!(body_text(&got), "last");
    probe.stop().await;
    shutdown.cancel();
}

#[tokio::test]
async fn batches_interrupted_by_a_lost_connection_return_and_confirmed_ones_are_kept() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let label = format!("it-recovery-batch-{}", uuid::Uuid::new_v4().simple());
    let broker = ns.ready_broker(&label, &shutdown).await;
    let connection = format!("{label} ({})", ns.name());

    // Publish batches back to back, so the close lands in the middle of one (or
    // between two), and count what the broker confirmed.
    const BATCH: usize = 300;
    let stop = CancellationToken::new();
    let (first_tx, first_confirmed) = tokio::sync::oneshot::channel();
    let publisher = {
        let broker = broker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut first_tx = Some(first_tx);
            let (mut confirmed, mut failed, mut round) = (0usize, 0usize, 0usize);
            while !stop.is_cancelled() {
                let batch: Vec<Outgoing> = (0..BATCH)
                    .map(|i| {
                        Outgoing::json(route::JOBS, &format!("r{round}-{i}")).expect("serialisable")
                    })
                    .collect();
                round += 1;
                let outcome = tokio::time::timeout(PATIENCE, broker.publish_batch(&batch))
                    .await
                    .expect("publish_batch returns instead of hanging");
                match outcome {
                    Ok(()) => {
                        confirmed += BATCH;
                        if let Some(tx) = first_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (confirmed, failed)
        })
    };
    first_confirmed.await.expect("a first batch is confirmed");
    assert_eq!(
        close_connections_named(&connection)
            .await
            .expect("rabbitmqctl"),
        1
    );
    eventually("the broker is ready again", PATIENCE, || async {
        broker.is_ready().then_some(())
    })
    .await;
    // Let a few batches go through on the recovered connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let (confirmed, _failed) = tokio::time::timeout(PATIENCE, publisher)
        .await
        .expect("the publisher stops")
        .expect("no panic");
    let depth = broker.queue_depth(route::JOBS).await.expect("depth") as usize;
    assert!(
        depth >= confirmed,
        "every confirmed message is in the queue: {depth} < {confirmed}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_delivery_held_across_a_lost_connection_is_redelivered() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let label = format!("it-recovery-held-{}", uuid::Uuid::new_v4().simple());
    let broker = ns.ready_broker(&label, &shutdown).await;
    let connection = format!("{label} ({})", ns.name());

    // The first delivery of "held" is acked only after the connection it came on is
    // gone: that ack cannot count, so the broker must hand the message out again.
    let release = Arc::new(tokio::sync::Notify::new());
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let consumer = {
        let broker = broker.clone();
        let stop = stop.clone();
        let release = release.clone();
        tokio::spawn(async move {
            broker
                .consume(
                    Source::Queue(route::JOBS.into()),
                    ConsumeLimits {
                        prefetch: 10,
                        concurrency: 4,
                    },
                    stop,
                    move |incoming, _cancel| {
                        let release = release.clone();
                        let seen_tx = seen_tx.clone();
                        async move {
                            let first_time = body_text(&incoming) == "held"
                                && incoming.delivery_count == 0
                                && !incoming.redelivered;
                            let _ = seen_tx.send(incoming);
                            if first_time {
                                release.notified().await;
                            }
                            Disposition::Ack
                        }
                    },
                )
                .await
        })
    };
    publish_until_confirmed(&broker, "held").await;
    let first = tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("delivered")
        .expect("consumer alive");
    assert_eq!(body_text(&first), "held");

    assert_eq!(
        close_connections_named(&connection)
            .await
            .expect("rabbitmqctl"),
        1
    );
    eventually("the broker is ready again", PATIENCE, || async {
        broker.is_ready().then_some(())
    })
    .await;
    release.notify_one();

    let again = tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("the held delivery comes again")
        .expect("consumer alive");
    assert_eq!(body_text(&again), "held");
    assert!(again.redelivered || again.delivery_count >= 1);

    // The stale ack did not break the consumer: it still takes new work.
    publish_until_confirmed(&broker, "next").await;
    let next = tokio::time::timeout(PATIENCE, seen.recv())
        .await
        .expect("delivered after the recovery")
        .expect("consumer alive");
    assert_eq!(body_text(&next), "next");
    stop.cancel();
    tokio::time::timeout(PATIENCE, consumer)
        .await
        .expect("consume returns")
        .expect("no panic")
        .expect("Ok");
    assert_eq!(broker.queue_depth(route::JOBS).await.expect("depth"), 0);
    shutdown.cancel();
}

/// The control consumer reads a server-named exclusive queue, which dies with the
/// connection; after the broker closes it, control messages must still arrive.
#[tokio::test]
async fn the_control_consumer_survives_the_broker_closing_its_connection() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let label = format!("it-recovery-control-{}", uuid::Uuid::new_v4().simple());
    let broker = ns.ready_broker(&label, &shutdown).await;
    let connection = format!("{label} ({})", ns.name());

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let consumer = {
        let broker = broker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            broker
                .consume(
                    Source::Control,
                    ConsumeLimits {
                        prefetch: 10,
                        concurrency: 1,
                    },
                    stop,
                    move |incoming, _cancel| {
                        let _ = tx.send(body_text(&incoming));
                        async { Disposition::Ack }
                    },
                )
                .await
        })
    };

    // A fanout drops what no queue is bound for yet, so keep sending until one lands.
    async fn send_until_heard(
        broker: &conduit_core::Broker,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        text: &str,
    ) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let _ = broker
                .publish(Outgoing::control(&text).expect("serialisable"))
                .await;
            if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
            {
                if got == text {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "control message {text} never arrived"
            );
        }
    }

    send_until_heard(&broker, &mut rx, "before").await;
    assert_eq!(
        close_connections_named(&connection)
            .await
            .expect("rabbitmqctl"),
        1
    );
    eventually("the broker is ready again", PATIENCE, || async {
        broker.is_ready().then_some(())
    })
    .await;
    send_until_heard(&broker, &mut rx, "after").await;
    stop.cancel();
    tokio::time::timeout(PATIENCE, consumer)
        .await
        .expect("consume returns")
        .expect("no panic")
        .expect("Ok");
    shutdown.cancel();
}
