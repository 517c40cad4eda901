//! Group commit: submits written together answer exactly as if each were written alone.
//! The first tests drive the writer directly, queueing every submit before it starts so
//! they all land in one batch; the last ones load the real server from many clients.

use std::collections::{BTreeMap, BTreeSet};

use conduit_api::{
    auth::Caller,
    db,
    domain::{GenerationRequest, ModelCatalog},
    error::ApiError,
    keys,
    metrics::Metrics,
    submits::{self, Answer},
    tasks::{self, NewSubmit, Submitted},
};
use conduit_core::{config::Settings, topology::route, Secret, Source};
use deadpool_postgres::Pool;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{body, cleanup, eventually, test_settings, TestApp, TIMEOUT};

struct Db {
    settings: Settings,
    pool: Pool,
    models: ModelCatalog,
}

impl Db {
    async fn new() -> Self {
        let settings = test_settings();
        let pool = db::connect_and_migrate(&settings.database)
            .await
            .expect("database");
        let models = ModelCatalog::from_settings(&settings);
        Self {
            settings,
            pool,
            models,
        }
    }

    async fn caller(&self, name: &str) -> Caller {
        let key = keys::create(&self.pool, name).await.expect("key");
        Caller {
            key_id: key.id,
            webhook_secret: key.webhook_secret,
        }
    }

    fn request(&self, body: &Value) -> GenerationRequest {
        GenerationRequest::parse(body, &self.models).expect("valid request")
    }

