//! Access rules an administrator sets on a runtime (`meter rules apply`): who may use which
//! product, reservations out of the quantity, and caps per user, group or machine.
//!
//! Rules apply per product, per firm or globally. Exclusion comes first and wins: a `deny`
//! rule of any scope that names the requester refuses it. Then inclusion: when the most specific
//! scope with `allow` rules has any, only those they name may use the product (an include list
//! shuts out everyone else); with none anywhere the document's `default` decides. Then, for an
//! access that takes a seat of the quantity, every `max` rule naming the requester caps the
//! seats its subject holds, and the seats `reserve` rules keep for *other* subjects and not yet
//! used by them are not free.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::allocation::ProductKey;
use crate::reason::Reason;

/// Most rules one document may hold.
pub const MAX_RULES: usize = 1000;
/// Most members in all groups of one document.
pub const MAX_MEMBERS: usize = 10_000;

/// An access rules document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AccessRules {
    /// Named groups of users and of machines.
    #[serde(default)]
    pub groups: Groups,
    /// The rules, in any order (their scope and kind decide, not their order).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Whether a requester no `allow` rule names may use a product no `allow` rule covers.
    #[serde(default)]
    pub default: Action,
}

/// Named groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Groups {
    /// Groups of user names.
    #[serde(default)]
    pub users: BTreeMap<String, BTreeSet<String>>,
    /// Groups of machine names.
    #[serde(default)]
    pub machines: BTreeMap<String, BTreeSet<String>>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Permitted.
    #[default]
    Allow,
    /// Refused.
    Deny,
}

/// One rule: what it covers, whom it names, and what it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Rule {
    /// Vendor firm code the rule covers (with `product`: that firm's product).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firm: Option<u32>,
    /// Product code the rule covers; absent: every product (of `firm`, when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<u32>,
    /// Whom the rule names.
    pub who: Subject,
    /// Allow or deny (exactly one of `action`, `reserve`, `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Seats kept for `who` out of the product's quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve: Option<u32>,
    /// Most seats `who` may hold at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// Whom a rule names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    /// One user.
    User(String),
    /// A group of users (`groups.users`).
    Group(String),
    /// One machine.
    Machine(String),
    /// A group of machines (`groups.machines`).
    MachineGroup(String),
    /// Machines whose address is in a subnet (`10.0.0.0/24`).
    Subnet(String),
    /// Terminal-server sessions opened from a client computer of this name.
    ClientName(String),
    /// Everyone.
    Anyone,
}

/// Who asks for a licence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// The user, when known.
    pub user: Option<String>,
    /// The machine the access is counted for.
    pub machine: String,
    /// The machine's address, when known.
    pub address: Option<IpAddr>,
    /// The client computer of a terminal-server session.
    pub client_name: Option<String>,
}

/// A seat of a product in use: who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seat<'a> {
    /// Who took it.
    pub holder: &'a Requester,
}

/// Why a rule refused an access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleDenial {
    /// The reason code.
    pub reason: Reason,
    /// Index of the rule in the document (none: the document's `default`).
    pub rule: Option<usize>,
    /// In words.
    pub why: String,
}

/// A rules document that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Not YAML of the expected shape.
    #[error("Unreadable rules")]
    Yaml(#[source] serde_saphyr::Error),
    /// A rule is malformed.
    #[error("Rule {index}: {why}")]
    Rule {
        /// Its index.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The document is too large.
    #[error(
        "Too many rules or group members (at most {MAX_RULES} rules and {MAX_MEMBERS} members)"
    )]
    TooLarge,
}

/// How specific a rule's cover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Global,
    Firm,
    Product,
}

impl Rule {
    fn scope(&self) -> Scope {
        match (self.product, self.firm) {
            (Some(_), _) => Scope::Product,
            (None, Some(_)) => Scope::Firm,
            (None, None) => Scope::Global,
        }
    }

    /// Whether the rule applies to `product`.
    pub fn covers(&self, product: ProductKey) -> bool {
        self.firm.is_none_or(|f| f == product.firm)
            && self.product.is_none_or(|p| p == product.code)
    }
}

impl AccessRules {
    /// Reads and checks a rules document.
    pub fn from_yaml(text: &str) -> Result<Self, RulesError> {
        let rules: AccessRules = serde_saphyr::from_str(text).map_err(RulesError::Yaml)?;
        rules.validate()?;
        Ok(rules)
    }

