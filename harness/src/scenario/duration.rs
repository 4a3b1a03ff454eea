//! Durations written as `30s`, `5m`, `2h`, `1d`, `1h30m` or `250ms`, and signed clock skews.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// The longest duration or clock skew a scenario may write, and the furthest its world clock
/// may be advanced in total: 36500 days (100 years).
pub const MAX_SPAN: Duration = Duration::from_millis(36_500 * 86_400_000);

/// A span of virtual time, such as `5m` (stored in milliseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    millis: u64,
}

/// A signed offset of one machine's clock from world time, such as `-2h`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClockSkew {
    millis: i64,
}

/// How every duration error's text begins (the parser hands it on as text; the diagnostic
/// labels it by this).
pub(crate) const ERROR_PREFIX: &str = "Invalid duration";

/// Why a duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Invalid duration `{text}`: {problem}; write a whole number followed by ms, s, m, h or d, e.g. 30s, 5m, 2h, 1d, 1h30m"
)]
pub struct DurationError {
    text: String,
    problem: &'static str,
}

impl Duration {
    /// A duration of this many milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self { millis }
    }

    /// A duration of this many seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self {
            millis: secs * 1000,
        }
    }

    /// Length in milliseconds.
    pub const fn as_millis(&self) -> u64 {
        self.millis
    }

    /// As a standard library duration.
    pub const fn as_std(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.millis)
    }

    /// Whether this is zero.
    pub const fn is_zero(&self) -> bool {
        self.millis == 0
    }
}

impl ClockSkew {
    /// A skew of this many milliseconds (negative = behind world time).
    pub const fn from_millis(millis: i64) -> Self {
        Self { millis }
    }

    /// Offset in milliseconds (negative = behind world time).
    pub const fn as_millis(&self) -> i64 {
        self.millis
    }
}

fn parse_millis(text: &str) -> Result<u64, DurationError> {
    let error = |problem| DurationError {
        text: text.to_owned(),
        problem,
    };
    if text.is_empty() {
        return Err(error("it is empty"));
    }
    let mut rest = text;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(error("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| error("the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        if unit_len == 0 {
            return Err(error("a unit is missing"));
        }
        let unit = &rest[..unit_len];
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| error("unknown unit"))?;
        total = number
            .checked_mul(scale)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| error("the duration is too large"))?;
        rest = &rest[unit_len..];
    }
    if total > MAX_SPAN.millis {
        return Err(error("it is longer than 36500d (100 years)"));
    }
    Ok(total)
}

fn format_millis(f: &mut fmt::Formatter<'_>, mut millis: u64) -> fmt::Result {
    if millis == 0 {
        return f.write_str("0s");
    }
    for (unit, scale) in UNITS {
        if millis >= scale {
            write!(f, "{}{unit}", millis / scale)?;
            millis %= scale;
        }
    }
    Ok(())
}

impl FromStr for Duration {
    type Err = DurationError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_millis(text.trim()).map(Self::from_millis)
    }
}

impl FromStr for ClockSkew {
    type Err = DurationError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let (negative, magnitude) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed.strip_prefix('+').unwrap_or(trimmed)),
        };
        let millis = parse_millis(magnitude).map_err(|mut error| {
            error.text = text.to_owned();
            error
        })?;
        let millis = i64::try_from(millis).map_err(|_| DurationError {
            text: text.to_owned(),
            problem: "the duration is too large",
        })?;
        Ok(Self::from_millis(if negative { -millis } else { millis }))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format_millis(f, self.millis)
    }
}

impl fmt::Display for ClockSkew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.millis < 0 {
            f.write_str("-")?;
        }
        format_millis(f, self.millis.unsigned_abs())
    }
}

struct ParsedVisitor<T>(std::marker::PhantomData<T>);

impl<T> Visitor<'_> for ParsedVisitor<T>
where
    T: FromStr<Err = DurationError>,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 30s, 5m, 2h or 1d")
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        text.parse().map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, number: u64) -> Result<T, E> {
        Err(E::custom(format!(
            "{ERROR_PREFIX} `{number}`: a unit is missing; write e.g. {number}s or {number}m"
        )))
    }
    fn visit_i64<E: de::Error>(self, number: i64) -> Result<T, E> {
        Err(E::custom(format!(
            "{ERROR_PREFIX} `{number}`: a unit is missing; write e.g. {number}s or {number}m"
        )))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParsedVisitor(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for ClockSkew {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParsedVisitor(std::marker::PhantomData))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Serialize for ClockSkew {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Pattern a duration string matches in the JSON schema.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h|d))+$";
/// Pattern a clock skew string matches in the JSON schema.
pub const CLOCK_SKEW_PATTERN: &str = "^[+-]?([0-9]+(ms|s|m|h|d))+$";

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> schemars::Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration: whole numbers with units ms, s, m, h, d (e.g. 30s, 5m, 2h, 1d, 1h30m).",
            "examples": ["30s", "5m", "2h", "1d"]
        })
    }
}

impl JsonSchema for ClockSkew {
    fn schema_name() -> Cow<'static, str> {
        "ClockSkew".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> schemars::Schema {
        json_schema!({
            "type": "string",
            "pattern": CLOCK_SKEW_PATTERN,
            "description": "A signed clock offset from world time (e.g. -2h, +30m, 1d).",
            "examples": ["-2h", "+30m"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("250ms", 250)]
    #[case("30s", 30_000)]
    #[case("5m", 300_000)]
    #[case("2h", 7_200_000)]
    #[case("1d", 86_400_000)]
    #[case("1h30m", 5_400_000)]
    #[case("0s", 0)]
    fn parses_durations(#[case] text: &str, #[case] millis: u64) {
        assert_eq!(text.parse::<Duration>().unwrap().as_millis(), millis);
    }

    #[rstest]
    #[case("", "it is empty")]
    #[case("5", "a unit is missing")]
    #[case("5x", "unknown unit")]
    #[case("m5", "expected a number")]
    #[case("-5m", "expected a number")]
    #[case("99999999999999999999s", "the number is too large")]
    #[case("36501d", "it is longer than 36500d (100 years)")]
    #[case("36500d1ms", "it is longer than 36500d (100 years)")]
    fn rejects_bad_durations(#[case] text: &str, #[case] problem: &str) {
        let error = text.parse::<Duration>().unwrap_err();
        assert_eq!(error.problem, problem, "{error}");
        assert!(error.to_string().starts_with(ERROR_PREFIX), "{error}");
    }

    #[rstest]
    #[case("-2h", -7_200_000)]
    #[case("+30m", 1_800_000)]
    #[case("1d", 86_400_000)]
    fn parses_skews(#[case] text: &str, #[case] millis: i64) {
        assert_eq!(text.parse::<ClockSkew>().unwrap().as_millis(), millis);
    }

    #[rstest]
    #[case(5_400_000, "1h30m")]
    #[case(0, "0s")]
    #[case(90_061_001, "1d1h1m1s1ms")]
    fn formats_canonically(#[case] millis: u64, #[case] text: &str) {
        let duration = Duration::from_millis(millis);
        assert_eq!(duration.to_string(), text);
        assert_eq!(text.parse::<Duration>().unwrap(), duration);
    }

    #[test]
    fn negative_skew_round_trips() {
        let skew: ClockSkew = "-25d".parse().unwrap();
        assert_eq!(skew.to_string(), "-25d");
    }
}
