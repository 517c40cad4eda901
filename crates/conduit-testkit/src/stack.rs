//! The real service binaries as child processes, against the machine's RabbitMQ and
//! PostgreSQL under a namespace, database and folder of their own: [`Env`] is what the
//! processes of one run share (the benchmark starts its processes from it), [`Stack`] is
//! a whole stack for the system tests (API, generators, senders, one API key). The
//! binaries come from a target folder; `scripts/test` and `scripts/bench` build them
//! first.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::eventually;

/// Where the machine's RabbitMQ and PostgreSQL are, kept with the services' own test
/// settings in `conduit_core::testing`.
pub use conduit_core::testing::{database_url, AMQP_URL, PG_ADMIN_URL};

/// `target/debug` of the workspace (or of `CARGO_TARGET_DIR`).
pub fn debug_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("debug")
}

/// Path of a workspace binary in [`debug_bin_dir`]; panics, saying how to build it,
/// when it is missing (for tests that start one binary by themselves).
pub fn binary(name: &str) -> PathBuf {
    let path = debug_bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which ./scripts/test does)",
        path.display()
    );
    path
}

/// What every service process of one run shares: where the binaries are, a folder for
/// logs and videos, the namespace, the database and the `CONDUIT__...` variables.
#[derive(Debug, Clone)]
pub struct Env {
    pub bin_dir: PathBuf,
    pub dir: PathBuf,
    pub namespace: String,
    pub database: String,
    pub vars: Vec<(String, String)>,
}

impl Env {
    /// A run named `label` (it names the folder) on `namespace`.
    pub fn new(bin_dir: &Path, label: &str, namespace: &str) -> anyhow::Result<Self> {
        let database = format!("conduit_{namespace}");
        let dir = std::env::temp_dir().join(format!("conduit-{label}-{namespace}"));
        std::fs::create_dir_all(dir.join("videos")).context("creating the run's folder")?;
        let vars = vec![
            ("CONDUIT__AMQP__URL".into(), AMQP_URL.into()),
            ("CONDUIT__AMQP__NAMESPACE".into(), namespace.to_owned()),
            ("CONDUIT__DATABASE__URL".into(), database_url(&database)),
            (
                "CONDUIT__STORAGE__URL".into(),
                format!("file://{}", dir.join("videos").display()),
            ),
            (
                "CONDUIT__WEBHOOKS__ALLOW_PRIVATE_TARGETS".into(),
                "true".into(),
            ),
            ("CONDUIT__LOG__FORMAT".into(), "json".into()),
        ];
        Ok(Self {
            bin_dir: bin_dir.to_owned(),
            dir,
            namespace: namespace.to_owned(),
            database,
            vars,
        })
    }

    /// Where the services store videos.
    pub fn storage(&self) -> PathBuf {
        self.dir.join("videos")
    }

    pub fn binary(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if !path.exists() {
            bail!(
                "{} is missing: build the service binaries first \
                 (`cargo build --workspace --bins`; scripts/test and scripts/bench do)",
                path.display()
            );
        }
        Ok(path)
    }

