//! The network server as a member of a licence server triad: its seats are the triad's
//! replicated ledger's, and it serves client runtimes only while it leads.
//!
//! The member keeps its own allocation table (licences, rules, the usage log work as on a lone
//! server) and takes a ledger seat for every grant the table counts, so a licence's quantity
//! holds across the three members. A client runtime's leases are renewed by its keepalives
//! (each answered once the renewal is committed) and re-claimed by its hello on whichever
//! member leads; a seat whose last grant ended here is given back at the next reclaim.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meter_core::allocation::ProductKey;
use meter_core::policy::{Counting, ItemRules};
use meter_core::seat_ledger::{LedgerCommand, LedgerOutcome};
use meter_core::station::StationId;
use meter_core::usage_seats::ledger_product;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::tls::Identity;
use crate::triad::{ForwardCheck, TriadError, TriadMember, TriadTiming};
use crate::triad_types::{Member, MemberId};

/// Where a member's triad settings are kept in its state.
pub const TRIAD_META_KEY: &str = "triad";

/// The three members as one of them reaches the others: `addr` is where this member reaches
/// each (its own: where it listens for them), `pin` each member's certificate pin. Every
/// member lists the members in the same order (a member's number is its place).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriadSettings {
    /// The members, in the triad's order.
    pub members: Vec<Member>,
}

/// How long a seat given back waits for another command to share its entry.
const GIVE_BACK_LINGER: Duration = Duration::from_millis(20);

/// Why a triad cannot be joined.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Not three members.
    #[error("A triad has three members, not {0}")]
    Size(usize),
    /// A pin is listed twice.
    #[error("Member {0} is listed twice")]
    Repeated(String),
    /// This server's certificate is not a member's.
    #[error("This server's certificate {0} is not one of the members'")]
    NotAMember(String),
    /// Joined already (a member's triad does not change while it runs).
    #[error("This server is a triad member already")]
    Joined,
    /// The member-to-member address cannot be listened on.
    #[error("Cannot listen for the other members on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The member did not start.
    #[error("The triad member did not start")]
    Member(#[source] TriadError),
}

/// How many give-backs of seats started and finished.
#[derive(Debug, Default, Clone, Copy)]
struct GiveBacks {
    started: u64,
    finished: u64,
}

/// Counts a give-back finished when dropped.
struct GiveBackDone(Arc<TriadSeats>);

impl Drop for GiveBackDone {
    fn drop(&mut self) {
        self.0.giving_back.send_modify(|g| g.finished += 1);
    }
}

/// Which member commits a seat's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This member, which must lead: the seats of the client runtimes it serves.
    Here,
    /// Whichever member leads, this one or the leader it forwards to: the seats of the apps on
    /// this member's own machine.
    Leader,
}

/// A seat could not be taken.
#[derive(Debug)]
pub enum SeatRefusal {
    /// Every seat of the product is held across the triad.
    NoSeat,
    /// This member cannot commit (it does not lead, or no two members agree).
    Unreachable(TriadError),
}

/// This server's part in a triad.
pub struct TriadSeats {
    member: TriadMember,
    window_ms: u64,
    /// The ledger holder of this member's own apps' seats (named by its certificate pin).
    apps_holder: String,
    /// Give-backs of seats started and finished (a release is answered before its seat is
    /// committed as given back).
    giving_back: tokio::sync::watch::Sender<GiveBacks>,
}

impl std::fmt::Debug for TriadSeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TriadSeats")
            .field("member", &self.member.id())
            .finish_non_exhaustive()
    }
}

