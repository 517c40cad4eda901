//! A hanging receiver delays nobody else; the target guard refuses loopback in every
//! spelling; a progress webhook never follows its task's delivered terminal webhook.

use std::time::Duration;

use conduit_core::messages::DeliveryState;
use uuid::Uuid;

use crate::{completed, delivery_of, progress, Harness, Receiver, Reply};

#[tokio::test]
async fn a_hanging_receiver_does_not_delay_a_healthy_one() {
    let mut h = Harness::new(|s| {
        s.webhooks.concurrency = 4;
        s.webhooks.per_host_concurrency = 2;
        s.webhooks.timeout_seconds = 20;
        s.webhooks.retry_schedule = Harness::schedule("0s");
    })
    .await;
    let hanging =
        Receiver::replying(|_, _| Reply::status(200).after(Duration::from_secs(60))).await;
    let healthy = Receiver::answering(200).await;
    let app = h.start_app().await;

    // The hanging host's webhooks go first, so they would hold every slot if the
    // per-host cap did not keep them to their own.
    for _ in 0..12 {
        let d = delivery_of(&hanging.url("/slow"), &progress(Uuid::new_v4(), 10));
        h.publish(&d).await;
    }
    let mut ids = Vec::new();
    for _ in 0..8 {
        let d = delivery_of(&healthy.url("/fast"), &completed(Uuid::new_v4()));
        ids.push(d.webhook_id.clone());
        h.publish(&d).await;
    }
    let outcomes = h.finals(&ids, Duration::from_secs(15)).await;
    assert!(outcomes.iter().all(|o| o.state == DeliveryState::Delivered));
    assert_eq!(healthy.received().len(), 8);
    // Every healthy delivery finished while the hanging receiver still held its first
    // requests, and it never had more than its own two slots.
    let slow = hanging.received();
    assert!(
        !slow.is_empty() && slow.len() <= 2,
        "hanging host got {} requests",
        slow.len()
    );

    hanging.stop().await;
    app.stop().await;
    healthy.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn the_guard_refuses_loopback_in_every_spelling() {
    let mut h = Harness::new(|s| {
        s.webhooks.allow_private_targets = false;
        s.webhooks.retry_schedule = Harness::schedule("0s");
    })
    .await;
    let receiver = Receiver::answering(200).await;
    let app = h.start_app().await;

    let port = receiver.port();
    let urls = [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        format!("http://127.1:{port}/hook"),
        format!("http://0x7f.0.0.1:{port}/hook"),
        format!("http://2130706433:{port}/hook"),
    ];
    let mut ids = Vec::new();
    for url in &urls {
        let d = delivery_of(url, &completed(Uuid::new_v4()));
        ids.push(d.webhook_id.clone());
        h.publish(&d).await;
    }
    let outcomes = h.finals(&ids, Duration::from_secs(20)).await;
    for (url, o) in urls.iter().zip(&outcomes) {
        assert_eq!(o.state, DeliveryState::Failed, "{url}");
        assert!(o.status_code.is_none(), "{url}");
        let error = o.error.as_deref().unwrap_or_default();
        assert!(error.contains("internal address"), "{url}: {error}");
    }
    assert!(
        receiver.received().is_empty(),
        "nothing reached the receiver"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(&format!(
            r#"conduit_webhook_attempts_total{{outcome="refused"}} {}"#,
            urls.len()
        )),
        "{metrics}"
    );

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn progress_is_never_delivered_after_the_terminal_webhook() {
    let mut h = Harness::new(|_| {}).await;
    let receiver = Receiver::answering(200).await;
    let app = h.start_app().await;

    let task = Uuid::new_v4();
    // A progress event from before the end, delayed on its way (published late).
    let stale = delivery_of(&receiver.url("/hook"), &progress(task, 90));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let terminal = delivery_of(&receiver.url("/hook"), &completed(task));
    h.publish(&terminal).await;
    let done = h
        .outcomes_until_final(&terminal.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(done.last().map(|o| o.state), Some(DeliveryState::Delivered));

    h.publish(&stale).await;
    let outcomes = h
        .outcomes_until_final(&stale.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].state, DeliveryState::Dropped);
    assert!(outcomes[0].status_code.is_none());

    // A later run of the same task (an explicit retry) has newer events: they go out.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let rerun = delivery_of(&receiver.url("/hook"), &progress(task, 10));
    h.publish(&rerun).await;
    let outcomes = h
        .outcomes_until_final(&rerun.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes[0].state, DeliveryState::Delivered);

    let ids: Vec<String> = receiver
        .received()
        .iter()
        .filter_map(|r| r.header("webhook-id").map(str::to_owned))
        .collect();
    assert_eq!(
        ids,
        vec![terminal.webhook_id.clone(), rerun.webhook_id.clone()]
    );

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_task_progress_and_terminal_published_together_keep_their_order() {
    let mut h = Harness::new(|_| {}).await;
    let receiver =
        Receiver::replying(|_, _| Reply::status(200).after(Duration::from_millis(50))).await;
    let app = h.start_app().await;

    for _ in 0..5 {
        let task = Uuid::new_v4();
        let p = delivery_of(&receiver.url("/hook"), &progress(task, 50));
        tokio::time::sleep(Duration::from_millis(2)).await;
        let t = delivery_of(&receiver.url("/hook"), &completed(task));
        // The terminal one first: the progress arrives after it and must be dropped or
        // delivered before it, never after.
        h.publish(&t).await;
        h.publish(&p).await;
        let finals = h
            .finals(
                &[t.webhook_id.clone(), p.webhook_id.clone()],
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(finals[0].state, DeliveryState::Delivered);
        let order: Vec<String> = receiver
            .received()
            .iter()
            .filter_map(|r| r.header("webhook-id").map(str::to_owned))
            .filter(|id| *id == t.webhook_id || *id == p.webhook_id)
            .collect();
        if let Some(pos_p) = order.iter().position(|id| *id == p.webhook_id) {
            let pos_t = order
                .iter()
                .position(|id| *id == t.webhook_id)
                .expect("terminal sent");
            assert!(
                pos_p < pos_t,
                "progress delivered after the terminal webhook"
            );
        }
    }

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}