    /// Checks what serde cannot: one effect per rule, known groups, valid subnets, sizes.
    pub fn validate(&self) -> Result<(), RulesError> {
        let members: usize = self
            .groups
            .users
            .values()
            .chain(self.groups.machines.values())
            .map(BTreeSet::len)
            .sum();
        if self.rules.len() > MAX_RULES || members > MAX_MEMBERS {
            return Err(RulesError::TooLarge);
        }
        for (index, rule) in self.rules.iter().enumerate() {
            let bad = |why: String| RulesError::Rule { index, why };
            let effects = [
                rule.action.is_some(),
                rule.reserve.is_some(),
                rule.max.is_some(),
            ]
            .iter()
            .filter(|e| **e)
            .count();
            if effects != 1 {
                return Err(bad(
                    "give exactly one of `action`, `reserve` and `max`".into()
                ));
            }
            match &rule.who {
                Subject::Group(g) if !self.groups.users.contains_key(g) => {
                    return Err(bad(format!("no user group `{g}` in `groups.users`")));
                }
                Subject::MachineGroup(g) if !self.groups.machines.contains_key(g) => {
                    return Err(bad(format!("no machine group `{g}` in `groups.machines`")));
                }
                Subject::Subnet(s) if parse_subnet(s).is_none() => {
                    return Err(bad(format!("`{s}` is not a subnet like 10.0.0.0/24")));
                }
                _ => {}
            }
            if rule.reserve.is_some() && rule.product.is_none() {
                return Err(bad("a reservation names a `product`".into()));
            }
        }
        Ok(())
    }

    /// Whether `subject` names `requester`.
    pub fn names(&self, subject: &Subject, requester: &Requester) -> bool {
        match subject {
            Subject::Anyone => true,
            Subject::User(u) => requester.user.as_deref() == Some(u.as_str()),
            Subject::Group(g) => requester
                .user
                .as_ref()
                .is_some_and(|u| self.groups.users.get(g).is_some_and(|m| m.contains(u))),
            Subject::Machine(m) => requester.machine == *m,
            Subject::MachineGroup(g) => self
                .groups
                .machines
                .get(g)
                .is_some_and(|m| m.contains(&requester.machine)),
            Subject::Subnet(s) => match (parse_subnet(s), requester.address) {
                (Some((net, prefix)), Some(addr)) => in_subnet(addr, net, prefix),
                _ => false,
            },
            Subject::ClientName(c) => requester.client_name.as_deref() == Some(c.as_str()),
        }
    }

