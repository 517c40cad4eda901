//! TLS to PostgreSQL and RabbitMQ with the real binaries.
//!
//! PostgreSQL: the machine's server has `ssl = on` with its own (self-signed) certificate.
//! The API started with `sslmode=require` talks TLS (`pg_stat_ssl` says so for each of its
//! connections; with `sslmode=disable` it says the opposite, so the check can fail);
//! `verify-full` with a throw-away CA stops it at start-up with an error naming the
//! setting; the server's own certificate as `sslrootcert` passes `verify-full` under the
//! name the certificate carries and `verify-ca` under any name, and fails `verify-full`
//! under another name.
//!
//! RabbitMQ: stunnel (Debian's `stunnel4`) terminates TLS in front of the machine's
//! broker with a certificate of a CA made for the test; a stack on `amqps://` with that
//! CA in `CONDUIT__AMQP__CA_FILE` runs a task, and a generator given another CA never
//! becomes ready and logs the refusal at ERROR.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use conduit_testkit::{
    eventually,
    stack::{binary, free_port, AMQP_URL},
    Stack, StackOptions,
};
use serde_json::json;

const PG_ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

/// A folder of the test's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("conduit-tls-{what}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throw-away CA in `dir`: `<name>-ca.pem` and its key.
fn make_ca(dir: &TempDir, name: &str) -> PathBuf {
    let cert = dir.path(&format!("{name}-ca.pem"));
    let key = dir.path(&format!("{name}-ca.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=Conduit test CA {name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        key.to_str().expect("utf-8 path"),
        "-out",
        cert.to_str().expect("utf-8 path"),
    ]);
    cert
}

/// A server certificate for 127.0.0.1 signed by the CA `ca` made by [`make_ca`]; returns
/// (certificate, key).
fn make_server_cert(dir: &TempDir, ca: &Path) -> (PathBuf, PathBuf) {
    let ca_key = ca.with_extension("key");
    let csr = dir.path("server.csr");
    let key = dir.path("server.key");
    let cert = dir.path("server.pem");
    let ext = dir.path("server.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write extensions");
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        key.to_str().expect("utf-8 path"),
        "-out",
        csr.to_str().expect("utf-8 path"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().expect("utf-8 path"),
        "-CA",
        ca.to_str().expect("utf-8 path"),
        "-CAkey",
        ca_key.to_str().expect("utf-8 path"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext.to_str().expect("utf-8 path"),
        "-out",
        cert.to_str().expect("utf-8 path"),
    ]);
    (cert, key)
}

/// A child process killed when dropped, its output in a log file.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn spawn(program: &Path, args: &[&str], env: &[(String, String)], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("create log");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Self { child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `within` for the process to exit; `None` while it still runs.
    async fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = tokio::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL as postgres");
    tokio::spawn(conn);
    client
}

async fn drop_database(name: &str) {
    let _ = admin()
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await;
}

