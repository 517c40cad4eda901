//! Failed attempts: retries on the schedule with the same `webhook-id`, `410`, the
//! dead-letter queue and redelivery from it, `Retry-After`, redirects, and a sender
//! restarted in the middle of a schedule.

use std::time::Duration;

use conduit_core::messages::{DeliveryState, WebhookDelivery};
use conduit_webhook_sender::signing;
use uuid::Uuid;

use crate::{completed, delivery_of, progress, Harness, Receiver, Reply, SECRET};

#[tokio::test]
async fn retries_a_terminal_webhook_until_it_is_delivered_with_the_same_id() {
    let mut h =
        Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,200ms,300ms")).await;
    let receiver = Receiver::replying(|n, _| Reply::status(if n < 2 { 500 } else { 204 })).await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    let states: Vec<_> = outcomes
        .iter()
        .map(|o| (o.attempt, o.state, o.status_code))
        .collect();
    assert_eq!(
        states,
        vec![
            (1, DeliveryState::Pending, Some(500)),
            (2, DeliveryState::Pending, Some(500)),
            (3, DeliveryState::Delivered, Some(204)),
        ]
    );
    for pending in &outcomes[..2] {
        let next = pending.next_attempt_at.expect("pending outcomes say when");
        assert!(next > pending.attempted_at);
    }
    let requests = receiver.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(requests.len(), 3);
    for r in &requests {
        assert_eq!(r.header("webhook-id"), Some(d.webhook_id.as_str()));
        assert_eq!(r.body, d.body);
        let ts: i64 = r
            .header("webhook-timestamp")
            .unwrap_or_default()
            .parse()
            .unwrap_or(0);
        assert!(signing::verify(
            SECRET,
            &d.webhook_id,
            ts,
            &r.body,
            r.header("webhook-signature").unwrap_or_default()
        ));
    }
    // The schedule's delays are respected (jitter only lengthens them).
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(190));
    assert!(requests[2].at - requests[1].at >= Duration::from_millis(290));

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn gone_stops_all_attempts() {
    let mut h =
        Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,100ms,100ms")).await;
    let receiver = Receiver::answering(410).await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].state, DeliveryState::Dropped);
    assert_eq!(outcomes[0].status_code, Some(410));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.received().len(), 1, "no attempt after 410");
    assert!(h.next_dead(Duration::from_millis(200)).await.is_none());

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn exhausted_schedule_lands_in_the_dead_letter_queue_and_can_be_replayed() {
    let mut h =
        Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,100ms,100ms")).await;
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let receiver = Receiver::replying(move |_, _| {
        Reply::status(if flag.load(std::sync::atomic::Ordering::SeqCst) {
            200
        } else {
            503
        })
    })
    .await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 3);
    let last = outcomes.last().expect("final outcome");
    assert_eq!((last.attempt, last.state), (3, DeliveryState::Failed));
    assert!(last.next_attempt_at.is_none());

    let dead = h
        .next_dead(Duration::from_secs(10))
        .await
        .expect("dead-lettered");
    let mut replay: WebhookDelivery = serde_json::from_slice(&dead).expect("a delivery");
    assert_eq!(replay.webhook_id, d.webhook_id);
    assert_eq!(replay.body, d.body);
    assert_eq!(replay.attempts_made, 3);

    // The redelivery: the same event with a fresh schedule.
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    replay.attempts_made = 0;
    h.publish(&replay).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].state, DeliveryState::Delivered);
    let requests = receiver.wait_for(4, Duration::from_secs(5)).await;
    assert_eq!(
        requests[3].header("webhook-id"),
        Some(d.webhook_id.as_str())
    );

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn retry_after_is_a_lower_bound_on_the_next_attempt() {
    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,100ms")).await;
    let receiver = Receiver::replying(|n, _| {
        if n == 0 {
            Reply::status(429).with_header("Retry-After", "2")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0].status_code, Some(429));
    let next = outcomes[0].next_attempt_at.expect("pending");
    assert!(next - outcomes[0].attempted_at >= chrono::Duration::milliseconds(2_000));
    let requests = receiver.wait_for(2, Duration::from_secs(5)).await;
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(1_950));

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn progress_webhooks_are_attempted_once() {
    let mut h =
        Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,100ms,100ms")).await;
    let receiver = Receiver::answering(500).await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &progress(Uuid::new_v4(), 40));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].state, DeliveryState::Failed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.received().len(), 1);
    assert!(h.next_dead(Duration::from_millis(200)).await.is_none());

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s")).await;
    let receiver = Receiver::replying(|_, r| {
        if r.path == "/hook" {
            Reply::status(302).with_header("Location", "/elsewhere")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0].status_code, Some(302));
    assert_eq!(outcomes[0].state, DeliveryState::Failed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paths: Vec<String> = receiver.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, vec!["/hook".to_owned()]);

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_sender_restarted_mid_schedule_still_delivers() {
    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,3s")).await;
    let receiver = Receiver::replying(|n, _| Reply::status(if n == 0 { 500 } else { 200 })).await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    let first = h
        .next_outcome(Duration::from_secs(20))
        .await
        .expect("first outcome");
    assert_eq!(first.state, DeliveryState::Pending);
    // The next attempt now waits in RabbitMQ, not in the process that goes away.
    app.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1);

    let app = h.start_app().await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(30))
        .await;
    let last = outcomes.last().expect("final");
    assert_eq!((last.attempt, last.state), (2, DeliveryState::Delivered));
    let requests = receiver.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(
        requests[1].header("webhook-id"),
        Some(d.webhook_id.as_str())
    );
    assert!(requests[1].at - requests[0].at >= Duration::from_millis(2_900));

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_sender_killed_during_an_attempt_loses_nothing() {
    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,200ms")).await;
    // The first request hangs long enough for the sender to die while it is in flight.
    let receiver = Receiver::replying(|n, _| {
        if n == 0 {
            Reply::status(200).after(Duration::from_secs(30))
        } else {
            Reply::status(200)
        }
    })
    .await;
    let app = h.start_app().await;
    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    app.kill().await;

    let app = h.start_app().await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(30))
        .await;
    assert_eq!(
        outcomes.last().map(|o| o.state),
        Some(DeliveryState::Delivered)
    );
    let requests = receiver.wait_for(2, Duration::from_secs(5)).await;
    assert!(requests
        .iter()
        .all(|r| r.header("webhook-id") == Some(d.webhook_id.as_str())));

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn shutdown_hands_back_an_attempt_stuck_in_a_hanging_receiver() {
    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s,200ms")).await;
    let receiver = Receiver::replying(|n, _| {
        if n == 0 {
            Reply::status(200).after(Duration::from_secs(60))
        } else {
            Reply::status(200)
        }
    })
    .await;
    let app = h.start_app().await;
    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    receiver.wait_for(1, Duration::from_secs(20)).await;
    // Stops within 30 s although the attempt would hang for 60 s.
    app.stop().await;
    assert!(
        h.next_outcome(Duration::from_millis(200)).await.is_none(),
        "an abandoned attempt has no outcome"
    );

    let app = h.start_app().await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(30))
        .await;
    assert_eq!(
        outcomes.last().map(|o| o.state),
        Some(DeliveryState::Delivered)
    );

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn the_first_delay_of_the_schedule_counts_from_the_event() {
    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("1s,100ms")).await;
    let receiver = Receiver::answering(200).await;
    let app = h.start_app().await;

    let d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    assert_eq!(outcomes.len(), 1);
    assert!(outcomes[0].attempted_at - d.occurred_at >= chrono::Duration::milliseconds(1_000));

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}
