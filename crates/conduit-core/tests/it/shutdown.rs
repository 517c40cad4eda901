//! Shutdown while a handler holds a delivery: `consume` returns and the delivery is
//! back in the queue for the next process.

use std::time::Duration;

use conduit_core::{
    broker::{ConsumeLimits, Disposition, Source},
    topology::route,
    Outgoing,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::{body_text, Namespace, Probe, PATIENCE};

#[tokio::test]
async fn cancelling_returns_the_held_delivery_to_the_queue() {
    let ns = Namespace::new();
    let connections = CancellationToken::new();
    let broker = ns.ready_broker("it-shutdown", &connections).await;
    broker
        .publish(Outgoing::json(route::JOBS, &"held").expect("serialisable"))
        .await
        .expect("confirmed");

    let (holding_tx, mut holding) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let consumer = {
        let broker = broker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            broker
                .consume(
                    Source::Queue(route::JOBS.into()),
                    ConsumeLimits {
                        prefetch: 1,
                        concurrency: 1,
                    },
                    stop,
                    move |incoming, cancel| {
                        let holding_tx = holding_tx.clone();
                        async move {
                            let _ = holding_tx.send(incoming);
                            // A long job: it gives the delivery back when told to stop.
                            cancel.cancelled().await;
                            Disposition::Requeue
                        }
                    },
                )
                .await
        })
    };
    let held = tokio::time::timeout(PATIENCE, holding.recv())
        .await
        .expect("the handler got the delivery")
        .expect("handler alive");
    assert_eq!(body_text(&held), "held");

    stop.cancel();
    tokio::time::timeout(PATIENCE, consumer)
        .await
        .expect("consume returns after shutdown")
        .expect("no panic")
        .expect("consume returns Ok");
    connections.cancel();

    // A fresh process on the same namespace gets the delivery again.
    let fresh_token = CancellationToken::new();
    let fresh = ns.ready_broker("it-shutdown-fresh", &fresh_token).await;
    let mut probe = Probe::start(&fresh, route::JOBS, |_| Disposition::Ack);
    let again = probe
        .next(PATIENCE)
        .await
        .expect("the held delivery is back");
    assert_eq!(body_text(&again), "held");
    assert!(again.delivery_count >= 1);
    assert!(probe.next(Duration::from_millis(300)).await.is_none());
    probe.stop().await;
    fresh_token.cancel();
}

/// A handler that ignores the shutdown is given up on after the drain grace (20 s):
/// `consume` still returns and the delivery it held goes back to the queue, while the
/// process (and its connection) lives on.
#[tokio::test]
async fn a_handler_that_ignores_shutdown_loses_its_delivery_to_the_queue() {
    let ns = Namespace::new();
    let connections = CancellationToken::new();
    let broker = ns.ready_broker("it-shutdown-stuck", &connections).await;
    broker
        .publish(Outgoing::json(route::JOBS, &"stuck").expect("serialisable"))
        .await
        .expect("confirmed");

    let (holding_tx, mut holding) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let consumer = {
        let broker = broker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            broker
                .consume(
                    Source::Queue(route::JOBS.into()),
                    ConsumeLimits {
                        prefetch: 1,
                        concurrency: 1,
                    },
                    stop,
                    move |incoming, _cancel| {
                        let holding_tx = holding_tx.clone();
                        async move {
                            let _ = holding_tx.send(incoming);
                            std::future::pending::<()>().await;
                            Disposition::Ack
                        }
                    },
                )
                .await
        })
    };
    tokio::time::timeout(PATIENCE, holding.recv())
        .await
        .expect("the handler got the delivery")
        .expect("handler alive");

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(40), consumer)
        .await
        .expect("consume returns after the drain grace")
        .expect("no panic")
        .expect("consume returns Ok");

    // Same connection, new consumer: the delivery is back.
    let mut probe = Probe::start(&broker, route::JOBS, |_| Disposition::Ack);
    let again = probe
        .next(PATIENCE)
        .await
        .expect("the stuck delivery is back");
    assert_eq!(body_text(&again), "stuck");
    assert!(again.delivery_count >= 1);
    probe.stop().await;
    connections.cancel();
}
