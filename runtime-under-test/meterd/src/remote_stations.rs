//! The daemon as a network server: the stations of client runtimes, their grants, hellos,
//! keepalives and departures.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use meter_core::allocation::ContainerClass;
use meter_core::reason::Reason;
use meter_core::usage::UsageKind;

use crate::daemon::{
    GrantRecord, Holder, RUNTIME_KEY_PREFIX, RemoteLink, Runtime, State, Via, encode_record,
};
use crate::protocol::{Claim, FromServer};
use crate::store::{self, Change};

/// Most grants of one product one client runtime may hold at once.
pub const MAX_GRANTS_PER_STATION: u32 = 256;

/// How a client runtime's connection ended.
#[derive(Debug, Clone, Copy)]
pub enum Departure {
    /// Silent for a whole keepalive window: its lease is over now.
    Silent,
    /// Closed or broken; its lease runs until one window after the last frame heard.
    Closed {
        /// When the server last heard from it.
        last_heard: Instant,
    },
}

/// What a client runtime's hello got.
#[derive(Debug)]
pub enum HelloAnswer {
    /// Linked: serve the connection as generation `generation`, sending `events` unprompted.
    Welcomed {
        /// The connection's generation.
        generation: u64,
        /// The welcome frame.
        welcome: FromServer,
        /// Frames to send unprompted (revocations).
        events: mpsc::UnboundedReceiver<FromServer>,
    },
    /// Refused: send this and close.
    Refused(FromServer),
}

impl Runtime {
    /// A client runtime connected (or reconnected), authenticated by the certificate with
    /// `fingerprint`, and says which grants it still holds.
    pub async fn remote_hello(
        self: &Arc<Self>,
        runtime: &str,
        fingerprint: &str,
        machine: &str,
        peer: SocketAddr,
        claims: Vec<Claim>,
    ) -> HelloAnswer {
        if self.refuses_hello() {
            tracing::info!(runtime, machine, %peer, "Hello refused: this triad member does not lead");
            return HelloAnswer::Refused(FromServer::Refused {
                reason: Reason::ServerUnreachable,
            });
        }
        let now = self.platform.now_ms().unwrap_or(0);
        let peer_ip = peer.ip();
        let peer_text = peer.to_string();
        let peer = peer_text.as_str();
        let mut restored = Vec::new();
        let mut lost = Vec::new();
        let mut claimed_seats = Vec::new();
        let mut changes = Vec::new();
        let generation;
        let (events_tx, events) = mpsc::unbounded_channel();
        {
            let mut state = self.lock();
            let trust_claims = crate::weakened::is(crate::weakened::Defence::StationAuthentication);
            let limit_peers = !crate::weakened::is(crate::weakened::Defence::ConnectionLimits);
            let admission = match state.stations.admit(
                runtime,
                fingerprint,
                machine,
                peer_ip,
                trust_claims,
                limit_peers,
            ) {
                Ok(admission) => admission,
                Err(reason) => {
                    drop(state);
                    tracing::warn!(runtime, machine, peer, %reason, "Remote runtime refused");
                    return HelloAnswer::Refused(FromServer::Refused { reason });
                }
            };
            changes.extend(admission.changes);
            let station_machine = admission.station_machine;
            if self.triad().is_some() {
                claimed_seats = claims
                    .iter()
                    .filter_map(|claim| crate::triad_stations::claim_seat(&state, claim))
                    .collect();
            }
            state.link_generation += 1;
            generation = state.link_generation;
            state.awaiting_reconnect.remove(runtime);
            state.lapsing.remove(runtime);
            if state.known_runtimes.insert(runtime.to_owned()) {
                changes.push(Change::PutMeta(
                    format!("{RUNTIME_KEY_PREFIX}{runtime}"),
                    Vec::new(),
                ));
            }
            state.links.insert(
                runtime.to_owned(),
                RemoteLink {
                    generation,
                    peer: peer.to_owned(),
                    machine: machine.to_owned(),
                    station_machine: station_machine.clone(),
                    events: events_tx,
                },
            );
            let held: BTreeMap<u64, u64> = state
                .grants_of_runtime(runtime)
                .into_iter()
                .filter_map(|handle| match &state.grants.get(&handle)?.holder {
                    Holder::Remote { client_handle, .. } => Some((*client_handle, handle)),
                    Holder::Local { .. } => None,
                })
                .collect();
            let claimed: std::collections::BTreeSet<u64> =
                claims.iter().map(|c| c.client_handle).collect();
            // Grants the client no longer claims are released.
            for (client_handle, handle) in &held {
                if !claimed.contains(client_handle) {
                    state.remove_grant(*handle, &mut changes);
                }
            }
            for mut claim in claims {
                if let Some(handle) = held.get(&claim.client_handle) {
                    if let Some(record) = state.grants.get_mut(handle)
                        && let Holder::Remote { peer: p, .. } = &mut record.holder
                    {
                        *p = peer.to_owned();
                    }
                    // The users of grants kept over a restart live in memory only.
                    if let Some(user) = &claim.user {
                        state.remote_users.insert(*handle, user.clone());
                    }
                    restored.push((claim.client_handle, *handle));
                    continue;
                }
                claim.station.machine = station_machine.clone();
                // A claim this server does not hold is a new access: the rules decide it.
                let refusal = self.remote_rules_refusal(&state, &claim, peer);
                if let Some(denial) = refusal {
                    lost.push((claim.client_handle, denial.reason));
                    continue;
                }
                match self.grant_remote(&mut state, runtime, peer, &claim, now, &mut changes) {
                    Ok((handle, ..)) => restored.push((claim.client_handle, handle)),
                    Err(reason) => lost.push((claim.client_handle, reason)),
                }
            }
        }
        if !changes.is_empty()
            && let Err(e) = self.store.commit(changes).await
        {
            tracing::error!(error = %e, "Reconnect not recorded");
        }
        if !self
            .reclaim_triad_seats(runtime, claimed_seats, &mut restored, &mut lost)
            .await
        {
            let departure = Departure::Closed {
                last_heard: Instant::now(),
            };
            self.remote_gone(runtime, generation, departure, "no triad quorum")
                .await;
            return HelloAnswer::Refused(FromServer::Refused {
                reason: Reason::ServerUnreachable,
            });
        }
        tracing::info!(
            runtime,
            machine,
            peer,
            restored = restored.len(),
            lost = lost.len(),
            "Remote runtime connected"
        );
        HelloAnswer::Welcomed {
            generation,
            welcome: FromServer::Welcome {
                restored,
                lost,
                keepalive_ms: self.settings.keepalive.as_millis() as u64,
            },
            events,
        }
    }

