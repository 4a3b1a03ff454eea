//! The threat catalogue of `vigil audit`: what each threat proves, when it applies to a product,
//! and what its outcome check expects, with the scenario templates in the repository's
//! threats/ folder.

use crate::scenario::{BindingScheme, Container, Counting, Permission, Product, RollbackPolicy};
use crate::scenario::{Tolerance, WitnessPolicy};

/// One threat: an attack a licensee can try on a product.
#[derive(Debug, Clone, Copy)]
pub struct Threat {
    /// Name (also the template's file stem).
    pub name: &'static str,
    /// What the audit proves when the runtime refuses it, in one sentence.
    pub proves: &'static str,
    /// The scenario template.
    pub template: &'static str,
    /// What to expect for a product.
    plan: fn(&Product) -> Plan,
}

/// What the audit expects of one threat on one product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The threat does not apply to this product, and why.
    NotApplicable(String),
    /// The runtime must refuse it: the outcome check (a `expect:` body).
    Refused {
        /// The outcome check.
        expect: String,
    },
    /// The product's policy allows it: the policy field that does, and the outcome check that
    /// shows the runtime allowing it.
    Allowed {
        /// `field: value` of the product's policy.
        field: String,
        /// The outcome check.
        expect: String,
    },
}

macro_rules! template {
    ($name:literal) => {
        include_str!(concat!("../../../threats/", $name, ".yaml"))
    };
}

/// Every threat, in a stable order.
pub static THREATS: &[Threat] = &[
    Threat {
        name: "clone-other-hardware",
        proves: "a guest cloned to other hardware cannot use the original's soft licence",
        template: template!("clone-other-hardware"),
        plan: plan_clone,
    },
    Threat {
        name: "move-other-host",
        proves: "a guest moved to another host cannot take its soft licence along",
        template: template!("move-other-host"),
        plan: plan_move,
    },
    Threat {
        name: "vm-activation",
        proves: "a soft licence cannot be activated in a virtual machine",
        template: template!("vm-activation"),
        plan: plan_vm_activation,
    },
    Threat {
        name: "state-restore",
        proves: "restoring a copy of the runtime's state folder regains no unit when a witness saw them",
        template: template!("state-restore"),
        plan: plan_state_restore,
    },
    Threat {
        name: "state-restore-unwitnessed",
        proves: "restoring a copy of the state folder on a machine with no witness regains no unit",
        template: template!("state-restore-unwitnessed"),
        plan: plan_state_restore_unwitnessed,
    },
    Threat {
        name: "snapshot-revert",
        proves: "reverting a guest to a snapshot taken before units were spent regains no unit",
        template: template!("snapshot-revert"),
        plan: plan_snapshot_revert,
    },
    Threat {
        name: "crash",
        proves: "a crashed app's licence is released at once, not held for ever",
        template: template!("crash"),
        plan: plan_crash,
    },
    Threat {
        name: "forged-licence",
        proves: "a licence minted under the licensee's own vendor key and root adds no seat",
        template: template!("forged-licence"),
        plan: plan_forged,
    },
    Threat {
        name: "terminal-server-sessions",
        proves: "a terminal server's sessions are counted one station each: no more users than seats",
        template: template!("terminal-server-sessions"),
        plan: plan_terminal_server,
    },
    Threat {
        name: "local-licence-network",
        proves: "a local single-user licence (quantity 0) is never served over the network",
        template: template!("local-licence-network"),
        plan: plan_local_licence_network,
    },
    Threat {
        name: "spoofed-station",
        proves: "a machine presenting another's name and runtime id to the server shares no seat",
        template: template!("spoofed-station"),
        plan: plan_spoofed_station,
    },
    Threat {
        name: "partition",
        proves: "a client cut off longer than the keepalive window loses its seat before another takes it: never two holders",
        template: template!("partition"),
        plan: plan_partition,
    },
    Threat {
        name: "dongle-shared",
        proves: "a dongle shared by two machines at once serves neither",
        template: template!("dongle-shared"),
        plan: plan_dongle_shared,
    },
    Threat {
        name: "dongle-hop",
        proves: "a dongle passed through to another guest takes its seat along: the first app loses it",
        template: template!("dongle-hop"),
        plan: plan_dongle_hop,
    },
    Threat {
        name: "usbip-replug",
        proves: "a dongle re-exported over USB/IP to another guest takes its seat along: the first app loses it",
        template: template!("usbip-replug"),
        plan: plan_dongle_hop,
    },
    Threat {
        name: "dongle-in-vm",
        proves: "a dongle passed through to a virtual machine is not used there",
        template: template!("dongle-in-vm"),
        plan: plan_dongle_in_vm,
    },
];

