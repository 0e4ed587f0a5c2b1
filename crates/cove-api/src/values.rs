//! Values that clients may write in two ways: durations as a number of
//! seconds or a string (`1500ms`, `30s`, `5m`, `1h`), sizes as a number of
//! bytes or a string (`512M`, `1.5G`).

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::{PartialSchema, ToSchema};

use crate::units;

/// A duration: seconds as a number (fractions allowed), or a string with a
/// unit: `500ms`, `30s`, `5m`, `1h`. `0` means "no limit" where a limit is
/// optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DurationValue(pub Duration);

/// A size in bytes: a number, or a string with a binary unit: `512M`, `1.5G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeValue(pub u64);

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum NumberOrString {
    Number(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => {
                let secs = n
                    .as_f64()
                    .ok_or_else(|| D::Error::custom("duration is not a number"))?;
                if !secs.is_finite() || !(0.0..=1e12).contains(&secs) {
                    return Err(D::Error::custom(format!(
                        "{n} is not a valid duration (seconds must be between 0 and 1e12)"
                    )));
                }
                Ok(DurationValue(Duration::from_secs_f64(secs)))
            }
            serde_json::Value::String(s) => units::parse_duration(&s)
                .map(DurationValue)
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "{other} is not a duration (use seconds as a number, or a string like \"30s\")"
            ))),
        }
    }
}

impl Serialize for DurationValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&units::format_duration(self.0))
    }
}

impl PartialSchema for DurationValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        NumberOrString::schema()
    }
}

impl ToSchema for DurationValue {
    fn name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(bytes) => Ok(SizeValue(bytes)),
                None => Err(D::Error::custom(format!(
                    "{n} is not a size (a whole, non-negative number of bytes)"
                ))),
            },
            serde_json::Value::String(s) => units::parse_size(&s)
                .map(SizeValue)
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "{other} is not a size (use bytes as a number, or a string like \"512M\")"
            ))),
        }
    }
}

impl Serialize for SizeValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl PartialSchema for SizeValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        NumberOrString::schema()
    }
}

impl ToSchema for SizeValue {
    fn name() -> std::borrow::Cow<'static, str> {
        "Size".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_from_numbers_and_strings() {
        let d: DurationValue = serde_json::from_str("1.5").unwrap();
        assert_eq!(d.0, Duration::from_millis(1500));
        let d: DurationValue = serde_json::from_str("\"1500ms\"").unwrap();
        assert_eq!(d.0, Duration::from_millis(1500));
        assert!(serde_json::from_str::<DurationValue>("-1").is_err());
        assert!(serde_json::from_str::<DurationValue>("\"soon\"").is_err());
        assert!(serde_json::from_str::<DurationValue>("true").is_err());
    }

    #[test]
    fn sizes_from_numbers_and_strings() {
        let s: SizeValue = serde_json::from_str("1024").unwrap();
        assert_eq!(s.0, 1024);
        let s: SizeValue = serde_json::from_str("\"512M\"").unwrap();
        assert_eq!(s.0, 512 << 20);
        assert!(serde_json::from_str::<SizeValue>("-5").is_err());
        assert!(serde_json::from_str::<SizeValue>("1.5").is_err());
    }
}