    /// Whether `requester` may take `product`. `quantity` is the product's quantity (0: not
    /// counted against a quantity), `held` the seats of it in use, `takes_seat` whether this
    /// access would take another.
    pub fn check(
        &self,
        product: ProductKey,
        requester: &Requester,
        quantity: u32,
        held: &[Seat<'_>],
        takes_seat: bool,
    ) -> Result<(), RuleDenial> {
        let count = u32::try_from(held.len()).unwrap_or(u32::MAX);
        self.check_lazily(
            product,
            requester,
            quantity,
            count,
            || held.iter().map(|s| s.holder.clone()).collect(),
            takes_seat,
        )
    }

    /// As [`AccessRules::check`], with `held_count` seats in use, whose holders `holders` lists
    /// only when a cap or a reservation needs them (a cap naming the requester, or reservations
    /// that could leave it no free seat).
    pub fn check_lazily(
        &self,
        product: ProductKey,
        requester: &Requester,
        quantity: u32,
        held_count: u32,
        holders: impl FnOnce() -> Vec<Requester>,
        takes_seat: bool,
    ) -> Result<(), RuleDenial> {
        let covering: Vec<(usize, &Rule)> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.covers(product))
            .collect();
        // Exclusion first, and it wins.
        for (index, rule) in &covering {
            if rule.action == Some(Action::Deny) && self.names(&rule.who, requester) {
                return Err(RuleDenial {
                    reason: Reason::RuleDenied,
                    rule: Some(*index),
                    why: format!("rule {index} denies {}", describe(&rule.who)),
                });
            }
        }
        // Inclusion: the most specific scope with allow rules lists who may.
        let allows: Vec<&(usize, &Rule)> = covering
            .iter()
            .filter(|(_, r)| r.action == Some(Action::Allow))
            .collect();
        match allows.iter().map(|(_, r)| r.scope()).max() {
            Some(scope) => {
                let listed = allows
                    .iter()
                    .filter(|(_, r)| r.scope() == scope)
                    .any(|(_, r)| self.names(&r.who, requester));
                if !listed {
                    return Err(RuleDenial {
                        reason: Reason::RuleDenied,
                        rule: None,
                        why: "not on the list of those allowed".into(),
                    });
                }
            }
            None if self.default == Action::Deny => {
                return Err(RuleDenial {
                    reason: Reason::RuleDenied,
                    rule: None,
                    why: "no rule allows it and the default is deny".into(),
                });
            }
            None => {}
        }
        if !takes_seat {
            return Ok(());
        }
        let free = quantity.saturating_sub(held_count);
        let capped = covering
            .iter()
            .any(|(_, r)| r.max.is_some() && self.names(&r.who, requester));
        let reserved: u32 = covering
            .iter()
            .filter_map(|(_, r)| r.reserve)
            .fold(0u32, u32::saturating_add);
        // Reservations can leave no free seat only when they keep at least as many as are free.
        let reservations_bite = quantity > 0 && reserved > 0 && free <= reserved;
        if !capped && !reservations_bite {
            return Ok(());
        }
        let holders = holders();
        let held: Vec<Seat<'_>> = holders.iter().map(|holder| Seat { holder }).collect();
        let used_by = |subject: &Subject| -> u32 {
            let n = held
                .iter()
                .filter(|s| self.names(subject, s.holder))
                .count();
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        for (index, rule) in &covering {
            if let Some(max) = rule.max
                && self.names(&rule.who, requester)
                && used_by(&rule.who) >= max
            {
                return Err(RuleDenial {
                    reason: Reason::RuleMaxReached,
                    rule: Some(*index),
                    why: format!("{} holds its most ({max})", describe(&rule.who)),
                });
            }
        }
        if reservations_bite {
            let kept_for_others: u32 = covering
                .iter()
                .filter(|(_, r)| !self.names(&r.who, requester))
                .filter_map(|(_, r)| r.reserve.map(|n| n.saturating_sub(used_by(&r.who))))
                .fold(0u32, u32::saturating_add);
            if kept_for_others > 0 && free <= kept_for_others {
                return Err(RuleDenial {
                    reason: Reason::ReservedForOthers,
                    rule: None,
                    why: format!("{free} free seats, {kept_for_others} reserved for others"),
                });
            }
        }
        Ok(())
    }
}

/// A subject in words (`group support`).
pub fn describe(subject: &Subject) -> String {
    match subject {
        Subject::User(u) => format!("user {u}"),
        Subject::Group(g) => format!("group {g}"),
        Subject::Machine(m) => format!("machine {m}"),
        Subject::MachineGroup(g) => format!("machine group {g}"),
        Subject::Subnet(s) => format!("subnet {s}"),
        Subject::ClientName(c) => format!("client {c}"),
        Subject::Anyone => "anyone".into(),
    }
}

/// `10.0.0.0/24` as an address and prefix length.
fn parse_subnet(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

fn in_subnet(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: ProductKey = ProductKey {
        firm: 10,
        code: 1001,
    };

    fn who(user: &str, machine: &str) -> Requester {
        Requester {
            user: Some(user.into()),
            machine: machine.into(),
            address: Some("10.0.0.7".parse().unwrap()),
            client_name: None,
        }
    }

    /// The white paper's split: of ten, three for support, four for development, three free.
    fn split() -> AccessRules {
        AccessRules::from_yaml(
            "groups:\n  users:\n    support: [s1, s2, s3]\n    dev: [d1, d2, d3, d4, d5, d6]\n\
             rules:\n  - { product: 1001, who: { group: support }, reserve: 3 }\n\
             \x20 - { product: 1001, who: { group: dev }, max: 4 }\n\
             \x20 - { who: { user: mallory }, action: deny }\n",
        )
        .unwrap()
    }

    fn seats(held: &[Requester]) -> Vec<Seat<'_>> {
        held.iter().map(|holder| Seat { holder }).collect()
    }

    #[test]
    fn reservations_hold_against_hogging_and_the_free_pool_is_shared() {
        let rules = split();
        let mut held: Vec<Requester> = Vec::new();
        for d in ["d1", "d2", "d3", "d4"] {
            rules
                .check(KEY, &who(d, "ts1"), 10, &seats(&held), true)
                .unwrap();
            held.push(who(d, "ts1"));
        }
        let fifth = rules.check(KEY, &who("d5", "ts1"), 10, &seats(&held), true);
        assert_eq!(fifth.unwrap_err().reason, Reason::RuleMaxReached);
        for f in ["f1", "f2", "f3"] {
            rules
                .check(KEY, &who(f, "ts1"), 10, &seats(&held), true)
                .unwrap();
            held.push(who(f, "ts1"));
        }
        // Seven in use, three kept for support: nobody else gets one.
        let fourth_free = rules.check(KEY, &who("f4", "ts1"), 10, &seats(&held), true);
        assert_eq!(fourth_free.unwrap_err().reason, Reason::ReservedForOthers);
        for s in ["s1", "s2", "s3"] {
            rules
                .check(KEY, &who(s, "ts1"), 10, &seats(&held), true)
                .unwrap();
            held.push(who(s, "ts1"));
        }
        // Another access of a station already counted takes no seat: no cap applies.
        rules
            .check(KEY, &who("d5", "ts1"), 10, &seats(&held), false)
            .unwrap();
    }

    #[test]
    fn exclusion_wins_and_include_lists_shut_out_everyone_else() {
        let rules = split();
        let denied = rules.check(KEY, &who("mallory", "ts1"), 10, &[], true);
        assert_eq!(denied.unwrap_err().reason, Reason::RuleDenied);
        let listed = AccessRules::from_yaml(
            "groups: { machines: { lab: [ws1, ws2] } }\n\
             rules:\n  - { firm: 10, who: { machine-group: lab }, action: allow }\n\
             \x20 - { product: 1001, who: { subnet: 10.0.0.0/24 }, action: allow }\n\
             \x20 - { product: 1001, who: { user: eve }, action: deny }\n",
        )
        .unwrap();
        // The product's list (the subnet) decides over the firm's (the lab).
        assert!(
            listed
                .check(KEY, &who("x", "elsewhere"), 10, &[], true)
                .is_ok()
        );
        let other = ProductKey { firm: 10, code: 7 };
        assert!(listed.check(other, &who("x", "ws1"), 10, &[], true).is_ok());
        assert_eq!(
            listed
                .check(other, &who("x", "elsewhere"), 10, &[], true)
                .unwrap_err()
                .reason,
            Reason::RuleDenied
        );
        assert_eq!(
            listed
                .check(KEY, &who("eve", "ws1"), 10, &[], true)
                .unwrap_err()
                .rule,
            Some(2)
        );
        let closed = AccessRules::from_yaml("default: deny\n").unwrap();
        assert!(closed.check(KEY, &who("x", "ws1"), 10, &[], true).is_err());
    }

    #[test]
    fn malformed_documents_are_refused() {
        for (yaml, wants) in [
            ("rules: [{ who: anyone }]", "exactly one"),
            (
                "rules: [{ who: anyone, action: deny, max: 2 }]",
                "exactly one",
            ),
            (
                "rules: [{ who: { group: nobody }, action: deny }]",
                "no user group",
            ),
            (
                "rules: [{ who: { subnet: 10.0.0.0/33 }, action: deny }]",
                "not a subnet",
            ),
            ("rules: [{ who: anyone, reserve: 2 }]", "names a `product`"),
        ] {
            let e = AccessRules::from_yaml(yaml).unwrap_err().to_string();
            assert!(e.contains(wants), "{yaml}: {e}");
        }
        assert!(AccessRules::from_yaml("rules: [{ who: anyone, bogus: 1 }]").is_err());
    }

    #[test]
    fn subnets_match_by_prefix() {
        let net = parse_subnet("10.1.0.0/16").unwrap();
        assert!(in_subnet("10.1.200.3".parse().unwrap(), net.0, net.1));
        assert!(!in_subnet("10.2.0.1".parse().unwrap(), net.0, net.1));
        let all = parse_subnet("0.0.0.0/0").unwrap();
        assert!(in_subnet("192.0.2.1".parse().unwrap(), all.0, all.1));
    }
}