/// `(ssl, version)` of every connection the API holds to `database`.
async fn api_connections(database: &str) -> Vec<(bool, Option<String>)> {
    admin()
        .await
        .query(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = $1 AND a.application_name = 'conduit-api'",
            &[&database],
        )
        .await
        .expect("query pg_stat_ssl")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// An API process on its own database, namespace and port.
struct Api {
    proc: Running,
    port: u16,
    database: String,
    namespace: String,
    _dir: TempDir,
}

impl Api {
    /// Starts `conduit-api serve` with `database.url` =
    /// `postgres://postgres@{host}:5432/{database}?{params}`.
    fn start(host: &str, params: &str) -> Self {
        let dir = TempDir::new("api");
        let namespace = conduit_core::testing::unique_namespace();
        let database = format!("conduit_{namespace}");
        let port = free_port().expect("a free port");
        let env = vec![
            ("CONDUIT__AMQP__URL".into(), AMQP_URL.to_owned()),
            ("CONDUIT__AMQP__NAMESPACE".into(), namespace.clone()),
            (
                "CONDUIT__DATABASE__URL".into(),
                format!("postgres://postgres@{host}:5432/{database}?{params}"),
            ),
            ("CONDUIT__DATABASE__POOL_SIZE".into(), "4".into()),
            ("CONDUIT__HTTP__BIND".into(), format!("127.0.0.1:{port}")),
            (
                "CONDUIT__STORAGE__URL".into(),
                format!("file://{}", dir.path("videos").display()),
            ),
            ("CONDUIT__LOG__FORMAT".into(), "json".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        let proc = Running::spawn(&binary("conduit-api"), &[], &env, dir.path("api.log"));
        Self {
            proc,
            port,
            database,
            namespace,
            _dir: dir,
        }
    }

    async fn wait_ready(&mut self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let client = reqwest::Client::new();
        let start = tokio::time::Instant::now();
        loop {
            if let Ok(r) = client.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                panic!(
                    "conduit-api exited ({status}) instead of becoming ready:\n{}",
                    self.proc.logs()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "conduit-api not ready within 60 s:\n{}",
                self.proc.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts, waits until ready and returns the API's connections as `pg_stat_ssl` sees them.
    async fn connections_when_ready(mut self) -> Vec<(bool, Option<String>)> {
        self.wait_ready().await;
        let connections = eventually(
            "the API's connections in pg_stat_activity",
            Duration::from_secs(10),
            || async {
                let c = api_connections(&self.database).await;
                (!c.is_empty()).then_some(c)
            },
        )
        .await;
        self.cleanup().await;
        connections
    }

    async fn cleanup(self) {
        drop(self.proc);
        let _ = conduit_core::testing::delete_namespace(AMQP_URL, &self.namespace).await;
        drop_database(&self.database).await;
    }
}

#[tokio::test]
async fn sslmode_require_talks_tls_to_postgres_and_disable_does_not() {
    let tls = Api::start("127.0.0.1", "sslmode=require")
        .connections_when_ready()
        .await;
    assert!(
        tls.iter().all(|(ssl, version)| *ssl && version.is_some()),
        "with sslmode=require every connection uses TLS: {tls:?}"
    );

    let plain = Api::start("127.0.0.1", "sslmode=disable")
        .connections_when_ready()
        .await;
    assert!(
        plain.iter().all(|(ssl, _)| !*ssl),
        "with sslmode=disable no connection uses TLS: {plain:?}"
    );

    // The default, prefer, uses TLS when the server offers it, as libpq does.
    let preferred = Api::start("127.0.0.1", "application_name=conduit-api")
        .connections_when_ready()
        .await;
    assert!(
        preferred.iter().all(|(ssl, _)| *ssl),
        "with the default sslmode=prefer every connection uses TLS: {preferred:?}"
    );
}

/// Starts the API with `params` and expects it to stop at start-up; returns its output.
async fn refused_at_start_up(host: &str, params: &str) -> String {
    let mut api = Api::start(host, params);
    let status = api.proc.exit_within(Duration::from_secs(60)).await;
    let logs = api.proc.logs();
    assert!(
        status.is_some_and(|s| !s.success()),
        "conduit-api should stop with an error ({status:?}):\n{logs}"
    );
    // Refused at once: a certificate is not an outage to wait out.
    assert!(
        !logs.contains("PostgreSQL not reachable yet"),
        "a refused certificate was retried:\n{logs}"
    );
    api.cleanup().await;
    logs
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_stops_the_api_at_start_up() {
    let dir = TempDir::new("wrong-ca");
    let ca = make_ca(&dir, "wrong");
    let logs = refused_at_start_up(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    )
    .await;
    let stderr_line = logs
        .lines()
        .find(|l| l.starts_with("conduit-api: "))
        .unwrap_or_else(|| panic!("no error line on stderr:\n{logs}"));
    assert!(
        stderr_line.contains("certificate of PostgreSQL server 127.0.0.1 was refused")
            && stderr_line.contains("sslmode=verify-full")
            && stderr_line.contains(&format!("sslrootcert={}", ca.display()))
            && stderr_line.contains("UnknownIssuer"),
        "the error names the setting and the reason: {stderr_line}"
    );

    // A CA file that does not exist is a configuration error, also at once.
    let logs = refused_at_start_up(
        "127.0.0.1",
        "sslmode=verify-full&sslrootcert=/nonexistent/conduit-ca.pem",
    )
    .await;
    assert!(
        logs.contains("sslrootcert: cannot read CA file /nonexistent/conduit-ca.pem"),
        "{logs}"
    );
}

/// The server's certificate file, when it can be read here: the machine's PostgreSQL uses
/// a self-signed certificate, which is its own CA.
async fn server_certificate() -> Option<(PathBuf, String)> {
    let row = admin()
        .await
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .ok()?;
    let path = PathBuf::from(row.get::<_, String>(0));
    let path = if path.is_relative() {
        let data = admin()
            .await
            .query_one("SHOW data_directory", &[])
            .await
            .ok()?;
        PathBuf::from(data.get::<_, String>(0)).join(path)
    } else {
        path
    };
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&path)
        .output()
        .ok()?;
    text.status
        .success()
        .then(|| (path, String::from_utf8_lossy(&text.stdout).into_owned()))
}

#[tokio::test]
async fn the_servers_own_certificate_passes_verify_ca_and_verify_full_under_its_name() {
    let Some((cert, names)) = server_certificate().await else {
        eprintln!("skipped: the server's certificate file cannot be read here");
        return;
    };
    if !names.contains("DNS:localhost") {
        eprintln!("skipped: the server's certificate does not name localhost ({names})");
        return;
    }
    let root = format!("sslrootcert={}", cert.display());

    let full = Api::start("localhost", &format!("sslmode=verify-full&{root}"))
        .connections_when_ready()
        .await;
    assert!(full.iter().all(|(ssl, _)| *ssl), "{full:?}");

    // verify-ca checks the chain only: the address is not a name in the certificate.
    let ca = Api::start("127.0.0.1", &format!("sslmode=verify-ca&{root}"))
        .connections_when_ready()
        .await;
    assert!(ca.iter().all(|(ssl, _)| *ssl), "{ca:?}");

    // verify-full under a name the certificate does not carry is refused.
    let logs = refused_at_start_up("127.0.0.1", &format!("sslmode=verify-full&{root}")).await;
    assert!(
        logs.contains("was refused") && logs.contains("certificate not valid for name"),
        "{logs}"
    );
}

/// stunnel terminating TLS on a free port in front of the machine's RabbitMQ.
struct Stunnel {
    _proc: Running,
    port: u16,
}

fn stunnel_program() -> Option<PathBuf> {
    ["stunnel4", "stunnel"].iter().find_map(|name| {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()?;
        let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
        (found.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
    })
}

async fn start_stunnel(dir: &TempDir, cert: &Path, key: &Path) -> Stunnel {
    let program =
        stunnel_program().expect("stunnel is installed (scripts/test installs Debian's stunnel4)");
    let port = free_port().expect("a free port");
    let conf = dir.path("stunnel.conf");
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\n\n[amqps]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:5672\ncert = {}\nkey = {}\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("write stunnel.conf");
    let proc = Running::spawn(
        &program,
        &[conf.to_str().expect("utf-8 path")],
        &[],
        dir.path("stunnel.log"),
    );
    eventually("stunnel to listen", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(drop)
    })
    .await;
    Stunnel { _proc: proc, port }
}

#[tokio::test]
async fn amqps_through_a_tls_terminator_with_a_ca_file() {
    let dir = TempDir::new("amqps");
    let ca = make_ca(&dir, "broker");
    let (cert, key) = make_server_cert(&dir, &ca);
    let stunnel = start_stunnel(&dir, &cert, &key).await;
    let amqps = format!("amqps://guest:guest@127.0.0.1:{}/%2f", stunnel.port);

    // A whole stack over TLS: the task goes API -> generator -> API through the terminator.
    let stack = Stack::start_with(StackOptions {
        senders: 0,
        env: vec![
            ("CONDUIT__AMQP__URL".into(), amqps.clone()),
            ("CONDUIT__AMQP__CA_FILE".into(), ca.display().to_string()),
        ],
        ..StackOptions::default()
    })
    .await;
    let task_id = stack
        .submit_ok(&json!({
            "model": "local-video",
            "prompt": "A lighthouse blinking over a calm sea",
            "duration": 1,
            "size": "160x90",
            "fps": 6,
        }))
        .await;
    let task = stack
        .wait_status(&task_id, "completed", Duration::from_secs(90))
        .await;
    assert!(task["video_url"].is_string(), "{task}");
    let namespace = stack.namespace.clone();
    stack.stop().await;

    // Another CA: the generator never becomes ready and says why.
    let wrong = make_ca(&dir, "other");
    let port = free_port().expect("a free port");
    let env = vec![
        ("CONDUIT__AMQP__URL".into(), amqps),
        ("CONDUIT__AMQP__CA_FILE".into(), wrong.display().to_string()),
        ("CONDUIT__AMQP__NAMESPACE".into(), namespace),
        ("CONDUIT__HTTP__BIND".into(), format!("127.0.0.1:{port}")),
        (
            "CONDUIT__STORAGE__URL".into(),
            format!("file://{}", dir.path("videos").display()),
        ),
        ("CONDUIT__LOG__FORMAT".into(), "json".into()),
        ("RUST_LOG".into(), "info".into()),
    ];
    let generator = Running::spawn(
        &binary("conduit-generator"),
        &[],
        &env,
        dir.path("generator.log"),
    );
    // lapin retries the handshake by itself; rustls' verifier logs each refusal at ERROR.
    let line = eventually(
        "the generator to log the refused certificate",
        Duration::from_secs(30),
        || async {
            generator
                .logs()
                .lines()
                .find(|l| l.contains("invalid peer certificate: UnknownIssuer"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(line.contains("\"ERROR\""), "{line}");
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("generator answers HTTP");
    assert_eq!(ready.status().as_u16(), 503, "not ready without the broker");
    // Still retrying, like any broker outage.
    let mut generator = generator;
    assert!(generator
        .exit_within(Duration::from_millis(500))
        .await
        .is_none());
    assert!(!generator.logs().contains("connected to RabbitMQ"));
}
