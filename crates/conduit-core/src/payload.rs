//! The four webhook payloads of the public contract, field for field as the webhook
//! documentation shows them. Each type can only be built through its constructor, so
//! `status` and `webhook_type` always agree with the event. No field is ever `null`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::time::rfc3339_millis;

/// `webhook_type` of the three terminal payloads.
pub const TYPE_COMPLETED: &str = "video_generation_completed";
/// `webhook_type` of progress payloads.
pub const TYPE_PROGRESS: &str = "video_generation_progress";
/// The `error` of every cancelled task, as the contract spells it.
pub const CANCELLED_ERROR: &str = "Video generation was cancelled by user request";

/// Which event a webhook announces; also the values of `webhook_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum WebhookEvent {
    Progress,
    Completed,
    Failed,
    Cancelled,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 4] = [
        WebhookEvent::Progress,
        WebhookEvent::Completed,
        WebhookEvent::Failed,
        WebhookEvent::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::Progress => "progress",
            WebhookEvent::Completed => "completed",
            WebhookEvent::Failed => "failed",
            WebhookEvent::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == raw)
    }

    /// Terminal events are retried on the schedule; progress is attempted once.
    pub fn is_terminal(self) -> bool {
        !matches!(self, WebhookEvent::Progress)
    }

    pub fn webhook_type(self) -> &'static str {
        match self {
            WebhookEvent::Progress => TYPE_PROGRESS,
            _ => TYPE_COMPLETED,
        }
    }
}

/// Sent once when a video is ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletedPayload {
    pub task_id: Uuid,
    status: String,
    webhook_type: String,
    #[serde(with = "rfc3339_millis")]
    pub timestamp: DateTime<Utc>,
    pub video_url: String,
    pub generation_duration_seconds: f64,
    pub model: String,
    pub prompt: String,
}

impl CompletedPayload {
    pub fn new(
        task_id: Uuid,
        timestamp: DateTime<Utc>,
        video_url: String,
        generation_duration_seconds: f64,
        model: String,
        prompt: String,
    ) -> Self {
        Self {
            task_id,
            status: "completed".into(),
            webhook_type: TYPE_COMPLETED.into(),
            timestamp,
            video_url,
            generation_duration_seconds,
            model,
            prompt,
        }
    }
}

/// Sent once when a task failed or was cancelled (the two share one shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedPayload {
    pub task_id: Uuid,
    status: String,
    webhook_type: String,
    #[serde(with = "rfc3339_millis")]
    pub timestamp: DateTime<Utc>,
    pub error: String,
    pub model: String,
    pub prompt: String,
}

impl FailedPayload {
    pub fn failed(
        task_id: Uuid,
        timestamp: DateTime<Utc>,
        error: String,
        model: String,
        prompt: String,
    ) -> Self {
        Self {
            task_id,
            status: "failed".into(),
            webhook_type: TYPE_COMPLETED.into(),
            timestamp,
            error,
            model,
            prompt,
        }
    }

    pub fn cancelled(
        task_id: Uuid,
        timestamp: DateTime<Utc>,
        model: String,
        prompt: String,
    ) -> Self {
        Self {
            task_id,
            status: "cancelled".into(),
            webhook_type: TYPE_COMPLETED.into(),
            timestamp,
            error: CANCELLED_ERROR.into(),
            model,
            prompt,
        }
    }

    pub fn status(&self) -> &str {
        &self.status
    }
}

/// Sent while a task is processing, at most once a second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressPayload {
    pub task_id: Uuid,
    status: String,
    webhook_type: String,
    #[serde(with = "rfc3339_millis")]
    pub timestamp: DateTime<Utc>,
    pub progress_percentage: u8,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_seconds_remaining: Option<u64>,
}

impl ProgressPayload {
    pub fn new(
        task_id: Uuid,
        timestamp: DateTime<Utc>,
        progress_percentage: u8,
        message: String,
        estimated_seconds_remaining: Option<u64>,
    ) -> Self {
        Self {
            task_id,
            status: "processing".into(),
            webhook_type: TYPE_PROGRESS.into(),
            timestamp,
            progress_percentage: progress_percentage.min(100),
            message,
            estimated_seconds_remaining,
        }
    }
}

/// Any of the four payloads, serialised without a wrapper.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum WebhookPayload {
    Completed(CompletedPayload),
    Failed(FailedPayload),
    Progress(ProgressPayload),
}

impl WebhookPayload {
    pub fn event(&self) -> WebhookEvent {
        match self {
            WebhookPayload::Completed(_) => WebhookEvent::Completed,
            WebhookPayload::Failed(p) if p.status == "cancelled" => WebhookEvent::Cancelled,
            WebhookPayload::Failed(_) => WebhookEvent::Failed,
            WebhookPayload::Progress(_) => WebhookEvent::Progress,
        }
    }

    pub fn task_id(&self) -> Uuid {
        match self {
            WebhookPayload::Completed(p) => p.task_id,
            WebhookPayload::Failed(p) => p.task_id,
            WebhookPayload::Progress(p) => p.task_id,
        }
    }