/// The ledger request naming one seat: a station's seat of a product (StationShare), or one
/// access's (UserLimit); `None` for accesses that take no seat.
pub fn seat_request(
    rules: &ItemRules,
    product: ProductKey,
    station: &StationId,
    client_handle: u64,
) -> Option<u64> {
    let mut hash = Sha256::new();
    hash.update(product.firm.to_le_bytes());
    hash.update(product.code.to_le_bytes());
    match rules.counting {
        Counting::NoCount => return None,
        // The holder is the client runtime, which is one machine: its station is its session
        // (the machine's name as each member's registry knows it may differ between members).
        Counting::StationShare => {
            hash.update(b"station");
            hash.update(station.session.unwrap_or(u32::MAX).to_le_bytes());
        }
        Counting::UserLimit => {
            hash.update(b"access");
            hash.update(client_handle.to_le_bytes());
        }
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Some(u64::from_le_bytes(first))
}

impl TriadSettings {
    /// Checks the settings for the server whose certificate pin is `own_pin`; its number.
    pub fn own_id(&self, own_pin: &str) -> Result<MemberId, JoinError> {
        if self.members.len() != 3 {
            return Err(JoinError::Size(self.members.len()));
        }
        let mut seen = BTreeSet::new();
        for member in &self.members {
            if !seen.insert(member.pin.as_str()) {
                return Err(JoinError::Repeated(member.pin.clone()));
            }
        }
        self.members
            .iter()
            .position(|m| m.pin == own_pin)
            .map(|i| i as MemberId + 1)
            .ok_or_else(|| JoinError::NotAMember(own_pin.to_owned()))
    }
}

impl TriadSeats {
    /// Joins the triad: listens for the other members at its own address and starts its Raft
    /// with its log in `db`; client leases last `window`. A member that `rejoins` (at a start,
    /// from the settings kept in its state) is kept out of elections a while (quarantine).
    /// While it leads, it commits what another member forwards only if `check` passes it.
    pub async fn join(
        settings: &TriadSettings,
        identity: Arc<Identity>,
        db: &Path,
        window: Duration,
        rejoins: bool,
        check: ForwardCheck,
    ) -> Result<TriadSeats, JoinError> {
        let identity_pin = identity.fingerprint();
        let id = settings.own_id(&identity_pin)?;
        let own = &settings.members[(id - 1) as usize];
        let listener = TcpListener::bind(&own.addr)
            .await
            .map_err(|source| JoinError::Listen {
                addr: own.addr.clone(),
                source,
            })?;
        let members: BTreeMap<MemberId, Member> = settings
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (i as MemberId + 1, m.clone()))
            .collect();
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        // The members' election timeouts do not overlap: the first listed leads a triad whose
        // members are all up, the second takes over from it (the scenarios rely on knowing).
        let election_min_ms = 300 + 250 * (id - 1);
        let timing = TriadTiming {
            election_min_ms,
            election_max_ms: election_min_ms + 150,
            // A keepalive is answered once its renewal commits: a write that cannot commit
            // must fail well within the client's window, so it can go to the next leader.
            // (An eighth: a write waits at most two, the entry in flight and its own, within
            // the quarter window a client waits for a keepalive's answer.)
            write_timeout: (window / 8).clamp(Duration::from_millis(200), Duration::from_secs(3)),
            lease_grace_ms: window_ms,
            ..TriadTiming::default()
        };
        // Only the first member proposes the membership: a new triad is led by it.
        let member =
            TriadMember::start(id, members, listener, identity, db, timing, id == 1, check)
                .await
                .map_err(JoinError::Member)?;
        if rejoins && !crate::weakened::is(crate::weakened::Defence::TriadRestartQuarantine) {
            // Started again: its state may be an old copy (see `quarantine`).
            member.quarantine(window.saturating_mul(2));
        } else if id != 1 {
            // The others stand for election only once they have known a leader (or after a
            // while without one, the first being down).
            member.hold_elections(Duration::from_secs(10));
        }
        tracing::info!(member = id, "Joined the licence server triad");
        Ok(TriadSeats {
            member,
            window_ms,
            apps_holder: crate::triad_network::member_apps_holder(&identity_pin),
            giving_back: tokio::sync::watch::Sender::new(GiveBacks::default()),
        })
    }

    /// Keeps this member out of the triad after its machine went back to an older state (a
    /// new generation id: a hypervisor's revert), for two lease windows (see
    /// [`TriadMember::isolate`]).
    pub fn machine_reverted(&self) {
        if crate::weakened::is(crate::weakened::Defence::TriadRestartQuarantine) {
            return;
        }
        self.member
            .isolate(Duration::from_millis(self.window_ms.saturating_mul(2)));
    }

    /// Whether this member leads now (only the leader serves client runtimes).
    pub fn leads(&self) -> bool {
        self.member.leads()
    }

    /// This member's number and the leader's, as it knows.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "member": self.member.id(),
            "leader": self.member.leader(),
            "leads": self.member.leads(),
            "applied": self.member.applied_index(),
        })
    }

    /// The ledger holder under which this member's own apps hold their seats.
    pub fn apps_holder(&self) -> &str {
        &self.apps_holder
    }

    /// Every lease on this member's copy of the ledger, by number, with its holder.
    pub async fn lease_holders(&self) -> Vec<(u64, String)> {
        self.member.ledger().lease_holders().await
    }

    /// Gives back `holder`'s lease `lease`, committed through the leader.
    pub async fn release(&self, lease: u64, holder: &str) -> Result<LedgerOutcome, TriadError> {
        let command = LedgerCommand::Release {
            lease,
            holder: holder.to_owned(),
        };
        self.commit(Route::Leader, command).await
    }

    /// This member's number and the leader's, when one is known.
    pub fn numbers(&self) -> (MemberId, Option<MemberId>) {
        (self.member.id(), self.member.leader())
    }

    /// The members that said they run in a virtual machine.
    pub fn members_in_guests(&self) -> Vec<MemberId> {
        self.member.ledger().members_in_guests()
    }

    /// Has the triad learn whether this member's machine is a virtual machine: committed
    /// through the leader, tried again every second (for up to a minute) until it is.
    pub fn announce_machine(self: &Arc<Self>, guest: bool) {
        let triad = Arc::downgrade(self);
        tokio::spawn(async move {
            for _ in 0..60 {
                let Some(seats) = triad.upgrade() else {
                    return;
                };
                let command = LedgerCommand::MemberMachine {
                    member: seats.member.id(),
                    guest,
                };
                match seats.member.submit_anywhere(command).await {
                    Ok(_) => return,
                    Err(e) => tracing::debug!(error = %e, "Machine kind not announced yet"),
                }
                drop(seats);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Changes of this member's Raft state (to notice losing the lead).
    pub fn states(&self) -> tokio::sync::watch::Receiver<openraft::RaftMetrics<MemberId, Member>> {
        self.member.metrics()
    }

    /// Commits `command` by `route`.
    async fn commit(
        &self,
        route: Route,
        command: LedgerCommand,
    ) -> Result<LedgerOutcome, TriadError> {
        match route {
            Route::Here => self.member.submit(command).await,
            Route::Leader => self.member.submit_anywhere(command).await,
        }
    }

    /// Takes the ledger seat `request` of `product` (of `quantity`) for `holder`, committed by
    /// `route`; a seat the holder has already is that seat. Every seat held, it waits for the
    /// seats being given back and asks once more.
    pub async fn take(
        &self,
        route: Route,
        holder: &str,
        request: u64,
        product: ProductKey,
        quantity: u32,
    ) -> Result<(), SeatRefusal> {
        let command = LedgerCommand::Grant {
            request,
            product: ledger_product(product),
            quantity,
            holder: holder.to_owned(),
            lease_ms: self.window_ms,
        };
        let mut given_back = self.giving_back.subscribe();
        let mut outcome = self.commit(route, command.clone()).await;
        if matches!(outcome, Ok(LedgerOutcome::NoSeat { .. })) {
            // The give-backs started by now may free a seat: once they are done, ask again.
            let started = given_back.borrow().started;
            if given_back.borrow().finished < started {
                let done = given_back.wait_for(|g| g.finished >= started);
                let _ = tokio::time::timeout(self.member.write_timeout(), done).await;
                outcome = self.commit(route, command).await;
            }
        }
        match outcome {
            Ok(LedgerOutcome::Granted { .. }) => Ok(()),
            Ok(LedgerOutcome::NoSeat { .. }) => Err(SeatRefusal::NoSeat),
            // The leader found no seat this licence gives (a forwarded grant it refused).
            Err(TriadError::BeyondLicence(beyond)) => {
                tracing::warn!(reason = %beyond, "The leader refused a seat beyond the licence");
                Err(SeatRefusal::NoSeat)
            }
            Ok(other) => Err(SeatRefusal::Unreachable(TriadError::Stopped(format!(
                "unexpected answer {other:?}"
            )))),
            Err(e) => Err(SeatRefusal::Unreachable(e)),
        }
    }

    /// Renews `holder`'s seats named by `seats()` for one window and ends its others (but not
    /// one a grant took after `seats()` was read), committed by `route`; the seats named that
    /// the ledger still held.
    pub async fn reclaim(
        &self,
        route: Route,
        holder: &str,
        seats: impl FnOnce() -> Vec<u64>,
    ) -> Result<BTreeSet<u64>, TriadError> {
        self.reclaim_within(route, holder, seats, Duration::ZERO)
            .await
    }

    /// [`TriadSeats::reclaim`], written with the next entry another command goes in if one is
    /// within `linger` (when this member writes it).
    async fn reclaim_within(
        &self,
        route: Route,
        holder: &str,
        seats: impl FnOnce() -> Vec<u64>,
        linger: Duration,
    ) -> Result<BTreeSet<u64>, TriadError> {
        // Read before the list: a grant the list misses is taken by a later entry.
        let as_of = self.member.ledger().applied().await;
        let requests = seats();
        let command = LedgerCommand::Reclaim {
            holder: holder.to_owned(),
            requests,
            lease_ms: self.window_ms,
            as_of: Some(as_of),
        };
        let outcome = match route {
            Route::Leader if !self.member.leads() => self.member.submit_anywhere(command).await?,
            _ => self.member.submit_within(command, linger).await?,
        };
        match outcome {
            LedgerOutcome::Reclaimed { kept } => Ok(kept.into_iter().map(|(r, _)| r).collect()),
            other => Err(TriadError::Stopped(format!("unexpected answer {other:?}"))),
        }
    }

    /// Gives back `holder`'s seats that `seats()` no longer names, without waiting (and
    /// without an entry of its own when another command is written within [`GIVE_BACK_LINGER`]):
    /// a grant that finds every seat held meanwhile waits for it.
    pub fn give_back(
        self: &Arc<Self>,
        route: Route,
        holder: &str,
        seats: impl FnOnce() -> Vec<u64> + Send + 'static,
    ) {
        self.giving_back.send_modify(|g| g.started += 1);
        // Counted as finished however it ends (even never run).
        let finished = GiveBackDone(Arc::clone(self));
        let (triad, holder) = (Arc::clone(self), holder.to_owned());
        tokio::spawn(async move {
            let _finished = finished;
            if let Err(e) = triad
                .reclaim_within(route, &holder, seats, GIVE_BACK_LINGER)
                .await
            {
                // Its next keepalive gives them back, or they run out with their lease.
                tracing::debug!(holder, error = %e, "Triad seats not given back yet");
            }
        });
    }

    /// How many seats `holder` holds on this member's copy of the ledger (it may lag the
    /// leader's).
    pub async fn held_by(&self, holder: &str) -> usize {
        self.member.ledger().held_by(holder).await
    }

    /// The seat events this member's ledger applied (for a run's history).
    pub fn history(&self) -> Vec<meter_core::seat_ledger::SeatEvent> {
        self.member.ledger().events()
    }

    /// Stops the member.
    pub async fn stop(self) {
        self.member.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter_core::policy::Allowance;

    fn rules(counting: Counting) -> ItemRules {
        ItemRules {
            quantity: 2,
            counting,
            virtual_machines: Allowance::Allow,
            terminal_server: Allowance::Allow,
            expires_at: None,
        }
    }

    const PRODUCT: ProductKey = ProductKey {
        firm: 10,
        code: 1001,
    };

    #[test]
    fn a_stations_accesses_share_one_seat_and_user_limit_accesses_do_not() {
        let station = StationId::machine("vm1");
        let share = rules(Counting::StationShare);
        assert_eq!(
            seat_request(&share, PRODUCT, &station, 1),
            seat_request(&share, PRODUCT, &station, 2)
        );
        let session = StationId {
            machine: "vm1".into(),
            session: Some(4),
        };
        assert_ne!(
            seat_request(&share, PRODUCT, &station, 1),
            seat_request(&share, PRODUCT, &session, 1)
        );
        let limit = rules(Counting::UserLimit);
        assert_ne!(
            seat_request(&limit, PRODUCT, &station, 1),
            seat_request(&limit, PRODUCT, &station, 2)
        );
        assert_eq!(
            seat_request(&rules(Counting::NoCount), PRODUCT, &station, 1),
            None
        );
    }

    #[test]
    fn a_member_finds_itself_by_its_pin_and_a_triad_has_three_distinct_members() {
        let member = |pin: &str| Member {
            addr: "127.0.0.1:1".into(),
            pin: pin.into(),
        };
        let settings = TriadSettings {
            members: vec![member("a"), member("b"), member("c")],
        };
        assert_eq!(settings.own_id("b").unwrap(), 2);
        assert!(matches!(
            settings.own_id("d"),
            Err(JoinError::NotAMember(_))
        ));
        let two = TriadSettings {
            members: vec![member("a"), member("b")],
        };
        assert!(matches!(two.own_id("a"), Err(JoinError::Size(2))));
        let repeated = TriadSettings {
            members: vec![member("a"), member("a"), member("c")],
        };
        assert!(matches!(repeated.own_id("a"), Err(JoinError::Repeated(_))));
    }

    #[test]
    fn ledger_products_keep_firms_apart() {
        assert_ne!(
            ledger_product(PRODUCT),
            ledger_product(ProductKey {
                firm: 11,
                code: 1001
            })
        );
    }
}
