//! The per-task webhook delivery options of a submit: `webhook_retry` (the task's own
//! retry schedule) and `webhook_batch` (batch delivery). Parsed from JSON into the
//! types that travel with the task's webhooks, with the contract's limits and codes:
//! `unknown_parameter` for an unknown key, `missing_parameter` without a required one,
//! `invalid_value` for anything else, `param` naming the option.

use std::time::Duration;

use conduit_core::{config::RetrySchedule, messages::BatchSettings, time::parse_duration};
use serde_json::Value;

use crate::error::FieldError;

pub(crate) const RETRY_PARAM: &str = "webhook_retry";
pub(crate) const BATCH_PARAM: &str = "webhook_batch";
pub(crate) const MAX_RETRY_ENTRIES: usize = 20;
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 3600);
pub(crate) const MAX_RETRY_TOTAL: Duration = Duration::from_secs(72 * 3600);
pub(crate) const MAX_BATCH_EVENTS: u32 = 1000;
pub(crate) const DEFAULT_BATCH_EVENTS: u32 = 100;
pub(crate) const MAX_BATCH_WAIT_MS: u64 = 60_000;
pub(crate) const DEFAULT_BATCH_WAIT_MS: u64 = 1000;

/// Parses `{"schedule": ["0s", "30s", "5m", ...]}`.
pub(crate) fn parse_webhook_retry(value: &Value) -> Result<RetrySchedule, FieldError> {
    let invalid = |why: String| FieldError::invalid(RETRY_PARAM, why);
    let obj = value.as_object().ok_or_else(|| {
        invalid(
            "webhook_retry must be an object such as {\"schedule\": [\"0s\", \"30s\", \"5m\"]}"
                .into(),
        )
    })?;
    if obj.keys().any(|k| k != "schedule") {
        return Err(unknown_key(RETRY_PARAM, obj.keys(), &["schedule"]));
    }
    let schedule = obj
        .get("schedule")
        .filter(|v| !v.is_null())
        .ok_or_else(|| FieldError {
            message: "Missing required parameter: 'webhook_retry.schedule'".into(),
            ..FieldError::missing(RETRY_PARAM)
        })?;
    let items = schedule.as_array().ok_or_else(|| {
        invalid("webhook_retry.schedule must be an array of delays such as \"30s\"".into())
    })?;
    if items.is_empty() || items.len() > MAX_RETRY_ENTRIES {
        return Err(invalid(format!(
            "webhook_retry.schedule must hold 1 to {MAX_RETRY_ENTRIES} delays (got {})",
            items.len()
        )));
    }
    let mut delays = Vec::with_capacity(items.len());
    for item in items {
        let delay = item.as_str().and_then(delay_of).ok_or_else(|| {
            invalid(format!(
                "webhook_retry.schedule holds {item}; each delay is a whole number followed by ms, s, m or h"
            ))
        })?;
        if delay > MAX_RETRY_DELAY {
            return Err(invalid(format!(
                "webhook_retry.schedule holds {item}; each delay is at most 24h"
            )));
        }
        delays.push(item.as_str().unwrap_or_default());
    }
    let schedule = RetrySchedule::parse(&delays.join(","))
        .map_err(|e| invalid(format!("webhook_retry.schedule: {e}")))?;
    if schedule.total() > MAX_RETRY_TOTAL {
        return Err(invalid(
            "webhook_retry.schedule's delays must add up to at most 72h".into(),
        ));
    }
    Ok(schedule)
}

/// One delay: digits and a unit, nothing else (no sign, no spaces, no bare `0`).
fn delay_of(raw: &str) -> Option<Duration> {
    let digits = raw.bytes().take_while(u8::is_ascii_digit).count();
    let unit = &raw[digits..];
    if digits == 0 || digits > 12 || !matches!(unit, "ms" | "s" | "m" | "h") {
        return None;
    }
    parse_duration(raw).ok()
}

