//! Typed configuration, loaded with the `config` crate from built-in defaults, then an
//! optional file (`--config PATH` or `CONDUIT_CONFIG`), then `CONDUIT__SECTION__KEY`
//! environment variables. Secrets are wrapped in [`Secret`] so they never reach a log.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

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
    pub health: HealthSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HealthSettings {
    /// How long a consumer or the outbox relay may be stalled (gone, not merely idle)
    /// before `/healthz` answers 503.
    pub stall_seconds: u64,
}

/// Where traces go. Unset (the default), no exporter runs and spans only feed the logs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TelemetrySettings {
    /// OTLP/HTTP base URL (`http://otel-collector:4318`); traces go to `/v1/traces`
    /// below it. `OTEL_EXPORTER_OTLP_ENDPOINT` is used when this is unset.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    pub url: Secret,
    pub namespace: String,
    /// Unacknowledged deliveries a consumer holds at once.
    pub prefetch: u16,
    /// PEM file of CA certificates trusted for an `amqps://` broker, besides the system
    /// roots. Read at every connection attempt, so a rotated file needs no restart.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl AmqpSettings {
    /// The CA file for `amqps://`, when one is set (an empty value counts as unset).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file
            .as_deref()
            .filter(|path| !path.as_os_str().is_empty())
    }
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
    pub fal: ProviderAccount,
    pub veo: ProviderAccount,
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

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct ModelSettings {
    /// `local`, `minimax`, `openai`, `replicate`, `fal` or `veo`.
    pub provider: String,
    /// The provider's own model name (`MiniMax-Hailuo-02`, `owner/name`, a fal endpoint id).
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Longest duration in seconds the model accepts (the API refuses more).
    #[serde(default)]
    pub max_duration: Option<u32>,
    /// The only durations, in seconds, the model can make (MiniMax Hailuo: 6 and 10).
    #[serde(default)]
    pub durations: Option<Vec<u32>>,
    /// The only sizes the model can make, exactly as `WIDTHxHEIGHT` (Veo: `1280x720`, `720x1280`, ...).
    #[serde(default)]
    pub sizes: Option<Vec<String>>,
    /// The output resolutions of a model that takes a resolution name rather than a size
    /// (MiniMax: `512P`, `768P`, `1080P`). A request's size picks the smallest one at
    /// least as tall as the size's height; these models render landscape frames only.
    #[serde(default)]
    pub resolutions: Option<Vec<ResolutionTier>>,
    /// Whether the model takes an `image_url` (a first frame); the API refuses one otherwise.
    #[serde(default)]
    pub image_input: bool,
    /// The upstream model to use instead of `upstream_model` when the request has an image
    /// (fal serves text-to-video and image-to-video as different endpoints).
    #[serde(default)]
    pub image_upstream_model: Option<String>,
    /// The input field that carries the image, for providers whose models name it
    /// differently (Replicate: `first_frame_image`, `start_image`, `image`; fal: `image_url`).
    #[serde(default)]
    pub image_field: Option<String>,
    /// Other model ids to try, in order, when this model's provider rate-limits or cannot
    /// be reached after its retries (never after a refusal or a bad request).
    #[serde(default)]
    pub fallback: Vec<String>,
}

/// One output resolution of a model, such as MiniMax's `768P`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ResolutionTier {
    /// The name the provider expects (`768P`).
    pub name: String,
    /// Frame height in pixels (768).
    pub height: u32,
    /// Longest duration the model makes at this resolution, when shorter than its others
    /// (MiniMax Hailuo makes 1080P videos of 6 seconds only).
    #[serde(default)]
    pub max_duration: Option<u32>,
}

/// Why a model cannot make what a request asks for: the request field at fault and a
/// message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLimit {
    pub param: &'static str,
    pub message: String,
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    match items.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

impl ModelSettings {
    /// The resolution a `width`x`height` request maps to: the smallest tier at least as
    /// tall as `height`, for a landscape size. `None` when the model has no tiers or none fits.
    pub fn resolution_for(&self, width: u32, height: u32) -> Option<&ResolutionTier> {
        if width <= height {
            return None;
        }
        self.resolutions
            .as_deref()?
            .iter()
            .filter(|tier| tier.height >= height)
            .min_by_key(|tier| tier.height)
    }

