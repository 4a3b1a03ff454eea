//! Cryptographic binding of a licence content key to machine traits.

use serde::{Deserialize, Serialize};

/// How many trait changes a bound licence survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tolerance {
    /// Survives a move to other hardware as long as some traits still match.
    Loose,
    /// Survives one changed component; detects a copy to another host.
    #[default]
    Medium,
    /// Any changed weighted trait breaks the binding.
    Strict,
}

/// Which machine property a licence is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindingScheme {
    /// Weighted hardware traits (physical or VM recipe).
    #[default]
    Smartbind,
    /// A random id created at activation that travels with the disk.
    Random,
    /// The machine's IP address.
    Ip,
}

/// Vendor choice of binding scheme and tolerance for one product item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BindingPolicy {
    /// Binding scheme.
    pub scheme: BindingScheme,
    /// Tolerance to trait changes.
    pub tolerance: Tolerance,
}
