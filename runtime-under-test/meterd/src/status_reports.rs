//! What the daemon reports about itself: the status document and the allocation list.

use crate::daemon::{Holder, Runtime, Via};

impl Runtime {
    /// Status document (`meter status --json`).
    pub fn status_json(&self) -> serde_json::Value {
        let machine = serde_json::json!({
            "name": self.platform.machine_name().ok(),
            "kind": self.platform.kind().ok(),
            "role": self.platform.role().ok(),
            "platform": self.platform.describe(),
            "vmgenid": self.platform.vmgenid().ok().flatten(),
            "clock_ms": self.platform.now_ms().ok(),
            "runtime_id": self.runtime_id,
        });
        let state = self.lock();
        let licences = self.licences.lock().unwrap_or_else(|e| e.into_inner());
        let mut containers = licences.containers_json(&state.table);
        containers.retain(|c| c["kind"] != "dongle");
        containers.extend(self.dongles.containers_json(&state.table));
        let mut remotes: Vec<serde_json::Value> = self
            .remotes
            .list()
            .into_iter()
            .map(|(addr, connected)| {
                serde_json::json!({"kind": "remote", "id": format!("remote:{addr}"), "state": if connected {"valid"} else {"unreachable"}, "reason": if connected { serde_json::Value::Null } else { "server-unreachable".into() }, "products": []})
            })
            .collect();
        let mut all = containers;
        all.append(&mut remotes);
        let server = self
            .server_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|(listen, fingerprint)| {
                let stations: Vec<serde_json::Value> = state
                    .links
                    .iter()
                    .map(|(runtime, link)| {
                        let held = state
                            .grants
                            .values()
                            .filter(|g| matches!(&g.holder, Holder::Remote { runtime: r, .. } if r == runtime))
                            .count();
                        serde_json::json!({"runtime": runtime, "machine": link.machine, "peer": link.peer, "allocations": held})
                    })
                    .collect();
                serde_json::json!({"listen": listen, "cert_sha256": fingerprint, "stations": stations})
            });
        serde_json::json!({"machine": machine, "containers": all, "server": server})
    }

    /// Allocation list document (`meter list --json`).
    pub fn list_json(&self) -> serde_json::Value {
        let state = self.lock();
        let allocations: Vec<serde_json::Value> = state
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
                serde_json::json!({
                    "handle": handle, "product": g.product.code, "firm": g.product.firm,
                    "station": g.station.to_string(), "pid": pid, "peer": peer,
                    "container": g.container(), "server": server, "granted_at": g.granted_at,
                })
            })
            .collect();
        serde_json::json!({ "allocations": allocations })
    }
}