    /// Checks that the model can make a video of `duration` seconds at `width`x`height`;
    /// `model` names it in the message.
    pub fn check_request(
        &self,
        model: &str,
        duration: u32,
        width: u32,
        height: u32,
    ) -> Result<(), ModelLimit> {
        if let Some(max) = self.max_duration {
            if duration > max {
                return Err(ModelLimit {
                    param: "duration",
                    message: format!("duration must be at most {max} seconds for model {model}"),
                });
            }
        }
        if let Some(durations) = self.durations.as_deref().filter(|d| !d.is_empty()) {
            if !durations.contains(&duration) {
                return Err(ModelLimit {
                    param: "duration",
                    message: format!(
                        "duration must be {} seconds for model {model} (got {duration})",
                        list(durations)
                    ),
                });
            }
        }
        let size = format!("{width}x{height}");
        if let Some(sizes) = self.sizes.as_deref().filter(|s| !s.is_empty()) {
            if !sizes.iter().any(|s| s.eq_ignore_ascii_case(&size)) {
                return Err(ModelLimit {
                    param: "size",
                    message: format!(
                        "size must be {} for model {model} (got {size:?})",
                        list(sizes)
                    ),
                });
            }
        }
        if let Some(tiers) = self.resolutions.as_deref().filter(|t| !t.is_empty()) {
            let names: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
            let tallest = tiers.iter().map(|t| t.height).max().unwrap_or(0);
            let Some(tier) = self.resolution_for(width, height) else {
                return Err(ModelLimit {
                    param: "size",
                    message: format!(
                        "size {size:?} is not available for model {model}: it renders landscape videos at {} \
                         (the size's height picks the resolution), so the size must be wider than tall \
                         and at most {tallest} high",
                        list(&names)
                    ),
                });
            };
            if let Some(max) = tier.max_duration {
                if duration > max {
                    return Err(ModelLimit {
                        param: "duration",
                        message: format!(
                            "model {model} renders size {size:?} at {}, which allows at most {max} seconds \
                             (got {duration}); ask for a shorter duration or a smaller size",
                            tier.name
                        ),
                    });
                }
            }
        }
        Ok(())
    }
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

    /// All delays together: how long the schedule can keep an event pending.
    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().copied().map(format_duration).collect();
        f.write_str(&parts.join(","))
    }
}

/// Written as its `0s,5s,5m` form, so it travels in messages as it is configured.
impl serde::Serialize for RetrySchedule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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
        if let Some(ca) = self.amqp.ca_file() {
            anyhow::ensure!(
                self.amqp.url.expose().starts_with("amqps://"),
                "amqp.ca_file is set but amqp.url is not an amqps:// URL: the CA would never be used"
            );
            crate::tls::read_pem_certificates(ca, "amqp.ca_file")?;
        }
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
        anyhow::ensure!(
            self.health.stall_seconds > 0,
            "health.stall_seconds must be at least 1"
        );
        Ok(())
    }

    pub fn webhook_timeout(&self) -> Duration {
        Duration::from_secs(self.webhooks.timeout_seconds)
    }

    pub fn task_timeout(&self) -> Duration {
        Duration::from_secs(self.generator.task_timeout_seconds)
    }

    /// How long a work loop may be silent before `/healthz` answers 503.
    pub fn stall_grace(&self) -> Duration {
        Duration::from_secs(self.health.stall_seconds)
    }
}

