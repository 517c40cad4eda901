//! The webhook wait queues hold a delivery for their TTL and then dead-letter it back
//! into the webhooks queue.

use std::time::Duration;

use conduit_core::{broker::Disposition, topology::route, Outgoing, Topology};
use tokio_util::sync::CancellationToken;

use crate::support::{body_text, Namespace, Probe, PATIENCE};

#[tokio::test]
async fn a_parked_delivery_comes_back_on_the_webhooks_queue() {
    let ns = Namespace::new();
    let shutdown = CancellationToken::new();
    let broker = ns.ready_broker("it-wait", &shutdown).await;
    let mut probe = Probe::start(&broker, route::WEBHOOKS, |_| Disposition::Ack);

    let wait = Topology::wait_route(Duration::from_millis(50));
    broker
        .publish(Outgoing::json(&wait, &"parked").expect("serialisable"))
        .await
        .expect("the wait queue takes it");

    let back = probe.next(PATIENCE).await.expect("back after the TTL");
    assert_eq!(body_text(&back), "parked");
    assert_eq!(back.routing_key, route::WEBHOOKS);
    assert_eq!(broker.queue_depth(&wait).await.expect("depth"), 0);
    probe.stop().await;
    shutdown.cancel();
}
