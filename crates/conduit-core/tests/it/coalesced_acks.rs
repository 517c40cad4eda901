//! Acks that are ready together go out as one `multiple` ack; a delivery whose handler
//! has not finished is never covered by one, whatever finished after it.

use std::{collections::BTreeSet, time::Duration};

use conduit_core::{
    broker::{ConsumeLimits, Disposition, Source},
    topology::route,
    Outgoing,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::{body_text, Namespace, Probe, PATIENCE};

#[tokio::test]
async fn an_unfinished_delivery_is_not_acked_by_the_ones_after_it() {
    let ns = Namespace::new();
    let connections = CancellationToken::new();
    let broker = ns.ready_broker("it-coalesced", &connections).await;
    let batch: Vec<Outgoing> = (0..40)
        .map(|i| Outgoing::json(route::JOBS, &format!("m{i}")).expect("serialisable"))
        .collect();
    broker.publish_batch(&batch).await.expect("confirmed");

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let consumer = {
        let broker = broker.clone();
        tokio::spawn(async move {
            broker
                .consume(
                    Source::Queue(route::JOBS.into()),
                    ConsumeLimits {
                        prefetch: 40,
                        concurrency: 40,
                    },
                    CancellationToken::new(),
                    move |incoming, _| {
                        let seen_tx = seen_tx.clone();
                        async move {
                            let body = body_text(&incoming);
                            let _ = seen_tx.send(body.clone());
                            if body == "m10" || body == "m30" {
                                // Never finishes: the process dies with it in hand.
                                std::future::pending::<()>().await;
                            }
                            Disposition::Ack
                        }
                    },
                )
                .await
        })
    };
    let mut bodies = BTreeSet::new();
    while bodies.len() < 40 {
        let body = tokio::time::timeout(PATIENCE, seen.recv())
            .await
            .expect("every message is handed out")
            .expect("consumer alive");
        bodies.insert(body);
    }
    // Long enough for every finished delivery's ack to have gone out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A crash: no handler settles anything more, the connection just goes.
    connections.cancel();
    consumer.abort();
    let _ = consumer.await;

    let fresh_token = CancellationToken::new();
    let fresh = ns.ready_broker("it-coalesced-fresh", &fresh_token).await;
    let mut probe = Probe::start(&fresh, route::JOBS, |_| Disposition::Ack);
    let mut back = BTreeSet::new();
    while let Some(again) = probe.next(Duration::from_secs(2)).await {
        back.insert(body_text(&again));
    }
    assert_eq!(
        back,
        BTreeSet::from(["m10".to_owned(), "m30".to_owned()]),
        "exactly the two unfinished deliveries come back"
    );
    probe.stop().await;
    fresh_token.cancel();
}