/// Most seats a threat fills one by one before its attack.
pub const MAX_FILLED_SEATS: u32 = 8;

/// Units a metered threat spends at most.
const UNITS_SPENT: u64 = 4;

impl Threat {
    /// What to expect of this threat on `product`.
    pub fn plan(&self, product: &Product) -> Plan {
        (self.plan)(product)
    }

    /// The template with its placeholders filled for `product` and an outcome check.
    pub fn instantiate(&self, product: &Product, expect: &str) -> String {
        let flow = serde_json::to_string(product).expect("products always encode");
        self.template
            .replace("{{product}}", &flow)
            .replace("{{code}}", &product.code.value.to_string())
            .replace("{{expect}}", expect)
            .replace(
                "{{fill}}",
                &if self.template.contains("{{fill}}") {
                    fill(self.name, product)
                } else {
                    String::new()
                },
            )
    }
}

/// Steps that take every seat of `product` before the attack (for the threats that need it).
fn fill(threat: &str, product: &Product) -> String {
    let code = product.code.value;
    let seats = product.quantity.clamp(1, MAX_FILLED_SEATS);
    let lines: Vec<String> = (1..=seats)
        .flat_map(|n| match threat {
            "terminal-server-sessions" => vec![
                format!(
                    "  - session-open: {{ machine: ts1, as: s{n}, kind: rdp, user: user{n}, \
                     client-name: pc-{n}, client-ip: 10.0.1.{n} }}"
                ),
                format!(
                    "  - start-app: {{ machine: ts1, session: s{n}, product: {code}, as: fill{n} }}"
                ),
            ],
            _ => vec![format!(
                "  - start-app: {{ machine: ws1, product: {code}, as: fill{n} }}"
            )],
        })
        .collect();
    lines.join("\n")
}

fn not_applicable(why: impl Into<String>) -> Plan {
    Plan::NotApplicable(why.into())
}

fn refused(expect: impl Into<String>) -> Plan {
    Plan::Refused {
        expect: expect.into(),
    }
}

fn allowed(field: impl Into<String>, expect: impl Into<String>) -> Plan {
    Plan::Allowed {
        field: field.into(),
        expect: expect.into(),
    }
}

/// A clone gets a new hardware identity (UUID, serials, MACs) on other hardware: too many
/// changed traits for any smartbind tolerance; a random-id binding travels in the state.
fn plan_clone(product: &Product) -> Plan {
    if let Some(plan) = soft_in_guests(product) {
        return plan;
    }
    match product.binding.scheme {
        BindingScheme::Random => allowed("binding: { scheme: random }", "granted: attack"),
        _ => refused("denied: attack, reason: licence-corrupt"),
    }
}

/// A moved guest keeps its identity; only the host's CPU changes, which a loose smartbind
/// tolerates.
fn plan_move(product: &Product) -> Plan {
    if let Some(plan) = soft_in_guests(product) {
        return plan;
    }
    match (product.binding.scheme, product.binding.tolerance) {
        (BindingScheme::Random, _) => allowed("binding: { scheme: random }", "granted: attack"),
        (BindingScheme::Smartbind, Tolerance::Loose) => {
            allowed("binding: { tolerance: loose }", "granted: attack")
        }
        _ => refused("denied: attack, reason: licence-corrupt"),
    }
}

/// Not applicable unless the product is a soft licence that guests may use.
fn soft_in_guests(product: &Product) -> Option<Plan> {
    if product.container != Container::Soft {
        return Some(not_applicable("not a soft licence"));
    }
    if product.virtual_machines == Permission::Deny {
        return Some(not_applicable(
            "virtual-machines: deny keeps the licence off guests",
        ));
    }
    None
}

