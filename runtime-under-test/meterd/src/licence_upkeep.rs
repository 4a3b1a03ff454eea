//! The daemon's licence upkeep: the traits soft licences open with, refreshing installed
//! licences, recording spent units and explaining denials.

use std::collections::BTreeSet;
use std::sync::Arc;

use meter_core::allocation::{AllocationTable, ContainerClass, ContainerId, ItemState, ProductKey};
use meter_core::reason::Reason;
use meter_core::traits::{MachineTraits, names};

use crate::daemon::{Runtime, Via};
use crate::licences::UnitUse;
use crate::store;

impl Runtime {
    /// The traits soft licences are opened with: the platform's current traits plus the
    /// runtime's random id.
    pub fn soft_traits(&self) -> Result<MachineTraits, crate::platform::PlatformError> {
        let mut traits = self.platform.traits()?;
        if let Some(id) = self.lock_licences().random_id() {
            traits.set(names::RUNTIME_RANDOM_ID, id.to_owned());
        }
        Ok(traits)
    }

    /// Re-validates the installed licences against the machine as it is now (traits, clock,
    /// vmgenid): bindings that stopped opening turn corrupt and their grants are revoked,
    /// rollback signs lock metered items, and locked items whose policy says reconcile are
    /// reconciled with a reachable witness. Runs before every access and status read.
    pub async fn refresh_licences(self: &Arc<Self>) {
        let (traits, vmgenid) = match (self.soft_traits(), self.platform.vmgenid()) {
            (Ok(traits), Ok(vmgenid)) => (traits, vmgenid),
            (traits, vmgenid) => {
                tracing::warn!(traits = ?traits.err(), vmgenid = ?vmgenid.err(), "Cannot read the machine: licences not re-validated");
                return;
            }
        };
        let (revoke, to_reconcile, durable, now) = {
            let mut state = self.lock();
            let mut licences = self.lock_licences();
            // Read under the lock: a concurrent look may have moved the high-water mark past a
            // reading taken before it, which would look like a clock turned back.
            let now = match self.platform.now_ms() {
                Ok(now) => now,
                Err(e) => {
                    tracing::warn!(clock = %e, "Cannot read the machine: licences not re-validated");
                    return;
                }
            };
            let broken = licences.revalidate(&traits, &mut state.table, now);
            let mut changes = licences.register_metering(now, vmgenid.as_deref());
            let check = licences.metering.check(now, vmgenid.as_deref());
            changes.extend(check.changes);
            licences.metering.overlay(&mut state.table, now);
            // Almost every look finds nothing broken and nothing newly locked: then no grant
            // is looked at.
            let revoke: Vec<(u64, Reason)> = if broken.is_empty() && check.newly_locked.is_empty() {
                Vec::new()
            } else {
                let broken: BTreeSet<String> = broken.iter().map(ToString::to_string).collect();
                let newly_locked: BTreeSet<String> = check
                    .newly_locked
                    .iter()
                    .map(|id| ContainerId::new(ContainerClass::Soft, id.clone()).to_string())
                    .collect();
                // A lock takes only the products it locks (the licence's metered ones) back.
                let locked: BTreeSet<(String, ProductKey)> = state
                    .table
                    .items()
                    .into_iter()
                    .filter(|view| view.entry.state == ItemState::Locked)
                    .map(|view| (view.entry.container.to_string(), view.entry.product))
                    .filter(|(container, _)| newly_locked.contains(container))
                    .collect();
                state
                    .grants
                    .iter()
                    .filter_map(|(handle, grant)| match &grant.via {
                        Via::Table { container } if broken.contains(container) => {
                            Some((*handle, Reason::BindingBroken))
                        }
                        Via::Table { container }
                            if locked.contains(&(container.clone(), grant.product)) =>
                        {
                            Some((*handle, Reason::RollbackDetected))
                        }
                        _ => None,
                    })
                    .collect()
            };
            let durable = (!changes.is_empty()).then(|| self.store.submit(changes));
            (revoke, check.to_reconcile, durable, now)
        };
        if let Some(durable) = durable
            && let Err(e) = store::wait(durable).await
        {
            tracing::error!(error = %e, "Metered state not recorded");
        }
        for (handle, reason) in revoke {
            self.revoke(handle, reason).await;
        }
        for licence in to_reconcile {
            self.reconcile_with_witness(&licence, now, vmgenid.as_deref())
                .await;
        }
        self.revoke_expired().await;
    }

