//! The daemon's side of access rules: putting a document in force (`meter rules apply`),
//! showing it, and asking it before a local or a client runtime's access takes a licence.

use std::sync::Arc;

use meter_core::access_rules::{AccessRules, Requester, RuleDenial};
use meter_core::allocation::ProductKey;
use meter_core::policy::Counting;
use meter_core::station::{SessionKind, StationId};
use serde_json::{Value, json};

use crate::daemon::{Caller, GrantRecord, Holder, Runtime, State};
use crate::protocol::{Claim, WireSession};
use crate::store;

impl Runtime {
    /// Puts a rules document (YAML or JSON) in force; an empty one lifts every rule.
    pub async fn apply_rules(
        self: &Arc<Self>,
        source_name: &str,
        bytes: &[u8],
    ) -> Result<Value, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| format!("{source_name} is not text"))?;
        let rules = AccessRules::from_yaml(text).map_err(|e| {
            format!(
                "Rules {source_name} refused: {}",
                crate::licences::error_chain(&e)
            )
        })?;
        let count = rules.rules.len();
        let change = crate::access_control::AccessControl::change_for(&rules);
        store::wait(self.store.submit(vec![change]))
            .await
            .map_err(|e| format!("Rules not recorded: {e}"))?;
        // In force only once stored, so a failed command leaves the old rules.
        self.lock_access().set(rules);
        tracing::info!(source = source_name, rules = count, "Access rules in force");
        Ok(json!({"applied": true, "rules": count}))
    }

    /// The account name of `uid` on this machine (looked up once).
    pub(crate) fn user_of(&self, uid: u32) -> Option<String> {
        self.lock_access()
            .user_name(uid, |uid| self.platform.user_name(uid).ok().flatten())
    }

    /// The rules in force (`null` when none).
    pub fn rules_json(&self) -> Value {
        json!({"rules": self.lock_access().rules().as_deref()})
    }

    /// Why the rules refuse the local process `caller` a licence of `key` now, if they do.
    pub(crate) fn rules_refusal(
        &self,
        state: &State,
        key: ProductKey,
        caller: &Caller,
    ) -> Option<RuleDenial> {
        let rules = self.rules_to_ask()?;
        let requester = Requester {
            user: self.user_of(caller.uid),
            machine: caller.station.machine.clone(),
            address: self.platform.address().ok().flatten(),
            client_name: match &caller.session {
                SessionKind::Rdp { client_name, .. } => Some(client_name.clone()),
                _ => None,
            },
        };
        self.refusal_for(&rules, state, key, &requester, &caller.station)
    }

    /// Why the rules refuse a client runtime's access `claim` from `peer`, if they do.
    pub(crate) fn remote_rules_refusal(
        &self,
        state: &State,
        claim: &Claim,
        peer: &str,
    ) -> Option<RuleDenial> {
        let rules = self.rules_to_ask()?;
        let requester = Requester {
            user: claim.user.clone(),
            machine: claim.station.machine.clone(),
            address: peer_ip(peer),
            client_name: match &claim.session {
                WireSession::Rdp { client_name, .. } => Some(client_name.clone()),
                _ => None,
            },
        };
        self.refusal_for(&rules, state, claim.product, &requester, &claim.station)
    }

    /// The rules accesses must ask, if any.
    fn rules_to_ask(&self) -> Option<Arc<AccessRules>> {
        if crate::weakened::is(crate::weakened::Defence::AccessRules) {
            // Weakened: the administrator's rules are never asked.
            return None;
        }
        let rules = self.lock_access().rules()?;
        if crate::weakened::is(crate::weakened::Defence::RuleReservations) {
            // Weakened: reservations are dropped, so the seats they keep are free to anyone.
            let mut unreserved = (*rules).clone();
            unreserved.rules.retain(|rule| rule.reserve.is_none());
            return Some(Arc::new(unreserved));
        }
        Some(rules)
    }

    /// Why `rules` refuse `requester` a licence of `key` for `station` now, if they do.
    fn refusal_for(
        &self,
        rules: &AccessRules,
        state: &State,
        key: ProductKey,
        requester: &Requester,
        station: &StationId,
    ) -> Option<RuleDenial> {
        let items: Vec<_> = state
            .table
            .items()
            .into_iter()
            .filter(|v| v.entry.product == key)
            .collect();
        let quantity: u32 = items
            .iter()
            .map(|v| v.entry.rules.quantity)
            .fold(0, u32::saturating_add);
        let counting = items.first().map(|v| v.entry.rules.counting);
        let held_here = |record: &GrantRecord| record.product == key && record.station == *station;
        let takes_seat = match counting {
            Some(Counting::UserLimit) => true,
            Some(Counting::StationShare) => !state.grants.values().any(held_here),
            Some(Counting::NoCount) | None => false,
        };
        // One seat per grant (user-limit) or per station (station-share).
        let of_product = || state.grants.iter().filter(|(_, g)| g.product == key);
        let held_count = match counting {
            Some(Counting::StationShare) => of_product()
                .map(|(_, g)| &g.station)
                .collect::<std::collections::HashSet<_>>()
                .len(),
            _ => state.in_use(key) as usize,
        };
        // Who holds the seats: read only when a cap or a reservation needs them.
        let holders = || {
            let mut seen_stations = std::collections::BTreeSet::new();
            of_product()
                .filter(|(_, g)| {
                    counting != Some(Counting::StationShare)
                        || seen_stations.insert(g.station.clone())
                })
                .map(|(handle, g)| Requester {
                    user: match g.holder {
                        Holder::Local { uid, .. } => self.user_of(uid),
                        Holder::Remote { .. } => state.remote_users.get(handle).cloned(),
                    },
                    machine: g.station.machine.clone(),
                    address: match &g.holder {
                        Holder::Local { .. } => self.platform.address().ok().flatten(),
                        Holder::Remote { peer, .. } => peer_ip(peer),
                    },
                    client_name: match &g.session {
                        WireSession::Rdp { client_name, .. } => Some(client_name.clone()),
                        _ => None,
                    },
                })
                .collect()
        };
        let held_count = u32::try_from(held_count).unwrap_or(u32::MAX);
        match rules.check_lazily(key, requester, quantity, held_count, holders, takes_seat) {
            Ok(()) => None,
            Err(denial) => {
                tracing::info!(
                    product = %key,
                    user = requester.user.as_deref().unwrap_or("?"),
                    rule = ?denial.rule,
                    why = %denial.why,
                    "Access rule refused a licence"
                );
                Some(denial)
            }
        }
    }
}

/// The address of a peer (`ip:port`), IPv4-mapped IPv6 addresses as IPv4.
pub(crate) fn peer_ip(peer: &str) -> Option<std::net::IpAddr> {
    peer.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}
