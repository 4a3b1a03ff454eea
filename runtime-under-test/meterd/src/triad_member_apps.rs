//! The apps on a triad member's own machine: each takes a seat in the triad's ledger, as the
//! member's runtime, through whichever member leads (forwarded to it when this one follows),
//! so the members' apps and the client runtimes together never hold more seats than the
//! licence has. Their seats are renewed every quarter window; apps whose seats went three
//! quarters of a window unrenewed are revoked, before their leases can run out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meter_core::allocation::ProductKey;
use meter_core::reason::Reason;

use crate::daemon::{Holder, Runtime, State};
use crate::triad_server::{Route, SeatRefusal, seat_request};

/// The seat (request, product, quantity) of a local app's grant `handle`, if it takes one: a
/// counted item's (a local single-user licence is the machine's own, counted by no server).
fn local_seat_of(state: &State, handle: u64) -> Option<(u64, ProductKey, u32)> {
    let record = state.grants.get(&handle)?;
    if !matches!(record.holder, Holder::Local { .. }) {
        return None;
    }
    let allocation = state.table.allocation(record.table_handle?)?;
    let rules = state
        .table
        .rules_of(&allocation.container, record.product)?;
    if rules.is_local() {
        return None;
    }
    let request = seat_request(&rules, record.product, &record.station, handle)?;
    Some((request, record.product, rules.capacity()?))
}

/// Every local app's seat, with the grants holding it.
fn local_seats(state: &State) -> Vec<((u64, ProductKey, u32), Vec<u64>)> {
    let mut seats: Vec<((u64, ProductKey, u32), Vec<u64>)> = Vec::new();
    for handle in state.grants.keys() {
        let Some(seat) = local_seat_of(state, *handle) else {
            continue;
        };
        match seats.iter_mut().find(|(s, _)| s.0 == seat.0) {
            Some((_, handles)) => handles.push(*handle),
            None => seats.push((seat, vec![*handle])),
        }
    }
    seats
}

/// The requests of every local app's seat.
fn local_requests(state: &State) -> Vec<u64> {
    let mut requests: Vec<u64> = local_seats(state)
        .into_iter()
        .map(|((request, ..), _)| request)
        .collect();
    requests.sort_unstable();
    requests
}

fn weakened() -> bool {
    crate::weakened::is(crate::weakened::Defence::TriadMemberApps)
}

impl Runtime {
    /// Takes the triad seat of a local app's grant just made here; the reason to withdraw the
    /// grant otherwise.
    pub(crate) async fn take_member_app_seat(&self, handle: u64) -> Result<(), Reason> {
        if weakened() {
            // Weakened: the member's own table is the only count of its apps.
            return Ok(());
        }
        if self.triad().is_none() && !self.triad_saved {
            return Ok(());
        }
        let seat = {
            let state = self.lock();
            if !state.grants.contains_key(&handle) {
                return Err(Reason::NotHeld);
            }
            local_seat_of(&state, handle)
        };
        let Some((request, product, quantity)) = seat else {
            return Ok(());
        };
        let quantity = self.asked_seat_quantity(quantity);
        let Some(triad) = self.triad() else {
            // A member that has not joined again since its start can seat nobody yet.
            return Err(Reason::ServerUnreachable);
        };
        match triad
            .take(
                Route::Leader,
                triad.apps_holder(),
                request,
                product,
                quantity,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(SeatRefusal::NoSeat) => Err(Reason::QuantityExhausted),
            Err(SeatRefusal::Unreachable(e)) => {
                tracing::warn!(handle, error = %e, "Triad seat of a member's app not taken");
                Err(Reason::ServerUnreachable)
            }
        }
    }

