//! Group commit: submits written together answer exactly as if each were written alone.
//! These tests drive the writer directly against a database of their own, queueing every
//! submit before it starts so they all land in one batch. The HTTP-level tests that load
//! the real server from many clients are in `tests/it/batching.rs`.

use std::collections::BTreeMap;

use conduit_core::{
    config::{Service, Settings},
    testing,
    topology::route,
};
use deadpool_postgres::Pool;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{channel, Answer};
use crate::{
    db,
    domain::{GenerationRequest, ModelCatalog},
    keys,
    ledger::{lifecycle, LedgerError, NewTask, Submitted},
    metrics::Metrics,
};

/// A caller's key, as the writer sees it.
struct Caller {
    key_id: Uuid,
}

fn body() -> Value {
    json!({"model": "local-video", "prompt": "A serene mountain landscape with clouds"})
}

impl NewTask {
    fn for_test(caller: &Caller, request: &GenerationRequest, key: Option<&str>) -> NewTask {
        request.to_new_task(caller.key_id, key).expect("new task")
    }
}

struct Db {
    settings: Settings,
    pool: Pool,
    models: ModelCatalog,
}

impl Db {
    async fn new() -> Self {
        let settings = testing::settings(Service::Api);
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
        Caller { key_id: key.id }
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
        let mut config: tokio_postgres::Config = self
            .settings
            .database
            .url
            .expose()
            .parse()
            .expect("database URL");
        let name = config.get_dbname().unwrap_or_default().to_owned();
        config.dbname("postgres");
        if let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
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
    submits: Vec<NewTask>,
) -> (Vec<Result<Submitted, LedgerError>>, Metrics) {
    let metrics = Metrics::new().unwrap();
    let (queue, writer) = channel(db.pool.clone(), metrics.clone(), 1);
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

fn task_id(outcome: &Result<Submitted, LedgerError>) -> Option<(Uuid, bool)> {
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
        let s = NewTask::for_test(&me, &a, Some(name));
        let (queue, writer) = channel(db.pool.clone(), Metrics::new().unwrap(), 1);
        let stop = CancellationToken::new();
        let running = tokio::spawn(writer.run(stop.clone()));
        let written = queue.submit(s).await.unwrap();
        stop.cancel();
        running.await.unwrap();
        let Submitted::Created(task) = written else {
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
    let submits: Vec<NewTask> = plan
        .iter()
        .map(|(caller, request, key, _)| NewTask::for_test(caller, request, *key))
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
                matches!(outcome, Err(LedgerError::IdempotencyKeyReused)),
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
        let stored = lifecycle::get(&client, s.task.api_key_id, s.task.id)
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
    let submits: Vec<NewTask> = requests
        .iter()
        .map(|r| NewTask::for_test(&me, r, None))
        .collect();
    let ids: Vec<Uuid> = submits.iter().map(|s| s.task.id).collect();
    let (outcomes, _) = write_in_one_batch(&db, submits).await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Ok(Submitted::Created(_)))));
    let client = db.pool.get().await.unwrap();
    let stored = lifecycle::get(&client, me.key_id, ids[0])
        .await
        .unwrap()
        .unwrap();
    assert!(stored.webhook_events.names().is_empty());
    let stored = lifecycle::get(&client, me.key_id, ids[1])
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
        NewTask::for_test(&me, &a, None),
        NewTask::for_test(&me, &a, None),
        NewTask::for_test(&me, &a, Some("kept")),
        NewTask::for_test(&me, &a, None),
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
        matches!(outcomes[1], Err(LedgerError::Internal(_))),
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
    let s = NewTask::for_test(&me, &db.request(&body()), None);
    write_in_one_batch(&db, vec![s]).await.0.remove(0).unwrap();
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
    let (queue, writer) = channel(db.pool.clone(), metrics, 2);
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(
            queue
                .enqueue(NewTask::for_test(&me, &a, None))
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
    let late = queue.submit(NewTask::for_test(&me, &a, None)).await;
    assert!(matches!(late, Err(LedgerError::Unavailable(_))), "{late:?}");
    assert_eq!(db.count("SELECT count(*) FROM tasks").await, 5);
    db.stop().await;
}
