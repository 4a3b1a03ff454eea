//! Rollback resistance of soft licences' metered items (pay-per-use units, expiry dates): the
//! receipt chain, time high-water mark and vmgenid of each licence, persisted with the state.

use std::collections::{BTreeMap, BTreeSet};

use meter_core::allocation::{AllocationTable, ContainerClass, ContainerId, ItemState};
use meter_core::policy::{ProductItem, RollbackPolicy, WitnessPolicy};
use meter_core::rollback::{
    LockReason, MeteredState, Receipt, ReceiptSigner, Reconciliation, RollbackError, WitnessLog,
};

use crate::store::Change;

/// Metadata key prefix of a licence's metered state (JSON).
const METERED_KEY_PREFIX: &str = "metered/";

/// Metadata key prefix of the certificate pin (hex) of a licence's witness.
const WITNESS_PIN_PREFIX: &str = "witness-pin/";

/// The clock may pass the high-water mark by this much before the mark is written again.
const HIGH_WATER_STEP_MS: u64 = 1_000;

/// The time and vmgenid the runtime goes by: the machine's, unless a weakened build ignores them.
fn observed(state: &MeteredState, now: u64, vmgenid: Option<&str>) -> (u64, Option<String>) {
    use crate::weakened::{Defence, is};
    let now = if is(Defence::RollbackClock) {
        now.max(state.high_water_ms)
    } else {
        now
    };
    let vmgenid = if is(Defence::RollbackVmgenid) {
        state.vmgenid.clone()
    } else {
        vmgenid.map(str::to_owned)
    };
    (now, vmgenid)
}

/// What the vendor's items of one licence say about metering.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MeteredRules {
    /// Reconcile with a witness only when every metered item says so; else lock.
    policy: RollbackPolicy,
    /// Product codes that are metered (units) or time-limited.
    products: BTreeSet<u32>,
    /// Product codes whose units are spent only with a witness (`witness: required`).
    witnessed: BTreeSet<u32>,
}

/// The metered state of every installed soft licence with metered or time-limited items.
#[derive(Debug, Default)]
pub struct Metering {
    states: BTreeMap<String, MeteredState>,
    rules: BTreeMap<String, MeteredRules>,
    /// Licences loaded from the disk and not yet compared with a witness: the state may be a
    /// restored copy, so their next spend asks the witness first.
    unverified: BTreeSet<String>,
    /// A spend already waited for a witness to link in this run.
    waited_for_witness: bool,
    /// The witness each licence keeps its chain with (server certificate pin, hex): the first
    /// linked when the licence was installed or that first took its receipts. Only it may
    /// reconcile the licence: an empty server the licensee points a reverted guest at may not.
    witness_pins: BTreeMap<String, String>,
}

/// The store change that records a licence's metered state.
fn state_change(licence: &str, state: &MeteredState) -> Change {
    Change::PutMeta(
        format!("{METERED_KEY_PREFIX}{licence}"),
        serde_json::to_vec(state).expect("metered state always encodes"),
    )
}

/// What one check of every metered licence found.
#[derive(Debug, Default)]
pub struct CheckOutcome {
    /// State writes to persist.
    pub changes: Vec<Change>,
    /// Licences that were locked by this check.
    pub newly_locked: Vec<String>,
    /// Locked licences whose policy says reconcile (a witness may unlock them).
    pub to_reconcile: Vec<String>,
}

impl Metering {
    /// Metered states as the store holds them.
    pub fn load(meta: &BTreeMap<String, Vec<u8>>) -> Self {
        let mut states = BTreeMap::new();
        for (key, bytes) in meta {
            let Some(id) = key.strip_prefix(METERED_KEY_PREFIX) else {
                continue;
            };
            match serde_json::from_slice::<MeteredState>(bytes) {
                Ok(state) => {
                    states.insert(id.to_owned(), state);
                }
                Err(e) => tracing::error!(licence = id, error = %e, "Unreadable metered state"),
            }
        }
        let witness_pins = meta
            .iter()
            .filter_map(|(key, bytes)| {
                let id = key.strip_prefix(WITNESS_PIN_PREFIX)?;
                Some((id.to_owned(), String::from_utf8(bytes.clone()).ok()?))
            })
            .collect();
        Metering {
            unverified: states.keys().cloned().collect(),
            states,
            rules: BTreeMap::new(),
            waited_for_witness: false,
            witness_pins,
        }
    }