    /// Runs `conduit-api ARGS` with the run's variables and parses its stdout as JSON.
    pub fn run_api_command(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = Command::new(self.binary("conduit-api")?)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .args(args)
            .output()
            .with_context(|| format!("running conduit-api {args:?}"))?;
        if !out.status.success() {
            bail!(
                "conduit-api {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "conduit-api {args:?} printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `conduit-api keys create --name NAME --json`: (key, webhook_secret).
    pub fn create_key(&self, name: &str) -> anyhow::Result<(String, String)> {
        let json = self.run_api_command(&["keys", "create", "--name", name, "--json"])?;
        let field = |field: &str| {
            json[field]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("no {field} in keys create output"))
        };
        Ok((field("key")?, field("webhook_secret")?))
    }

    /// Starts `bin` with the run's variables plus `extra`, HTTP on a free port.
    pub fn spawn(&self, bin: &str, index: usize, extra: &[(&str, String)]) -> anyhow::Result<Proc> {
        self.spawn_on(bin, index, free_port()?, extra)
    }

    /// Starts `bin` with the run's variables plus `extra`, HTTP on `port`.
    pub fn spawn_on(
        &self,
        bin: &str,
        index: usize,
        port: u16,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Proc> {
        let mut env = self.vars.clone();
        env.extend(
            deployed_env(bin)
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env.push(("CONDUIT__HTTP__BIND".into(), format!("127.0.0.1:{port}")));
        let mut proc = Proc {
            name: bin.to_owned(),
            binary: self.binary(bin)?,
            child: None,
            port,
            env,
            log: self.dir.join(format!("{bin}-{index}.log")),
        };
        proc.start()?;
        Ok(proc)
    }

    /// Removes the namespace, the database and the folder (best effort).
    pub async fn clean_up(&self) {
        let _ = conduit_core::testing::delete_namespace(AMQP_URL, &self.namespace).await;
        let _ = drop_database(&self.database).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One service process; killed when dropped.
pub struct Proc {
    pub name: String,
    binary: PathBuf,
    child: Option<Child>,
    pub port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Proc {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening a service log")?;
        let child = Command::new(&self.binary)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning a log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits for `/readyz` to answer 200; fails early if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "{} exited ({status}) before it was ready; log {}",
                        self.name,
                        self.log.display()
                    );
                }
            }
            if let Ok(r) = client.get(self.url("/readyz")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within {timeout:?}; log {}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        vm_hwm_kib(self.pid()?)
    }

    /// `kill -9`: no chance to finish or hand anything back.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then up to `grace` for the exit status; killed after that (`None`).
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Starts the process again (`kill -9` first) with the same variables and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.start()
            .unwrap_or_else(|e| panic!("restarting {}: {e:#}", self.name));
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How a [`Stack`] is made up.
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

/// A whole stack for the system tests: API, generators, senders, one API key, the
/// debug binaries of the workspace.
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
    env: Env,
}

impl Stack {
    /// How long a process may take to become ready.
    pub const READY: Duration = Duration::from_secs(60);
    /// How long a process may take to stop on SIGTERM.
    pub const STOP_GRACE: Duration = Duration::from_secs(35);

    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        let namespace = conduit_core::testing::unique_namespace();
        let mut env =
            Env::new(&debug_bin_dir(), "stack", &namespace).expect("create the stack's folder");
        let api_port = free_port().expect("a free port for the API");
        env.vars.extend([
            ("CONDUIT__DATABASE__POOL_SIZE".into(), "4".into()),
            (
                "CONDUIT__PUBLIC_BASE_URL".into(),
                format!("http://127.0.0.1:{api_port}"),
            ),
            (
                "CONDUIT__WEBHOOKS__RETRY_SCHEDULE".into(),
                options.retry_schedule.clone(),
            ),
            (
                "CONDUIT__GENERATOR__CONCURRENCY".into(),
                options.generator_concurrency.to_string(),
            ),
            ("RUST_LOG".into(), "info".into()),
        ]);
        env.vars.extend(options.env.iter().cloned());

        let (key, secret) = env.create_key("system-test").expect("keys create");
        let api = env
            .spawn_on("conduit-api", 0, api_port, &[])
            .expect("start conduit-api");
        let generators = (0..options.generators)
            .map(|i| env.spawn("conduit-generator", i, &[]))
            .collect::<anyhow::Result<Vec<_>>>()
            .expect("start the generators");
        let senders = (0..options.senders)
            .map(|i| env.spawn("conduit-webhook-sender", i, &[]))
            .collect::<anyhow::Result<Vec<_>>>()
            .expect("start the senders");
        let mut stack = Self {
            namespace,
            database: env.database.clone(),
            storage: env.storage(),
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
        };
        for p in std::iter::once(&mut stack.api)
            .chain(stack.generators.iter_mut())
            .chain(stack.senders.iter_mut())
        {
            p.wait_ready(Self::READY)
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        stack
    }

    /// Adds a generator process to the stack.
    pub async fn add_generator(&mut self) -> usize {
        let i = self.generators.len();
        let p = self.add("conduit-generator", i).await;
        self.generators.push(p);
        i
    }

    /// Adds a webhook sender process to the stack.
    pub async fn add_sender(&mut self) -> usize {
        let i = self.senders.len();
        let p = self.add("conduit-webhook-sender", i).await;
        self.senders.push(p);
        i
    }

    /// Starts another API process (replica `index`, 1 and up; it names the log) on the
    /// stack's database and namespace, ready; the caller owns it.
    pub async fn spawn_api(&self, index: usize) -> Proc {
        assert!(index > 0, "replica 0 is the stack's own API");
        self.add("conduit-api", index).await
    }

    async fn add(&self, bin: &str, index: usize) -> Proc {
        let mut p = self
            .env
            .spawn(bin, index, &[])
            .unwrap_or_else(|e| panic!("{e:#}"));
        p.wait_ready(Self::READY)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        p
    }

    pub fn api_url(&self, path: &str) -> String {
        self.api.url(path)
    }

    /// Runs `conduit-api ARGS` with the stack's variables and parses its stdout as JSON.
    pub fn run_api_command(&self, args: &[&str]) -> Value {
        self.env
            .run_api_command(args)
            .unwrap_or_else(|e| panic!("{e:#}"))
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
            p.terminate(Self::STOP_GRACE);
        }
        self.env.clean_up().await;
    }
}

/// `VmHWM` of `/proc/<pid>/status`, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// A client of the machine's PostgreSQL as the administrator.
pub async fn pg_admin() -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(conn);
    Ok(client)
}

pub async fn drop_database(name: &str) -> anyhow::Result<()> {
    pg_admin()
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .context("dropping a scratch database")
}

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port())
}

/// The variables the images set for `bin` (`deploy/Dockerfile`), so the services run
/// as they are deployed (the benchmark measures them so).
fn deployed_env(bin: &str) -> &'static [(&'static str, &'static str)] {
    match bin {
        "conduit-generator" => &[("MALLOC_MMAP_THRESHOLD_", "131072")],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_hwm() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    4242 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(4242));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }
}