    async fn count(&self, sql: &str) -> i64 {
        let client = self.pool.get().await.unwrap();
        client.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn stop(self) {
        self.pool.close();
        cleanup(&self.settings).await;
    }
}

fn other_body() -> Value {
    json!({
        "model": "local-video",
        "prompt": "A lighthouse in a storm",
        "duration": 2,
        "size": "320x180",
        "fps": 12,
        "seed": 7,
        "webhook_url": "https://example.com/hooks/video",
        "webhook_headers": {"Authorization": "Bearer abc", "X-Tenant": "t1"},
        "webhook_events": ["completed", "failed"],
    })
}

/// What one submit of a batch must come out as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Created,
    /// The same task as the submit at this index of the plan.
    SameAs(usize),
    /// The task created before the batch under this name.
    Earlier(&'static str),
    Conflict,
}

/// Queues every submit, then runs the writer: one batch, whatever the machine's speed.
async fn write_in_one_batch(
    db: &Db,
    submits: Vec<NewSubmit>,
) -> (Vec<Result<Submitted, ApiError>>, Metrics) {
    let metrics = Metrics::new().unwrap();
    let (queue, writer) = submits::channel(db.pool.clone(), metrics.clone(), 1);
    let mut answers: Vec<Answer> = Vec::new();
    for s in submits {
        answers.push(queue.enqueue(s).await.expect("queued"));
    }
    let stop = CancellationToken::new();
    let running = tokio::spawn(writer.run(stop.clone()));
    let mut outcomes = Vec::new();
    for a in answers {
        outcomes.push(a.outcome().await);
    }
    stop.cancel();
    running.await.unwrap();
    (outcomes, metrics)
}

fn task_id(outcome: &Result<Submitted, ApiError>) -> Option<(Uuid, bool)> {
    match outcome {
        Ok(Submitted::Created(t)) => Some((t.id, true)),
        Ok(Submitted::Replayed(t)) => Some((t.id, false)),
        Err(_) => None,
    }
}

#[tokio::test]
async fn a_batch_answers_each_submit_as_if_it_were_alone() {
    let db = Db::new().await;
    let me = db.caller("me").await;
    let other = db.caller("other").await;
    let a = db.request(&body());
    let b = db.request(&other_body());

    // Keys used before the batch.
    let mut earlier = BTreeMap::new();
    for name in ["old", "taken"] {
        let s = NewSubmit::new(&me, &a, Some(name)).unwrap();
        let Submitted::Created(task) = tasks::submit_one(&db.pool, &s).await.unwrap() else {
            panic!("a fresh key creates a task");
        };
        earlier.insert(name, task.id);
    }

    let plan: Vec<(&Caller, &GenerationRequest, Option<&str>, Expect)> = vec![
        (&me, &a, None, Expect::Created),
        (&me, &b, None, Expect::Created),
        (&me, &a, Some("new-1"), Expect::Created),
        (&me, &b, Some("new-2"), Expect::Created),
        (&me, &a, Some("old"), Expect::Earlier("old")),
        (&me, &b, Some("taken"), Expect::Conflict),
        (&me, &a, Some("twin"), Expect::Created),
        (&me, &a, Some("twin"), Expect::SameAs(6)),
        (&me, &b, Some("twin"), Expect::Conflict),
        (&me, &a, None, Expect::Created),
        (&me, &b, Some("old"), Expect::Conflict),
        // Idempotency keys belong to the API key: the same name is another key here.
        (&other, &a, Some("new-1"), Expect::Created),
        (&other, &b, Some("old"), Expect::Created),
    ];
    let submits: Vec<NewSubmit> = plan
        .iter()
        .map(|(caller, request, key, _)| NewSubmit::new(caller, request, *key).unwrap())
        .collect();
    let (outcomes, metrics) = write_in_one_batch(&db, submits.clone()).await;
    assert_eq!(metrics.submit_batch_size.get_sample_count(), 1);
    assert_eq!(
        metrics.submit_batch_size.get_sample_sum() as usize,
        plan.len()
    );

    for (i, ((_, _, key, expect), outcome)) in plan.iter().zip(&outcomes).enumerate() {
        let what = format!("submit {i} (key {key:?}, expected {expect:?}): {outcome:?}");
        match expect {
            Expect::Created => {
                assert_eq!(task_id(outcome), Some((submits[i].task.id, true)), "{what}")
            }
            Expect::SameAs(j) => {
                assert_eq!(
                    task_id(outcome),
                    Some((submits[*j].task.id, false)),
                    "{what}"
                )
            }
            Expect::Earlier(name) => {
                assert_eq!(task_id(outcome), Some((earlier[name], false)), "{what}")
            }
            Expect::Conflict => assert!(
                matches!(outcome, Err(ApiError::IdempotencyKeyReused)),
                "{what}"
            ),
        }
    }

    let created = plan.iter().filter(|p| p.3 == Expect::Created).count() as i64;
    assert_eq!(db.count("SELECT count(*) FROM tasks").await, 2 + created);
    // No relay runs here: every new task's job is still in the outbox, once.
    assert_eq!(db.count("SELECT count(*) FROM outbox").await, 2 + created);
    assert_eq!(
        db.count("SELECT count(DISTINCT task_id) FROM outbox").await,
        2 + created
    );
    assert_eq!(db.count("SELECT count(*) FROM idempotency_keys").await, 7);

    // Every column survives the multi-row insert, and the job is the one built.
    let client = db.pool.get().await.unwrap();
    for (i, s) in submits.iter().enumerate() {
        if plan[i].3 != Expect::Created {
            continue;
        }
        let stored = tasks::get(&client, s.task.api_key_id, s.task.id)
            .await
            .unwrap()
            .expect("the task is stored");
        assert_eq!(stored.prompt, s.task.prompt);
        assert_eq!(stored.model, s.task.model);
        assert_eq!(stored.provider, s.task.provider);
        assert_eq!(stored.upstream_model, s.task.upstream_model);
        assert_eq!(
            (stored.duration, stored.width, stored.height, stored.fps),
            (s.task.duration, s.task.width, s.task.height, s.task.fps)
        );
        assert_eq!(stored.seed, s.task.seed);
        assert_eq!(stored.webhook_url, s.task.webhook_url);
        assert_eq!(stored.webhook_headers, s.task.webhook_headers);
        assert_eq!(stored.webhook_events.names(), s.task.webhook_events.names());
        assert_eq!(stored.created_at, s.task.created_at);
        assert_eq!(stored.status.as_str(), "pending");
        let job: Vec<u8> = client
            .query_one(
                "SELECT body FROM outbox WHERE task_id = $1 AND route = $2",
                &[&s.task.id, &route::JOBS],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(job, s.job.body);
    }
    drop(client);
    db.stop().await;
}

#[tokio::test]
async fn an_empty_webhook_subscription_survives_the_batch() {
    let db = Db::new().await;
    let me = db.caller("me").await;
    let mut quiet = other_body();
    quiet["webhook_events"] = json!([]);
    let requests = [db.request(&quiet), db.request(&body())];
    let submits: Vec<NewSubmit> = requests
        .iter()
        .map(|r| NewSubmit::new(&me, r, None).unwrap())
        .collect();
    let ids: Vec<Uuid> = submits.iter().map(|s| s.task.id).collect();
    let (outcomes, _) = write_in_one_batch(&db, submits).await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Ok(Submitted::Created(_)))));
    let client = db.pool.get().await.unwrap();
    let stored = tasks::get(&client, me.key_id, ids[0])
        .await
        .unwrap()
        .unwrap();
    assert!(stored.webhook_events.names().is_empty());
    let stored = tasks::get(&client, me.key_id, ids[1])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.webhook_events.names().len(), 4);
    drop(client);
    db.stop().await;
}

