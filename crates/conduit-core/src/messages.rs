//! The versioned messages that cross RabbitMQ. Every message carries `v`, the schema
//! version; a consumer refuses (dead-letters) a version it does not know instead of
//! guessing. Each message type knows the queue it travels to.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::RetrySchedule;
use crate::payload::WebhookEvent;
use crate::time::{rfc3339_millis, rfc3339_millis_opt};

/// Schema version written by this build.
pub const SCHEMA_VERSION: u16 = 1;

/// The render parameters a job asks for, already validated by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderSpec {
    pub duration_seconds: u32,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
}

/// API → generator: run one attempt of a task. Travels on the `jobs` queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMessage {
    pub v: u16,
    pub task_id: Uuid,
    /// Increases with every explicit retry; events of an older attempt are stale.
    pub attempt: i32,
    pub model: String,
    /// Provider of the model (`local`, `minimax`, ...) as resolved at submit time.
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    pub prompt: String,
    pub spec: RenderSpec,
    #[serde(with = "rfc3339_millis")]
    pub submitted_at: DateTime<Utc>,
    /// The first frame for image-to-video, as the user gave it: an `http`/`https` URL
    /// (checked against private targets) or a `data:image/png|jpeg;base64,` URI. Absent
    /// in jobs of older APIs, which a generator reads as text-to-video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    /// What earlier runs of this attempt left for the next one: when it first started and
    /// the upstream job it submitted. Absent on the API's first publish; a hand-back copy
    /// carries it, and a crash takeover finds it on the lifecycle stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<JobCheckpoint>,
}

/// The durable progress of one attempt: enough for any generator to take it over
/// without restarting the timeout clock or paying for a second upstream job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCheckpoint {
    /// When the attempt first started; the task timeout counts from here.
    #[serde(with = "rfc3339_millis")]
    pub first_started_at: DateTime<Utc>,
    /// The provider job submitted for this attempt, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamJob>,
}

/// A provider job submitted upstream: its id and whatever else polling it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamJob {
    /// The provider that runs it (`minimax`, `openai`, ...).
    pub provider: String,
    /// The provider's own id of the job.
    pub id: String,
    /// Anything else the provider needs to resume polling (e.g. a poll URL).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
    /// The model the job was submitted for: the task's own, or a fallback of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl UpstreamJob {
    /// Job `id` at `provider`, with nothing else to remember yet.
    pub fn new(provider: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            id: id.into(),
            extra: BTreeMap::new(),
            model: None,
        }
    }

    /// The same job, also remembering `value` under `key` for resuming it.
    #[must_use]
    pub fn with_extra(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }
}

impl JobMessage {
    /// The broker message id of this attempt's job: the same on every copy of it (the
    /// outbox's first publish, a hand-back, a checkpoint), so duplicates are recognisable.
    pub fn message_id(&self) -> String {
        job_message_id(self.task_id, self.attempt)
    }
}

/// The broker message id of the job of `task_id`'s attempt `attempt`.
pub fn job_message_id(task_id: Uuid, attempt: i32) -> String {
    format!("{task_id}:{attempt}")
}

/// What a status event says about a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StatusKind {
    /// Work has started on the task.
    Processing {
        message: String,
    },
    Progress {
        percent: u8,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eta_seconds: Option<u64>,
    },
    /// The video is stored under `video_key` in Conduit's storage.
    Completed {
        video_key: String,
        generation_duration_seconds: f64,
        /// The model that made the video when it is not the task's own (a `fallback`
        /// model took over); absent otherwise and from older generators.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    Failed {
        error: String,
    },
}

impl StatusKind {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            StatusKind::Completed { .. } | StatusKind::Failed { .. }
        )
    }
}

/// Generator → API ledger. Travels on the `status` queue. `seq` orders the events of one
/// attempt, so the ledger drops duplicates and stale ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub v: u16,
    pub task_id: Uuid,
    pub attempt: i32,
    pub seq: u64,
    #[serde(with = "rfc3339_millis")]
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub kind: StatusKind,
}