    fn grant_remote(
        &self,
        state: &mut State,
        runtime: &str,
        peer: &str,
        claim: &Claim,
        now: u64,
        changes: &mut Vec<Change>,
    ) -> Result<(u64, String, ContainerClass), Reason> {
        if !crate::weakened::is(crate::weakened::Defence::ConnectionLimits)
            && state.remote_grants_of(runtime, claim.product) >= MAX_GRANTS_PER_STATION
        {
            return Err(Reason::GrantLimitReached);
        }
        let mut record = GrantRecord {
            product: claim.product,
            station: claim.station.clone(),
            session: claim.session.clone(),
            role: claim.role,
            guest: claim.guest,
            holder: Holder::Remote {
                runtime: runtime.to_owned(),
                client_handle: claim.client_handle,
                peer: peer.to_owned(),
            },
            via: Via::Table {
                container: String::new(),
            },
            granted_at: now,
            table_handle: None,
        };
        let grant = state
            .table
            .access(record.access_request(), now)
            .map_err(|reason| self.explain_denial(&state.table, claim.product, reason))?;
        let container = grant.container.to_string();
        record.table_handle = Some(grant.handle);
        if crate::weakened::is(crate::weakened::Defence::ServerQuantity) {
            // Weakened: a remote grant is answered but not kept in the count.
            let _ = state.table.release(grant.handle);
        }
        record.via = Via::Table {
            container: container.clone(),
        };
        let handle = state.allocate_handle(changes);
        if let Some(units) = grant.units_left {
            // Served licences are witnessed by the server's own state; no chain to hand on.
            match self.record_unit_spent(&grant.container, claim.product, now) {
                Ok((more, _receipt)) => {
                    changes.push(crate::licences::units_change(
                        &grant.container,
                        claim.product,
                        units,
                    ));
                    changes.extend(more);
                }
                Err(reason) => {
                    let _ = state.table.release(grant.handle);
                    let _ = state.table.set_units_left(
                        &grant.container,
                        claim.product,
                        Some(units + 1),
                    );
                    return Err(reason);
                }
            }
        }
        // A seat is a lease kept in memory, re-claimed after a restart (see `resume`). It is
        // recorded only with a write its grant makes anyway (a spent unit, a usage record), so
        // that a re-claim after a crash finds it held: no second unit spent, no usage record
        // left without its end.
        if grant.units_left.is_some() || self.usage_key.is_some() {
            changes.push(Change::PutGrant(handle, encode_record(&record)));
        } else {
            state.leases.insert(handle);
        }
        state.insert_grant(handle, record);
        if let Some(user) = &claim.user {
            state.remote_users.insert(handle, user.clone());
        }
        changes.extend(self.usage_grant(state, handle));
        Ok((handle, container, grant.container.class))
    }

