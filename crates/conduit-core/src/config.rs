//! Typed configuration, loaded with the `config` crate from built-in defaults, then an
//! optional file (`--config PATH` or `CONDUIT_CONFIG`), then `CONDUIT__SECTION__KEY`
//! environment variables. Secrets are wrapped in [`Secret`] so they never reach a log.

use std::{collections::BTreeMap, fmt, path::Path, time::Duration};

use anyhow::Context;
use serde::{Deserialize, Deserializer};

use crate::time::{format_duration, parse_duration};

/// Which binary is loading its settings; only the default HTTP bind differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Api,
    Generator,
    WebhookSender,
}

impl Service {
    pub fn default_bind(self) -> &'static str {
        match self {
            Service::Api => "0.0.0.0:8080",
            Service::Generator => "0.0.0.0:8081",
            Service::WebhookSender => "0.0.0.0:8082",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Api => "conduit-api",
            Service::Generator => "conduit-generator",
            Service::WebhookSender => "conduit-webhook-sender",
        }
    }
}

/// A configuration value that must never be printed (API keys, tokens).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub public_base_url: String,
    pub storage: StorageSettings,
    pub webhooks: WebhookSettings,
    pub generator: GeneratorSettings,
    pub providers: ProviderSettings,
    /// Model id → provider and upstream model. `GET /v1/models` lists these.
    pub models: BTreeMap<String, ModelSettings>,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    pub url: Secret,
    pub namespace: String,
    /// Unacknowledged deliveries a consumer holds at once.
    pub prefetch: u16,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub pool_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    pub bind: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StorageSettings {
    pub url: String,
    /// Lifetime of a signed `video_url`.
    pub url_ttl_seconds: u64,
    /// Key that signs `video_url`s; when unset the API keeps a generated one in its database.
    pub signing_key: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WebhookSettings {
    pub retry_schedule: RetrySchedule,
    pub timeout_seconds: u64,
    pub connect_timeout_seconds: u64,
    pub allow_private_targets: bool,
    /// Deliveries in flight at once in one sender process.
    pub concurrency: usize,
    /// Deliveries in flight at once to one host, so a hanging receiver holds only its own slots.
    pub per_host_concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GeneratorSettings {
    pub concurrency: usize,
    pub task_timeout_seconds: u64,
    /// Deliveries of one job (lost workers included) before the task fails.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSettings {
    pub minimax: ProviderAccount,
    pub openai: ProviderAccount,
    pub replicate: ProviderAccount,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProviderAccount {
    /// `api_key` for MiniMax and OpenAI, `api_token` for Replicate.
    #[serde(alias = "api_token")]
    pub api_key: Option<Secret>,
    pub base_url: String,
    /// Seconds between status polls (the adapter backs off from here).
    #[serde(default = "default_poll_seconds")]
    pub poll_interval_seconds: f64,
}

fn default_poll_seconds() -> f64 {
    2.0
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ModelSettings {
    /// `local`, `minimax`, `openai` or `replicate`.
    pub provider: String,
    /// The provider's own model name (`MiniMax-Hailuo-02`, `sora-2`, `owner/name`).
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Longest duration in seconds the model accepts (the API refuses more).
    #[serde(default)]
    pub max_duration: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `RUST_LOG`-style filter used when `RUST_LOG` is unset.
    pub level: String,
}

/// The delay before each attempt of a terminal webhook, `0s,5s,5m,30m,2h,5h,10h,10h` by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl RetrySchedule {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let delays = raw
            .split(',')
            .map(|part| parse_duration(part).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        if delays.is_empty() {
            return Err("the retry schedule needs at least one attempt".into());
        }
        Ok(Self(delays))
    }

    /// Delays before attempt 1, 2, ... (the first is usually zero).
    pub fn delays(&self) -> &[Duration] {
        &self.0
    }

    pub fn attempts(&self) -> usize {
        self.0.len()
    }

    /// The delay before attempt `n` (1-based), `None` past the last attempt.
    pub fn delay_before(&self, attempt: usize) -> Option<Duration> {
        attempt.checked_sub(1).and_then(|i| self.0.get(i)).copied()
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().copied().map(format_duration).collect();
        f.write_str(&parts.join(","))
    }
}

impl<'de> Deserialize<'de> for RetrySchedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        RetrySchedule::parse(&raw).map_err(serde::de::Error::custom)
    }
}

pub const DEFAULT_RETRY_SCHEDULE: &str = "0s,5s,5m,30m,2h,5h,10h,10h";

impl Settings {
    /// Loads defaults, then the file named by `file` or `CONDUIT_CONFIG`, then the environment.
    pub fn load(service: Service, file: Option<&Path>) -> anyhow::Result<Self> {
        let env_file = std::env::var_os("CONDUIT_CONFIG").map(std::path::PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut builder = defaults(service)?;
        if let Some(path) = &file {
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("CONDUIT")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| match &file {
                Some(path) => format!("loading configuration (file {})", path.display()),
                None => "loading configuration from defaults and environment".to_owned(),
            })?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.amqp.namespace.is_empty()
                && self
                    .amqp
                    .namespace
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "amqp.namespace must be non-empty and use only letters, digits, '-', '_' and '.'"
        );
        anyhow::ensure!(self.amqp.prefetch > 0, "amqp.prefetch must be at least 1");
        anyhow::ensure!(
            self.webhooks.concurrency > 0,
            "webhooks.concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.webhooks.per_host_concurrency > 0,
            "webhooks.per_host_concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.generator.concurrency > 0,
            "generator.concurrency must be at least 1"
        );
        anyhow::ensure!(
            self.generator.max_attempts > 0,
            "generator.max_attempts must be at least 1"
        );
        Ok(())
    }

    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_secs(self.webhooks.timeout_seconds)
    }

    pub fn task_timeout(&self) -> Duration {
        Duration::from_secs(self.generator.task_timeout_seconds)
    }
}