/// API → webhook sender: deliver one event. Travels on the `webhooks` queue and, between
/// attempts, waits in the delay queues.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    pub v: u16,
    /// `webhook-id`: one per event, the same on every attempt.
    pub webhook_id: String,
    pub task_id: Uuid,
    pub event: WebhookEvent,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The calling key's `whsec_` signing secret.
    pub secret: String,
    /// The exact JSON body, fixed when the event happened.
    pub body: String,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    /// Attempts already made in the current schedule (0 for a fresh event).
    #[serde(default)]
    pub attempts_made: u32,
    /// Not to be attempted before this instant (retry delay, `Retry-After`).
    #[serde(
        default,
        with = "rfc3339_millis_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before: Option<DateTime<Utc>>,
    /// The task's own retry schedule (`webhook_retry`), used instead of the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySchedule>,
    /// The task's batch settings (`webhook_batch`): delivered in batches when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSettings>,
    /// The key's secret before its latest rotation, while the overlap lasts: attempts
    /// made before `expires_at` carry a second signature made with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<PreviousSecret>,
    /// For an event whose body carries a `video_url`: how to sign a fresh one at send
    /// time, so every attempt, however late, carries a link valid for the URL lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_link: Option<VideoLinkSigner>,
}

/// A task's `webhook_batch`: at most `max_events` events per POST, sent at most
/// `max_wait_ms` after the first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchSettings {
    pub max_events: u32,
    pub max_wait_ms: u64,
}

/// A key's signing secret before its latest rotation, and when it stops being used.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PreviousSecret {
    pub secret: String,
    #[serde(with = "rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
}

/// One event inside a [`WebhookBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchedEvent {
    pub webhook_id: String,
    pub task_id: Uuid,
    pub event: WebhookEvent,
    /// The exact JSON the event has as a single webhook.
    pub body: String,
    #[serde(with = "rfc3339_millis")]
    pub occurred_at: DateTime<Utc>,
    /// As [`WebhookDelivery::video_link`]: the `video_url` in `body` is signed afresh
    /// for an attempt of the batch it would not last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_link: Option<VideoLinkSigner>,
}

impl BatchedEvent {
    /// The event's payload as sent at `now`: `body`, with a fresh `video_url` if it
    /// carries one.
    pub fn payload_at(&self, now: DateTime<Utc>) -> std::borrow::Cow<'_, str> {
        match &self.video_link {
            Some(link) => std::borrow::Cow::Owned(link.refresh(&self.body, self.task_id, now)),
            None => std::borrow::Cow::Borrowed(&self.body),
        }
    }
}

/// Webhook sender → itself: a batch of events formed by a sender that waits for its
/// next attempt. Travels through the delay queues back to the `webhooks` queue, like a
/// [`WebhookDelivery`] does.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookBatch {
    pub v: u16,
    /// The batch's own `webhook-id`, the same on every attempt of the batch.
    pub batch_id: String,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<PreviousSecret>,
    /// The longest schedule (largest total delay) among the batch's tasks.
    pub retry: RetrySchedule,
    /// When the batch was formed: its body's `timestamp`.
    #[serde(with = "rfc3339_millis")]
    pub formed_at: DateTime<Utc>,
    pub events: Vec<BatchedEvent>,
    #[serde(default)]
    pub attempts_made: u32,
    #[serde(
        default,
        with = "rfc3339_millis_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before: Option<DateTime<Utc>>,
}

impl fmt::Debug for WebhookBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookBatch")
            .field("batch_id", &self.batch_id)
            .field("url", &self.url)
            .field("events", &self.events.len())
            .field("attempts_made", &self.attempts_made)
            .field("not_before", &self.not_before)
            .finish_non_exhaustive()
    }
}

/// What a webhook sender needs to re-sign one task's `video_url` when it sends: the URL
/// written into the body (replaced), the link without its query, a key that signs links
/// of this task only, and the lifetime. The link is
/// `{base}?expires=<unix>&signature=<hex>` (see [`crate::video_links`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoLinkSigner {
    /// The `video_url` as it stands in `body`.
    pub url_in_body: String,
    /// `{public_base_url}/v1/videos/files/{task_id}`.
    pub base: String,
    /// Base64 of the task's link key (see [`crate::video_links`]).
    pub task_key: String,
    pub ttl_seconds: u64,
}

impl fmt::Debug for VideoLinkSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VideoLinkSigner")
            .field("base", &self.base)
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for WebhookDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookDelivery")
            .field("webhook_id", &self.webhook_id)
            .field("task_id", &self.task_id)
            .field("event", &self.event)
            .field("url", &self.url)
            .field("attempts_made", &self.attempts_made)
            .field("not_before", &self.not_before)
            .finish_non_exhaustive()
    }
}

