//! Publisher confirms plus manual acks: what is confirmed arrives, exactly once; the
//! three dispositions do what they promise on a quorum queue.

use std::{collections::BTreeMap, time::Duration};

use conduit_core::{broker::Disposition, topology::route, Outgoing};
use tokio_util::sync::CancellationToken;

use crate::support::{body_text, Namespace, Probe, PATIENCE};

#[tokio::test]
async fn a_confirmed_batch_arrives_exactly_once_and_is_acked() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let broker = ns.ready_broker("it-batch", &shutdown).await;

    const N: usize = 50;
    let batch: Vec<Outgoing> = (0..N)
        .map(|i| {
            Outgoing::json(route::JOBS, &format!("m{i}"))
                .expect("serialisable")
                .with_message_id(format!("m{i}"))
        })
        .collect();
    broker
        .publish_batch(&batch)
        .await
        .expect("the broker confirms the whole batch");
    assert_eq!(
        broker.queue_depth(route::JOBS).await.expect("depth"),
        N as u32,
        "a confirmed message is in the queue"
    );

    let mut probe = Probe::start(&broker, route::JOBS, |_| Disposition::Ack);
    let mut seen = BTreeMap::<String, u32>::new();
    while seen.len() < N {
        let got = probe
            .next(PATIENCE)
            .await
            .expect("every published message is delivered");
        *seen.entry(body_text(&got)).or_default() += 1;
    }
    // Anything delivered twice would show up shortly after the last first delivery.
    while let Some(extra) = probe.next(Duration::from_millis(500)).await {
        *seen.entry(body_text(&extra)).or_default() += 1;
    }
    probe.stop().await;

    let expected: BTreeMap<String, u32> = (0..N).map(|i| (format!("m{i}"), 1)).collect();
    assert_eq!(seen, expected, "each message exactly once");
    // The consumer's channel is closed now, so an unacked message would be back.
    assert_eq!(broker.queue_depth(route::JOBS).await.expect("depth"), 0);
    shutdown.cancel();
}

#[tokio::test]
async fn requeue_redelivers_with_a_higher_delivery_count() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let broker = ns.ready_broker("it-requeue", &shutdown).await;
    broker
        .publish(Outgoing::json(route::JOBS, &"again").expect("serialisable"))
        .await
        .expect("confirmed");

    let mut probe = Probe::start(&broker, route::JOBS, |incoming| {
        if incoming.delivery_count == 0 {
            Disposition::Requeue
        } else {
            Disposition::Ack
        }
    });
    let first = probe.next(PATIENCE).await.expect("first delivery");
    let second = probe
        .next(PATIENCE)
        .await
        .expect("redelivery after Requeue");
    assert_eq!(body_text(&first), "again");
    assert_eq!(body_text(&second), "again");
    assert_eq!(first.delivery_count, 0);
    assert!(!first.redelivered);
    assert_eq!(
        second.delivery_count, 1,
        "the quorum queue counted the return"
    );
    assert!(second.redelivered);
    assert!(
        probe.next(Duration::from_millis(500)).await.is_none(),
        "acked on the second delivery"
    );
    probe.stop().await;
    assert_eq!(broker.queue_depth(route::JOBS).await.expect("depth"), 0);
    shutdown.cancel();
}

#[tokio::test]
async fn reject_drops_the_message() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let broker = ns.ready_broker("it-reject", &shutdown).await;
    broker
        .publish(Outgoing::json(route::JOBS, &"poison").expect("serialisable"))
        .await
        .expect("confirmed");

    let mut probe = Probe::start(&broker, route::JOBS, |_| Disposition::Reject);
    let got = probe.next(PATIENCE).await.expect("delivered once");
    assert_eq!(body_text(&got), "poison");
    assert!(
        probe.next(Duration::from_millis(800)).await.is_none(),
        "a rejected message is not redelivered"
    );
    probe.stop().await;
    assert_eq!(broker.queue_depth(route::JOBS).await.expect("depth"), 0);
    shutdown.cancel();
}

#[tokio::test]
async fn an_unroutable_message_is_an_error_not_a_silent_drop() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let broker = ns.ready_broker("it-unroutable", &shutdown).await;
    let err = broker
        .publish(Outgoing::json("no-such-route", &"lost").expect("serialisable"))
        .await
        .expect_err("nothing is bound to that routing key");
    assert!(format!("{err:#}").contains("no-such-route"), "{err:#}");
    // The publish channel is still usable afterwards.
    broker
        .publish(Outgoing::json(route::JOBS, &"fine").expect("serialisable"))
        .await
        .expect("confirmed");
    shutdown.cancel();
}
