//! Time formats of the contract: RFC 3339 timestamps in UTC with milliseconds and a `Z`,
//! and human durations such as `5s`, `250ms`, `5m`, `2h`.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

/// Formats a timestamp the way every payload and API response does:
/// `2024-01-20T15:30:45.123Z`.
pub fn format_millis(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The current time truncated to milliseconds, so a value that is stored, sent and
/// read back compares equal.
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// Serde adapter for `DateTime<Utc>` fields written as `2024-01-20T15:30:45.123Z`.
pub mod rfc3339_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_millis(at))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// Same as [`rfc3339_millis`] for optional fields (skip them when `None`).
pub mod rfc3339_millis_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_str(&super::format_millis(at)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let raw = Option::<String>::deserialize(d)?;
        raw.map(|raw| {
            DateTime::parse_from_rfc3339(&raw)
                .map(|t| t.with_timezone(&Utc))
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected a number followed by ms, s, m or h")]
pub struct DurationParseError(pub String);

/// Parses `250ms`, `5s`, `5m`, `2h` (a bare `0` is accepted as zero).
pub fn parse_duration(raw: &str) -> Result<Duration, DurationParseError> {
    let text = raw.trim();
    let err = || DurationParseError(raw.to_owned());
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| err())?;
    let millis = match unit {
        "ms" => Some(value),
        "s" => value.checked_mul(1_000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(err)?;
    Ok(Duration::from_millis(millis))
}

/// Formats a duration in the largest unit that represents it exactly (`5m`, `1500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_owned()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_millis_and_z() {
        let at = DateTime::parse_from_rfc3339("2024-01-20T15:30:45.123456+00:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_millis(&at), "2024-01-20T15:30:45.123Z");
        let whole = DateTime::parse_from_rfc3339("2024-01-20T15:30:45Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_millis(&whole), "2024-01-20T15:30:45.000Z");
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("10h"), Ok(Duration::from_secs(36_000)));
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "s", "5", "5d", "-5s", "5.5s", "ms5"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn formats_round_trip() {
        for raw in ["0s", "250ms", "5s", "5m", "2h", "1500ms"] {
            assert_eq!(format_duration(parse_duration(raw).unwrap()), raw);
        }
    }
}