/// State of one webhook event in the delivery log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
    Dropped,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Dropped => "dropped",
        }
    }
}

/// Webhook sender → API: the outcome of one attempt, for the delivery log. Travels on
/// the `outcomes` queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptOutcome {
    pub v: u16,
    pub webhook_id: String,
    pub task_id: Uuid,
    pub event: WebhookEvent,
    /// 1-based number of this attempt within its schedule.
    pub attempt: u32,
    #[serde(with = "rfc3339_millis")]
    pub attempted_at: DateTime<Utc>,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The event's state after this attempt.
    pub state: DeliveryState,
    #[serde(
        default,
        with = "rfc3339_millis_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The lifecycle records of attempts. The API publishes cancels on the `control` fanout;
/// generators publish checkpoints, finishes and marks. All of them land in the
/// `lifecycle` stream, which every generator reads from the start of its retention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// Stop work on this attempt of the task at once, and never start it.
    Cancel { v: u16, task_id: Uuid, attempt: i32 },
    /// The attempt's durable progress (first start, upstream job).
    Checkpoint {
        v: u16,
        task_id: Uuid,
        attempt: i32,
        checkpoint: JobCheckpoint,
    },
    /// The attempt ended (its terminal event is confirmed); its checkpoint is no longer
    /// needed.
    Finished { v: u16, task_id: Uuid, attempt: i32 },
    /// A generator's own marker: once it reads its mark back it has read everything
    /// published to the stream before it.
    Mark { v: u16, id: Uuid },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_event_is_flat_and_round_trips() {
        let ev = StatusEvent {
            v: SCHEMA_VERSION,
            task_id: Uuid::nil(),
            attempt: 1,
            seq: 3,
            at: crate::time::now_millis(),
            kind: StatusKind::Progress {
                percent: 40,
                message: "Rendering".into(),
                eta_seconds: None,
            },
        };
        let json: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "progress");
        assert_eq!(json["percent"], 40);
        assert!(json.get("eta_seconds").is_none());
        let back: StatusEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn a_job_message_id_is_task_and_attempt() {
        let task_id = Uuid::from_u128(0x0192_0d4b_7c3e_7a11_9f2e_5b6c_7d8e_9f01);
        assert_eq!(
            job_message_id(task_id, 3),
            "01920d4b-7c3e-7a11-9f2e-5b6c7d8e9f01:3"
        );
        let job = JobMessage {
            v: SCHEMA_VERSION,
            task_id,
            attempt: 2,
            model: "local-video".into(),
            provider: "local".into(),
            upstream_model: None,
            prompt: "p".into(),
            spec: RenderSpec {
                duration_seconds: 1,
                width: 64,
                height: 64,
                fps: 1,
                seed: None,
            },
            submitted_at: crate::time::now_millis(),
            image_url: None,
            checkpoint: None,
        };
        assert_eq!(job.message_id(), job_message_id(task_id, 2));
    }

    #[test]
    fn delivery_debug_hides_secret_and_body() {
        let d = WebhookDelivery {
            v: SCHEMA_VERSION,
            webhook_id: "msg_1".into(),
            task_id: Uuid::nil(),
            event: WebhookEvent::Completed,
            url: "https://example.com/hook".into(),
            headers: BTreeMap::new(),
            secret: "whsec_c2VjcmV0".into(),
            body: "{}".into(),
            occurred_at: crate::time::now_millis(),
            attempts_made: 0,
            not_before: None,
            retry: None,
            batch: None,
            previous_secret: Some(PreviousSecret {
                secret: "whsec_b2xk".into(),
                expires_at: crate::time::now_millis(),
            }),
            video_link: None,
        };
        let printed = format!("{d:?}");
        assert!(!printed.contains("whsec_"));
    }

    #[test]
    fn a_job_without_checkpoint_reads_as_before() {
        let json = serde_json::json!({
            "v": 1, "task_id": Uuid::nil(), "attempt": 1, "model": "m", "provider": "local",
            "prompt": "p", "spec": {"duration_seconds": 1, "width": 8, "height": 8, "fps": 1},
            "submitted_at": "2026-11-29T00:00:00.000Z"
        });
        let job: JobMessage = serde_json::from_value(json).unwrap();
        assert_eq!(job.checkpoint, None);
        assert!(serde_json::to_value(&job)
            .unwrap()
            .get("checkpoint")
            .is_none());
    }
}