    /// Records the items of an opened licence; creates its metered state on first sight.
    pub fn register(
        &mut self,
        licence: &str,
        items: &[ProductItem],
        now: u64,
        vmgenid: Option<&str>,
    ) -> Option<Change> {
        let metered: Vec<&ProductItem> = items
            .iter()
            .filter(|item| item.units.is_some() || item.expires_at.is_some())
            .collect();
        if metered.is_empty() {
            return None;
        }
        let policy = if metered
            .iter()
            .all(|item| item.on_rollback == RollbackPolicy::Reconcile)
        {
            RollbackPolicy::Reconcile
        } else {
            RollbackPolicy::Lock
        };
        self.rules.insert(
            licence.to_owned(),
            MeteredRules {
                policy,
                products: metered.iter().map(|item| item.code).collect(),
                witnessed: metered
                    .iter()
                    .filter(|item| item.witness == WitnessPolicy::Required)
                    .map(|item| item.code)
                    .collect(),
            },
        );
        if self.states.contains_key(licence) {
            return None;
        }
        let grants: BTreeMap<u32, u64> = metered
            .iter()
            .filter_map(|item| item.units.map(|units| (item.code, units)))
            .collect();
        let state = MeteredState::new(licence, grants, now, vmgenid);
        let change = state_change(licence, &state);
        self.states.insert(licence.to_owned(), state);
        Some(change)
    }

    /// Forgets a licence (it was replaced by a new install of the same id).
    pub fn forget(&mut self, licence: &str) -> Option<Change> {
        self.rules.remove(licence);
        self.states
            .remove(licence)
            .map(|_| Change::DeleteMeta(format!("{METERED_KEY_PREFIX}{licence}")))
    }

    /// Looks for rollback signs in every opened metered licence (vmgenid, clock) and moves the
    /// high-water mark forward.
    pub fn check(&mut self, now: u64, vmgenid: Option<&str>) -> CheckOutcome {
        let mut outcome = CheckOutcome::default();
        for (id, rules) in &self.rules {
            let Some(state) = self.states.get_mut(id) else {
                continue;
            };
            let (now, vmgenid) = observed(state, now, vmgenid);
            let vmgenid = vmgenid.as_deref();
            if state.lock.is_none() {
                if let Some(reason) = state.detect(now, vmgenid, None) {
                    tracing::warn!(licence = %id, reason = reason.code(), "Rollback detected: metered items locked");
                    state.lock = Some(reason);
                    outcome.newly_locked.push(id.clone());
                    outcome.changes.push(state_change(id, state));
                } else if now >= state.high_water_ms + HIGH_WATER_STEP_MS
                    && state.touch(now, vmgenid).is_ok()
                {
                    outcome.changes.push(state_change(id, state));
                }
            }
            if state.lock.is_some() && rules.policy == RollbackPolicy::Reconcile {
                outcome.to_reconcile.push(id.clone());
            }
        }
        outcome
    }

    /// Spends units of a product of a licence; the receipt goes to the witness.
    pub fn spend(
        &mut self,
        licence: &str,
        product: u32,
        units: u64,
        now: u64,
        vmgenid: Option<&str>,
        signer: &ReceiptSigner,
    ) -> Option<Result<(Receipt, Change), RollbackError>> {
        let state = self.states.get_mut(licence)?;
        state.remaining(product)?;
        let (now, vmgenid) = observed(state, now, vmgenid);
        let vmgenid = vmgenid.as_deref();
        Some(
            state
                .spend(product, units, now, vmgenid, signer)
                .map(|receipt| (receipt, state_change(licence, state))),
        )
    }

    /// Locks a licence whose chain the witness refused (a fork).
    pub fn lock(&mut self, licence: &str, reason: LockReason) -> Option<Change> {
        let state = self.states.get_mut(licence)?;
        if state.lock.is_none() {
            tracing::warn!(
                licence,
                reason = reason.code(),
                "Witness refused the chain: metered items locked"
            );
            state.lock = Some(reason);
        }
        Some(state_change(licence, state))
    }

    /// Reconciles a locked licence with the witness's chain, as the vendor's policy allows.
    pub fn reconcile(
        &mut self,
        licence: &str,
        witness: &WitnessLog,
        now: u64,
        vmgenid: Option<&str>,
        signer: &ReceiptSigner,
    ) -> Option<Result<(Reconciliation, Change), RollbackError>> {
        let policy = self.rules.get(licence)?.policy;
        let state = self.states.get_mut(licence)?;
        let (now, vmgenid) = observed(state, now, vmgenid);
        let vmgenid = vmgenid.as_deref();
        Some(
            state
                .resolve(policy, Some(witness), now, vmgenid, signer)
                .map(|done| (done, state_change(licence, state))),
        )
    }

    /// Loaded licences with a metered item `product` that no witness has vouched for yet.
    pub fn unverified_holding(&self, product: u32) -> Vec<String> {
        self.unverified
            .iter()
            .filter(|id| {
                self.rules
                    .get(*id)
                    .is_some_and(|rules| rules.products.contains(&product))
            })
            .cloned()
            .collect()
    }

    /// True when the vendor requires a witness for `product`'s units in this licence.
    pub fn needs_witness(&self, licence: &str, product: u32) -> bool {
        self.rules
            .get(licence)
            .is_some_and(|rules| rules.witnessed.contains(&product))
    }

    /// True when a witness vouched for the licence's chain in this run, or the chain was begun
    /// in this run (nothing was loaded that a restore could have put back).
    pub fn is_vouched_for(&self, licence: &str) -> bool {
        !self.unverified.contains(licence)
    }