#[tokio::test]
async fn a_submit_the_database_refuses_fails_alone() {
    let db = Db::new().await;
    let me = db.caller("me").await;
    let a = db.request(&body());
    let mut submits = vec![
        NewSubmit::new(&me, &a, None).unwrap(),
        NewSubmit::new(&me, &a, None).unwrap(),
        NewSubmit::new(&me, &a, Some("kept")).unwrap(),
        NewSubmit::new(&me, &a, None).unwrap(),
    ];
    // PostgreSQL refuses a NUL in text: this row fails the batch's statement, and the
    // others must still be written.
    submits[1].task.prompt = "bad \0 prompt".into();
    let ids: Vec<Uuid> = submits.iter().map(|s| s.task.id).collect();
    let (outcomes, metrics) = write_in_one_batch(&db, submits).await;
    assert_eq!(metrics.submit_batch_size.get_sample_count(), 1);
    for i in [0, 2, 3] {
        assert_eq!(
            task_id(&outcomes[i]),
            Some((ids[i], true)),
            "{:?}",
            outcomes[i]
        );
    }
    assert!(
        matches!(outcomes[1], Err(ApiError::Unexpected(_))),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(db.count("SELECT count(*) FROM tasks").await, 3);
    assert_eq!(db.count("SELECT count(*) FROM outbox").await, 3);
    assert_eq!(db.count("SELECT count(*) FROM idempotency_keys").await, 1);
    db.stop().await;
}

#[tokio::test]
async fn a_key_is_never_deleted_so_its_tasks_always_name_it() {
    let db = Db::new().await;
    let me = db.caller("me").await;
    let s = NewSubmit::new(&me, &db.request(&body()), None).unwrap();
    tasks::submit_one(&db.pool, &s).await.unwrap();
    let client = db.pool.get().await.unwrap();
    let err = client
        .execute("DELETE FROM api_keys WHERE id = $1", &[&me.key_id])
        .await
        .expect_err("deleting a key is refused");
    let db_err = err.as_db_error().expect("refused by the database");
    assert_eq!(db_err.code().code(), "23001", "{db_err:?}");
    assert!(db_err.message().contains("revoke"), "{db_err:?}");
    assert!(keys::revoke(&db.pool, me.key_id).await.unwrap());
    drop(client);
    db.stop().await;
}

#[tokio::test]
async fn a_stopping_writer_still_writes_what_was_queued() {
    let db = Db::new().await;
    let me = db.caller("me").await;
    let a = db.request(&body());
    let metrics = Metrics::new().unwrap();
    let (queue, writer) = submits::channel(db.pool.clone(), metrics, 2);
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(
            queue
                .enqueue(NewSubmit::new(&me, &a, None).unwrap())
                .await
                .unwrap(),
        );
    }
    let stop = CancellationToken::new();
    stop.cancel();
    writer.run(stop).await;
    for a in answers {
        assert!(matches!(a.outcome().await, Ok(Submitted::Created(_))));
    }
    // Once stopped, a new submit is refused as unavailable, never lost silently.
    let late = queue.submit(NewSubmit::new(&me, &a, None).unwrap()).await;
    assert!(matches!(late, Err(ApiError::Unavailable(_))), "{late:?}");
    assert_eq!(db.count("SELECT count(*) FROM tasks").await, 5);
    db.stop().await;
}

/// A submit's body, status and task id.
type Answered<'a> = (&'a Value, u16, Option<String>);

