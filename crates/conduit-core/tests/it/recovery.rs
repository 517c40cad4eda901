//! A consumer and a publisher outlive the broker closing their connection: readiness
//! comes back by itself and every confirmed message is consumed, none lost.

use std::{collections::BTreeSet, time::Duration};

use conduit_core::{broker::Disposition, topology::route, Outgoing};
use tokio_util::sync::CancellationToken;

use crate::support::{body_text, close_connections_named, eventually, Namespace, Probe, PATIENCE};

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
    eventually("the broker is ready again", || broker.is_ready()).await;
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
        eventually("the broker is ready again", || broker.is_ready()).await;
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
async fn a_batch_interrupted_by_a_lost_connection_returns() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let label = format!("it-recovery-batch-{}", uuid::Uuid::new_v4().simple());
    let broker = ns.ready_broker(&label, &shutdown).await;
    let connection = format!("{label} ({})", ns.name());

    let batch: Vec<Outgoing> = (0..3000)
        .map(|i| Outgoing::json(route::JOBS, &format!("b{i}")).expect("serialisable"))
        .collect();
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish_batch(&batch).await })
    };
    close_connections_named(&connection)
        .await
        .expect("rabbitmqctl");
    // Either the batch beat the close or it fails; what it must not do is hang.
    let _outcome = tokio::time::timeout(Duration::from_secs(30), publisher)
        .await
        .expect("publish_batch returns when the connection goes mid-way")
        .expect("no panic");
    eventually("the broker is ready again", || broker.is_ready()).await;
    shutdown.cancel();
}
