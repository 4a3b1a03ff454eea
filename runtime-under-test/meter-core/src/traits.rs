//! Machine traits: the named hardware and identity values a soft licence can be bound to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Well-known trait names (as written by the platform layer, see docs/runtime-contract.md).
pub mod names {
    /// CPU vendor string, e.g. "GenuineIntel".
    pub const CPU_VENDOR: &str = "cpu.vendor";
    /// CPU brand string.
    pub const CPU_MODEL_NAME: &str = "cpu.model-name";
    /// CPU family number.
    pub const CPU_FAMILY: &str = "cpu.family";
    /// CPU model number.
    pub const CPU_MODEL: &str = "cpu.model";
    /// CPU stepping.
    pub const CPU_STEPPING: &str = "cpu.stepping";
    /// CPU microcode revision.
    pub const CPU_MICROCODE: &str = "cpu.microcode";
    /// Digest of the CPU feature flags.
    pub const CPU_FLAGS: &str = "cpu.flags";
    /// Mainboard serial number.
    pub const BOARD_SERIAL: &str = "board.serial";
    /// SMBIOS product UUID.
    pub const PRODUCT_UUID: &str = "product.uuid";
    /// SMBIOS product serial number.
    pub const PRODUCT_SERIAL: &str = "product.serial";
    /// Disk serial numbers (one per disk).
    pub const DISK_SERIAL: &str = "disk.serial";
    /// Network interface MAC addresses (one per NIC).
    pub const NIC_MAC: &str = "nic.mac";
    /// IP addresses of the machine.
    pub const NET_IP: &str = "net.ip";
    /// Random id created at activation and stored with the runtime's state.
    pub const RUNTIME_RANDOM_ID: &str = "runtime.random-id";
}

/// Whether the runtime runs on real hardware or inside a virtual machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineKind {
    /// Real hardware.
    #[default]
    Physical,
    /// A virtual machine.
    Guest,
}

/// The value of one trait: a single string or several (e.g. one MAC per NIC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TraitValue {
    /// A single value.
    One(String),
    /// Several values, each standing on its own.
    Many(Vec<String>),
}

impl TraitValue {
    /// All values, in order.
    pub fn values(&self) -> Vec<&str> {
        match self {
            TraitValue::One(value) => vec![value.as_str()],
            TraitValue::Many(values) => values.iter().map(String::as_str).collect(),
        }
    }

    /// The single value, or the first of several.
    pub fn first(&self) -> Option<&str> {
        match self {
            TraitValue::One(value) => Some(value.as_str()),
            TraitValue::Many(values) => values.first().map(String::as_str),
        }
    }
}

impl From<&str> for TraitValue {
    fn from(value: &str) -> Self {
        TraitValue::One(value.to_owned())
    }
}

impl From<String> for TraitValue {
    fn from(value: String) -> Self {
        TraitValue::One(value)
    }
}

impl From<Vec<String>> for TraitValue {
    fn from(values: Vec<String>) -> Self {
        TraitValue::Many(values)
    }
}

impl<const N: usize> From<[&str; N]> for TraitValue {
    fn from(values: [&str; N]) -> Self {
        TraitValue::Many(values.iter().map(|v| (*v).to_owned()).collect())
    }
}

/// The traits of one machine, keyed by trait name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MachineTraits(pub BTreeMap<String, TraitValue>);

impl MachineTraits {
    /// An empty trait set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a trait, replacing any previous value.
    pub fn set(&mut self, name: &str, value: impl Into<TraitValue>) -> &mut Self {
        self.0.insert(name.to_owned(), value.into());
        self
    }

    /// Builder form of [`MachineTraits::set`].
    pub fn with(mut self, name: &str, value: impl Into<TraitValue>) -> Self {
        self.set(name, value);
        self
    }

    /// Removes a trait, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<TraitValue> {
        self.0.remove(name)
    }

    /// The raw value of a trait.
    pub fn get(&self, name: &str) -> Option<&TraitValue> {
        self.0.get(name)
    }

    /// The single (or first) value of a trait.
    pub fn one(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(TraitValue::first)
    }

    /// All values of a trait; empty when absent.
    pub fn many(&self, name: &str) -> Vec<&str> {
        self.get(name).map(TraitValue::values).unwrap_or_default()
    }

    /// The usable values of a trait for binding: normalised, without blanks and firmware placeholders.
    pub fn binding_values(&self, name: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .many(name)
            .into_iter()
            .map(normalise)
            .filter(|v| !is_placeholder(v))
            .collect();
        values.sort();
        values.dedup();
        values
    }

    /// Iterates over trait names and values.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &TraitValue)> {
        self.0.iter()
    }

    /// Number of traits.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no trait is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<String, TraitValue>> for MachineTraits {
    fn from(map: BTreeMap<String, TraitValue>) -> Self {
        Self(map)
    }
}

impl<K: Into<String>, V: Into<TraitValue>> FromIterator<(K, V)> for MachineTraits {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

fn normalise(value: &str) -> String {
    value.trim().to_ascii_lowercase()
}

/// Values firmware writes when it has nothing real to say; binding to them would bind to nothing.
fn is_placeholder(value: &str) -> bool {
    const PLACEHOLDERS: &[&str] = &[
        "",
        "0",
        "none",
        "n/a",
        "na",
        "unknown",
        "not specified",
        "not applicable",
        "default string",
        "to be filled by o.e.m.",
        "system serial number",
        "0123456789",
        "00:00:00:00:00:00",
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
    ];
    PLACEHOLDERS.contains(&value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_with_single_and_multiple_values_round_trips() {
        let json =
            r#"{"cpu.vendor":"GenuineIntel","nic.mac":["52:54:00:00:00:01","52:54:00:00:00:02"]}"#;
        let traits: MachineTraits = serde_json::from_str(json).unwrap();
        assert_eq!(traits.one(names::CPU_VENDOR), Some("GenuineIntel"));
        assert_eq!(traits.many(names::NIC_MAC).len(), 2);
        assert_eq!(serde_json::to_string(&traits).unwrap(), json);
    }

    #[test]
    fn binding_values_drop_placeholders_and_normalise() {
        let traits = MachineTraits::new()
            .with(names::BOARD_SERIAL, "To be filled by O.E.M.")
            .with(names::NIC_MAC, [" 52:54:00:AA:BB:CC ", "00:00:00:00:00:00"]);
        assert!(traits.binding_values(names::BOARD_SERIAL).is_empty());
        assert_eq!(
            traits.binding_values(names::NIC_MAC),
            vec!["52:54:00:aa:bb:cc".to_owned()]
        );
        assert!(traits.binding_values(names::DISK_SERIAL).is_empty());
    }

    #[test]
    fn machine_kind_is_kebab_case() {
        assert_eq!(
            serde_json::to_string(&MachineKind::Guest).unwrap(),
            "\"guest\""
        );
    }
}
