//! The services under test as real processes, started from a target folder against the
//! machine's RabbitMQ and PostgreSQL under a namespace and database of the run's own.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG_ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// What every service process of one run shares.
#[derive(Debug, Clone)]
pub struct Env {
    pub bin_dir: PathBuf,
    pub dir: PathBuf,
    pub namespace: String,
    pub database: String,
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new(bin_dir: &Path, namespace: &str) -> anyhow::Result<Self> {
        let database = format!("conduit_{namespace}");
        let dir = std::env::temp_dir().join(format!("conduit-bench-{namespace}"));
        std::fs::create_dir_all(dir.join("videos")).context("creating the run's folder")?;
        let vars = vec![
            ("CONDUIT__AMQP__URL".into(), AMQP_URL.into()),
            ("CONDUIT__AMQP__NAMESPACE".into(), namespace.to_owned()),
            (
                "CONDUIT__DATABASE__URL".into(),
                format!("postgres://postgres@127.0.0.1:5432/{database}"),
            ),
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

    pub fn binary(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if !path.exists() {
            bail!(
                "{} is missing: build the services first (scripts/bench does)",
                path.display()
            );
        }
        Ok(path)
    }

    /// `conduit-api keys create --name bench --json`: (key, webhook_secret).
    pub fn create_key(&self) -> anyhow::Result<(String, String)> {
        let out = Command::new(self.binary("conduit-api")?)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .args(["keys", "create", "--name", "bench", "--json"])
            .output()
            .context("running conduit-api keys create")?;
        if !out.status.success() {
            bail!(
                "conduit-api keys create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("keys create printed no JSON")?;
        let field = |name: &str| {
            json[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("no {name} in keys create output"))
        };
        Ok((field("key")?, field("webhook_secret")?))
    }

    /// Starts `bin` with the run's variables plus `extra`, HTTP on a free port.
    pub fn spawn(&self, bin: &str, index: usize, extra: &[(&str, String)]) -> anyhow::Result<Proc> {
        let port = free_port()?;
        let log_path = self.dir.join(format!("{bin}-{index}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .context("opening a service log")?;
        let child = Command::new(self.binary(bin)?)
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .envs(deployed_env(bin).iter().map(|(k, v)| (*k, *v)))
            .envs(extra.iter().map(|(k, v)| (*k, v)))
            .env("CONDUIT__HTTP__BIND", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning a log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Proc {
            name: bin.to_owned(),
            child: Some(child),
            port,
            log: log_path,
        })
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
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits for `/readyz` to answer 200.
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

    /// SIGTERM, then up to `grace` for the exit; kills it after that.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

/// The variables the images set for `bin` (`deploy/Dockerfile`), so the benchmark
/// measures the services as they are deployed.
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
