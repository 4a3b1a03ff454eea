//! What the daemon reports about itself: the status document and the allocation list.

use meter_core::reason::Reason;

use crate::daemon::{Holder, Runtime, Via};
use crate::status_view::{
    AllocationList, AllocationStatus, ContainerState, ContainerStatus, MachineStatus, ServerStatus,
    StationStatus, StatusDocument, TriadStatus,
};

impl Runtime {
    /// Status document (`meter status --json`).
    pub fn status_json(&self) -> serde_json::Value {
        let machine = MachineStatus {
            name: self.platform.machine_name().ok(),
            kind: self.platform.kind().ok(),
            role: self.role_judge.role(&*self.platform, None).ok(),
            platform: self.platform.describe(),
            vmgenid: self.platform.vmgenid().ok().flatten(),
            clock_ms: self.platform.now_ms().ok(),
            runtime_id: self.runtime_id.clone(),
        };
        let state = self.lock();
        let licences = self.lock_licences();
        let mut all = licences.containers(&state.table);
        all.retain(|c| c.kind != "dongle");
        all.extend(self.dongles.containers(&state.table));
        all.extend(
            self.remotes
                .list()
                .into_iter()
                .map(|(addr, connected)| ContainerStatus {
                    kind: "remote".into(),
                    id: format!("remote:{addr}"),
                    state: if connected {
                        ContainerState::Valid
                    } else {
                        ContainerState::Unreachable
                    },
                    reason: (!connected).then_some(Reason::ServerUnreachable.code()),
                    dongle: None,
                    products: Vec::new(),
                }),
        );
        let server = self
            .server_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|(listen, fingerprint)| {
                let stations: Vec<StationStatus> = state
                    .links
                    .iter()
                    .map(|(runtime, link)| {
                        let held = state.grants_of_runtime(runtime).len();
                        StationStatus {
                            runtime: runtime.clone(),
                            machine: link.machine.clone(),
                            peer: link.peer.clone(),
                            allocations: held,
                        }
                    })
                    .collect();
                ServerStatus {
                    listen,
                    cert_sha256: fingerprint,
                    stations,
                }
            });
        let triad = self.triad().map(|triad| {
            let (member, leader) = triad.numbers();
            TriadStatus::new(
                member,
                leader,
                triad.apps_holder(),
                triad.members_in_guests(),
            )
        });
        let document = StatusDocument {
            machine,
            containers: all,
            server,
            triad,
        };
        serde_json::to_value(document).unwrap_or_default()
    }

    /// Allocation list document (`meter list --json`).
    pub fn list_json(&self) -> serde_json::Value {
        let state = self.lock();
        let allocations: Vec<AllocationStatus> = state
            .grants
            .iter()
            .map(|(handle, g)| {
                let (pid, peer) = match &g.holder {
                    Holder::Local { pid, .. } => (Some(*pid), None),
                    Holder::Remote { peer, .. } => (None, Some(peer.clone())),
                };
                let server = match &g.via {
                    Via::Forwarded { server, .. } => Some(server.clone()),
                    Via::Table { .. } => None,
                };
                AllocationStatus {
                    handle: *handle,
                    product: g.product.code,
                    firm: g.product.firm,
                    station: g.station.to_string(),
                    pid,
                    peer,
                    container: g.container().to_owned(),
                    server,
                    granted_at: g.granted_at,
                }
            })
            .collect();
        serde_json::to_value(AllocationList { allocations }).unwrap_or_default()
    }
}
