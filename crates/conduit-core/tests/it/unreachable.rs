//! With no broker to talk to, a service is not ready and a publish fails: it never
//! hangs and never reports a success it did not get.

use std::time::Duration;

use conduit_core::{topology::route, Broker, Outgoing, Secret};
use tokio_util::sync::CancellationToken;

use crate::support::Namespace;

#[tokio::test]
async fn publishing_without_a_broker_fails_and_readiness_stays_false() {
    let ns = Namespace::new();
    let mut amqp = ns.settings.amqp.clone();
    // Port 1 on loopback: nothing listens there, the connect is refused at once.
    amqp.url = Secret::new("amqp://guest:guest@127.0.0.1:1/%2f".to_owned());
    let shutdown = CancellationToken::new();
    let broker = Broker::start(&amqp, "it-unreachable", shutdown.clone());

    assert!(!broker.is_ready());
    assert!(broker.wait_ready(Duration::from_millis(700)).await.is_err());
    assert!(!broker.is_ready());
    for _ in 0..3 {
        let outcome = tokio::time::timeout(
            Duration::from_secs(15),
            broker.publish(Outgoing::json(route::JOBS, &"nowhere").expect("serialisable")),
        )
        .await
        .expect("publish returns instead of hanging");
        assert!(outcome.is_err(), "no broker, no success");
    }
    assert!(!broker.is_ready());
    shutdown.cancel();
}
