//! A rough drain-rate comparison, run by hand:
//! `cargo test -p conduit-webhook-sender --test it -- --ignored --nocapture drain_rate`.
//! It prints numbers and asserts nothing about speed.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use conduit_core::{topology::route, ConsumeLimits, Disposition, Outgoing, Source};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{delivery_of, progress, Harness, Receiver};

const N: usize = 5_000;

async fn preload(h: &Harness, url: &str) {
    let batch: Vec<Outgoing> = (0..N)
        .map(|_| {
            let d = delivery_of(url, &progress(Uuid::new_v4(), 50));
            Outgoing::json(route::WEBHOOKS, &d).expect("serialises")
        })
        .collect();
    for chunk in batch.chunks(500) {
        h.broker.publish_batch(chunk).await.expect("preloaded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, run by hand"]
async fn drain_rate() {
    let h = Harness::new(|_| {}).await;
    let receiver = Receiver::answering(200).await;
    let url = receiver.url("/hook");

    preload(&h, &url).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let consumer = {
        let broker = h.broker.clone();
        let seen = seen.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            broker
                .consume(
                    Source::Queue(route::WEBHOOKS.into()),
                    ConsumeLimits {
                        prefetch: 512,
                        concurrency: 512,
                    },
                    stop,
                    move |_, _| {
                        seen.fetch_add(1, Ordering::Relaxed);
                        async { Disposition::Ack }
                    },
                )
                .await
        })
    };
    while seen.load(Ordering::Relaxed) < N {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bare = N as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = consumer.await;

    // The same consumer doing one plain POST per message: the HTTP floor.
    preload(&h, &url).await;
    let posted = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let consumer = {
        let broker = h.broker.clone();
        let posted = posted.clone();
        let stop = stop.clone();
        let client = reqwest::Client::new();
        let url = url.clone();
        tokio::spawn(async move {
            broker
                .consume(
                    Source::Queue(route::WEBHOOKS.into()),
                    ConsumeLimits {
                        prefetch: 512,
                        concurrency: 512,
                    },
                    stop,
                    move |incoming, _| {
                        let request = client.post(&url).body(incoming.body).send();
                        let posted = posted.clone();
                        async move {
                            if let Ok(r) = request.await {
                                let _ = r.bytes().await;
                            }
                            posted.fetch_add(1, Ordering::Relaxed);
                            Disposition::Ack
                        }
                    },
                )
                .await
        })
    };
    while posted.load(Ordering::Relaxed) < N {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let plain_post = N as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = consumer.await;

    preload(&h, &url).await;
    let before = receiver.received().len();
    let started = Instant::now();
    let app = h.start_app().await;
    receiver
        .wait_for(before + N, Duration::from_secs(600))
        .await;
    let sender = N as f64 / started.elapsed().as_secs_f64();
    println!(
        "bare consumer: {bare:.0} msg/s; consumer with a plain POST: {plain_post:.0} msg/s; \
         sender: {sender:.0} webhooks/s ({:.2} of bare, {:.2} of plain POST)",
        sender / bare,
        sender / plain_post
    );

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}
