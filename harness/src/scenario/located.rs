//! A parsed value together with where it was written in the scenario file.

use std::borrow::Cow;
use std::fmt;
use std::ops::Deref;

use schemars::{JsonSchema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where a value was written: 1-based line and column, and its byte range in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Position {
    /// 1-based line; 0 when the value was not read from a file.
    pub line: u32,
    /// 1-based column in characters; 0 when unknown.
    pub column: u32,
    /// Byte offset of the value in the file.
    pub offset: usize,
    /// Length of the value in bytes (0 for a point).
    pub len: usize,
}

impl Position {
    /// Whether this position points into a file.
    pub fn is_known(&self) -> bool {
        self.line > 0
    }

    pub(crate) fn from_location(location: &serde_saphyr::Location) -> Self {
        let span = location.span();
        Self {
            line: u32::try_from(location.line()).unwrap_or(u32::MAX),
            column: u32::try_from(location.column()).unwrap_or(u32::MAX),
            offset: span
                .byte_offset()
                .and_then(|o| usize::try_from(o).ok())
                .unwrap_or(0),
            len: span
                .byte_len()
                .and_then(|l| usize::try_from(l).ok())
                .unwrap_or(0),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A value read from a scenario file, with its position (compared by value only).
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// The value itself.
    pub value: T,
    /// Where it was written.
    pub at: Position,
}

impl<T> Located<T> {
    /// A value that was not read from a file (built in code).
    pub fn new(value: T) -> Self {
        Self {
            value,
            at: Position::default(),
        }
    }
}

impl<T: Default> Default for Located<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> From<T> for Located<T> {
    fn from(value: T) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Located<String> {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}

impl<T> Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Located<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Located<T> {}

impl<T: fmt::Display> fmt::Display for Located<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: Serialize> Serialize for Located<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Self {
            at: Position::from_location(&spanned.referenced),
            value: spanned.value,
        })
    }
}

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}