    /// Gives back the triad seats of this member's apps that ended. The leader answers at
    /// once (a grant that finds every seat held waits for its give-backs); a follower waits
    /// for the leader to commit it, so the ended app's seat is free once its release is
    /// answered.
    pub(crate) async fn give_back_member_app_seats(self: &Arc<Self>) {
        let Some(triad) = self.triad().cloned() else {
            return;
        };
        if weakened() {
            return;
        }
        let holder = triad.apps_holder().to_owned();
        // No more seats held than the apps still running name: the app that ended held none
        // (an item no server counts), or its grant is not on this copy yet and the next
        // renewal gives it back.
        if triad.held_by(&holder).await <= local_requests(&self.lock()).len() {
            return;
        }
        if triad.leads() {
            let me = Arc::clone(self);
            triad.give_back(Route::Leader, &holder, move || local_requests(&me.lock()));
        } else if let Err(e) = triad
            .reclaim(Route::Leader, &holder, || local_requests(&self.lock()))
            .await
        {
            // The next renewal gives it back, or its lease runs out.
            tracing::debug!(error = %e, "Seat of a member's ended app not given back yet");
        }
    }

    /// Renews this member's apps' seats at once and then every quarter `window` for as long
    /// as the runtime lives; revokes the apps whose seats were not renewed for three quarters
    /// of it, however long the triad takes to answer (before the ledger lets their seats go),
    /// or that the ledger no longer seats.
    pub(crate) fn keep_member_app_seats(self: &Arc<Self>, window: Duration) {
        if weakened() {
            return;
        }
        let runtime = Arc::downgrade(self);
        let period = (window / 4).max(Duration::from_millis(50));
        let revoke_after = window.saturating_mul(3) / 4;
        tokio::spawn(async move {
            let mut renewed_at = Instant::now();
            let mut first = true;
            loop {
                if !first {
                    // Never past the moment the apps must go, should the triad stay silent.
                    let left =
                        (renewed_at + revoke_after).saturating_duration_since(Instant::now());
                    tokio::time::sleep(period.min(left)).await;
                }
                first = false;
                let Some(me) = runtime.upgrade() else {
                    return;
                };
                let Some(triad) = me.triad().cloned() else {
                    return;
                };
                let holder = triad.apps_holder().to_owned();
                let asked = Instant::now();
                let seats = local_seats(&me.lock());
                // No app holds a seat: nothing to renew, unless the ledger still lists one (a
                // give-back sent by a follower whose copy had not yet applied the seat's grant
                // leaves it; this reclaim, naming none, ends it).
                if seats.is_empty() && triad.held_by(&holder).await == 0 {
                    renewed_at = asked;
                    continue;
                }
                let requests: Vec<u64> = seats.iter().map(|((request, ..), _)| *request).collect();
                let renewal = async {
                    let kept = match triad.reclaim(Route::Leader, &holder, || requests).await {
                        Ok(kept) => kept,
                        Err(e) => {
                            tracing::warn!(error = %e, "Triad seats of the member's apps not renewed");
                            return None;
                        }
                    };
                    let mut unseated = Vec::new();
                    let mut all = true;
                    for ((request, product, quantity), handles) in &seats {
                        if kept.contains(request) {
                            continue;
                        }
                        // Its lease ran out (or a grant is still taking it): take it again.
                        match triad
                            .take(Route::Leader, &holder, *request, *product, *quantity)
                            .await
                        {
                            Ok(()) => {}
                            Err(SeatRefusal::NoSeat) => unseated.extend(handles.iter().copied()),
                            Err(SeatRefusal::Unreachable(_)) => all = false,
                        }
                    }
                    Some((all, unseated))
                };
                // However long the triad takes, the apps go before their seats can.
                let deadline = tokio::time::Instant::from_std(renewed_at + revoke_after);
                if let Ok(Some((all, unseated))) = tokio::time::timeout_at(deadline, renewal).await
                {
                    if all {
                        renewed_at = asked;
                    }
                    for handle in unseated {
                        tracing::warn!(handle, "A member's app lost its triad seat: revoked");
                        me.revoke(handle, Reason::QuantityExhausted).await;
                    }
                }
                if renewed_at.elapsed() >= revoke_after {
                    let handles: Vec<u64> = local_seats(&me.lock())
                        .into_iter()
                        .flat_map(|(_, h)| h)
                        .collect();
                    tracing::warn!(
                        apps = handles.len(),
                        "The triad did not renew the member's apps' seats: revoked"
                    );
                    for handle in handles {
                        me.revoke(handle, Reason::ServerUnreachable).await;
                    }
                    renewed_at = Instant::now();
                }
            }
        });
    }
}
