//! The daemon as a triad member: joining (at the administrator's word, and again at every
//! start), the triad seats of the grants it makes for client runtimes, and letting its client
//! runtimes go when it stops leading.

use std::sync::Arc;
use std::time::Duration;

use meter_core::allocation::ProductKey;
use meter_core::reason::Reason;
use meter_core::usage::UsageKind;
use openraft::ServerState;

use crate::daemon::{Holder, Runtime, State};
use crate::protocol::FromServer;
use crate::store::Change;
use crate::triad_server::{
    JoinError, Route, SeatRefusal, TRIAD_META_KEY, TriadSeats, TriadSettings,
};

/// Why this runtime cannot join a triad.
#[derive(Debug, thiserror::Error)]
pub enum TriadJoinError {
    /// Only a network server joins a triad.
    #[error("This runtime is not a network server (start it with --server)")]
    NotAServer,
    /// The server's TLS identity cannot be read.
    #[error("Cannot read the server's TLS identity")]
    Identity(#[source] crate::tls::TlsError),
    /// The triad refused or failed.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The settings could not be kept.
    #[error("The triad settings were not saved")]
    Store(#[source] crate::store::StoreError),
}

fn weakened() -> bool {
    crate::weakened::is(crate::weakened::Defence::TriadQuorum)
}

/// The seat of one grant held here: its ledger request, product and quantity.
fn seat_of(state: &State, handle: u64) -> Option<(u64, ProductKey, u32)> {
    let record = state.grants.get(&handle)?;
    let Holder::Remote { client_handle, .. } = &record.holder else {
        return None;
    };
    let allocation = state.table.allocation(record.table_handle?)?;
    let rules = state
        .table
        .rules_of(&allocation.container, record.product)?;
    let request =
        crate::triad_server::seat_request(&rules, record.product, &record.station, *client_handle)?;
    Some((request, record.product, rules.capacity()?))
}

/// The seat a client runtime's claim names (as its grant here would have it), if it takes one.
pub(crate) fn claim_seat(state: &State, claim: &crate::protocol::Claim) -> Option<u64> {
    let rules = state.table.first_rules(claim.product)?;
    crate::triad_server::seat_request(&rules, claim.product, &claim.station, claim.client_handle)
}

/// One seat a client runtime's grants here hold.
struct HeldSeat {
    request: u64,
    product: ProductKey,
    quantity: u32,
    /// Every grant holding it is still taking it (their own take decides).
    being_taken: bool,
}

/// The seats of every grant a client runtime holds here.
fn seats_held(state: &State, runtime: &str) -> Vec<HeldSeat> {
    let mut seats: Vec<HeldSeat> = state
        .grants_of_runtime(runtime)
        .into_iter()
        .filter_map(|handle| {
            let (request, product, quantity) = seat_of(state, handle)?;
            Some(HeldSeat {
                request,
                product,
                quantity,
                being_taken: state.seating.contains(&handle),
            })
        })
        .collect();
    // A seat any settled grant holds is settled.
    seats.sort_unstable_by_key(|seat| (seat.request, seat.being_taken));
    seats.dedup_by_key(|seat| seat.request);
    seats
}

/// The seat requests of every grant a client runtime holds here.
fn seats_of(state: &State, runtime: &str) -> Vec<u64> {
    seats_held(state, runtime)
        .into_iter()
        .map(|seat| seat.request)
        .collect()
}

/// Marks a grant as taking its seat until dropped.
struct Seating<'a> {
    runtime: &'a Runtime,
    handle: u64,
}

impl Drop for Seating<'_> {
    fn drop(&mut self) {
        self.runtime.lock().seating.remove(&self.handle);
    }
}

/// How often a triad member looks at its machine's generation id.
const GENERATION_POLL: Duration = Duration::from_millis(50);

impl Runtime {
    /// The triad this server is a member of, if any.
    pub(crate) fn triad(&self) -> Option<&Arc<TriadSeats>> {
        self.triad.get()
    }

