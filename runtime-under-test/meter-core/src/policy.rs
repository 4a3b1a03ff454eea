//! Vendor product policy: which products a licence holds and how they are counted.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub use crate::binding::{BindingPolicy, BindingScheme, Tolerance};

/// Firm code used when a policy does not name one.
pub const DEFAULT_FIRM: u32 = 10;

/// A vendor's product policy, as written in YAML by the vendor (or a scenario).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProductPolicy {
    /// Vendor (firm) code; defaults to [`DEFAULT_FIRM`].
    #[serde(default = "default_firm")]
    pub firm: u32,
    /// Vendor display name.
    #[serde(default = "default_firm_name")]
    pub firm_name: String,
    /// The product items.
    pub products: Vec<ProductItem>,
}

/// One product item: a licensed product with its quantity and rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProductItem {
    /// Product code.
    pub code: u32,
    /// Product name.
    pub name: String,
    /// Kind of container the item is issued into.
    #[serde(default)]
    pub container: ContainerKind,
    /// Licence quantity; 0 means a local single-user licence.
    #[serde(default = "default_quantity")]
    pub quantity: u32,
    /// How accesses are counted against the quantity.
    #[serde(default)]
    pub counting: Counting,
    /// Expiry time, unix milliseconds.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Pay-per-use units at issue time.
    #[serde(default)]
    pub units: Option<u64>,
    /// How a soft licence is bound to its machine.
    #[serde(default)]
    pub binding: BindingPolicy,
    /// Whether the item may be activated and used in a virtual machine.
    #[serde(default)]
    pub virtual_machines: Allowance,
    /// Whether the item may be used on a terminal server.
    #[serde(default)]
    pub terminal_server: Allowance,
    /// Whether a triad licence of the item may be activated for members in virtual machines
    /// (members on guests of one host lose the quorum with that host). Left out when allowed,
    /// so the signed form of the items of licences issued before it existed is unchanged.
    #[serde(default, skip_serializing_if = "Allowance::is_allow")]
    pub triad_in_guests: Allowance,
    /// What the runtime does when it detects a rollback.
    #[serde(default)]
    pub on_rollback: RollbackPolicy,
    /// Whether metered units may be spent with no witness vouching for them.
    #[serde(default)]
    pub witness: WitnessPolicy,
}

/// Kind of licence container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerKind {
    /// A licence file bound to the machine.
    #[default]
    Soft,
    /// A hardware dongle.
    Dongle,
}

/// How accesses count against an item's quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Counting {
    /// Each access takes one.
    UserLimit,
    /// Each station takes one, however many accesses it makes.
    #[default]
    StationShare,
    /// Accesses are not counted.
    NoCount,
}

/// A vendor allow/deny switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allowance {
    /// Allowed.
    #[default]
    Allow,
    /// Denied.
    Deny,
}

impl Allowance {
    /// Whether it allows.
    pub fn is_allow(&self) -> bool {
        *self == Allowance::Allow
    }
}

/// What happens to metered items when a rollback is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RollbackPolicy {
    /// Lock the item until reconciled with a witness.
    #[default]
    Lock,
    /// Reconcile with the witness automatically when one is reachable.
    Reconcile,
}

/// Whether a metered item may be spent without a witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WitnessPolicy {
    /// Spent with a witness when one is reachable, without one otherwise (a state restore on a
    /// machine that never reaches a witness goes unnoticed).
    #[default]
    Optional,
    /// Spent only when a witness has vouched for the licence's receipts in this run and takes
    /// the new receipt before the grant is answered.
    Required,
}

/// The counting rules of one item, as the allocation table needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ItemRules {
    /// Licence quantity; 0 means a local single-user licence (counted as 1).
    pub quantity: u32,
    /// How accesses are counted.
    pub counting: Counting,
    /// Whether local use in a virtual machine is allowed.
    pub virtual_machines: Allowance,
    /// Whether use on a terminal server is allowed.
    pub terminal_server: Allowance,
    /// Expiry time, unix milliseconds.
    pub expires_at: Option<u64>,
}

impl ItemRules {
    /// True for a local single-user licence (quantity 0).
    pub fn is_local(&self) -> bool {
        self.quantity == 0
    }

    /// How many stations or accesses may hold the item at once (`None` = unlimited).
    pub fn capacity(&self) -> Option<u32> {
        match self.counting {
            Counting::NoCount => None,
            Counting::UserLimit | Counting::StationShare => Some(self.quantity.max(1)),
        }
    }
}

impl ProductItem {
    /// The counting rules of this item.
    pub fn rules(&self) -> ItemRules {
        ItemRules {
            quantity: self.quantity,
            counting: self.counting,
            virtual_machines: self.virtual_machines,
            terminal_server: self.terminal_server,
            expires_at: self.expires_at,
        }
    }
}