fn plan_vm_activation(product: &Product) -> Plan {
    if product.container != Container::Soft {
        return not_applicable("not a soft licence");
    }
    match product.virtual_machines {
        Permission::Deny => refused("denied: attack, reason: vm-not-allowed"),
        Permission::Allow => allowed("virtual-machines: allow", "granted: attack"),
    }
}

/// Metered soft licences with enough units for a threat that spends [`UNITS_SPENT`].
fn metered(product: &Product) -> Result<u64, Plan> {
    if product.container != Container::Soft {
        return Err(not_applicable("not a soft licence"));
    }
    match product.units {
        None => Err(not_applicable("not metered (no units)")),
        Some(units) if units <= UNITS_SPENT => Err(not_applicable(format!(
            "has {units} units; the threat spends {UNITS_SPENT}"
        ))),
        Some(units) => Ok(units),
    }
}

fn plan_state_restore(product: &Product) -> Plan {
    rolled_back(product, "ws1")
}

/// Three units spent, the state rolled back on `machine`, one more asked for: locked
/// (`on-rollback: lock`), or reconciled with the witness so no unit comes back.
fn rolled_back(product: &Product, machine: &str) -> Plan {
    let units = match metered(product) {
        Ok(units) => units,
        Err(plan) => return plan,
    };
    let code = product.code.value;
    match product.on_rollback {
        RollbackPolicy::Lock => refused("denied: attack, reason: rollback-detected"),
        // Reconciled: the three spent before the rollback stay spent, the attack's one too.
        RollbackPolicy::Reconcile => refused(format!(
            "units: {{ machine: {machine}, product: {code}, left: {} }}",
            units - UNITS_SPENT
        )),
    }
}

fn plan_state_restore_unwitnessed(product: &Product) -> Plan {
    let units = match metered(product) {
        Ok(units) => units,
        Err(plan) => return plan,
    };
    let code = product.code.value;
    match product.witness.value {
        WitnessPolicy::Required => refused("denied: attack, reason: witness-unreachable"),
        WitnessPolicy::Optional => allowed(
            "witness: optional",
            format!("units: {{ machine: ws1, product: {code}, left: {units} }}"),
        ),
    }
}

fn plan_snapshot_revert(product: &Product) -> Plan {
    if let Some(plan) = soft_in_guests(product) {
        return plan;
    }
    rolled_back(product, "vm1")
}

fn plan_local_licence_network(product: &Product) -> Plan {
    if product.container != Container::Soft {
        return not_applicable("not a soft licence");
    }
    if product.quantity != 0 {
        return not_applicable("not a local licence (quantity 0)");
    }
    refused("denied: attack, reason: local-licence-remote")
}

/// A network licence whose only seat the template hands from one machine to another.
fn one_network_seat(product: &Product) -> Option<Plan> {
    if product.container != Container::Soft {
        return Some(not_applicable("not a soft licence"));
    }
    if product.counting == Counting::NoCount {
        return Some(not_applicable("not counted"));
    }
    if product.quantity != 1 {
        return Some(not_applicable(format!(
            "quantity {} (the template hands over one seat: quantity 1)",
            product.quantity
        )));
    }
    if product.units.is_some() {
        return Some(not_applicable("metered: units are spent locally"));
    }
    None
}

fn plan_spoofed_station(product: &Product) -> Plan {
    if let Some(plan) = one_network_seat(product) {
        return plan;
    }
    if product.counting != Counting::StationShare {
        return not_applicable("counted per access, not per station");
    }
    refused("denied: attack, reason: station-refused")
}

fn plan_partition(product: &Product) -> Plan {
    if let Some(plan) = one_network_seat(product) {
        return plan;
    }
    let code = product.code.value;
    refused(format!("holders: {{ product: {code}, at-most: 1 }}"))
}

fn plan_dongle_shared(product: &Product) -> Plan {
    if product.container != Container::Dongle {
        return not_applicable("not a dongle licence");
    }
    if product.virtual_machines == Permission::Deny {
        return not_applicable(
            "virtual-machines: deny keeps the dongle off guests (see dongle-in-vm)",
        );
    }
    refused("denied: attack, reason: dongle-shared")
}

