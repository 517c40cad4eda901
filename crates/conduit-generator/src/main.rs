use std::path::PathBuf;

use clap::Parser;
use conduit_core::{ops, telemetry, Service, Settings};
use conduit_generator::App;

/// Conduit generator: consumes generation jobs and publishes their status events.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML or JSON); `CONDUIT_CONFIG` works too.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(Service::Generator, cli.config.as_deref())?;
    let telemetry = telemetry::init_service(&settings, Service::Generator);
    let result = match App::build(settings).await {
        Ok(app) => app.run_until_stopped(ops::shutdown_on_signals()).await,
        Err(err) => Err(err),
    };
    telemetry.shutdown().await;
    result
}
