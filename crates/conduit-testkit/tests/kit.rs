//! The kit's own behaviour: what the receiver records and answers, holding and releasing
//! requests, polling, an in-process service's stop, the signature check.

use std::time::Duration;

use conduit_testkit::{
    eventually, signature_is_valid,
    stack::{free_port, Env},
    Receiver, Reply, RunningApp,
};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

#[tokio::test]
async fn the_receiver_records_requests_and_answers_as_told() {
    let receiver = Receiver::replying(|n, r| {
        if n == 0 {
            Reply::status(429).with_header("Retry-After", "2")
        } else if r.path == "/moved" {
            Reply::status(302).with_header("Location", "/elsewhere")
        } else {
            Reply::status(204)
        }
    })
    .await;
    let http = client();
    let first = http
        .post(receiver.url("/hook"))
        .header("webhook-id", "msg_1")
        .header("x-twice", "a")
        .header("x-twice", "b")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .expect("first request");
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["retry-after"], "2");
    let second = http
        .post(receiver.url("/moved"))
        .body("{}")
        .send()
        .await
        .expect("second request");
    assert_eq!(second.status(), 302);
    assert_eq!(second.headers()["location"], "/elsewhere");
    let third = http
        .put(receiver.url("/hook"))
        .send()
        .await
        .expect("third request");
    assert_eq!(third.status(), 204);

    let got = receiver.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].method, "POST");
    assert_eq!(got[0].path, "/hook");
    assert_eq!(got[0].json()["n"], 1);
    assert_eq!(got[0].header("Webhook-Id"), Some("msg_1"));
    assert_eq!(got[0].header_count("x-twice"), 2);
    assert_eq!(got[2].method, "PUT");
    assert!(got[0].at <= got[1].at && got[1].at <= got[2].at);
    assert_eq!(receiver.count(), 3);
    assert_eq!(
        receiver.arrivals().len(),
        1,
        "one request carried a webhook-id"
    );
    let (first_at, last_at) = receiver.span().expect("a span");
    assert_eq!((first_at, last_at), (got[0].at, got[2].at));
    receiver.stop().await;
}

#[tokio::test]
async fn a_counting_receiver_keeps_counts_and_arrivals_but_no_requests() {
    let receiver = Receiver::builder()
        .counting_only()
        .bind()
        .await
        .expect("receiver binds");
    let http = client();
    for id in ["msg_a", "msg_b", "msg_a"] {
        let r = http
            .post(receiver.url("/hook"))
            .header("webhook-id", id)
            .body("{}")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
    }
    assert!(receiver.wait_for_count(3, Duration::from_secs(5)).await);
    assert!(receiver.received().is_empty());
    let arrivals = receiver.arrivals();
    assert_eq!(arrivals.len(), 2);
    let (first, _) = receiver.span().expect("a span");
    assert_eq!(
        arrivals["msg_a"], first,
        "the first arrival of an id counts"
    );
    assert!(!receiver.wait_for_count(4, Duration::from_millis(100)).await);
}

#[tokio::test]
async fn a_hanging_receiver_holds_requests_until_released() {
    let receiver = Receiver::builder()
        .hanging(Duration::from_secs(60))
        .start()
        .await;
    let url = receiver.url("/slow");
    let held = tokio::spawn(async move { client().post(url).body("{}").send().await });
    assert!(receiver.wait_for_count(1, Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished(), "the request is held");
    receiver.release();
    let answered = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("answered after the release")
        .expect("no panic")
        .expect("an answer");
    assert_eq!(answered.status(), 200);
}

#[tokio::test]
async fn stopping_a_receiver_closes_held_requests() {
    let receiver =
        Receiver::replying(|_, _| Reply::status(200).after(Duration::from_secs(60))).await;
    let url = receiver.url("/slow");
    let held = tokio::spawn(async move { client().post(url).body("{}").send().await });
    receiver.wait_for(1, Duration::from_secs(5)).await;
    receiver.stop().await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the client sees the close at once")
        .expect("no panic");
    assert!(outcome.is_err(), "no answer after stop: {outcome:?}");
}

#[tokio::test]
async fn eventually_returns_the_first_value() {
    let mut polls = 0;
    let got = eventually("the third poll", Duration::from_secs(5), || {
        polls += 1;
        let n = polls;
        async move { (n >= 3).then_some(n) }
    })
    .await;
    assert_eq!(got, 3);
}

#[tokio::test]
#[should_panic(expected = "timed out after 200ms waiting for nothing")]
async fn eventually_fails_after_its_timeout() {
    eventually("nothing", Duration::from_millis(200), || async {
        None::<()>
    })
    .await;
}

#[tokio::test]
async fn a_running_app_stops_when_asked() {
    let port = free_port().expect("a port");
    let app = RunningApp::spawn("idle", port, |stop| async move {
        stop.cancelled().await;
        Ok(())
    });
    assert_eq!(app.url("/x"), format!("http://127.0.0.1:{port}/x"));
    app.stop().await;
}

#[tokio::test]
#[should_panic(expected = "failing ran cleanly: broke")]
async fn a_running_app_that_fails_fails_the_test_at_stop() {
    let app = RunningApp::spawn("failing", 0, |_| async { anyhow::bail!("broke") });
    app.stop().await;
}

#[test]
fn the_signature_check_accepts_the_standard_webhooks_vector_only() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (id, ts, body) = (
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265330",
        r#"{"test": 2432232314}"#,
    );
    let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    assert!(signature_is_valid(secret, id, ts, body, good));
    assert!(signature_is_valid(
        secret,
        id,
        ts,
        body,
        &format!("v1,bm9wZQ== {good}")
    ));
    assert!(!signature_is_valid(secret, id, ts, "{}", good));
    assert!(!signature_is_valid(secret, id, "1614265331", body, good));
}

#[test]
fn an_env_names_its_run_and_says_when_a_binary_is_missing() {
    let namespace = conduit_core::testing::unique_namespace();
    let env = Env::new(
        std::path::Path::new("/nonexistent-bin-dir"),
        "kit",
        &namespace,
    )
    .expect("env");
    assert_eq!(env.database, format!("conduit_{namespace}"));
    assert!(env.storage().is_dir());
    assert!(env
        .vars
        .contains(&("CONDUIT__AMQP__NAMESPACE".into(), namespace.clone())));
    let err = env.binary("conduit-api").expect_err("no such binary");
    assert!(format!("{err}").contains("cargo build --workspace --bins"));
    std::fs::remove_dir_all(&env.dir).expect("remove the run's folder");
}