/// Parses `{"max_events": 1..1000, "max_wait_ms": 0..60000}`, both optional.
pub(crate) fn parse_webhook_batch(value: &Value) -> Result<BatchSettings, FieldError> {
    let obj = value.as_object().ok_or_else(|| {
        FieldError::invalid(
            BATCH_PARAM,
            "webhook_batch must be an object such as {\"max_events\": 100, \"max_wait_ms\": 1000}",
        )
    })?;
    const KEYS: [&str; 2] = ["max_events", "max_wait_ms"];
    if obj.keys().any(|k| !KEYS.contains(&k.as_str())) {
        return Err(unknown_key(BATCH_PARAM, obj.keys(), &KEYS));
    }
    let int = |key: &str, max: u64, default: u64, min: u64| -> Result<u64, FieldError> {
        let Some(v) = obj.get(key).filter(|v| !v.is_null()) else {
            return Ok(default);
        };
        v.as_u64()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                FieldError::invalid(
                    BATCH_PARAM,
                    format!("webhook_batch.{key} must be an integer from {min} to {max} (got {v})"),
                )
            })
    };
    let max_events = int(
        "max_events",
        u64::from(MAX_BATCH_EVENTS),
        u64::from(DEFAULT_BATCH_EVENTS),
        1,
    )?;
    Ok(BatchSettings {
        max_events: u32::try_from(max_events).unwrap_or(MAX_BATCH_EVENTS),
        max_wait_ms: int("max_wait_ms", MAX_BATCH_WAIT_MS, DEFAULT_BATCH_WAIT_MS, 0)?,
    })
}

fn unknown_key<'a>(
    param: &str,
    mut keys: impl Iterator<Item = &'a String>,
    known: &[&str],
) -> FieldError {
    let key = keys
        .find(|k| !known.contains(&k.as_str()))
        .cloned()
        .unwrap_or_default();
    FieldError {
        message: format!(
            "Unrecognized argument '{param}.{key}'; {param} takes {}",
            known.join(", ")
        ),
        ..FieldError::unknown(param)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldCode;
    use serde_json::json;

    fn retry_refusal(v: Value) -> FieldCode {
        let e = parse_webhook_retry(&v).unwrap_err();
        assert_eq!(e.param, RETRY_PARAM, "{v}");
        e.code
    }

    fn batch_refusal(v: Value) -> FieldCode {
        let e = parse_webhook_batch(&v).unwrap_err();
        assert_eq!(e.param, BATCH_PARAM, "{v}");
        e.code
    }

    #[test]
    fn retry_schedules_within_the_limits() {
        let s =
            parse_webhook_retry(&json!({"schedule": ["0s", "250ms", "30s", "5m", "2h"]})).unwrap();
        assert_eq!(s.to_string(), "0s,250ms,30s,5m,2h");
        let twenty = vec!["24h"; 3]
            .into_iter()
            .chain(vec!["0s"; 17])
            .collect::<Vec<_>>();
        assert_eq!(
            parse_webhook_retry(&json!({ "schedule": twenty }))
                .unwrap()
                .attempts(),
            20
        );
    }

    #[test]
    fn retry_refusals() {
        use FieldCode::*;
        assert_eq!(
            retry_refusal(json!({"schedule": ["1s"], "x": 1})),
            UnknownParameter
        );
        assert_eq!(retry_refusal(json!({})), MissingParameter);
        assert_eq!(retry_refusal(json!({"schedule": null})), MissingParameter);
        for bad in [
            json!(["1s"]),
            json!("1s"),
            json!({"schedule": []}),
            json!({"schedule": vec!["1s"; 21]}),
            json!({"schedule": "1s"}),
            json!({"schedule": ["1d"]}),
            json!({"schedule": ["0"]}),
            json!({"schedule": ["-1s"]}),
            json!({"schedule": [" 1s"]}),
            json!({"schedule": ["1.5s"]}),
            json!({"schedule": [5]}),
            json!({"schedule": ["25h"]}),
            json!({"schedule": ["1441m"]}),
            json!({"schedule": ["24h", "24h", "24h", "1ms"]}),
            json!({"schedule": ["99999999999999999h"]}),
        ] {
            assert_eq!(retry_refusal(bad.clone()), InvalidValue, "{bad}");
        }
    }

    #[test]
    fn batch_defaults_and_limits() {
        assert_eq!(
            parse_webhook_batch(&json!({})).unwrap(),
            BatchSettings {
                max_events: 100,
                max_wait_ms: 1000
            }
        );
        assert_eq!(
            parse_webhook_batch(&json!({"max_events": 1000, "max_wait_ms": 0})).unwrap(),
            BatchSettings {
                max_events: 1000,
                max_wait_ms: 0
            }
        );
        use FieldCode::*;
        assert_eq!(batch_refusal(json!({"max_event": 5})), UnknownParameter);
        for bad in [
            json!(true),
            json!({"max_events": 0}),
            json!({"max_events": 1001}),
            json!({"max_events": "5"}),
            json!({"max_events": 2.5}),
            json!({"max_wait_ms": -1}),
            json!({"max_wait_ms": 60001}),
        ] {
            assert_eq!(batch_refusal(bad.clone()), InvalidValue, "{bad}");
        }
    }
}