fn defaults(
    service: Service,
) -> anyhow::Result<config::ConfigBuilder<config::builder::DefaultState>> {
    let b = config::Config::builder()
        .set_default("amqp.url", "amqp://guest:guest@127.0.0.1:5672/%2f")?
        .set_default("amqp.namespace", "conduit")?
        .set_default("amqp.prefetch", 64)?
        .set_default("database.url", "postgres://postgres@127.0.0.1:5432/conduit")?
        .set_default("database.pool_size", 16)?
        .set_default("http.bind", service.default_bind())?
        .set_default("public_base_url", "http://127.0.0.1:8080")?
        .set_default("storage.url", "file://./data/videos")?
        .set_default("storage.url_ttl_seconds", 86_400)?
        .set_default("webhooks.retry_schedule", DEFAULT_RETRY_SCHEDULE)?
        .set_default("webhooks.timeout_seconds", 30)?
        .set_default("webhooks.connect_timeout_seconds", 5)?
        .set_default("webhooks.allow_private_targets", false)?
        .set_default("webhooks.concurrency", 512)?
        .set_default("webhooks.per_host_concurrency", 64)?
        .set_default("generator.concurrency", 2)?
        .set_default("generator.task_timeout_seconds", 1800)?
        .set_default("generator.max_attempts", 3)?
        .set_default("providers.minimax.base_url", "https://api.minimax.io")?
        .set_default("providers.openai.base_url", "https://api.openai.com")?
        .set_default("providers.replicate.base_url", "https://api.replicate.com")?
        .set_default("models.local-video.provider", "local")?
        .set_default("models.minimax-video.provider", "minimax")?
        .set_default("models.minimax-video.upstream_model", "MiniMax-Hailuo-02")?
        .set_default("models.minimax-video.max_duration", 10)?
        .set_default("models.openai-video.provider", "openai")?
        .set_default("models.openai-video.upstream_model", "sora-2")?
        .set_default("models.openai-video.max_duration", 12)?
        .set_default("models.replicate-video.provider", "replicate")?
        .set_default("models.replicate-video.upstream_model", "minimax/video-01")?
        .set_default("log.format", "json")?
        .set_default("log.level", "info")?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_has_eight_attempts() {
        let s = RetrySchedule::parse(DEFAULT_RETRY_SCHEDULE).unwrap();
        assert_eq!(s.attempts(), 8);
        assert_eq!(s.delay_before(1), Some(Duration::ZERO));
        assert_eq!(s.delay_before(3), Some(Duration::from_secs(300)));
        assert_eq!(s.delay_before(9), None);
        assert_eq!(s.delay_before(0), None);
        assert_eq!(s.to_string(), DEFAULT_RETRY_SCHEDULE);
    }

    #[test]
    fn schedule_refuses_bad_parts() {
        assert!(RetrySchedule::parse("0s,,5s").is_err());
        assert!(RetrySchedule::parse("0s,5x").is_err());
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::new("condt_very_secret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn defaults_load_per_service() {
        let api = defaults(Service::Api).unwrap().build().unwrap();
        let settings: Settings = api.try_deserialize().unwrap();
        assert_eq!(settings.http.bind, "0.0.0.0:8080");
        assert_eq!(settings.amqp.namespace, "conduit");
        assert_eq!(settings.webhooks.retry_schedule.attempts(), 8);
        assert!(settings.models.contains_key("local-video"));
        assert!(settings.providers.minimax.api_key.is_none());
        let sender: Settings = defaults(Service::WebhookSender)
            .unwrap()
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(sender.http.bind, "0.0.0.0:8082");
    }
}
