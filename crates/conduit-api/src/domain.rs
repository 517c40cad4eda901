//! The submit request, parsed into types that cannot hold an invalid value. Parsing
//! starts from a `serde_json::Value`, not a derived `Deserialize`, so every refusal names
//! the exact field and says whether it was missing, unknown, of the wrong JSON type or
//! out of range.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use conduit_core::{
    config::{ModelSettings, Settings},
    netguard::is_forbidden_ip,
    payload::WebhookEvent,
};
use serde::Serialize;
use serde_json::{Map, Value};
use url::{Host, Url};

use conduit_core::{config::RetrySchedule, messages::BatchSettings};

use crate::{
    error::FieldError,
    ledger::{IdempotencyClaim, NewTask, TaskRow, TaskStatus, WebhookEvents},
    webhook_options::{parse_webhook_batch, parse_webhook_retry},
};

pub(crate) const MAX_PROMPT_CHARS: usize = 4000;
pub(crate) const MAX_DURATION: u32 = 60;
pub(crate) const DEFAULT_DURATION: u32 = 6;
pub(crate) const DEFAULT_SIZE: (u32, u32) = (1280, 720);
pub(crate) const DEFAULT_FPS: u32 = 24;
pub(crate) const MAX_URL_CHARS: usize = 2048;
pub(crate) const MAX_HEADERS: usize = 20;
pub(crate) const MAX_HEADERS_BYTES: usize = 8 * 1024;
const FORBIDDEN_HEADERS: [&str; 6] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "user-agent",
];
/// Largest `image_url` image, decoded.
pub const MAX_IMAGE_BYTES: usize = 10 << 20;
/// Longest `data:` `image_url`: the prefix and 10 MiB as base64.
pub const MAX_IMAGE_DATA_URI_CHARS: usize = 64 + MAX_IMAGE_BYTES.div_ceil(3) * 4;
const FIELDS: [&str; 12] = [
    "model",
    "prompt",
    "duration",
    "size",
    "fps",
    "seed",
    "webhook_url",
    "webhook_headers",
    "webhook_events",
    "image_url",
    "webhook_retry",
    "webhook_batch",
];

/// One configured model and whether its provider can be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ModelEntry {
    pub(crate) id: String,
    pub(crate) provider: String,
    pub(crate) upstream_model: Option<String>,
    pub(crate) max_duration: Option<u32>,
    /// The setting that must be set before the model can be used, when it is not.
    pub(crate) missing_setting: Option<String>,
    /// The model's configured limits (durations, sizes, resolutions), checked at submit.
    #[serde(skip)]
    pub(crate) settings: ModelSettings,
}

impl ModelEntry {
    pub(crate) fn available(&self) -> bool {
        self.missing_setting.is_none()
    }

    /// Whether the model takes an `image_url`.
    pub fn image_input(&self) -> bool {
        self.settings.image_input
    }
}

/// The setting a model still needs before it can be used, if any.
fn missing_setting(id: &str, m: &ModelSettings, settings: &Settings) -> Option<String> {
    let p = &settings.providers;
    let model_key = || format!("CONDUIT__MODELS__{}", id.to_uppercase());
    let no_upstream = m
        .upstream_model
        .as_deref()
        .is_none_or(|u| u.trim().is_empty());
    match m.provider.as_str() {
        "local" => None,
        "minimax" if p.minimax.api_key.is_none() => {
            Some("CONDUIT__PROVIDERS__MINIMAX__API_KEY".to_owned())
        }
        "openai" if p.openai.base_url.trim().is_empty() => {
            Some("CONDUIT__PROVIDERS__OPENAI__BASE_URL".to_owned())
        }
        "openai" if p.openai.api_key.is_none() => {
            Some("CONDUIT__PROVIDERS__OPENAI__API_KEY".to_owned())
        }
        "replicate" if p.replicate.api_key.is_none() => {
            Some("CONDUIT__PROVIDERS__REPLICATE__API_TOKEN".to_owned())
        }
        "fal" if p.fal.api_key.is_none() => Some("CONDUIT__PROVIDERS__FAL__API_KEY".to_owned()),
        "veo" if p.veo.api_key.is_none() => Some("CONDUIT__PROVIDERS__VEO__API_KEY".to_owned()),
        // These name the provider's model explicitly: there is no default to fall back on.
        "openai" | "replicate" | "fal" | "veo" if no_upstream => Some(format!(
            "models.{id}.upstream_model in the configuration file ({}__UPSTREAM_MODEL)",
            model_key()
        )),
        "minimax" | "openai" | "replicate" | "fal" | "veo" => None,
        other => Some(format!(
            "a supported provider (not {other:?}) in {}__PROVIDER",
            model_key()
        )),
    }
}

