//! The daemon as a network client: the grants it forwarded to servers, kept across reconnects.

use std::sync::Arc;

use meter_core::reason::Reason;

use crate::daemon::{Holder, Runtime, Via, encode_record};
use crate::protocol::Claim;
use crate::store::{self, Change};

impl Runtime {
    /// Revokes a grant the server no longer honours (client side).
    pub async fn forwarded_lost(
        self: &Arc<Self>,
        server: &str,
        server_handle: u64,
        reason: Reason,
    ) {
        let handle = {
            let state = self.lock();
            state.grants.iter().find_map(|(h, g)| match &g.via {
                Via::Forwarded {
                    server: s,
                    server_handle: sh,
                    ..
                } if s == server && *sh == server_handle => Some(*h),
                _ => None,
            })
        };
        if let Some(handle) = handle {
            self.revoke(handle, reason).await;
        }
    }

    /// The lease on `server` ran out: every grant forwarded to it is revoked
    /// (`server-unreachable`), since the server may give those seats to others from now on.
    pub async fn lease_lapsed(self: &Arc<Self>, server: &str) {
        if crate::weakened::is(crate::weakened::Defence::LeaseRevocation) {
            return;
        }
        let handles: Vec<u64> = {
            let state = self.lock();
            state
                .grants
                .iter()
                .filter(|(_, g)| matches!(&g.via, Via::Forwarded { server: s, .. } if s == server))
                .map(|(h, _)| *h)
                .collect()
        };
        if !handles.is_empty() {
            tracing::warn!(
                server,
                revoked = handles.len(),
                "Lease on the server lapsed; its grants are revoked"
            );
        }
        for handle in handles {
            self.revoke(handle, Reason::ServerUnreachable).await;
        }
    }

    /// The claims this runtime holds on one server (sent on reconnect).
    pub fn claims_for(&self, server: &str) -> Vec<Claim> {
        let state = self.lock();
        state
            .grants
            .iter()
            .filter_map(|(handle, g)| match &g.via {
                Via::Forwarded { server: s, .. } if s == server => Some(Claim {
                    client_handle: *handle,
                    product: g.product,
                    station: g.station.clone(),
                    session: g.session.clone(),
                    role: g.role,
                    guest: g.guest,
                    user: match g.holder {
                        Holder::Local { uid, .. } => self.user_of(uid),
                        Holder::Remote { .. } => None,
                    },
                }),
                _ => None,
            })
            .collect()
    }

    /// After a reconnect: records new server handles and revokes lost grants.
    pub async fn reconciled(
        self: &Arc<Self>,
        server: &str,
        restored: Vec<(u64, u64)>,
        lost: Vec<(u64, Reason)>,
    ) {
        let durable = {
            let mut state = self.lock();
            let mut changes = Vec::new();
            for (handle, server_handle) in restored {
                if let Some(record) = state.grants.get_mut(&handle)
                    && let Via::Forwarded {
                        server: s,
                        server_handle: sh,
                        ..
                    } = &mut record.via
                    && s == server
                    && *sh != server_handle
                {
                    *sh = server_handle;
                    changes.push(Change::PutGrant(handle, encode_record(record)));
                }
            }
            self.store.submit(changes)
        };
        let _ = store::wait(durable).await;
        for (handle, reason) in lost {
            self.revoke(handle, reason).await;
        }
    }
}