    /// Joins the triad `settings` names (kept in the state when `keep`, so every start joins
    /// again); what the member reports.
    pub async fn join_triad(
        self: &Arc<Self>,
        settings: TriadSettings,
        keep: bool,
    ) -> Result<serde_json::Value, TriadJoinError> {
        if self
            .server_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Err(TriadJoinError::NotAServer);
        }
        if self.triad.get().is_some() {
            return Err(JoinError::Joined.into());
        }
        let identity = crate::tls::load_or_create_identity(&self.settings.state_dir)
            .map_err(TriadJoinError::Identity)?;
        let db = self.settings.state_dir.join("triad.redb");
        let seats = TriadSeats::join(
            &settings,
            Arc::new(identity),
            &db,
            self.settings.keepalive,
            !keep,
            crate::triad_forward_check::forward_check(
                Arc::downgrade(self),
                u64::try_from(self.settings.keepalive.as_millis()).unwrap_or(u64::MAX),
            ),
        )
        .await?;
        if keep {
            let bytes = serde_json::to_vec(&settings).unwrap_or_default();
            if let Err(e) = self
                .store
                .commit(vec![Change::PutMeta(TRIAD_META_KEY.into(), bytes)])
                .await
            {
                seats.stop().await;
                return Err(TriadJoinError::Store(e));
            }
        }
        let seats = Arc::new(seats);
        let described = seats.describe();
        if self.triad.set(Arc::clone(&seats)).is_err() {
            return Err(JoinError::Joined.into());
        }
        self.watch_leadership(&seats);
        self.watch_generation(&seats);
        let guest = self.platform.kind().ok() == Some(meter_core::traits::MachineKind::Guest);
        seats.announce_machine(guest);
        self.keep_member_app_seats(self.settings.keepalive);
        self.stop_awaiting_reclaims();
        // The ledger counts the seats every member gave: this member's table, which knows only
        // its own grants (none of a leader's before it took over, none from before a crash
        // until their holders re-claim them), must not refuse a re-claim for want of a seat
        // that a grant still taking its ledger seat holds here.
        let pins: Vec<String> = settings.members.iter().map(|m| m.pin.clone()).collect();
        {
            let mut state = self.lock();
            state.table.count_quantity_elsewhere(true);
            // The licences issued for this very triad serve from now on.
            self.lock_licences().enter_triad(pins, &mut state.table);
        }
        Ok(described)
    }

    /// Keeps the member out of the triad whenever its machine's generation id changes (its
    /// hypervisor reverted it to a snapshot: the runtime runs on from an old memory and disk).
    /// Looked at often: a reverted member must be kept out before it answers a candidate.
    fn watch_generation(self: &Arc<Self>, seats: &Arc<TriadSeats>) {
        let runtime = Arc::downgrade(self);
        let seats = Arc::downgrade(seats);
        tokio::spawn(async move {
            // A machine with no generation id (a physical one), or whose id cannot be read a
            // moment, is not a reverted one: only one id followed by another is.
            let mut seen: Option<String> = None;
            loop {
                let (Some(runtime), Some(seats)) = (runtime.upgrade(), seats.upgrade()) else {
                    return;
                };
                if let Ok(Some(now)) = runtime.platform.vmgenid() {
                    if let Some(before) = seen.as_ref().filter(|before| **before != now) {
                        tracing::warn!(%before, %now, "The machine's generation id changed");
                        seats.machine_reverted();
                    }
                    seen = Some(now);
                }
                drop((runtime, seats));
                tokio::time::sleep(GENERATION_POLL).await;
            }
        });
    }

    /// Lets every linked client runtime go when this member stops leading (they go on with
    /// the new leader).
    fn watch_leadership(self: &Arc<Self>, seats: &TriadSeats) {
        let mut states = seats.states();
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut led = false;
            while states.changed().await.is_ok() {
                let leads = states.borrow().state == ServerState::Leader;
                if led && !leads {
                    let Some(runtime) = runtime.upgrade() else {
                        return;
                    };
                    tracing::warn!("This member no longer leads the triad; its stations go");
                    runtime.let_stations_go();
                }
                led = leads;
            }
        });
    }

    /// Tells every linked client runtime to go elsewhere (their links end).
    fn let_stations_go(&self) {
        let state = self.lock();
        for link in state.links.values() {
            let _ = link.events.send(FromServer::Refused {
                reason: Reason::ServerUnreachable,
            });
        }
    }

    /// Whether a client runtime's hello is refused because this member does not lead.
    pub(crate) fn refuses_hello(&self) -> bool {
        self.triad().is_some_and(|triad| !triad.leads()) && !weakened()
    }

    /// Takes the triad seat of a grant just made here for `runtime`; the reason to withdraw
    /// it otherwise.
    pub(crate) async fn take_triad_seat(&self, runtime: &str, handle: u64) -> Result<(), Reason> {
        let Some(triad) = self.triad() else {
            return Ok(());
        };
        let seat = {
            let mut state = self.lock();
            if !state.grants.contains_key(&handle) {
                // Ended meanwhile (revoked while it was being confirmed): nothing to answer.
                return Err(Reason::ServerUnreachable);
            }
            let seat = seat_of(&state, handle);
            if seat.is_some() {
                state.seating.insert(handle);
            } else {
                state.seating.remove(&handle);
            }
            seat
        };
        let Some((request, product, quantity)) = seat else {
            return Ok(());
        };
        let _seating = Seating {
            runtime: self,
            handle,
        };
        match triad
            .take(Route::Here, runtime, request, product, quantity)
            .await
        {
            Ok(()) => Ok(()),
            Err(SeatRefusal::NoSeat) => Err(Reason::QuantityExhausted),
            Err(SeatRefusal::Unreachable(_)) if weakened() => Ok(()),
            Err(SeatRefusal::Unreachable(e)) => {
                tracing::warn!(runtime, error = %e, "Triad seat not taken");
                Err(Reason::ServerUnreachable)
            }
        }
    }

    /// Renews a client runtime's triad seats and gives back those whose grants ended here;
    /// false when the triad did not commit it (the runtime must go to the leader).
    pub(crate) async fn renew_triad_seats(self: &Arc<Self>, runtime: &str) -> bool {
        let Some(triad) = self.triad() else {
            return true;
        };
        if weakened() {
            // Weakened: answered on the member's own word, the renewal committed if it can be.
            let (me, triad, runtime) = (Arc::clone(self), Arc::clone(triad), runtime.to_owned());
            tokio::spawn(async move {
                let _ = triad
                    .reclaim(Route::Here, &runtime, || seats_of(&me.lock(), &runtime))
                    .await;
            });
            return true;
        }
        let mut held = Vec::new();
        let reclaimed = triad
            .reclaim(Route::Here, runtime, || {
                held = seats_held(&self.lock(), runtime);
                held.iter().map(|seat| seat.request).collect()
            })
            .await;
        match reclaimed {
            // A seat the ledger does not hold is taken now (the grants still taking theirs are
            // left to their own takes, which withdraw them if every seat is held). One that
            // cannot be had sends the runtime to say hello again, which reports it lost.
            Ok(kept) => {
                for seat in held {
                    let HeldSeat {
                        request,
                        product,
                        quantity,
                        being_taken,
                    } = seat;
                    if being_taken || kept.contains(&request) {
                        continue;
                    }
                    if let Err(refusal) = triad
                        .take(Route::Here, runtime, request, product, quantity)
                        .await
                    {
                        tracing::warn!(
                            runtime,
                            ?refusal,
                            "Triad seat no longer held; the station must re-claim"
                        );
                        return false;
                    }
                }
                true
            }
            Err(e) => {
                tracing::warn!(runtime, error = %e, "Triad seats not renewed");
                false
            }
        }
    }

    /// Gives back the triad seats of a client runtime's grants that ended here (answered at
    /// once; a grant that finds every seat held waits for it).
    pub(crate) fn give_back_triad_seats(self: &Arc<Self>, runtime: &str) {
        let Some(triad) = self.triad() else {
            return;
        };
        let (me, holder) = (Arc::clone(self), runtime.to_owned());
        triad.give_back(Route::Here, runtime, move || seats_of(&me.lock(), &holder));
    }

    /// After a client runtime's hello: re-claims the triad seats of its claims (`claimed`: a
    /// claim this member could not restore keeps its seat until the runtime has revoked it),
    /// takes seats anew for the grants kept here whose seats the triad no longer held, and
    /// moves those it cannot seat to `lost`; false when the triad did not commit (the hello is
    /// refused).
    pub(crate) async fn reclaim_triad_seats(
        self: &Arc<Self>,
        runtime: &str,
        claimed: Vec<u64>,
        restored: &mut Vec<(u64, u64)>,
        lost: &mut Vec<(u64, Reason)>,
    ) -> bool {
        let Some(triad) = self.triad() else {
            return true;
        };
        let named = || {
            let mut seats = seats_of(&self.lock(), runtime);
            seats.extend(claimed);
            seats.sort_unstable();
            seats.dedup();
            seats
        };
        let kept = match triad.reclaim(Route::Here, runtime, named).await {
            Ok(kept) => kept,
            Err(_) if weakened() => return true,
            Err(e) => {
                tracing::warn!(runtime, error = %e, "Triad seats not re-claimed");
                return false;
            }
        };
        let mut seated = Vec::new();
        for (client_handle, handle) in std::mem::take(restored) {
            let seat = seat_of(&self.lock(), handle);
            let refusal = match seat {
                Some((request, ..)) if kept.contains(&request) => None,
                // No seat to take, or the grant ended meanwhile (then it is lost).
                _ => self.take_triad_seat(runtime, handle).await.err(),
            };
            match refusal {
                None => seated.push((client_handle, handle)),
                Some(Reason::ServerUnreachable) if !weakened() => return false,
                Some(reason) => {
                    let _ = self
                        .end_grant_of(handle, Some(runtime), false, UsageKind::Reclaim)
                        .await;
                    lost.push((client_handle, reason));
                }
            }
        }
        *restored = seated;
        true
    }

    /// What this member reports: its number, the leader, and (with `history`) the seat events
    /// its ledger applied.
    pub fn triad_status(&self, history: bool) -> Option<serde_json::Value> {
        let triad = self.triad()?;
        let mut status = triad.describe();
        if history {
            status["history"] = serde_json::to_value(triad.history()).unwrap_or_default();
        }
        Some(status)
    }
}
