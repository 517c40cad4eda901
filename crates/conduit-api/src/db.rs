//! PostgreSQL: the connection pool, creating the database when it is missing, and the
//! migrations, embedded in the binary and applied in order under an advisory lock so
//! several API replicas starting together migrate once. Every connection honours
//! `sslmode` and `sslrootcert` in `database.url` (see [`tls`]).

use std::time::Duration;

use anyhow::{bail, Context};
use conduit_core::config::DatabaseSettings;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tracing::info;

use self::tls::MakeRustls;

mod tls;

/// Every migration, in order. Never edit one that has shipped: add the next.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "no per-row key checks",
        include_str!("../migrations/0002_no_per_row_key_checks.sql"),
    ),
    (
        3,
        "image_url",
        include_str!("../migrations/0003_image_url.sql"),
    ),
    (
        4,
        "stream events",
        include_str!("../migrations/0004_stream_events.sql"),
    ),
    (
        5,
        "webhook retry, batch and secret rotation",
        include_str!("../migrations/0005_webhook_retry_batch_rotation.sql"),
    ),
    (
        6,
        "outbox traceparent",
        include_str!("../migrations/0006_outbox_traceparent.sql"),
    ),
    (
        7,
        "one webhook per task in flight",
        include_str!("../migrations/0007_webhook_order.sql"),
    ),
];

/// Arbitrary constant naming the advisory lock that serialises migrations.
const MIGRATION_LOCK: i64 = 0x636f_6e64_7569_7401;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver's configuration and the TLS connector for `database.url`. A CA file that
/// cannot be read is an error here, before any connection.
fn pg_config(url: &str) -> anyhow::Result<(tokio_postgres::Config, MakeRustls)> {
    let (rest, params) = tls::split_tls_params(url)?;
    let mut config: tokio_postgres::Config = rest.parse().context("parsing database.url")?;
    config.ssl_mode(params.mode.for_driver());
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("conduit-api");
    }
    let tls = MakeRustls::new(&params)?;
    Ok((config, tls))
}

/// A failure to be reported at once rather than waited out: the server's certificate
/// (or the TLS handshake) was refused.
fn is_tls_refusal(err: &tokio_postgres::Error) -> bool {
    std::error::Error::source(err)
        .and_then(|e| e.downcast_ref::<tls::TlsError>())
        .is_some_and(|e| !matches!(e, tls::TlsError::Broken(_)))
}

/// Builds the pool. Connections are opened lazily, so this succeeds while the database
/// is away; every wait is bounded so a request answers 503 instead of hanging.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    let (config, tls) = pg_config(settings.url.expose())?;
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the database pool")
}

/// Creates the database named in `database.url` when it does not exist, by connecting
/// to the `postgres` database of the same server.
pub(crate) async fn ensure_database(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let (config, tls) = pg_config(settings.url.expose())?;
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        bail!("database.url names no database");
    };
    // A database we can reach needs nothing done (and the role may lack CREATEDB).
    match config.connect(tls.clone()).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            drop(client);
            return Ok(());
        }
        Err(e) if is_tls_refusal(&e) => {
            return Err(e).context("connecting to PostgreSQL");
        }
        Err(_) => {}
    }
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, conn) = admin
        .connect(tls)
        .await
        .context("connecting to the postgres database to create the service's database")?;
    tokio::spawn(conn);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .context("looking up the database")?
        .is_some();
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match client.batch_execute(&sql).await {
            Ok(()) => info!(database = %name, "created database"),
            // Another replica created it between our look-up and our CREATE.
            Err(e) if is_duplicate_database(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("creating database {name}")),
        }
    }
    Ok(())
}

fn is_duplicate_database(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| matches!(db.code().code(), "42P04" | "23505"))
}

/// Applies every migration not yet recorded in `schema_migrations`.
pub(crate) async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool
        .get()
        .await
        .context("connecting to the database to migrate")?;
    let tx = client.transaction().await.context("starting migration")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("taking the migration lock")?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .context("creating schema_migrations")?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .context("reading schema_migrations")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("applying migration {version} ({name})"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .context("recording migration")?;
        info!(version, name, "applied migration");
    }
    tx.commit().await.context("committing migrations")?;
    Ok(())
}

/// Creates the database if needed, builds the pool and migrates: what every entry point
/// (serve, migrate, keys) does first.
pub async fn connect_and_migrate(settings: &DatabaseSettings) -> anyhow::Result<Pool> {
    ensure_database(settings).await?;
    let pool = pool(settings)?;
    migrate(&pool).await?;
    Ok(pool)
}

/// A value of the `settings` table, written once when missing (first writer wins, so
/// every replica ends up with the same value).
pub(crate) async fn setting_or_insert(
    pool: &Pool,
    key: &str,
    fresh: String,
) -> anyhow::Result<String> {
    let client = pool.get().await.context("connecting to the database")?;
    client
        .execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&key, &fresh],
        )
        .await
        .with_context(|| format!("storing setting {key}"))?;
    let row = client
        .query_one("SELECT value FROM settings WHERE key = $1", &[&key])
        .await
        .with_context(|| format!("reading setting {key}"))?;
    Ok(row.get(0))
}

/// True when an error chain says the database cannot be reached right now.
pub(crate) fn is_unavailable(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        if cause
            .downcast_ref::<deadpool_postgres::PoolError>()
            .is_some()
        {
            return true;
        }
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            return pg_is_unavailable(pg);
        }
        cause.downcast_ref::<std::io::Error>().is_some()
    })
}

fn pg_is_unavailable(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.as_db_error() {
        // Connection exceptions, shutdowns, too many connections, read-only failover.
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "25006"
        }
        None => std::error::Error::source(err)
            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()),
    }
}