    /// A client runtime forwards an access.
    pub async fn remote_access(
        self: &Arc<Self>,
        runtime: &str,
        generation: u64,
        peer: &str,
        request: u64,
        mut claim: Claim,
    ) -> FromServer {
        // Concurrent accesses share one commit: the writer holds a waited commit back a little
        // for this one while it is prepared (with the usage log on, every access writes).
        let announced = self.usage_key.is_some().then(|| self.store.expect_change());
        self.wait_for_reconnects().await;
        self.observe_machine().await;
        let mut changes = Vec::new();
        let mut refusing_rule = None;
        let outcome = {
            let mut state = self.lock();
            // Read under the lock, as for local accesses: never behind a high-water mark.
            let Ok(now) = self.platform.now_ms() else {
                return FromServer::Denied {
                    request,
                    reason: Reason::ServerUnreachable,
                };
            };
            match state.links.get(runtime) {
                Some(link) if link.generation == generation => {
                    // The station is the authenticated runtime's, whatever the claim names.
                    claim.station.machine = link.station_machine.clone();
                }
                // The connection that asked is gone (another took over, or it lapsed).
                _ => {
                    return FromServer::Denied {
                        request,
                        reason: Reason::ServerUnreachable,
                    };
                }
            }
            let refusal = self.remote_rules_refusal(&state, &claim, peer);
            match refusal {
                Some(denial) => {
                    refusing_rule = denial.rule;
                    Err(denial.reason)
                }
                None => self.grant_remote(&mut state, runtime, peer, &claim, now, &mut changes),
            }
            .map(|granted| {
                if self.triad().is_some() {
                    // Its triad seat is taken once the dongle confirmed it and it is on disk;
                    // until then a keepalive leaves the seat to that take.
                    state.seating.insert(granted.0);
                }
                // A seat alone writes nothing; a spent unit or a usage record is on disk first.
                let durable =
                    (!changes.is_empty()).then(|| self.store.submit(std::mem::take(&mut changes)));
                (granted, durable)
            })
        };
        if !changes.is_empty() {
            // Refused after a handle was taken: its ceiling is still recorded.
            self.store.submit_eventually(changes);
        }
        drop(announced);
        let asker = || crate::daemon::Asker {
            user: claim.user.clone(),
            machine: claim.station.machine.clone(),
            session: claim.station.session,
            wire_session: claim.session.clone(),
            peer: Some(peer.to_owned()),
        };
        match outcome {
            Ok(((handle, container, class), durable)) => {
                // A grant withdrawn after the table gave it (the dongle refused it, or it could
                // not be recorded) went back as a release; the client is denied, logged too.
                if let Err(reason) = self.confirm_on_dongle(handle, class).await {
                    self.log_denial(asker(), claim.product, reason, None).await;
                    return FromServer::Denied { request, reason };
                }
                // What it wrote is on disk before it is answered. A seat needs no row: a server
                // that crashes after answering grants nothing new after its restart until the
                // holder has re-claimed the seat or its lease ran out (`resume`).
                if let Some(durable) = durable
                    && let Err(e) = store::wait(durable).await
                {
                    tracing::error!(handle, error = %e, "Remote grant not recorded; withdrawn");
                    let _ = self.release_inner(handle, false).await;
                    let reason = Reason::ServerUnreachable;
                    self.log_denial(asker(), claim.product, reason, None).await;
                    return FromServer::Denied { request, reason };
                }
                // In a triad the seat is the triad's: committed by two members before it is
                // answered.
                if let Err(reason) = self.take_triad_seat(runtime, handle).await {
                    let _ = self.release_inner(handle, false).await;
                    self.log_denial(asker(), claim.product, reason, None).await;
                    return FromServer::Denied { request, reason };
                }
                FromServer::Granted {
                    request,
                    handle,
                    container,
                }
            }
            Err(reason) => {
                let reason = self.dongles.explain_denial(claim.product, reason);
                self.log_denial(asker(), claim.product, reason, refusing_rule)
                    .await;
                FromServer::Denied { request, reason }
            }
        }
    }