fn plan_dongle_hop(product: &Product) -> Plan {
    if product.container != Container::Dongle {
        return not_applicable("not a dongle licence");
    }
    if product.virtual_machines == Permission::Deny {
        return not_applicable(
            "virtual-machines: deny keeps the dongle off guests (see dongle-in-vm)",
        );
    }
    if product.counting == Counting::NoCount {
        return not_applicable("not counted");
    }
    refused("app: { app: first, state: revoked, reason: dongle-removed }")
}

fn plan_crash(product: &Product) -> Plan {
    if product.container != Container::Soft {
        return not_applicable("not a soft licence");
    }
    if product.counting == Counting::NoCount {
        return not_applicable("not counted: nothing to hold");
    }
    refused("released-within: { app: attack, ms: 500 }")
}

fn plan_forged(product: &Product) -> Plan {
    if product.container != Container::Soft {
        return not_applicable("not a soft licence");
    }
    if product.counting != Counting::UserLimit {
        return not_applicable("the template counts accesses on one machine (user-limit only)");
    }
    if product.quantity == 0 || product.quantity > MAX_FILLED_SEATS {
        return not_applicable(format!(
            "quantity {} (the template fills 1 to {MAX_FILLED_SEATS} seats)",
            product.quantity
        ));
    }
    refused("denied: attack, reason: quantity-exhausted")
}

fn plan_terminal_server(product: &Product) -> Plan {
    if product.container != Container::Soft {
        return not_applicable("not a soft licence");
    }
    if product.counting == Counting::NoCount {
        return not_applicable("not counted");
    }
    if product.quantity > MAX_FILLED_SEATS {
        return not_applicable(format!(
            "quantity {} (the template fills up to {MAX_FILLED_SEATS} sessions)",
            product.quantity
        ));
    }
    if product.terminal_server == Permission::Deny {
        return refused("denied: attack, reason: terminal-server-not-allowed");
    }
    if product.quantity == 0 {
        return refused("denied: attack, reason: local-licence-terminal-server");
    }
    refused("denied: attack, reason: quantity-exhausted")
}

fn plan_dongle_in_vm(product: &Product) -> Plan {
    if product.container != Container::Dongle {
        return not_applicable("not a dongle licence");
    }
    match product.virtual_machines {
        Permission::Deny => refused("denied: attack, reason: vm-not-allowed"),
        Permission::Allow => allowed("virtual-machines: allow", "granted: attack"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn product(yaml: &str) -> Product {
        let text = format!("{{ policy: {{ products: [{yaml}] }} }}");
        #[derive(serde::Deserialize)]
        struct Wrap {
            policy: crate::scenario::Policy,
        }
        let wrap: Wrap = serde_saphyr::from_str(&text).unwrap();
        wrap.policy.products.into_iter().next().unwrap()
    }

    #[rstest]
    #[case("{ code: 1001, name: a, container: soft, quantity: 1, counting: user-limit }")]
    #[case(
        "{ code: 1002, name: b, container: soft, quantity: 3, counting: station-share, binding: { scheme: random }, virtual-machines: deny, terminal-server: deny }"
    )]
    #[case(
        "{ code: 1003, name: c, container: soft, quantity: 0, counting: user-limit, units: 10, on-rollback: reconcile }"
    )]
    #[case(
        "{ code: 1004, name: d, container: soft, quantity: 2, counting: user-limit, units: 20, witness: required }"
    )]
    #[case(
        "{ code: 2001, name: e, container: dongle, quantity: 2, counting: user-limit, virtual-machines: deny }"
    )]
    #[case("{ code: 2002, name: f, container: dongle, quantity: 1, counting: station-share }")]
    fn every_template_instantiates_to_a_valid_scenario(#[case] yaml: &str) {
        let product = product(yaml);
        for threat in THREATS {
            let expect = match threat.plan(&product) {
                Plan::NotApplicable(_) => continue,
                Plan::Refused { expect } | Plan::Allowed { expect, .. } => expect,
            };
            let text = threat.instantiate(&product, &expect);
            if let Err(e) = crate::scenario::parse_str(&text, threat.name) {
                panic!("{} for {yaml}: {e:?}\n{text}", threat.name);
            }
        }
    }

    #[test]
    fn every_threat_has_its_template() {
        for threat in THREATS {
            assert!(threat.template.contains("{{expect}}"), "{}", threat.name);
            assert!(
                threat
                    .template
                    .starts_with(&format!("name: {}-", threat.name))
            );
        }
    }
}