    /// The exact body that is signed and sent.
    pub fn to_body(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    //! Golden tests: each payload serialises to exactly the seed document's example.
    use super::*;
    use serde_json::{json, Value};

    fn task() -> Uuid {
        Uuid::parse_str("550e8400-e29b-41d4-a716-446655440000").unwrap()
    }

    fn at(raw: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(raw)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn as_value(p: &WebhookPayload) -> Value {
        serde_json::from_str(&p.to_body()).unwrap()
    }

    fn assert_same_fields(actual: &Value, expected: &Value) {
        let a = actual.as_object().unwrap();
        let e = expected.as_object().unwrap();
        let mut ak: Vec<_> = a.keys().collect();
        let mut ek: Vec<_> = e.keys().collect();
        ak.sort();
        ek.sort();
        assert_eq!(ak, ek, "field names differ");
        for (k, v) in e {
            assert_eq!(&a[k], v, "field {k}");
        }
        assert!(a.values().all(|v| !v.is_null()), "no field may be null");
    }

    #[test]
    fn completed_matches_seed() {
        let p = WebhookPayload::Completed(CompletedPayload::new(
            task(),
            at("2024-01-20T15:30:45.123Z"),
            "https://cdn.example.com/videos/generated-video.mp4".into(),
            45.5,
            "minimax-video".into(),
            "A serene mountain landscape with clouds".into(),
        ));
        let seed = json!({
          "task_id": "550e8400-e29b-41d4-a716-446655440000",
          "status": "completed",
          "webhook_type": "video_generation_completed",
          "timestamp": "2024-01-20T15:30:45.123Z",
          "video_url": "https://cdn.example.com/videos/generated-video.mp4",
          "generation_duration_seconds": 45.5,
          "model": "minimax-video",
          "prompt": "A serene mountain landscape with clouds"
        });
        assert_same_fields(&as_value(&p), &seed);
        assert_eq!(p.event(), WebhookEvent::Completed);
    }

    #[test]
    fn failed_matches_seed() {
        let p = WebhookPayload::Failed(FailedPayload::failed(
            task(),
            at("2024-01-20T15:30:45.123Z"),
            "Insufficient credits for video generation".into(),
            "minimax-video".into(),
            "A serene mountain landscape with clouds".into(),
        ));
        let seed = json!({
          "task_id": "550e8400-e29b-41d4-a716-446655440000",
          "status": "failed",
          "webhook_type": "video_generation_completed",
          "timestamp": "2024-01-20T15:30:45.123Z",
          "error": "Insufficient credits for video generation",
          "model": "minimax-video",
          "prompt": "A serene mountain landscape with clouds"
        });
        assert_same_fields(&as_value(&p), &seed);
        assert_eq!(p.event(), WebhookEvent::Failed);
    }

    #[test]
    fn cancelled_matches_seed() {
        let p = WebhookPayload::Failed(FailedPayload::cancelled(
            task(),
            at("2024-01-20T15:30:45.123Z"),
            "minimax-video".into(),
            "A serene mountain landscape with clouds".into(),
        ));
        let seed = json!({
          "task_id": "550e8400-e29b-41d4-a716-446655440000",
          "status": "cancelled",
          "webhook_type": "video_generation_completed",
          "timestamp": "2024-01-20T15:30:45.123Z",
          "error": "Video generation was cancelled by user request",
          "model": "minimax-video",
          "prompt": "A serene mountain landscape with clouds"
        });
        assert_same_fields(&as_value(&p), &seed);
        assert_eq!(p.event(), WebhookEvent::Cancelled);
    }

    #[test]
    fn progress_matches_seed() {
        let p = WebhookPayload::Progress(ProgressPayload::new(
            task(),
            at("2024-01-20T15:29:30.123Z"),
            50,
            "Rendering video content".into(),
            Some(30),
        ));
        let seed = json!({
          "task_id": "550e8400-e29b-41d4-a716-446655440000",
          "status": "processing",
          "webhook_type": "video_generation_progress",
          "timestamp": "2024-01-20T15:29:30.123Z",
          "progress_percentage": 50,
          "message": "Rendering video content",
          "estimated_seconds_remaining": 30
        });
        assert_same_fields(&as_value(&p), &seed);
        assert_eq!(p.event(), WebhookEvent::Progress);
    }

    #[test]
    fn progress_without_estimate_leaves_the_key_out() {
        let p = WebhookPayload::Progress(ProgressPayload::new(
            task(),
            at("2024-01-20T15:29:30Z"),
            10,
            "Starting".into(),
            None,
        ));
        let v = as_value(&p);
        assert!(v.get("estimated_seconds_remaining").is_none());
        assert_eq!(v["timestamp"], "2024-01-20T15:29:30.000Z");
    }

    #[test]
    fn payloads_round_trip() {
        let p = CompletedPayload::new(
            task(),
            at("2024-01-20T15:30:45.123Z"),
            "u".into(),
            1.0,
            "m".into(),
            "p".into(),
        );
        let back: CompletedPayload =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
