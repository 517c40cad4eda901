use std::path::PathBuf;

use clap::Parser;
use conduit_core::{ops, telemetry, Service, Settings};
use conduit_webhook_sender::App;

/// Conduit webhook sender: delivers signed webhook events to client URLs.
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
    let settings = Settings::load(Service::WebhookSender, cli.config.as_deref())?;
    let telemetry = telemetry::init_service(&settings, Service::WebhookSender);
    let result = match App::build(settings).await {
        Ok(app) => app.run_until_stopped(ops::shutdown_on_signals()).await,
        Err(err) => Err(err),
    };
    telemetry.shutdown().await;
    result
}