    /// Takes back the grants of items that can no longer be used as time passed (expired, on
    /// the platform clock) and tells their holders (`licence-expired`), local and remote.
    pub async fn revoke_expired(self: &Arc<Self>) {
        let revoke: Vec<(u64, Reason)> = {
            let mut state = self.lock();
            let Ok(now) = self.platform.now_ms() else {
                return;
            };
            let unusable: std::collections::HashMap<u64, Reason> = state
                .table
                .revoke_unusable(now)
                .into_iter()
                .map(|(allocation, reason)| (allocation.handle, reason))
                .collect();
            if unusable.is_empty() {
                return;
            }
            state
                .grants
                .iter()
                .filter_map(|(handle, grant)| {
                    let reason = unusable.get(&grant.table_handle?)?;
                    Some((*handle, *reason))
                })
                .collect()
        };
        for (handle, reason) in revoke {
            self.revoke(handle, reason).await;
        }
    }

    /// Checks expiry once a second for as long as the runtime lives.
    pub fn watch_expiry(self: &Arc<Self>) {
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(runtime) = runtime.upgrade() else {
                    return;
                };
                runtime.revoke_expired().await;
            }
        });
    }

    /// Records one unit spent from a metered soft item (called with the state lock held, before
    /// the grant is stored): the store changes and the receipt for the witness, or why the
    /// use is refused (a rollback sign locked the licence).
    pub(crate) fn record_unit_spent(
        &self,
        container: &ContainerId,
        product: ProductKey,
        now: u64,
    ) -> Result<UnitUse, Reason> {
        let mut licences = self.lock_licences();
        let Some(licence) = licences.licence_of(container).map(str::to_owned) else {
            return Ok((Vec::new(), None));
        };
        let mut changes = Vec::new();
        if licences.signer().is_none() {
            match licences.ensure_identity(|| {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| format!("No randomness: {e}"))?;
                Ok(bytes)
            }) {
                Ok((more, _)) => changes.extend(more),
                Err(e) => {
                    tracing::error!(error = %e, "No receipt key: unit use not recorded");
                    return Ok((changes, None));
                }
            }
        }
        if licences.metering.needs_witness(&licence, product.code)
            && !crate::weakened::is(crate::weakened::Defence::WitnessRequired)
            && (!licences.metering.is_vouched_for(&licence) || self.remotes.connected().is_empty())
        {
            // The vendor spends these units only where a witness sees them: a restored state
            // folder on a machine cut off from its witness gains nothing.
            tracing::warn!(
                licence,
                product = product.code,
                "No witness vouches for the receipts: unit use refused"
            );
            return Err(Reason::WitnessUnreachable);
        }
        let signer = licences.signer().expect("created above");
        let vmgenid = self.platform.vmgenid().ok().flatten();
        match licences
            .metering
            .spend(&licence, product.code, 1, now, vmgenid.as_deref(), &signer)
        {
            Some(Ok((receipt, change))) => {
                changes.push(change);
                Ok((changes, Some((licence, receipt))))
            }
            Some(Err(
                e @ (meter_core::rollback::RollbackError::Locked(_)
                | meter_core::rollback::RollbackError::LockedByPolicy(_)),
            )) => {
                tracing::warn!(licence, product = product.code, error = %e, "Unit use refused");
                Err(Reason::RollbackDetected)
            }
            Some(Err(meter_core::rollback::RollbackError::UnitsExhausted { .. })) => {
                Err(Reason::UnitsExhausted)
            }
            Some(Err(e)) => {
                tracing::error!(licence, product = product.code, error = %e, "Unit use not recorded");
                Ok((changes, None))
            }
            None => Ok((changes, None)),
        }
    }

    /// A table denial as the app should see it: a rollback lock is `rollback-detected`.
    pub(crate) fn explain_denial(
        &self,
        table: &AllocationTable,
        product: ProductKey,
        reason: Reason,
    ) -> Reason {
        if reason != Reason::LicenceLocked {
            return reason;
        }
        let licences = self.lock_licences();
        let rolled_back = table.items().iter().any(|view| {
            view.entry.product == product
                && view.entry.state == ItemState::Locked
                && licences
                    .licence_of(&view.entry.container)
                    .is_some_and(|id| licences.metering.is_locked(id))
        });
        if rolled_back {
            Reason::RollbackDetected
        } else {
            reason
        }
    }
}
