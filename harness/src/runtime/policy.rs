//! The product policy document the harness hands the vendor commands (`--policy <yaml>`), as
//! docs/runtime-contract.md ("Policy document") defines it.

use serde::Serialize;

use crate::scenario::{
    Binding, Container, Counting, Permission, Policy, RollbackPolicy, WitnessPolicy,
};

/// A vendor's product policy: its firm and the products it issues.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyDocument {
    /// The vendor's firm code.
    pub firm: u32,
    /// The vendor's name, for reports.
    pub firm_name: String,
    /// The products, each with its own code.
    pub products: Vec<PolicyProduct>,
}

/// One product of a policy document.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyProduct {
    /// Product code, as apps ask for it.
    pub code: u32,
    /// Product name.
    pub name: String,
    /// `soft` (a licence file) or `dongle`.
    pub container: Container,
    /// Licence quantity; 0 = a local single-user licence.
    pub quantity: u32,
    /// `user-limit`, `station-share` or `no-count`.
    pub counting: Counting,
    /// When the product expires, in milliseconds since the Unix epoch (absent = never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Pay-per-use units (absent = not metered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub units: Option<u64>,
    /// How a soft licence is bound to its machine.
    pub binding: Binding,
    /// Whether the product may be activated and used in virtual machines.
    pub virtual_machines: Permission,
    /// Whether the product may be used in terminal-server sessions.
    pub terminal_server: Permission,
    /// Whether a triad licence of it may be activated for members in virtual machines.
    pub triad_in_guests: Permission,
    /// What the runtime does when metered state is rolled back.
    pub on_rollback: RollbackPolicy,
    /// Whether units may be spent with no witness vouching for them.
    pub witness: WitnessPolicy,
}

impl PolicyDocument {
    /// The document for a scenario's policy; expiries count from `started_ms` (epoch ms).
    pub fn from_scenario(policy: &Policy, firm: u32, firm_name: &str, started_ms: u64) -> Self {
        let products = policy
            .products
            .iter()
            .map(|p| PolicyProduct {
                code: p.code.value,
                name: p.name.value.clone(),
                container: p.container,
                quantity: p.quantity,
                counting: p.counting,
                expires_at: p.expires.map(|d| started_ms.saturating_add(d.as_millis())),
                units: p.units,
                binding: p.binding,
                virtual_machines: p.virtual_machines,
                terminal_server: p.terminal_server,
                triad_in_guests: p.triad_in_guests,
                on_rollback: p.on_rollback,
                witness: p.witness.value,
            })
            .collect();
        Self {
            firm,
            firm_name: firm_name.to_owned(),
            products,
        }
    }

    /// The document as YAML.
    pub fn to_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        serde_saphyr::to_string(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{self, Scenario};

    /// The YAML example of the contract's "Policy document" section.
    fn documented_example() -> String {
        let doc = include_str!("../../../docs/runtime-contract.md");
        let section = doc
            .split("\n## Policy document")
            .nth(1)
            .expect("the contract has a Policy document section");
        let block = section
            .split("```yaml\n")
            .nth(1)
            .expect("the section has a yaml example");
        block
            .split("```")
            .next()
            .expect("the example block is closed")
            .to_owned()
    }

    fn scenario_with_every_field() -> Scenario {
        scenario::parse_str(
            r#"name: policy-example
policy:
  products:
    - { code: 1001, name: cad-pro, container: soft, quantity: 2, counting: station-share,
        binding: { scheme: smartbind, tolerance: strict }, virtual-machines: deny,
        terminal-server: allow, expires: 30d, units: 100, on-rollback: reconcile,
        witness: required }
    - { code: 2001, name: cam-suite, container: dongle, quantity: 1, counting: user-limit }
hosts:
  - { name: pc, cpu: { vendor: GenuineIntel, model: "Core i7-12700" } }
dongles:
  - { name: d1, products: [2001] }
steps:
  - advance: 1m
"#,
            "policy-example.yaml",
        )
        .unwrap()
    }

    #[test]
    fn the_harness_writes_the_documented_example() {
        let scenario = scenario_with_every_field();
        let document = PolicyDocument::from_scenario(
            &scenario.policy,
            6_000_010,
            "Vigil Test Vendor",
            1_790_000_000_000,
        );
        assert_eq!(document.to_yaml().unwrap(), documented_example());
    }

    #[test]
    fn expiry_counts_from_the_start_and_saturates() {
        let scenario = scenario_with_every_field();
        let document = PolicyDocument::from_scenario(&scenario.policy, 1, "v", u64::MAX - 1);
        assert_eq!(document.products[0].expires_at, Some(u64::MAX));
        assert_eq!(document.products[1].expires_at, None);
    }
}
