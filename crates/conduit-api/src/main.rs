//! The `conduit-api` binary: serve (the default), run migrations, or manage API keys.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use conduit_api::{db, keys, App};
use conduit_core::{ops, telemetry, Service, Settings};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "conduit-api", version, about = "Conduit public HTTP API")]
struct Cli {
    /// Configuration file (TOML or JSON); also `CONDUIT_CONFIG`.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Create the database if needed, apply migrations, and exit.
    Migrate,
    /// Print the OpenAPI 3.1 description (what `GET /openapi.json` serves) and exit.
    Openapi,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (it is shown once).
    Create {
        #[arg(long)]
        name: String,
        /// Print {"id","name","key","webhook_secret"} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the keys themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key; it stops working within 10 s.
    Revoke { id: Uuid },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "conduit-api failed");
            eprintln!("conduit-api: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(Service::Api, cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let telemetry = telemetry::init_service(&settings, Service::Api);
            let shutdown = ops::shutdown_on_signals();
            let result = match App::build(settings).await {
                Ok(app) => app.run_until_stopped(shutdown).await,
                Err(err) => Err(err),
            };
            telemetry.shutdown().await;
            result
        }
        Command::Migrate => {
            telemetry::init(&settings.log);
            let pool = db::connect_and_migrate(&settings.database).await?;
            pool.close();
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Openapi => {
            println!("{}", conduit_api::openapi::document());
            Ok(())
        }
        Command::Keys { action } => {
            telemetry::init(&settings.log);
            let pool = db::connect_and_migrate(&settings.database).await?;
            let result = keys_command(&pool, action).await;
            pool.close();
            result
        }
    }
}

async fn keys_command(pool: &deadpool_postgres::Pool, action: KeysCommand) -> anyhow::Result<()> {
    match action {
        KeysCommand::Create { name, json } => {
            let key = keys::create(pool, &name).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&key).context("encoding the key")?
                );
            } else {
                println!("{}", key.key);
                eprintln!(
                    "created key {} ({}); it is shown once. Webhook secret: {}",
                    key.id, key.name, key.webhook_secret
                );
            }
        }
        KeysCommand::List { json } => {
            let all = keys::list(pool).await?;
            if json {
                println!("{}", serde_json::to_string(&all).context("encoding keys")?);
            } else {
                for k in all {
                    let state = match k.revoked_at {
                        Some(at) => format!("revoked {}", conduit_core::time::format_millis(&at)),
                        None => "active".to_owned(),
                    };
                    println!(
                        "{}\t{}\t{}...\t{}\t{}",
                        k.id,
                        k.name,
                        k.key_prefix,
                        conduit_core::time::format_millis(&k.created_at),
                        state
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            if keys::revoke(pool, id).await? {
                println!("revoked {id}");
            } else {
                anyhow::bail!("no active key with id {id}");
            }
        }
    }
    Ok(())
}
