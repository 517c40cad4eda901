//! Two stacks on one broker, told apart only by namespace, never share a message.

use std::time::Duration;

use conduit_core::{broker::Disposition, topology::route, Outgoing};
use tokio_util::sync::CancellationToken;

use crate::support::{body_text, Namespace, Probe, PATIENCE};

#[tokio::test]
async fn two_namespaces_never_see_each_others_messages() {
    let (a, b) = (Namespace::new(), Namespace::new());
    assert_ne!(a.name(), b.name());
    let shutdown = CancellationToken::new();
    let broker_a = a.ready_broker("it-isolation-a", &shutdown).await;
    let broker_b = b.ready_broker("it-isolation-b", &shutdown).await;
    let mut probe_a = Probe::start(&broker_a, route::JOBS, |_| Disposition::Ack);
    let mut probe_b = Probe::start(&broker_b, route::JOBS, |_| Disposition::Ack);

    for i in 0..5 {
        broker_a
            .publish(Outgoing::json(route::JOBS, &format!("a{i}")).expect("serialisable"))
            .await
            .expect("confirmed");
        broker_b
            .publish(Outgoing::json(route::JOBS, &format!("b{i}")).expect("serialisable"))
            .await
            .expect("confirmed");
    }
    // The control fanout is per namespace too.
    broker_a
        .publish(Outgoing::control(&"a-control").expect("serialisable"))
        .await
        .expect("confirmed");

    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    while seen_a.len() < 5 {
        seen_a.push(body_text(&probe_a.next(PATIENCE).await.expect("a's own")));
    }
    while seen_b.len() < 5 {
        seen_b.push(body_text(&probe_b.next(PATIENCE).await.expect("b's own")));
    }
    assert!(probe_a.next(Duration::from_millis(500)).await.is_none());
    assert!(probe_b.next(Duration::from_millis(100)).await.is_none());
    seen_a.sort();
    seen_b.sort();
    assert_eq!(seen_a, ["a0", "a1", "a2", "a3", "a4"]);
    assert_eq!(seen_b, ["b0", "b1", "b2", "b3", "b4"]);
    probe_a.stop().await;
    probe_b.stop().await;
    shutdown.cancel();
}
