//! What the daemon core hands its services: the runtime as the owner the dongle service and the
//! server links ask for what they need, and nothing more.

use std::path::Path;
use std::sync::Arc;

use meter_core::allocation::{AllocationTable, ContainerId, ProductKey};
use meter_core::reason::Reason;

use crate::daemon::{Runtime, Via};
use crate::dongles::{DongleOwner, Dongles};
use crate::platform::Platform;
use crate::protocol::Claim;
use crate::remote::LinkOwner;

impl DongleOwner for Runtime {
    fn dongles(&self) -> &Dongles {
        &self.dongles
    }

    fn platform(&self) -> &dyn Platform {
        self.platform.as_ref()
    }

    fn state_dir(&self) -> &Path {
        &self.settings.state_dir
    }

    fn runtime_id(&self) -> String {
        self.runtime_id.clone()
    }

    fn dongle_key(&self) -> &dongle::SigningKey {
        &self.dongle_key
    }

    fn with_table<T>(&self, f: impl FnOnce(&mut AllocationTable) -> T) -> T {
        f(&mut self.lock().table)
    }

    fn withdraw_container(&self, container: &ContainerId) -> Vec<u64> {
        let text = container.to_string();
        let mut state = self.lock();
        let _ = state.table.remove_container(container);
        state
            .grants
            .iter()
            .filter(|(_, g)| matches!(&g.via, Via::Table { container } if *container == text))
            .map(|(h, _)| *h)
            .collect()
    }

    fn table_grant(&self, handle: u64) -> Option<(ProductKey, String)> {
        let state = self.lock();
        let grant = state.grants.get(&handle)?;
        match &grant.via {
            Via::Table { container } => Some((grant.product, container.clone())),
            Via::Forwarded { .. } => None,
        }
    }

    fn release(self: &Arc<Self>, handle: u64) -> impl Future<Output = Result<(), Reason>> + Send {
        Runtime::release(self, handle)
    }

    fn revoke(self: &Arc<Self>, handle: u64, reason: Reason) -> impl Future<Output = ()> + Send {
        Runtime::revoke(self, handle, reason)
    }
}

impl LinkOwner for Runtime {
    fn platform(&self) -> &dyn Platform {
        self.platform.as_ref()
    }

    fn runtime_id(&self) -> String {
        self.runtime_id.clone()
    }

    fn claims_for(&self, server: &str) -> Vec<Claim> {
        Runtime::claims_for(self, server)
    }

    fn reconciled(
        self: &Arc<Self>,
        server: &str,
        restored: Vec<(u64, u64)>,
        lost: Vec<(u64, Reason)>,
    ) -> impl Future<Output = ()> + Send {
        Runtime::reconciled(self, server, restored, lost)
    }

    fn forwarded_lost(
        self: &Arc<Self>,
        server: &str,
        server_handle: u64,
        reason: Reason,
    ) -> impl Future<Output = ()> + Send {
        Runtime::forwarded_lost(self, server, server_handle, reason)
    }

    fn lease_lapsed(self: &Arc<Self>, server: &str) -> impl Future<Output = ()> + Send {
        Runtime::lease_lapsed(self, server)
    }
}