/// A product policy that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The YAML is not a valid policy (syntax, unknown field, bad value).
    #[error("Invalid product policy")]
    Yaml(#[source] serde_saphyr::Error),
    /// A field has a value the policy does not allow.
    #[error("Invalid product policy: products[{index}].{field}: {message}")]
    Field {
        /// Index of the product item.
        index: usize,
        /// Kebab-case field name.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Two items share a product code.
    #[error("Invalid product policy: product code {code} appears more than once")]
    DuplicateCode {
        /// The repeated code.
        code: u32,
    },
    /// The policy lists no products.
    #[error("Invalid product policy: products is empty")]
    NoProducts,
}

impl ProductPolicy {
    /// Parses and validates a policy from YAML.
    pub fn from_yaml(yaml: &str) -> Result<Self, PolicyError> {
        let policy: ProductPolicy = serde_saphyr::from_str(yaml).map_err(PolicyError::Yaml)?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks rules serde cannot: unique codes, names, dongle-only fields.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.products.is_empty() {
            return Err(PolicyError::NoProducts);
        }
        let mut seen = BTreeSet::new();
        for (index, item) in self.products.iter().enumerate() {
            if !seen.insert(item.code) {
                return Err(PolicyError::DuplicateCode { code: item.code });
            }
            if item.code == 0 {
                return Err(PolicyError::Field {
                    index,
                    field: "code",
                    message: "product code 0 is reserved".to_owned(),
                });
            }
            if item.name.trim().is_empty() {
                return Err(PolicyError::Field {
                    index,
                    field: "name",
                    message: "must not be empty".to_owned(),
                });
            }
            if item.witness == WitnessPolicy::Required
                && (item.units.is_none() || item.container != ContainerKind::Soft)
            {
                return Err(PolicyError::Field {
                    index,
                    field: "witness",
                    message: "`required` needs a soft licence item with `units`".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// The item with this product code.
    pub fn product(&self, code: u32) -> Option<&ProductItem> {
        self.products.iter().find(|item| item.code == code)
    }
}

fn default_firm() -> u32 {
    DEFAULT_FIRM
}

fn default_firm_name() -> String {
    "vendor".to_owned()
}

fn default_quantity() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The YAML example of the runtime contract's "Policy document" section.
    fn documented_example() -> &'static str {
        let doc = include_str!("../../../docs/runtime-contract.md");
        let section = doc.split("\n## Policy document").nth(1).unwrap();
        let block = section.split("```yaml\n").nth(1).unwrap();
        block.split("```").next().unwrap()
    }

    #[test]
    fn the_contract_example_reads_as_written() {
        let policy = ProductPolicy::from_yaml(documented_example()).unwrap();
        assert_eq!(policy.firm, 6_000_010);
        let cad = policy.product(1001).unwrap();
        assert_eq!(cad.expires_at, Some(1_792_592_000_000));
        assert_eq!(cad.units, Some(100));
        assert_eq!(cad.binding.tolerance, Tolerance::Strict);
        assert_eq!(cad.virtual_machines, Allowance::Deny);
        assert_eq!(cad.on_rollback, RollbackPolicy::Reconcile);
        assert_eq!(cad.witness, WitnessPolicy::Required);
        let cam = policy.product(2001).unwrap();
        assert_eq!(cam.container, ContainerKind::Dongle);
        assert_eq!(cam.counting, Counting::UserLimit);
    }

    #[test]
    fn defaults_fill_a_minimal_item() {
        let policy =
            ProductPolicy::from_yaml("products:\n  - { code: 1001, name: cad-pro }\n").unwrap();
        let item = &policy.products[0];
        assert_eq!(policy.firm, DEFAULT_FIRM);
        assert_eq!(item.quantity, 1);
        assert_eq!(item.counting, Counting::StationShare);
        assert_eq!(item.container, ContainerKind::Soft);
        assert_eq!(item.binding.scheme, BindingScheme::Smartbind);
        assert_eq!(item.binding.tolerance, Tolerance::Medium);
        assert_eq!(item.virtual_machines, Allowance::Allow);
        assert_eq!(item.terminal_server, Allowance::Allow);
        assert_eq!(item.on_rollback, RollbackPolicy::Lock);
        assert_eq!(item.witness, WitnessPolicy::Optional);
    }

    #[test]
    fn a_required_witness_needs_soft_units() {
        for item in [
            "{code: 1, name: a, witness: required}",
            "{code: 1, name: a, container: dongle, units: 5, witness: required}",
        ] {
            let err = ProductPolicy::from_yaml(&format!("products: [{item}]")).unwrap_err();
            assert!(
                matches!(
                    err,
                    PolicyError::Field {
                        field: "witness",
                        ..
                    }
                ),
                "{item}: {err:?}"
            );
        }
        ProductPolicy::from_yaml("products: [{code: 1, name: a, units: 5, witness: required}]")
            .unwrap();
    }

    #[test]
    fn local_licence_counts_as_one() {
        let mut rules = ProductPolicy::from_yaml("products: [{code: 1, name: a, quantity: 0}]")
            .unwrap()
            .products[0]
            .rules();
        assert!(rules.is_local());
        assert_eq!(rules.capacity(), Some(1));
        rules.counting = Counting::NoCount;
        assert_eq!(rules.capacity(), None);
    }
}
