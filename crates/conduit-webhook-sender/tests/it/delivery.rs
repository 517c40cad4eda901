//! Exact bodies, headers and signatures of the four payloads; the outcomes and metrics
//! they produce; deliveries that can never be sent.

use std::time::Duration;

use conduit_core::{messages::DeliveryState, topology::route, Outgoing, Target};
use conduit_webhook_sender::signing;
use uuid::Uuid;

use crate::{cancelled, completed, delivery_of, failed, progress, Harness, Receiver, SECRET};

#[tokio::test]
async fn sends_the_four_payloads_exactly_signed_with_every_header() {
    let mut h = Harness::new(|_| {}).await;
    let receiver = Receiver::answering(200).await;
    let app = h.start_app().await;

    let task = Uuid::new_v4();
    let payloads = [
        completed(task),
        failed(task),
        cancelled(task),
        progress(task, 50),
    ];
    let mut sent = Vec::new();
    for p in &payloads {
        let mut d = delivery_of(&receiver.url("/webhooks/video-complete"), p);
        d.task_id = Uuid::new_v4(); // separate tasks, so no ordering rule applies
        d.headers
            .insert("Authorization".into(), "Bearer your-webhook-secret".into());
        d.headers
            .insert("X-Custom-Header".into(), "custom-value".into());
        h.publish(&d).await;
        sent.push(d);
    }
    let ids: Vec<String> = sent.iter().map(|d| d.webhook_id.clone()).collect();
    let outcomes = h.finals(&ids, Duration::from_secs(20)).await;
    let requests = receiver.wait_for(4, Duration::from_secs(5)).await;

    for d in &sent {
        let r = requests
            .iter()
            .find(|r| r.header("webhook-id") == Some(d.webhook_id.as_str()))
            .expect("every event arrived");
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/webhooks/video-complete");
        assert_eq!(r.body, d.body, "the body is sent byte for byte");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("user-agent"), Some("Conduit-LLM/1.0"));
        assert_eq!(r.header_count("user-agent"), 1);
        assert_eq!(
            r.header("authorization"),
            Some("Bearer your-webhook-secret")
        );
        assert_eq!(r.header("x-custom-header"), Some("custom-value"));
        let ts: i64 = r
            .header("webhook-timestamp")
            .expect("timestamp header")
            .parse()
            .expect("unix seconds");
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
        let signature = r.header("webhook-signature").expect("signature header");
        assert!(signature.starts_with("v1,"));
        assert!(signing::verify(
            SECRET,
            &d.webhook_id,
            ts,
            &r.body,
            signature
        ));
    }
    for o in &outcomes {
        assert_eq!(o.state, DeliveryState::Delivered);
        assert_eq!(o.status_code, Some(200));
        assert_eq!(o.attempt, 1);
        assert!(o.error.is_none() && o.next_attempt_at.is_none());
        let d = sent
            .iter()
            .find(|d| d.webhook_id == o.webhook_id)
            .expect("known id");
        assert_eq!((o.task_id, o.event), (d.task_id, d.event));
        assert!(o.attempted_at >= d.occurred_at);
    }

    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"conduit_webhook_attempts_total{outcome="delivered"} 4"#),
        "{metrics}"
    );
    assert!(metrics.contains("conduit_webhook_event_to_delivery_seconds_bucket"));
    assert!(metrics.contains("conduit_webhook_deliveries_in_flight 0"));

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn refuses_a_body_over_one_mebibyte_without_sending() {
    let mut h = Harness::new(|s| s.webhooks.retry_schedule = Harness::schedule("0s")).await;
    let receiver = Receiver::answering(200).await;
    let app = h.start_app().await;

    let mut d = delivery_of(&receiver.url("/hook"), &completed(Uuid::new_v4()));
    d.body = format!("{{\"pad\":\"{}\"}}", "x".repeat(1024 * 1024));
    h.publish(&d).await;
    let outcomes = h
        .outcomes_until_final(&d.webhook_id, Duration::from_secs(20))
        .await;
    let last = outcomes.last().expect("an outcome");
    assert_eq!(last.state, DeliveryState::Failed);
    assert!(last.error.as_deref().unwrap_or_default().contains("1 MiB"));
    assert!(last.status_code.is_none());
    assert!(receiver.received().is_empty(), "nothing was sent");
    // A terminal webhook that cannot be sent is kept for an operator.
    assert!(h.next_dead(Duration::from_secs(5)).await.is_some());

    app.stop().await;
    receiver.stop().await;
    h.cleanup().await;
}

#[tokio::test]
async fn unreadable_messages_go_to_the_dead_letter_queue() {
    let mut h = Harness::new(|_| {}).await;
    let app = h.start_app().await;
    let garbage = Outgoing {
        target: Target::Queue(route::WEBHOOKS.into()),
        body: b"{not json".to_vec(),
        task_id: None,
        message_id: None,
        traceparent: None,
    };
    h.broker.publish(garbage).await.expect("published");
    let dead = h
        .next_dead(Duration::from_secs(10))
        .await
        .expect("dead-lettered");
    assert_eq!(dead, b"{not json");
    app.stop().await;
    h.cleanup().await;
}