/// A default [`ResolutionTier`] as a configuration value.
fn tier(name: &str, height: u32, max_duration: Option<u32>) -> config::Value {
    let mut t = config::Map::<String, config::Value>::new();
    t.insert("name".into(), name.into());
    t.insert("height".into(), height.into());
    if let Some(max) = max_duration {
        t.insert("max_duration".into(), max.into());
    }
    t.into()
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
        // No default server: OpenAI shut its Videos API down on 2026-09-24; the protocol
        // lives on at servers that copied it, and the operator names one.
        .set_default("providers.openai.base_url", "")?
        .set_default("providers.replicate.base_url", "https://api.replicate.com")?
        .set_default("providers.fal.base_url", "https://queue.fal.run")?
        .set_default(
            "providers.veo.base_url",
            "https://generativelanguage.googleapis.com",
        )?
        .set_default("models.local-video.provider", "local")?
        .set_default("models.local-video.image_input", true)?
        .set_default("models.minimax-video.provider", "minimax")?
        .set_default("models.minimax-video.upstream_model", "MiniMax-Hailuo-02")?
        .set_default("models.minimax-video.image_input", true)?
        .set_default("models.minimax-video.max_duration", 10)?
        .set_default("models.minimax-video.durations", vec![6, 10])?
        .set_default(
            "models.minimax-video.resolutions",
            vec![
                tier("512P", 512, None),
                tier("768P", 768, None),
                tier("1080P", 1080, Some(6)),
            ],
        )?
        // `openai-video` has no upstream model and no limits by default: it stays
        // unavailable until the operator names the server's model (and its limits).
        .set_default("models.openai-video.provider", "openai")?
        .set_default("models.openai-video.image_input", true)?
        .set_default("models.replicate-video.provider", "replicate")?
        .set_default("models.replicate-video.upstream_model", "minimax/video-01")?
        .set_default("models.replicate-video.durations", vec![6])?
        .set_default("models.replicate-video.sizes", vec!["1280x720"])?
        .set_default("models.replicate-video.image_input", true)?
        .set_default("models.replicate-video.image_field", "first_frame_image")?
        .set_default("models.fal-video.provider", "fal")?
        .set_default(
            "models.fal-video.upstream_model",
            "fal-ai/kling-video/v2.1/standard/text-to-video",
        )?
        .set_default(
            "models.fal-video.image_upstream_model",
            "fal-ai/kling-video/v2.1/standard/image-to-video",
        )?
        .set_default("models.fal-video.durations", vec![5, 10])?
        .set_default("models.fal-video.image_input", true)?
        .set_default("models.fal-video.image_field", "image_url")?
        .set_default("models.veo-video.provider", "veo")?
        .set_default(
            "models.veo-video.upstream_model",
            "veo-3.1-generate-preview",
        )?
        .set_default("models.veo-video.durations", vec![4, 6, 8])?
        .set_default(
            "models.veo-video.sizes",
            vec!["1280x720", "720x1280", "1920x1080", "1080x1920"],
        )?
        .set_default("models.veo-video.image_input", true)?
        .set_default("log.format", "json")?
        .set_default("log.level", "info")?
        .set_default("health.stall_seconds", 60)?;
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

    fn model(settings: &Settings, id: &str) -> ModelSettings {
        settings.models.get(id).cloned().unwrap()
    }

    #[test]
    fn minimax_limits_map_size_to_resolution_by_height() {
        let s: Settings = defaults(Service::Api)
            .unwrap()
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let m = model(&s, "minimax-video");
        let name = |w, h| m.resolution_for(w, h).map(|t| t.name.clone());
        assert_eq!(name(640, 360).as_deref(), Some("512P"));
        assert_eq!(name(912, 512).as_deref(), Some("512P"));
        assert_eq!(name(1280, 720).as_deref(), Some("768P"));
        assert_eq!(name(1366, 768).as_deref(), Some("768P"));
        assert_eq!(name(1920, 1080).as_deref(), Some("1080P"));
        assert_eq!(name(3840, 2160), None);
        assert_eq!(name(720, 1280), None);
        assert_eq!(name(512, 512), None);

        assert!(m.check_request("minimax-video", 6, 1280, 720).is_ok());
        assert!(m.check_request("minimax-video", 10, 1280, 720).is_ok());
        assert!(m.check_request("minimax-video", 10, 640, 360).is_ok());
        assert!(m.check_request("minimax-video", 6, 1920, 1080).is_ok());
        let e = m
            .check_request("minimax-video", 10, 1920, 1080)
            .unwrap_err();
        assert_eq!(e.param, "duration");
        assert!(
            e.message.contains("1080P") && e.message.contains("6 seconds"),
            "{}",
            e.message
        );
        let e = m.check_request("minimax-video", 8, 1280, 720).unwrap_err();
        assert_eq!(e.param, "duration");
        assert!(e.message.contains("6 or 10"), "{}", e.message);
        let e = m.check_request("minimax-video", 6, 720, 1280).unwrap_err();
        assert_eq!(e.param, "size");
        assert!(e.message.contains("512P, 768P or 1080P"), "{}", e.message);
        assert_eq!(
            m.check_request("minimax-video", 6, 2560, 1440)
                .unwrap_err()
                .param,
            "size"
        );
    }

    #[test]
    fn sized_models_take_only_their_sizes_and_durations() {
        let s: Settings = defaults(Service::Api)
            .unwrap()
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let o = model(&s, "veo-video");
        assert!(o.check_request("veo-video", 8, 1280, 720).is_ok());
        assert!(o.check_request("veo-video", 4, 720, 1280).is_ok());
        let e = o.check_request("veo-video", 5, 1280, 720).unwrap_err();
        assert_eq!(e.param, "duration");
        assert!(e.message.contains("4, 6 or 8"), "{}", e.message);
        assert_eq!(
            o.check_request("veo-video", 8, 640, 360).unwrap_err().param,
            "size"
        );
        // No default server or model for the `/v1/videos` protocol.
        let openai = model(&s, "openai-video");
        assert_eq!(openai.upstream_model, None);
        assert!(s.providers.openai.base_url.is_empty());
        let local = model(&s, "local-video");
        assert!(local.check_request("local-video", 60, 3840, 64).is_ok());
    }

    #[test]
    fn a_file_replaces_a_default_list_instead_of_merging_into_it() {
        let dir = std::env::temp_dir().join(format!("conduit-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("conduit.toml");
        std::fs::write(
            &path,
            "[models.minimax-video]\nresolutions = [{ name = \"768P\", height = 768 }]\n",
        )
        .unwrap();
        let s = Settings::load(Service::Generator, Some(&path)).unwrap();
        let m = model(&s, "minimax-video");
        assert_eq!(m.resolutions.as_deref().map(<[_]>::len), Some(1));
        assert_eq!(m.upstream_model.as_deref(), Some("MiniMax-Hailuo-02"));
        assert_eq!(m.durations, Some(vec![6, 10]));
        let _ = std::fs::remove_dir_all(dir);
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
