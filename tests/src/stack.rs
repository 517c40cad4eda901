//! One Conduit stack made of the real binaries, started as child processes against the
//! machine's RabbitMQ and PostgreSQL under a namespace, database and video folder of its
//! own. The binaries come from the workspace's target folder; `scripts/test` builds them
//! before the tests run.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::eventually;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PG_ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// How a stack is made up.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub generators: usize,
    pub senders: usize,
    pub retry_schedule: String,
    pub generator_concurrency: usize,
    /// Further `CONDUIT__...` variables for every service.
    pub env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            generators: 1,
            senders: 1,
            retry_schedule: "0s,300ms,300ms,300ms,300ms,300ms".into(),
            generator_concurrency: 2,
            env: Vec::new(),
        }
    }
}

/// One service process.
pub struct Proc {
    bin: &'static str,
    child: Option<Child>,
    pub port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Proc {
    fn spawn(bin: &'static str, env: &[(String, String)], dir: &Path, index: usize) -> Self {
        let port = free_port();
        let log = dir.join(format!("{bin}-{index}.log"));
        let mut env = env.to_vec();
        env.push(("CONDUIT__HTTP__BIND".into(), format!("127.0.0.1:{port}")));
        let mut proc = Self {
            bin,
            child: None,
            port,
            env,
            log,
        };
        proc.start();
        proc
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open service log");
        let child = Command::new(binary(self.bin))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin));
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `kill -9`: no chance to finish or hand anything back.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to 35 s for the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(35);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the process again on the same port.
    pub fn restart(&mut self) {
        self.kill9();
        self.start();
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let url = self.url("/readyz");
        eventually(
            &format!("{} to be ready", self.bin),
            Duration::from_secs(60),
            || {
                let client = client.clone();
                let url = url.clone();
                async move {
                    let r = client.get(&url).send().await.ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A whole stack: API, generators, senders, one API key.
pub struct Stack {
    pub namespace: String,
    pub database: String,
    pub storage: PathBuf,
    pub api: Proc,
    pub generators: Vec<Proc>,
    pub senders: Vec<Proc>,
    pub key: String,
    pub secret: String,
    pub http: reqwest::Client,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        let namespace = conduit_core::testing::unique_namespace();
        let database = format!("conduit_{namespace}");
        let dir = std::env::temp_dir().join(format!("conduit-stack-{namespace}"));
        let storage = dir.join("videos");
        std::fs::create_dir_all(&storage).expect("create stack folder");
        let api_port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("CONDUIT__AMQP__URL".into(), AMQP_URL.into()),
            ("CONDUIT__AMQP__NAMESPACE".into(), namespace.clone()),
            (
                "CONDUIT__DATABASE__URL".into(),
                format!("postgres://postgres@127.0.0.1:5432/{database}"),
            ),
            ("CONDUIT__DATABASE__POOL_SIZE".into(), "4".into()),
            (
                "CONDUIT__PUBLIC_BASE_URL".into(),
                format!("http://127.0.0.1:{api_port}"),
            ),
            (
                "CONDUIT__STORAGE__URL".into(),
                format!("file://{}", storage.display()),
            ),
            (
                "CONDUIT__WEBHOOKS__RETRY_SCHEDULE".into(),
                options.retry_schedule.clone(),
            ),
            (
                "CONDUIT__WEBHOOKS__ALLOW_PRIVATE_TARGETS".into(),
                "true".into(),
            ),
            (
                "CONDUIT__GENERATOR__CONCURRENCY".into(),
                options.generator_concurrency.to_string(),
            ),
            ("CONDUIT__LOG__FORMAT".into(), "json".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        env.extend(options.env.iter().cloned());

        let key_json =
            run_api_command(&env, &["keys", "create", "--name", "system-test", "--json"]);
        let key = key_json["key"]
            .as_str()
            .expect("key in keys create output")
            .to_owned();
        let secret = key_json["webhook_secret"]
            .as_str()
            .expect("webhook_secret in keys create output")
            .to_owned();

        let mut api_env = env.clone();
        api_env.retain(|(k, _)| k != "CONDUIT__HTTP__BIND");
        let api = {
            let log = dir.join("conduit-api-0.log");
            let mut env = api_env.clone();
            env.push((
                "CONDUIT__HTTP__BIND".into(),
                format!("127.0.0.1:{api_port}"),
            ));
            let mut p = Proc {
                bin: "conduit-api",
                child: None,
                port: api_port,
                env,
                log,
            };
            p.start();
            p
        };
        let generators = (0..options.generators)
            .map(|i| Proc::spawn("conduit-generator", &env, &dir, i))
            .collect();
        let senders = (0..options.senders)
            .map(|i| Proc::spawn("conduit-webhook-sender", &env, &dir, i))
            .collect();
        let stack = Self {
            namespace,
            database,
            storage,
            api,
            generators,
            senders,
            key,
            secret,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            env,
            dir,
        };
        stack.api.wait_ready().await;
        for p in stack.generators.iter().chain(&stack.senders) {
            p.wait_ready().await;
        }
        stack
    }

    /// Adds a generator process to the stack.
    pub async fn add_generator(&mut self) -> usize {
        let i = self.generators.len();
        let p = Proc::spawn("conduit-generator", &self.env, &self.dir, i);
        p.wait_ready().await;
        self.generators.push(p);
        i
    }

    /// Adds a webhook sender process to the stack.
    pub async fn add_sender(&mut self) -> usize {
        let i = self.senders.len();
        let p = Proc::spawn("conduit-webhook-sender", &self.env, &self.dir, i);
        p.wait_ready().await;
        self.senders.push(p);
        i
    }

    pub fn api_url(&self, path: &str) -> String {
        self.api.url(path)
    }

    /// POSTs a generation request and returns (status, body).
    pub async fn submit(&self, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.api_url("/v1/videos/generations/async"))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .expect("submit request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Submits and returns the task id, asserting a 202.
    pub async fn submit_ok(&self, body: &Value) -> String {
        let (status, json) = self.submit(body).await;
        assert_eq!(status, 202, "submit answered {status}: {json}");
        json["task_id"].as_str().expect("task_id").to_owned()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.api_url(path))
            .bearer_auth(&self.key)
            .send()
            .await
            .expect("GET request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn task(&self, id: &str) -> Value {
        let (status, json) = self
            .get(&format!("/v1/videos/generations/tasks/{id}"))
            .await;
        assert_eq!(status, 200, "task lookup answered {status}: {json}");
        json
    }

    /// Waits until the task's status is `status`.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        eventually(&format!("task {id} to be {status}"), timeout, || async {
            let task = self.task(id).await;
            (task["status"] == status).then_some(task)
        })
        .await
    }

    /// Stops every process with SIGTERM and removes the namespace, database and folder.
    pub async fn stop(mut self) {
        for p in self
            .senders
            .iter_mut()
            .chain(self.generators.iter_mut())
            .chain(std::iter::once(&mut self.api))
        {
            p.terminate();
        }
        let _ = conduit_core::testing::delete_namespace(AMQP_URL, &self.namespace).await;
        drop_database(&self.database).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `conduit-api ARGS` with the stack's environment and parses its stdout as JSON.
pub fn run_api_command(env: &[(String, String)], args: &[&str]) -> Value {
    let out = Command::new(binary("conduit-api"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .output()
        .expect("run conduit-api");
    assert!(
        out.status.success(),
        "conduit-api {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "conduit-api {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn drop_database(name: &str) {
    let Ok((client, conn)) = tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls).await
    else {
        return;
    };
    tokio::spawn(conn);
    let _ = client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await;
}

/// Path of a workspace binary in the target folder (`scripts/test` builds them first).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which ./scripts/test does)",
        path.display()
    );
    path
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