/// The configured models, by id.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelCatalog(BTreeMap<String, ModelEntry>);

impl ModelCatalog {
    pub(crate) fn from_settings(settings: &Settings) -> Self {
        let entries = settings
            .models
            .iter()
            .map(|(id, m)| {
                let missing_setting = missing_setting(id, m, settings);
                let entry = ModelEntry {
                    id: id.clone(),
                    provider: m.provider.clone(),
                    upstream_model: m.upstream_model.clone(),
                    max_duration: m.max_duration,
                    missing_setting,
                    settings: m.clone(),
                };
                (id.clone(), entry)
            })
            .collect();
        Self(entries)
    }

    pub(crate) fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.0.get(id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &ModelEntry> {
        self.0.values()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prompt(String);

impl Prompt {
    pub(crate) fn parse(raw: &str) -> Result<Self, FieldError> {
        let chars = raw.chars().count();
        if raw.trim().is_empty() {
            return Err(FieldError::invalid("prompt", "prompt must not be empty"));
        }
        // PostgreSQL text cannot hold NUL, and no prompt needs one.
        if raw.contains('\0') {
            return Err(FieldError::invalid(
                "prompt",
                "prompt must not contain NUL characters",
            ));
        }
        if chars > MAX_PROMPT_CHARS {
            return Err(FieldError::invalid(
                "prompt",
                format!("prompt must be at most {MAX_PROMPT_CHARS} characters (got {chars})"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameSize {
    pub(crate) width: u32,
    pub(crate) height: u32,
}

impl FrameSize {
    pub(crate) fn parse(raw: &str) -> Result<Self, FieldError> {
        let bad = || {
            FieldError::invalid(
                "size",
                format!("size must look like \"1280x720\": WIDTHxHEIGHT, both even, from 64 to 3840 (got {raw:?})"),
            )
        };
        let (w, h) = raw.split_once('x').ok_or_else(bad)?;
        let dim = |s: &str| -> Result<u32, FieldError> {
            if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u32 = s.parse().map_err(|_| bad())?;
            if !(64..=3840).contains(&n) || !n.is_multiple_of(2) {
                return Err(bad());
            }
            Ok(n)
        };
        Ok(Self {
            width: dim(w)?,
            height: dim(h)?,
        })
    }
}

impl std::fmt::Display for FrameSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// The first frame of an image-to-video request: an absolute http(s) URL (its host is
/// checked separately, [`guard_target`]), or a `data:image/png|jpeg;base64,` URI of at
/// most [`MAX_IMAGE_BYTES`] decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageUrl {
    Remote(Url),
    Data(String),
}

impl ImageUrl {
    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        let invalid = |why: String| FieldError::invalid("image_url", format!("image_url {why}"));
        if raw
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("data:"))
        {
            let (meta, data) = raw[5..]
                .split_once(',')
                .ok_or_else(|| invalid("is a data URI without a ',' before its data".into()))?;
            let meta = meta.to_ascii_lowercase();
            if meta != "image/png;base64" && meta != "image/jpeg;base64" {
                return Err(invalid(
                    "must be a data:image/png;base64, or data:image/jpeg;base64, URI (or an http/https URL)"
                        .into(),
                ));
            }
            if raw.len() > MAX_IMAGE_DATA_URI_CHARS {
                return Err(invalid(format!(
                    "holds more than {} MiB",
                    MAX_IMAGE_BYTES >> 20
                )));
            }
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| invalid(format!("is not valid base64 ({e})")))?;
            if bytes.is_empty() {
                return Err(invalid("holds no image".into()));
            }
            if bytes.len() > MAX_IMAGE_BYTES {
                return Err(invalid(format!(
                    "holds more than {} MiB",
                    MAX_IMAGE_BYTES >> 20
                )));
            }
            let png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
            let jpeg = bytes.starts_with(&[0xff, 0xd8, 0xff]);
            if !(png && meta.starts_with("image/png") || jpeg && meta.starts_with("image/jpeg")) {
                return Err(invalid(format!(
                    "does not hold the {} image it declares",
                    if meta.starts_with("image/png") {
                        "PNG"
                    } else {
                        "JPEG"
                    }
                )));
            }
            return Ok(Self::Data(raw.to_owned()));
        }
        if raw.chars().count() > MAX_URL_CHARS {
            return Err(invalid(format!(
                "must be at most {MAX_URL_CHARS} characters (or a data: URI)"
            )));
        }
        let url = Url::parse(raw).map_err(|e| invalid(format!("is not an absolute URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(
                "must use http or https (or be a data:image/... URI)".into(),
            ));
        }
        if url.host().is_none() {
            return Err(invalid("must name a host".into()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("must not carry user-info (user:password@)".into()));
        }
        Ok(Self::Remote(url))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Remote(url) => url.as_str(),
            Self::Data(raw) => raw,
        }
    }
}

/// An absolute http(s) URL without user-info; its host is checked separately
/// ([`guard_webhook_target`]) because that may need DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebhookUrl(Url);

impl WebhookUrl {
    pub(crate) fn parse(raw: &str) -> Result<Self, FieldError> {
        let invalid = |why: &str| FieldError::invalid("webhook_url", format!("webhook_url {why}"));
        if raw.chars().count() > MAX_URL_CHARS {
            return Err(invalid(&format!(
                "must be at most {MAX_URL_CHARS} characters"
            )));
        }
        let url = Url::parse(raw).map_err(|e| invalid(&format!("is not an absolute URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("must use http or https"));
        }
        if url.host().is_none() {
            return Err(invalid("must name a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("must not carry user-info (user:password@)"));
        }
        Ok(Self(url))
    }

    pub(crate) fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub(crate) fn url(&self) -> &Url {
        &self.0
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct WebhookHeaders(BTreeMap<String, String>);

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl WebhookHeaders {
    pub(crate) fn parse(value: &Value) -> Result<Self, FieldError> {
        let invalid = |why: String| FieldError::invalid("webhook_headers", why);
        let obj = value.as_object().ok_or_else(|| {
            invalid("webhook_headers must be an object of string to string".into())
        })?;
        if obj.len() > MAX_HEADERS {
            return Err(invalid(format!(
                "webhook_headers may hold at most {MAX_HEADERS} entries"
            )));
        }
        let mut total = 0;
        let mut headers = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (name, v) in obj {
            let v = v
                .as_str()
                .ok_or_else(|| invalid(format!("webhook_headers.{name} must be a string")))?;
            if !is_token(name) {
                return Err(invalid(format!(
                    "webhook_headers name {name:?} is not a valid HTTP header name"
                )));
            }
            let lower = name.to_ascii_lowercase();
            if FORBIDDEN_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-") {
                return Err(invalid(format!(
                    "webhook_headers may not set {name}: Conduit sets it itself"
                )));
            }
            if !seen.insert(lower) {
                return Err(invalid(format!("webhook_headers names {name} twice")));
            }
            if v.contains(['\r', '\n', '\0']) {
                return Err(invalid(format!(
                    "webhook_headers.{name} must not contain CR, LF or NUL"
                )));
            }
            total += name.len() + v.len();
            headers.insert(name.clone(), v.to_owned());
        }
        if total > MAX_HEADERS_BYTES {
            return Err(invalid(format!(
                "webhook_headers must total at most {MAX_HEADERS_BYTES} bytes"
            )));
        }
        Ok(Self(headers))
    }

    pub(crate) fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

/// Parses `webhook_events`: an array of event names.
fn parse_webhook_events(value: &Value) -> Result<WebhookEvents, FieldError> {
    let invalid = |why: String| FieldError::invalid("webhook_events", why);
    let items = value.as_array().ok_or_else(|| {
        invalid("webhook_events must be an array of \"progress\", \"completed\", \"failed\", \"cancelled\"".into())
    })?;
    items
        .iter()
        .map(|item| {
            item.as_str().and_then(WebhookEvent::parse).ok_or_else(|| {
                invalid(format!(
                    "webhook_events holds {item}; allowed are \"progress\", \"completed\", \"failed\", \"cancelled\""
                ))
            })
        })
        .collect()
}

/// A submit request that passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GenerationRequest {
    pub(crate) model: ModelEntry,
    pub(crate) prompt: Prompt,
    pub(crate) duration: u32,
    pub(crate) size: FrameSize,
    pub(crate) fps: u32,
    pub(crate) seed: Option<i64>,
    pub(crate) webhook_url: Option<WebhookUrl>,
    pub(crate) webhook_headers: WebhookHeaders,
    pub(crate) webhook_events: WebhookEvents,
    pub(crate) image_url: Option<ImageUrl>,
    pub(crate) webhook_retry: Option<RetrySchedule>,
    pub(crate) webhook_batch: Option<BatchSettings>,
}

fn present<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn int_in(
    obj: &Map<String, Value>,
    field: &str,
    min: u32,
    max: u32,
    default: u32,
) -> Result<u32, FieldError> {
    let Some(v) = present(obj, field) else {
        return Ok(default);
    };
    let range = || {
        FieldError::invalid(
            field,
            format!("{field} must be an integer from {min} to {max}"),
        )
    };
    let n = v.as_i64().ok_or_else(range)?;
    if n < i64::from(min) || n > i64::from(max) {
        return Err(range());
    }
    u32::try_from(n).map_err(|_| range())
}

impl GenerationRequest {
    pub(crate) fn parse(body: &Value, models: &ModelCatalog) -> Result<Self, FieldError> {
        let obj = body
            .as_object()
            .ok_or_else(|| FieldError::invalid("body", "The request body must be a JSON object"))?;
        if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(FieldError::unknown(unknown));
        }
        let model_id = present(obj, "model").ok_or_else(|| FieldError::missing("model"))?;
        let model_id = model_id
            .as_str()
            .ok_or_else(|| FieldError::invalid("model", "model must be a string"))?;
        let model = models.get(model_id).ok_or_else(|| {
            let known: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
            FieldError::unsupported_model(format!(
                "model {model_id:?} does not exist; configured models: {}",
                known.join(", ")
            ))
        })?;
        if let Some(setting) = &model.missing_setting {
            return Err(FieldError::unsupported_model(format!(
                "model {model_id:?} is not available: its provider {:?} is not configured (set {setting})",
                model.provider
            )));
        }
        let prompt = present(obj, "prompt").ok_or_else(|| FieldError::missing("prompt"))?;
        let prompt = Prompt::parse(
            prompt
                .as_str()
                .ok_or_else(|| FieldError::invalid("prompt", "prompt must be a string"))?,
        )?;
        let duration = int_in(obj, "duration", 1, MAX_DURATION, DEFAULT_DURATION)?;
        let size = match present(obj, "size") {
            None => FrameSize {
                width: DEFAULT_SIZE.0,
                height: DEFAULT_SIZE.1,
            },
            Some(v) => FrameSize::parse(v.as_str().ok_or_else(|| {
                FieldError::invalid("size", "size must be a string such as \"1280x720\"")
            })?)?,
        };
        // What the model itself can make: its maximum and exact durations, its sizes or
        // its resolutions (MiniMax: the size's height picks 512P, 768P or 1080P).
        model
            .settings
            .check_request(model_id, duration, size.width, size.height)
            .map_err(|limit| FieldError::invalid(limit.param, limit.message))?;
        let fps = int_in(obj, "fps", 1, 60, DEFAULT_FPS)?;
        let seed = match present(obj, "seed") {
            None => None,
            Some(v) => Some(v.as_i64().ok_or_else(|| {
                FieldError::invalid("seed", "seed must be an integer (64-bit signed)")
            })?),
        };
        let webhook_url = match present(obj, "webhook_url") {
            None => None,
            Some(v) => Some(WebhookUrl::parse(v.as_str().ok_or_else(|| {
                FieldError::invalid("webhook_url", "webhook_url must be a string")
            })?)?),
        };
        let webhook_headers = present(obj, "webhook_headers")
            .map(WebhookHeaders::parse)
            .transpose()?
            .unwrap_or_default();
        let webhook_events = present(obj, "webhook_events")
            .map(parse_webhook_events)
            .transpose()?
            .unwrap_or_default();
        let image_url = match present(obj, "image_url") {
            None => None,
            Some(v) => {
                let image = ImageUrl::parse(v.as_str().ok_or_else(|| {
                    FieldError::invalid("image_url", "image_url must be a string")
                })?)?;
                if !model.image_input() {
                    let takers: Vec<&str> = models
                        .iter()
                        .filter(|m| m.image_input())
                        .map(|m| m.id.as_str())
                        .collect();
                    return Err(FieldError::invalid(
                        "image_url",
                        format!(
                            "model {model_id} cannot take an image_url; models that can: {}",
                            takers.join(", ")
                        ),
                    ));
                }
                Some(image)
            }
        };
        let webhook_retry = present(obj, "webhook_retry")
            .map(parse_webhook_retry)
            .transpose()?;
        let webhook_batch = present(obj, "webhook_batch")
            .map(parse_webhook_batch)
            .transpose()?;
        Ok(Self {
            model: model.clone(),
            prompt,
            duration,
            size,
            fps,
            seed,
            webhook_url,
            webhook_headers,
            webhook_events,
            image_url,
            webhook_retry,
            webhook_batch,
        })
    }

    /// A stable digest of what was asked for (defaults filled in), for Idempotency-Key.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::json!({
            "model": self.model.id,
            "prompt": self.prompt.as_str(),
            "duration": self.duration,
            "size": self.size.to_string(),
            "fps": self.fps,
            "seed": self.seed,
            "webhook_url": self.webhook_url.as_ref().map(WebhookUrl::as_str),
            "webhook_headers": self.webhook_headers.as_map(),
            "webhook_events": self.webhook_events.names(),
            "webhook_retry": self.webhook_retry.as_ref().map(ToString::to_string),
            "webhook_batch": self.webhook_batch,
        });
        let mut canonical = canonical;
        // Only when present, so the digests of requests without one stay what they were.
        if let Some(image) = &self.image_url {
            canonical["image_url"] = serde_json::Value::String(image.as_str().to_owned());
        }
        Sha256::digest(canonical.to_string().as_bytes()).into()
    }
}

impl GenerationRequest {
    /// The new task this request asks for, owned by `key_id`: a fresh id, attempt 1,
    /// pending, with its job.
    pub(crate) fn to_new_task(
        &self,
        key_id: uuid::Uuid,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<NewTask> {
        let now = conduit_core::time::now_millis();
        let task = TaskRow {
            id: uuid::Uuid::now_v7(),
            api_key_id: key_id,
            attempt: 1,
            status: TaskStatus::Pending,
            progress: 0,
            message: None,
            eta_seconds: None,
            model: self.model.id.clone(),
            provider: self.model.provider.clone(),
            upstream_model: self.model.upstream_model.clone(),
            prompt: self.prompt.as_str().to_owned(),
            duration: i32::try_from(self.duration).unwrap_or(i32::MAX),
            width: i32::try_from(self.size.width).unwrap_or(i32::MAX),
            height: i32::try_from(self.size.height).unwrap_or(i32::MAX),
            fps: i32::try_from(self.fps).unwrap_or(i32::MAX),
            seed: self.seed,
            webhook_url: self.webhook_url.as_ref().map(|u| u.as_str().to_owned()),
            webhook_headers: self.webhook_headers.as_map().clone(),
            webhook_events: self.webhook_events.clone(),
            webhook_retry: self.webhook_retry.clone(),
            webhook_batch: self.webhook_batch,
            video_key: None,
            generation_duration_seconds: None,
            error: None,
            created_at: now,
            updated_at: now,
            completed_at: None,
            last_seq: -1,
            image_url: self.image_url.as_ref().map(|i| i.as_str().to_owned()),
        };
        let claim = idempotency_key.map(|key| IdempotencyClaim {
            key: key.to_owned(),
            fingerprint: self.fingerprint(),
        });
        NewTask::new(task, claim)
    }
}

/// Refuses webhook targets on internal addresses: a literal address, or a name that
/// resolves to one. A name that does not resolve (yet) is accepted; the sender checks
/// the address it dials anyway.
pub(crate) async fn guard_webhook_target(
    url: &WebhookUrl,
    allow_private: bool,
) -> Result<(), FieldError> {
    guard_target(url.url(), "webhook_url", allow_private).await
}

/// The same check for an `image_url` that is a URL (a data URI goes nowhere); the
/// generator checks the address it dials too.
pub(crate) async fn guard_image_target(
    image: &ImageUrl,
    allow_private: bool,
) -> Result<(), FieldError> {
    match image {
        ImageUrl::Remote(url) => guard_target(url, "image_url", allow_private).await,
        ImageUrl::Data(_) => Ok(()),
    }
}

/// Refuses a `url` (the request field `param`) on an internal address.
pub(crate) async fn guard_target(
    url: &Url,
    param: &str,
    allow_private: bool,
) -> Result<(), FieldError> {
    if allow_private {
        return Ok(());
    }
    let refused = |ip: IpAddr| {
        FieldError::invalid(
            param,
            format!("{param} points at {ip}, a private, loopback or otherwise internal address"),
        )
    };
    let port = url.port_or_known_default().unwrap_or(443);
    match url.host() {
        Some(Host::Ipv4(ip)) if is_forbidden_ip(IpAddr::V4(ip)) => Err(refused(IpAddr::V4(ip))),
        Some(Host::Ipv6(ip)) if is_forbidden_ip(IpAddr::V6(ip)) => Err(refused(IpAddr::V6(ip))),
        Some(Host::Domain(name)) => {
            let lookup = tokio::net::lookup_host((name.trim_end_matches('.'), port));
            let Ok(Ok(addrs)) = tokio::time::timeout(Duration::from_secs(2), lookup).await else {
                return Ok(());
            };
            for addr in addrs {
                if is_forbidden_ip(addr.ip()) {
                    return Err(refused(addr.ip()));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldCode;
    use serde_json::json;

    fn catalog() -> ModelCatalog {
        let mut s = Settings::load(conduit_core::Service::Api, None).unwrap();
        s.providers.minimax.api_key = None;
        ModelCatalog::from_settings(&s)
    }

    fn refused(body: Value) -> FieldError {
        GenerationRequest::parse(&body, &catalog()).unwrap_err()
    }

    fn base() -> Value {
        json!({"model": "local-video", "prompt": "a cat"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut b = base();
        b[field] = value;
        b
    }

    #[test]
    fn defaults_fill_in() {
        let r = GenerationRequest::parse(&base(), &catalog()).unwrap();
        assert_eq!(r.duration, 6);
        assert_eq!(
            r.size,
            FrameSize {
                width: 1280,
                height: 720
            }
        );
        assert_eq!(r.fps, 24);
        assert_eq!(r.webhook_events, WebhookEvents::default());
        assert!(r.webhook_url.is_none());
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = refused(with("webhookurl", json!("https://x.example")));
        assert_eq!(
            (e.code, e.param.as_str()),
            (FieldCode::UnknownParameter, "webhookurl")
        );
    }

    #[test]
    fn required_fields() {
        let e = refused(json!({"prompt": "x"}));
        assert_eq!(
            (e.code, e.param.as_str()),
            (FieldCode::MissingParameter, "model")
        );
        let e = refused(json!({"model": "local-video"}));
        assert_eq!(
            (e.code, e.param.as_str()),
            (FieldCode::MissingParameter, "prompt")
        );
    }

    #[test]
    fn wrong_json_types_are_invalid_values() {
        for (field, value) in [
            ("duration", json!("6")),
            ("duration", json!(6.5)),
            ("fps", json!(true)),
            ("size", json!(1280)),
            ("seed", json!("1")),
            ("prompt", json!(5)),
            ("model", json!(["local-video"])),
            ("webhook_url", json!(1)),
            ("webhook_headers", json!(["a"])),
            ("webhook_events", json!("completed")),
        ] {
            let e = refused(with(field, value));
            assert_eq!((e.code, e.param.as_str()), (FieldCode::InvalidValue, field));
        }
    }

    #[test]
    fn ranges() {
        for (field, value) in [
            ("duration", json!(0)),
            ("duration", json!(61)),
            ("fps", json!(0)),
            ("fps", json!(61)),
            ("size", json!("1280x721")),
            ("size", json!("62x64")),
            ("size", json!("3842x64")),
            ("size", json!("1280*720")),
            ("size", json!("+128x128")),
            ("prompt", json!("")),
            ("prompt", json!("x".repeat(4001))),
            ("prompt", json!("a\u{0}b")),
        ] {
            let e = refused(with(field, value.clone()));
            assert_eq!(
                (e.code, e.param.as_str()),
                (FieldCode::InvalidValue, field),
                "{value}"
            );
        }
        assert!(
            GenerationRequest::parse(&with("prompt", json!("é".repeat(4000))), &catalog()).is_ok()
        );
        assert!(GenerationRequest::parse(&with("size", json!("64x3840")), &catalog()).is_ok());
    }

    #[test]
    fn models() {
        let e = refused(with("model", json!("nope")));
        assert_eq!(
            (e.code, e.param.as_str()),
            (FieldCode::UnsupportedModel, "model")
        );
        let e = refused(with("model", json!("minimax-video")));
        assert_eq!(e.code, FieldCode::UnsupportedModel);
        assert!(e.message.contains("CONDUIT__PROVIDERS__MINIMAX__API_KEY"));
        let mut s = Settings::load(conduit_core::Service::Api, None).unwrap();
        s.providers.minimax.api_key = Some(conduit_core::Secret::new("k"));
        let cat = ModelCatalog::from_settings(&s);
        let mut b = with("model", json!("minimax-video"));
        b["duration"] = json!(11);
        let e = GenerationRequest::parse(&b, &cat).unwrap_err();
        assert_eq!(
            (e.code, e.param.as_str()),
            (FieldCode::InvalidValue, "duration")
        );
    }

    #[test]
    fn minimax_refuses_what_hailuo_cannot_make() {
        let mut s = Settings::load(conduit_core::Service::Api, None).unwrap();
        s.providers.minimax.api_key = Some(conduit_core::Secret::new("k"));
        let cat = ModelCatalog::from_settings(&s);
        let parse = |duration: i64, size: &str| {
            let b = json!({"model": "minimax-video", "prompt": "p", "duration": duration, "size": size});
            GenerationRequest::parse(&b, &cat)
        };
        // The defaults (6 s, 1280x720 → 768P) work, and so do the documented combinations.
        assert!(
            GenerationRequest::parse(&json!({"model": "minimax-video", "prompt": "p"}), &cat)
                .is_ok()
        );
        for (duration, size) in [
            (6, "640x360"),
            (10, "912x512"),
            (10, "1366x768"),
            (6, "1920x1080"),
        ] {
            assert!(parse(duration, size).is_ok(), "{duration} s at {size}");
        }
        for (duration, size, param, words) in [
            (8, "1280x720", "duration", "6 or 10"),
            (10, "1920x1080", "duration", "at most 6 seconds"),
            (6, "2560x1440", "size", "at most 1080 high"),
            (6, "720x1280", "size", "wider than tall"),
        ] {
            let e = parse(duration, size).unwrap_err();
            assert_eq!(
                (e.code, e.param.as_str()),
                (FieldCode::InvalidValue, param),
                "{size}"
            );
            assert!(e.message.contains(words), "{}", e.message);
            assert!(e.message.contains("minimax-video"), "{}", e.message);
        }
    }

    #[test]
    fn webhook_urls() {
        for bad in [
            "ftp://x.example/a",
            "/relative",
            "https://user:pw@x.example/",
            "https://user@x.example/",
            "mailto:a@b.c",
        ] {
            let e = refused(with("webhook_url", json!(bad)));
            assert_eq!(
                (e.code, e.param.as_str()),
                (FieldCode::InvalidValue, "webhook_url"),
                "{bad}"
            );
        }
        let long = format!("https://x.example/{}", "a".repeat(2040));
        assert_eq!(
            refused(with("webhook_url", json!(long))).param,
            "webhook_url"
        );
    }

    #[test]
    fn webhook_headers() {
        let mut many = serde_json::Map::new();
        for i in 0..21 {
            many.insert(format!("X-H{i}"), json!("v"));
        }
        for bad in [
            json!({"Host": "x"}),
            json!({"content-type": "x"}),
            json!({"Content-Length": "1"}),
            json!({"Transfer-Encoding": "x"}),
            json!({"Connection": "x"}),
            json!({"User-Agent": "x"}),
            json!({"Webhook-Id": "x"}),
            json!({"X-A": "a\r\nb"}),
            json!({"X-A": "a\u{0}"}),
            json!({"Bad Name": "x"}),
            json!({"": "x"}),
            json!({"X-A": 1}),
            json!({"X-A": "x".repeat(8200)}),
            Value::Object(many),
        ] {
            let e = refused(with("webhook_headers", bad.clone()));
            assert_eq!(
                (e.code, e.param.as_str()),
                (FieldCode::InvalidValue, "webhook_headers"),
                "{bad}"
            );
        }
    }

    #[test]
    fn webhook_events() {
        let e = refused(with("webhook_events", json!(["completed", "done"])));
        assert_eq!(
            (e.code, e.param.as_str()),
            (FieldCode::InvalidValue, "webhook_events")
        );
        let r = GenerationRequest::parse(
            &with("webhook_events", json!(["failed", "failed"])),
            &catalog(),
        )
        .unwrap();
        assert_eq!(r.webhook_events.names(), vec!["failed".to_owned()]);
    }

    #[test]
    fn fingerprint_ignores_spelled_out_defaults() {
        let a = GenerationRequest::parse(&base(), &catalog()).unwrap();
        let b = GenerationRequest::parse(&with("duration", json!(6)), &catalog()).unwrap();
        let c = GenerationRequest::parse(&with("duration", json!(7)), &catalog()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        let retry = |s: Value| {
            GenerationRequest::parse(&with("webhook_retry", json!({ "schedule": s })), &catalog())
                .unwrap()
                .fingerprint()
        };
        assert_eq!(retry(json!(["60s"])), retry(json!(["1m"])));
        assert_ne!(retry(json!(["1m"])), retry(json!(["2m"])));
        assert_ne!(retry(json!(["0s"])), a.fingerprint());
        let batch = |b: Value| {
            GenerationRequest::parse(&with("webhook_batch", b), &catalog())
                .unwrap()
                .fingerprint()
        };
        assert_eq!(batch(json!({})), batch(json!({"max_events": 100})));
        assert_ne!(batch(json!({})), batch(json!({"max_events": 10})));
        assert_ne!(batch(json!({})), a.fingerprint());
    }

    const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

    #[test]
    fn image_urls() {
        let png = format!("data:image/png;base64,{PNG_1X1}");
        let r = GenerationRequest::parse(&with("image_url", json!(png)), &catalog()).unwrap();
        assert!(matches!(r.image_url, Some(ImageUrl::Data(_))));
        let r = GenerationRequest::parse(
            &with("image_url", json!("https://images.example/cat.jpg")),
            &catalog(),
        )
        .unwrap();
        assert_eq!(
            r.image_url.as_ref().map(ImageUrl::as_str),
            Some("https://images.example/cat.jpg")
        );
        assert_ne!(
            r.fingerprint(),
            GenerationRequest::parse(&base(), &catalog())
                .unwrap()
                .fingerprint()
        );
        for bad in [
            json!(5),
            json!("ftp://x.example/a.png"),
            json!("https://user:pw@x.example/a.png"),
            json!(format!("data:image/gif;base64,{PNG_1X1}")),
            json!(format!("data:image/jpeg;base64,{PNG_1X1}")),
            json!("data:image/png;base64,not base64!"),
            json!("data:image/png;base64,"),
            json!(format!(
                "data:image/png;base64,{}",
                "A".repeat(MAX_IMAGE_DATA_URI_CHARS)
            )),
        ] {
            let e = refused(with("image_url", bad.clone()));
            assert_eq!(
                (e.code, e.param.as_str()),
                (FieldCode::InvalidValue, "image_url"),
                "{bad}"
            );
        }
        // A model that cannot take an image refuses one, naming those that can.
        let mut s = Settings::load(conduit_core::Service::Api, None).unwrap();
        s.providers.minimax.api_key = Some(conduit_core::Secret::new("k"));
        if let Some(m) = s.models.get_mut("minimax-video") {
            m.image_input = false;
        }
        let cat = ModelCatalog::from_settings(&s);
        let b = json!({"model": "minimax-video", "prompt": "p", "image_url": png});
        let e = GenerationRequest::parse(&b, &cat).unwrap_err();
        assert_eq!(
            (e.code, e.param.as_str()),
            (FieldCode::InvalidValue, "image_url")
        );
        assert!(e.message.contains("local-video"), "{}", e.message);
    }

    #[test]
    fn models_without_a_default_say_what_to_set() {
        let mut s = Settings::load(conduit_core::Service::Api, None).unwrap();
        s.providers.openai.api_key = Some(conduit_core::Secret::new("k"));
        s.providers.fal.api_key = Some(conduit_core::Secret::new("k"));
        let cat = ModelCatalog::from_settings(&s);
        assert_eq!(
            cat.get("openai-video")
                .and_then(|m| m.missing_setting.clone())
                .as_deref(),
            Some("CONDUIT__PROVIDERS__OPENAI__BASE_URL")
        );
        s.providers.openai.base_url = "http://127.0.0.1:9".into();
        let cat = ModelCatalog::from_settings(&s);
        assert_eq!(
            cat.get("openai-video")
                .and_then(|m| m.missing_setting.clone())
                .as_deref(),
            Some(
                "models.openai-video.upstream_model in the configuration file \
                 (CONDUIT__MODELS__OPENAI-VIDEO__UPSTREAM_MODEL)"
            )
        );
        assert!(cat.get("fal-video").is_some_and(ModelEntry::available));
        assert!(cat.get("veo-video").is_some_and(|m| !m.available()));
    }

    #[tokio::test]
    async fn image_targets_are_guarded_like_webhooks() {
        let u = ImageUrl::parse("http://127.0.0.1:9/a.png").unwrap();
        let e = guard_image_target(&u, false).await.unwrap_err();
        assert_eq!(e.param, "image_url");
        assert!(guard_image_target(&u, true).await.is_ok());
        let d = ImageUrl::parse(&format!("data:image/png;base64,{PNG_1X1}")).unwrap();
        assert!(guard_image_target(&d, false).await.is_ok());
    }

    #[tokio::test]
    async fn guard_refuses_loopback_literals_and_names() {
        for url in [
            "http://127.0.0.1/hook",
            "http://[::1]:8080/hook",
            "http://[::ffff:127.0.0.1]/",
            "http://2130706433/",
            "http://localhost:9/hook",
        ] {
            let u = WebhookUrl::parse(url).unwrap();
            assert!(guard_webhook_target(&u, false).await.is_err(), "{url}");
            assert!(guard_webhook_target(&u, true).await.is_ok(), "{url}");
        }
    }
}