    /// A witness vouched for a licence's chain (or reconciled it): spends no longer ask first.
    pub fn vouched_for(&mut self, licence: &str) {
        self.unverified.remove(licence);
    }

    /// True the first time it is asked in this run: only one spend waits for a witness to link.
    pub fn first_wait_for_witness(&mut self) -> bool {
        !std::mem::replace(&mut self.waited_for_witness, true)
    }

    /// The receipt chain of a licence (sent to a witness that has not seen all of it).
    pub fn receipts(&self, licence: &str) -> Vec<Receipt> {
        self.states
            .get(licence)
            .map(|s| s.receipts.clone())
            .unwrap_or_default()
    }

    /// Every licence's receipt chain folded into one head, as a dongle keeps it for this
    /// runtime: the receipts of all chains, and a hash over each chain's head.
    pub fn combined_head(&self) -> dongle::WitnessHead {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(b"meter-dongle-witness-v1");
        let mut sequence = 0u64;
        // Chains with no receipt are left out: activating a licence changes no head.
        for (id, state) in self.states.iter().filter(|(_, s)| !s.receipts.is_empty()) {
            let seq = state.receipts.len() as u64;
            sequence = sequence.saturating_add(seq);
            hasher.update(id.as_bytes());
            hasher.update([0]);
            hasher.update(seq.to_le_bytes());
            if let Some(head) = crate::witness::head_at(id, &state.receipts, seq) {
                hasher.update(head.hash.0);
            }
        }
        dongle::WitnessHead {
            sequence,
            head: hasher.finalize().into(),
        }
    }

    /// The certificate pin (hex) of the witness a licence keeps its chain with, once chosen.
    pub fn witness_pin(&self, licence: &str) -> Option<&str> {
        self.witness_pins.get(licence).map(String::as_str)
    }

    /// Chooses the witness of a licence (its server's certificate pin, hex) unless it has one;
    /// the change to store when it was chosen now.
    pub fn pin_witness(&mut self, licence: &str, pin: &str) -> Option<Change> {
        if !self.states.contains_key(licence) || self.witness_pins.contains_key(licence) {
            return None;
        }
        self.witness_pins.insert(licence.to_owned(), pin.to_owned());
        Some(Change::PutMeta(
            format!("{WITNESS_PIN_PREFIX}{licence}"),
            pin.as_bytes().to_vec(),
        ))
    }

    /// Every licence with metered state.
    pub fn licences(&self) -> Vec<String> {
        self.states.keys().cloned().collect()
    }

    /// True when the licence's metered items are locked after a rollback.
    pub fn is_locked(&self, licence: &str) -> bool {
        self.rules.contains_key(licence)
            && self.states.get(licence).is_some_and(|s| s.lock.is_some())
    }

    /// The lock reason of a licence, if locked.
    pub fn lock_reason(&self, licence: &str) -> Option<&LockReason> {
        self.states.get(licence).and_then(|s| s.lock.as_ref())
    }

    /// Puts the metered truth into the allocation table: units left, expiry and rollback locks.
    pub fn overlay(&self, table: &mut AllocationTable, now: u64) {
        for (id, rules) in &self.rules {
            let Some(state) = self.states.get(id) else {
                continue;
            };
            let container = ContainerId::new(ContainerClass::Soft, id.clone());
            for view in table.items() {
                let entry = &view.entry;
                if entry.container != container || !rules.products.contains(&entry.product.code) {
                    continue;
                }
                if entry.state == ItemState::Corrupt {
                    continue;
                }
                if let Some(left) = state.remaining(entry.product.code) {
                    let _ = table.set_units_left(&container, entry.product, Some(left));
                }
                let wanted = if state.lock.is_some() {
                    ItemState::Locked
                } else if entry.rules.expires_at.is_some_and(|at| at <= now) {
                    ItemState::Expired
                } else {
                    ItemState::Valid
                };
                if entry.state != wanted {
                    let _ = table.set_state(&container, entry.product, wanted);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter_core::policy::ProductPolicy;

    #[test]
    fn a_licence_keeps_the_first_witness_it_is_given() {
        let policy =
            ProductPolicy::from_yaml("products: [{code: 1, name: credits, units: 5}]").unwrap();
        let mut metering = Metering::load(&BTreeMap::new());
        // A licence without metered state has nothing to witness.
        assert!(metering.pin_witness("L-1", "aa").is_none());
        assert!(
            metering
                .register("L-1", &policy.products, 1_000, None)
                .is_some()
        );
        let change = metering.pin_witness("L-1", "aa").expect("first pin");
        assert!(metering.pin_witness("L-1", "bb").is_none());
        assert_eq!(metering.witness_pin("L-1"), Some("aa"));
        // The pin survives a restart.
        let Change::PutMeta(key, value) = change else {
            panic!("{change:?}")
        };
        let reloaded = Metering::load(&BTreeMap::from([(key, value)]));
        assert_eq!(reloaded.witness_pin("L-1"), Some("aa"));
    }
}