async fn post(app: &TestApp, idem: Option<&str>, b: &Value) -> (u16, Value) {
    let mut req = app
        .http
        .post(app.url("/v1/videos/generations/async"))
        .bearer_auth(&app.key)
        .json(b);
    if let Some(k) = idem {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn concurrent_submits_with_mixed_keys_over_several_writers() {
    // A pool of 16 runs four writers, so submits of one key race across batches too.
    let app = TestApp::spawn_with(|s| s.database.pool_size = 16).await;
    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    let a = body();
    let b = other_body();
    let mut plan: Vec<(Option<String>, &Value)> = Vec::new();
    for i in 0..24 {
        plan.push((None, if i % 2 == 0 { &a } else { &b }));
    }
    for i in 0..8 {
        plan.push((Some(format!("own-{i}")), &a));
    }
    for _ in 0..8 {
        plan.push((Some("shared".into()), &a));
    }
    // One key, two bodies: whichever lands first owns it, the other body gets 409s.
    for i in 0..8 {
        plan.push((Some("contested".into()), if i % 2 == 0 { &a } else { &b }));
    }
    let answers = futures::future::join_all(
        plan.iter()
            .map(|(key, body)| post(&app, key.as_deref(), body)),
    )
    .await;

    let mut created = BTreeSet::new();
    let mut by_key: BTreeMap<&str, Vec<Answered>> = BTreeMap::new();
    for ((key, body), (status, json)) in plan.iter().zip(&answers) {
        let id = json["task_id"].as_str().map(str::to_owned);
        match key {
            None => {
                assert_eq!(*status, 202, "{json}");
                assert!(
                    created.insert(id.unwrap()),
                    "a keyless submit is a new task"
                );
            }
            Some(k) => by_key
                .entry(k.as_str())
                .or_default()
                .push((*body, *status, id)),
        }
    }
    for (key, seen) in &by_key {
        let winners: BTreeSet<&str> = seen
            .iter()
            .filter(|(_, s, _)| *s == 202)
            .map(|(b, _, _)| b["prompt"].as_str().unwrap())
            .collect();
        assert_eq!(winners.len(), 1, "one body owns {key}: {seen:?}");
        let ids: BTreeSet<&String> = seen.iter().filter_map(|(_, _, id)| id.as_ref()).collect();
        assert_eq!(ids.len(), 1, "one task for {key}: {seen:?}");
        for (body, status, _) in seen {
            let owner = winners.contains(body["prompt"].as_str().unwrap());
            assert_eq!(*status, if owner { 202 } else { 409 }, "{key}: {seen:?}");
        }
        created.insert((*ids.iter().next().unwrap()).clone());
    }
    let expected = 24 + 8 + 1 + 1;
    assert_eq!(created.len(), expected);
    assert_eq!(
        app.count("SELECT count(*) FROM tasks").await,
        expected as i64
    );
    // Every task's job reaches the broker, once.
    let mut published = BTreeSet::new();
    while published.len() < expected {
        let job = jobs.next().await;
        assert!(published.insert(job["task_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(
        published,
        created.iter().cloned().collect::<BTreeSet<String>>()
    );
    assert!(jobs
        .drain_for(std::time::Duration::from_millis(300))
        .await
        .is_empty());
    app.stop().await;
}

#[tokio::test]
async fn concurrent_submits_during_a_broker_outage_are_accepted_and_published_later() {
    let mut settings = test_settings();
    settings.database.pool_size = 16;
    let good_url = settings.amqp.url.clone();
    settings.amqp.url = Secret::new("amqp://guest:guest@127.0.0.1:1/%2f");
    let mut app = TestApp::spawn_settings(settings.clone()).await;
    let b = body();
    let keys: Vec<String> = (0..40).map(|i| format!("o-{i}")).collect();
    let answers = futures::future::join_all(keys.iter().map(|k| post(&app, Some(k), &b))).await;
    let mut ids = BTreeSet::new();
    for (status, json) in &answers {
        assert_eq!(*status, 202, "{json}");
        ids.insert(json["task_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 40);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 40);

    let mut jobs = app.collect(Source::Queue(route::JOBS.into()));
    settings.amqp.url = good_url;
    app.restart_with(settings).await;
    let mut seen = BTreeSet::new();
    while seen.len() < ids.len() {
        let job = jobs.next().await;
        assert!(seen.insert(job["task_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(seen, ids);
    eventually("the outbox to be empty", TIMEOUT, || async {
        (app.count("SELECT count(*) FROM outbox").await == 0).then_some(())
    })
    .await;
    app.stop().await;
}
