//! Serde for fixed-size byte arrays: hex strings in human-readable formats, raw bytes otherwise.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Serialises a byte array as hex (JSON, YAML) or as a byte string (postcard).
pub fn serialize<S: Serializer, const N: usize>(
    bytes: &[u8; N],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        serializer.serialize_str(&hex::encode(bytes))
    } else {
        serializer.serialize_bytes(bytes)
    }
}

/// Deserialises a byte array written by [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
    deserializer: D,
) -> Result<[u8; N], D::Error> {
    struct ArrayVisitor<const N: usize>;

    impl<const N: usize> ArrayVisitor<N> {
        fn from_slice<E: de::Error>(bytes: &[u8]) -> Result<[u8; N], E> {
            bytes
                .try_into()
                .map_err(|_| E::invalid_length(bytes.len(), &format!("{N} bytes").as_str()))
        }
    }

    impl<'de, const N: usize> Visitor<'de> for ArrayVisitor<N> {
        type Value = [u8; N];

        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            write!(formatter, "{N} bytes as hex or a byte string")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let bytes = hex::decode(text).map_err(E::custom)?;
            Self::from_slice(&bytes)
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
            Self::from_slice(bytes)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = [0u8; N];
            for (index, slot) in out.iter_mut().enumerate() {
                *slot = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(index, &self))?;
            }
            if seq.next_element::<u8>()?.is_some() {
                return Err(de::Error::invalid_length(N + 1, &self));
            }
            Ok(out)
        }
    }

    if deserializer.is_human_readable() {
        deserializer.deserialize_str(ArrayVisitor::<N>)
    } else {
        deserializer.deserialize_bytes(ArrayVisitor::<N>)
    }
}