    /// Confirms a grant with its dongle when it is on one (boxed: rare, and its state is large).
    async fn confirm_on_dongle(
        self: &Arc<Self>,
        handle: u64,
        class: ContainerClass,
    ) -> Result<(), Reason> {
        if class == ContainerClass::Dongle {
            Box::pin(self.dongles.confirm_grant(self, handle)).await
        } else {
            Ok(())
        }
    }

    /// A client runtime releases a grant.
    pub async fn remote_release(
        self: &Arc<Self>,
        runtime: &str,
        request: u64,
        handle: u64,
    ) -> FromServer {
        // Only its own grants: another runtime's handle is answered alike and left alone.
        let ended = self
            .end_grant_of(handle, Some(runtime), false, UsageKind::Release)
            .await;
        // A triad seat is given back at once, answered before it is committed.
        if ended.is_ok() {
            self.give_back_triad_seats(runtime);
        }
        FromServer::Released { request }
    }

    /// A client runtime's connection ended: silent past its window, its grants are released
    /// now; closed or broken, they lapse one window after it was last heard from, unless it
    /// reconnects first.
    pub async fn remote_gone(
        self: &Arc<Self>,
        runtime: &str,
        generation: u64,
        departure: Departure,
        why: &str,
    ) {
        {
            let mut state = self.lock();
            match state.links.get(runtime) {
                Some(link) if link.generation == generation => {
                    state.links.remove(runtime);
                }
                // A newer connection of the same runtime took over.
                _ => return,
            }
            if let Departure::Closed { last_heard } = departure {
                let deadline = last_heard + self.settings.keepalive;
                state.lapsing.insert(runtime.to_owned(), deadline);
                tracing::info!(runtime, why, "Remote connection ended; its lease runs on");
                return;
            }
        }
        let released = self.release_station(runtime).await;
        tracing::info!(runtime, why, released, "Remote station released");
    }

    /// Forgets a client runtime that is not linked and releases its grants; how many.
    async fn release_station(self: &Arc<Self>, runtime: &str) -> usize {
        let handles: Vec<u64> = {
            let mut state = self.lock();
            if state.links.contains_key(runtime) {
                return 0;
            }
            if state.known_runtimes.remove(runtime) {
                drop(self.store.submit(vec![Change::DeleteMeta(format!(
                    "{RUNTIME_KEY_PREFIX}{runtime}"
                ))]));
            }
            state.grants_of_runtime(runtime)
        };
        for handle in &handles {
            let _ = self.end_grant(*handle, true, UsageKind::Reclaim).await;
        }
        handles.len()
    }

    /// Releases the grants of client runtimes whose lease ran out: those that did not reconnect
    /// after a restart in time, and those whose connection ended a window ago.
    pub async fn sweep_unreconnected(self: &Arc<Self>) {
        let (unreconnected, lapsed): (Vec<String>, Vec<String>) = {
            let mut state = self.lock();
            let now = Instant::now();
            let due = |deadlines: &HashMap<String, Instant>| -> Vec<String> {
                deadlines
                    .iter()
                    .filter(|(_, deadline)| **deadline <= now)
                    .map(|(r, _)| r.clone())
                    .collect()
            };
            let unreconnected = due(&state.awaiting_reconnect);
            let lapsed = due(&state.lapsing);
            for runtime in &unreconnected {
                state.awaiting_reconnect.remove(runtime);
            }
            for runtime in &lapsed {
                state.lapsing.remove(runtime);
            }
            (unreconnected, lapsed)
        };
        for runtime in unreconnected {
            let released = self.release_station(&runtime).await;
            tracing::info!(runtime, released, "Remote runtime did not come back");
        }
        for runtime in lapsed {
            let released = self.release_station(&runtime).await;
            tracing::info!(runtime, released, "Remote runtime's lease lapsed");
        }
    }
}
