//! The seats of network licences as the members of a server triad replicate them: a
//! deterministic state machine over the committed entries of their log.
//!
//! Every entry carries the time its leader gave it; the ledger never reads a clock of its own,
//! so every member that applies the same entries holds the same seats. Times only go forwards: an
//! entry stamped earlier than one applied before counts at the later time (a new leader whose
//! clock runs behind cannot bring an ended lease back). A lease ends at its `until_ms`; a grant
//! finds the seats of the leases still running at its time, so a quantity is never exceeded
//! across the triad, whichever member leads. Grants carry the asker's request id: a grant asked
//! again after a failover (its answer lost with the old leader) gets the lease it already has,
//! not a second seat.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a triad's log records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerCommand {
    /// One seat of `product` (of `quantity` across the triad) for `holder`, for `lease_ms`.
    Grant {
        /// The asker's id for this request (the same on a retry).
        request: u64,
        /// Product: its firm in the high 32 bits, its code in the low.
        product: u64,
        /// Seats the licence has across the triad.
        quantity: u32,
        /// Who holds it: a station's runtime identity.
        holder: String,
        /// How long the lease runs without a renewal.
        lease_ms: u64,
    },
    /// Every lease of `holder` runs `lease_ms` from now.
    Renew {
        /// Whose leases.
        holder: String,
        /// How long they run now.
        lease_ms: u64,
    },
    /// A new leader took over: every lease still running runs at least `lease_ms` from now,
    /// so none runs out for want of the renewals no leader could take meanwhile. Unlike other
    /// commands it expires nothing first.
    Grace {
        /// The grace: one lease window.
        lease_ms: u64,
    },
    /// A holder names the requests whose seats it still holds (at a keepalive, after a
    /// release, or linked again to a new leader): their leases run `lease_ms` from now, and
    /// its other leases end (it gave them back), but only those last taken by an entry the
    /// asker had seen applied when it listed its seats.
    Reclaim {
        /// Whose leases.
        holder: String,
        /// The requests of the seats it still holds.
        requests: Vec<u64>,
        /// How long they run now.
        lease_ms: u64,
        /// The [`SeatLedger::applied`] position the asker read before it listed its seats: a
        /// seat taken by a later entry (a grant the list could not know) is not ended.
        /// `None`: every seat not named ends.
        #[serde(default)]
        as_of: Option<u64>,
    },
    /// A lease ends now (its holder gave it back).
    Release {
        /// The lease.
        lease: u64,
        /// Who asks (only the holder may).
        holder: String,
    },
    /// Several commands committed as one entry, applied one after the other at its time
    /// (each as if it were an entry of its own).
    Batch(Vec<LedgerCommand>),
    /// A member says what machine it runs on (every member learns which members are virtual
    /// machines, whose quorum one host's failure may take).
    MemberMachine {
        /// The member's number.
        member: u64,
        /// Whether its machine is a virtual machine.
        guest: bool,
    },
}

/// A command with the time its leader stamped it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Milliseconds since the epoch on the leader's clock.
    pub at_ms: u64,
    /// What to do.
    pub command: LedgerCommand,
}

/// What applying an entry answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerOutcome {
    /// A seat: lease id and when it ends unless renewed.
    Granted {
        /// The lease.
        lease: u64,
        /// When it ends.
        until_ms: u64,
    },
    /// Every seat of the product is held.
    NoSeat {
        /// Seats held when asked.
        in_use: u32,
    },
    /// How many leases of the holder were renewed.
    Renewed {
        /// Leases renewed.
        leases: u32,
    },
    /// The leases a reclaim kept: `(request, lease)` for each request still held.
    Reclaimed {
        /// Requests and their leases.
        kept: Vec<(u64, u64)>,
    },
    /// The lease ended.
    Released,
    /// No running lease of that holder has that id.
    UnknownLease,
    /// Not a command (a membership change or an empty entry).
    Nothing,
    /// The answers to a batch's commands, in its order.
    Batch(Vec<LedgerOutcome>),
}

/// One seat held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Product (firm and code).
    pub product: u64,
    /// Holder's identity.
    pub holder: String,
    /// The holder's request that took it.
    pub request: u64,
    /// When it started.
    pub since_ms: u64,
    /// When it ends unless renewed.
    pub until_ms: u64,
    /// The log position ([`SeatLedger::applied`]) of the entry that last took it.
    #[serde(default)]
    pub taken_at: u64,
}

/// Something that happened to a seat, as the triad committed it (for a run's history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeatEvent {
    /// A lease began.
    Granted {
        /// The lease.
        lease: u64,
        /// Product (firm and code).
        product: u64,
        /// Holder.
        holder: String,
        /// When.
        at_ms: u64,
    },
    /// A lease ended by its holder.
    Released {
        /// The lease.
        lease: u64,
        /// When.
        at_ms: u64,
    },
    /// A lease ran out.
    Expired {
        /// The lease.
        lease: u64,
        /// When it ended.
        at_ms: u64,
    },
}

/// The replicated seats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatLedger {
    /// Running leases by id.
    leases: BTreeMap<u64, Lease>,
    /// The next lease id.
    next_lease: u64,
    /// The latest entry time applied.
    now_ms: u64,
    /// The log position of the last entry applied.
    #[serde(default)]
    applied: u64,
    /// Whether each member that said so runs in a virtual machine.
    #[serde(default)]
    member_guests: BTreeMap<u64, bool>,
}

impl SeatLedger {
    /// An empty ledger.
    pub fn new() -> SeatLedger {
        SeatLedger::default()
    }

    /// Applies one committed entry; returns its answer and what happened to seats.
    pub fn apply(&mut self, entry: &LedgerEntry) -> (LedgerOutcome, Vec<SeatEvent>) {
        self.apply_at(self.applied.saturating_add(1), entry)
    }

    /// Applies the entry at `position` of the log (its index: the same on every member,
    /// whatever snapshot it started from); returns its answer and what happened to seats.
    pub fn apply_at(
        &mut self,
        position: u64,
        entry: &LedgerEntry,
    ) -> (LedgerOutcome, Vec<SeatEvent>) {
        self.now_ms = self.now_ms.max(entry.at_ms);
        self.applied = self.applied.max(position);
        let now = self.now_ms;
        self.apply_command(now, &entry.command)
    }

    /// The log position of the last entry this ledger applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Applies one command at `now`.
    fn apply_command(
        &mut self,
        now: u64,
        command: &LedgerCommand,
    ) -> (LedgerOutcome, Vec<SeatEvent>) {
        let mut events = match command {
            // Leases that ran out while no leader served are what the grace is for; a batch's
            // commands expire what they would as entries of their own.
            LedgerCommand::Grace { .. } | LedgerCommand::Batch(_) => Vec::new(),
            _ => self.expire(now),
        };
        let outcome = match command {
            LedgerCommand::Grant {
                request,
                product,
                quantity,
                holder,
                lease_ms,
            } => {
                // A retry (or a re-claim) of a seat still held is that seat.
                let applied = self.applied;
                if let Some((lease, held)) = self
                    .leases
                    .iter_mut()
                    .find(|(_, l)| &l.holder == holder && l.request == *request)
                {
                    held.taken_at = applied;
                    let outcome = LedgerOutcome::Granted {
                        lease: *lease,
                        until_ms: held.until_ms,
                    };
                    return (outcome, events);
                }
                let in_use = self.in_use(*product);
                if in_use >= *quantity {
                    LedgerOutcome::NoSeat { in_use }
                } else {
                    let lease = self.next_lease;
                    self.next_lease += 1;
                    let until_ms = now.saturating_add(*lease_ms);
                    self.leases.insert(
                        lease,
                        Lease {
                            product: *product,
                            holder: holder.clone(),
                            request: *request,
                            since_ms: now,
                            until_ms,
                            taken_at: self.applied,
                        },
                    );
                    events.push(SeatEvent::Granted {
                        lease,
                        product: *product,
                        holder: holder.clone(),
                        at_ms: now,
                    });
                    LedgerOutcome::Granted { lease, until_ms }
                }
            }
            LedgerCommand::Reclaim {
                holder,
                requests,
                lease_ms,
                as_of,
            } => {
                let until_ms = now.saturating_add(*lease_ms);
                let mut kept = Vec::new();
                let mut given_back = Vec::new();
                for (id, lease) in self.leases.iter_mut().filter(|(_, l)| &l.holder == holder) {
                    if requests.contains(&lease.request) {
                        lease.until_ms = lease.until_ms.max(until_ms);
                        kept.push((lease.request, *id));
                    } else if as_of.is_none_or(|seen| lease.taken_at <= seen) {
                        given_back.push(*id);
                    }
                }
                for lease in given_back {
                    self.leases.remove(&lease);
                    events.push(SeatEvent::Released { lease, at_ms: now });
                }
                LedgerOutcome::Reclaimed { kept }
            }
            LedgerCommand::Renew { holder, lease_ms } => {
                let until_ms = now.saturating_add(*lease_ms);
                let mut leases = 0;
                for lease in self.leases.values_mut().filter(|l| &l.holder == holder) {
                    lease.until_ms = lease.until_ms.max(until_ms);
                    leases += 1;
                }
                LedgerOutcome::Renewed { leases }
            }
            LedgerCommand::Grace { lease_ms } => {
                let until_ms = now.saturating_add(*lease_ms);
                for lease in self.leases.values_mut() {
                    lease.until_ms = lease.until_ms.max(until_ms);
                }
                LedgerOutcome::Renewed {
                    leases: u32::try_from(self.leases.len()).unwrap_or(u32::MAX),
                }
            }
            LedgerCommand::Release { lease, holder } => match self.leases.get(lease) {
                Some(held) if &held.holder == holder => {
                    self.leases.remove(lease);
                    events.push(SeatEvent::Released {
                        lease: *lease,
                        at_ms: now,
                    });
                    LedgerOutcome::Released
                }
                _ => LedgerOutcome::UnknownLease,
            },
            LedgerCommand::MemberMachine { member, guest } => {
                self.member_guests.insert(*member, *guest);
                LedgerOutcome::Nothing
            }
            LedgerCommand::Batch(commands) => LedgerOutcome::Batch(
                commands
                    .iter()
                    .map(|command| {
                        let (outcome, happened) = self.apply_command(now, command);
                        events.extend(happened);
                        outcome
                    })
                    .collect(),
            ),
        };
        (outcome, events)
    }

    /// Applies an entry that is not a command (it only moves time on).
    pub fn tick(&mut self, at_ms: u64) -> Vec<SeatEvent> {
        self.now_ms = self.now_ms.max(at_ms);
        self.expire(self.now_ms)
    }

    /// Seats of `product` held now.
    pub fn in_use(&self, product: u64) -> u32 {
        let held = self
            .leases
            .values()
            .filter(|l| l.product == product)
            .count();
        u32::try_from(held).unwrap_or(u32::MAX)
    }

    /// The running leases.
    pub fn leases(&self) -> &BTreeMap<u64, Lease> {
        &self.leases
    }

    /// The members that said they run in a virtual machine, by number.
    pub fn members_in_guests(&self) -> Vec<u64> {
        self.member_guests
            .iter()
            .filter(|(_, guest)| **guest)
            .map(|(member, _)| *member)
            .collect()
    }

    /// The latest time the ledger has seen.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn expire(&mut self, now: u64) -> Vec<SeatEvent> {
        let ended: Vec<(u64, u64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.until_ms <= now)
            .map(|(id, l)| (*id, l.until_ms))
            .collect();
        ended
            .into_iter()
            .map(|(lease, at_ms)| {
                self.leases.remove(&lease);
                SeatEvent::Expired { lease, at_ms }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(at_ms: u64, request: u64, holder: &str) -> LedgerEntry {
        LedgerEntry {
            at_ms,
            command: LedgerCommand::Grant {
                request,
                product: 1001,
                quantity: 2,
                holder: holder.into(),
                lease_ms: 1_000,
            },
        }
    }

    #[test]
    fn a_quantity_is_never_exceeded_and_ended_leases_free_their_seat() {
        let mut ledger = SeatLedger::new();
        assert!(matches!(
            ledger.apply(&grant(0, 1, "a")).0,
            LedgerOutcome::Granted { .. }
        ));
        assert!(matches!(
            ledger.apply(&grant(10, 1, "b")).0,
            LedgerOutcome::Granted { .. }
        ));
        assert_eq!(
            ledger.apply(&grant(20, 1, "c")).0,
            LedgerOutcome::NoSeat { in_use: 2 }
        );
        // a's lease ran out at 1000: its seat is free at 1001.
        let (outcome, events) = ledger.apply(&grant(1_001, 2, "c"));
        assert!(matches!(outcome, LedgerOutcome::Granted { .. }));
        assert_eq!(
            events[0],
            SeatEvent::Expired {
                lease: 0,
                at_ms: 1_000
            }
        );
    }

    #[test]
    fn a_batch_answers_each_command_as_entries_of_their_own_would() {
        let mut batched = SeatLedger::new();
        let mut single = SeatLedger::new();
        batched.apply(&grant(0, 1, "a"));
        single.apply(&grant(0, 1, "a"));
        // At 1 200 a's lease has run out (at 1 000): a grace first keeps it, as it would alone.
        let commands = vec![
            LedgerCommand::Grace { lease_ms: 1_000 },
            grant(1_200, 1, "b").command,
            grant(1_200, 1, "c").command,
            grant(1_200, 2, "d").command,
        ];
        let (outcome, events) = batched.apply(&LedgerEntry {
            at_ms: 1_200,
            command: LedgerCommand::Batch(commands.clone()),
        });
        let mut answers = Vec::new();
        let mut happened = Vec::new();
        for command in commands {
            let (answer, events) = single.apply(&LedgerEntry {
                at_ms: 1_200,
                command,
            });
            answers.push(answer);
            happened.extend(events);
        }
        assert_eq!(outcome, LedgerOutcome::Batch(answers.clone()));
        assert_eq!(events, happened);
        let seat = |l: &Lease| (l.product, l.holder.clone(), l.request, l.until_ms);
        assert!(
            batched
                .leases()
                .values()
                .map(seat)
                .eq(single.leases().values().map(seat))
        );
        assert_eq!(answers[3], LedgerOutcome::NoSeat { in_use: 2 });
    }

    #[test]
    fn members_tell_which_of_them_run_in_guests() {
        let mut ledger = SeatLedger::new();
        ledger.apply(&grant(0, 1, "a"));
        let said = |member, guest| LedgerEntry {
            at_ms: 10,
            command: LedgerCommand::MemberMachine { member, guest },
        };
        assert_eq!(ledger.apply(&said(3, true)).0, LedgerOutcome::Nothing);
        ledger.apply(&said(1, true));
        ledger.apply(&said(2, false));
        assert_eq!(ledger.members_in_guests(), vec![1, 3]);
        // Moved to a physical machine and restarted, a member says so again.
        ledger.apply(&said(3, false));
        assert_eq!(ledger.members_in_guests(), vec![1]);
        assert_eq!(ledger.in_use(1001), 1, "seats untouched");
    }

    #[test]
    fn a_new_leaders_grace_keeps_leases_that_ran_out_while_none_led() {
        let mut ledger = SeatLedger::new();
        ledger.apply(&grant(0, 1, "a"));
        ledger.apply(&grant(500, 1, "b"));
        // No leader from 600 to 1200: a's lease (to 1000) could not be renewed. The new leader's
        // grace comes first, and expires nothing.
        let grace = LedgerEntry {
            at_ms: 1_200,
            command: LedgerCommand::Grace { lease_ms: 1_000 },
        };
        let (outcome, events) = ledger.apply(&grace);
        assert_eq!(outcome, LedgerOutcome::Renewed { leases: 2 });
        assert!(events.is_empty());
        assert!(ledger.leases().values().all(|l| l.until_ms == 2_200));
        assert_eq!(
            ledger.apply(&grant(1_300, 1, "c")).0,
            LedgerOutcome::NoSeat { in_use: 2 }
        );
        // Without a renewal they end a window after the grace.
        assert!(matches!(
            ledger.apply(&grant(2_200, 2, "c")).0,
            LedgerOutcome::Granted { .. }
        ));
    }

    #[test]
    fn a_retried_grant_gets_its_first_answer_not_a_second_seat() {
        let mut ledger = SeatLedger::new();
        let first = ledger.apply(&grant(0, 7, "a")).0;
        let again = ledger.apply(&grant(5, 7, "a")).0;
        assert_eq!(first, again);
        assert_eq!(ledger.in_use(1001), 1);
    }

    #[test]
    fn time_never_goes_back_so_a_late_leader_cannot_revive_a_lease() {
        let mut ledger = SeatLedger::new();
        ledger.apply(&grant(0, 1, "a"));
        ledger.tick(2_000);
        assert_eq!(ledger.in_use(1001), 0);
        // A leader whose clock is behind stamps an earlier time: the ledger stays at 2000.
        let renew = LedgerEntry {
            at_ms: 500,
            command: LedgerCommand::Renew {
                holder: "a".into(),
                lease_ms: 1_000,
            },
        };
        assert_eq!(ledger.apply(&renew).0, LedgerOutcome::Renewed { leases: 0 });
        assert_eq!(ledger.now_ms(), 2_000);
    }

    #[test]
    fn only_the_holder_releases_its_lease() {
        let mut ledger = SeatLedger::new();
        let LedgerOutcome::Granted { lease, .. } = ledger.apply(&grant(0, 1, "a")).0 else {
            panic!("granted");
        };
        let by = |holder: &str| LedgerEntry {
            at_ms: 1,
            command: LedgerCommand::Release {
                lease,
                holder: holder.into(),
            },
        };
        assert_eq!(ledger.apply(&by("b")).0, LedgerOutcome::UnknownLease);
        assert_eq!(ledger.apply(&by("a")).0, LedgerOutcome::Released);
        assert_eq!(ledger.in_use(1001), 0);
    }

    #[test]
    fn renewals_keep_a_lease_past_its_first_end() {
        let mut ledger = SeatLedger::new();
        ledger.apply(&grant(0, 1, "a"));
        let renew = LedgerEntry {
            at_ms: 900,
            command: LedgerCommand::Renew {
                holder: "a".into(),
                lease_ms: 1_000,
            },
        };
        assert_eq!(ledger.apply(&renew).0, LedgerOutcome::Renewed { leases: 1 });
        ledger.tick(1_500);
        assert_eq!(ledger.in_use(1001), 1);
        ledger.tick(1_900);
        assert_eq!(ledger.in_use(1001), 0);
    }

    #[test]
    fn a_grant_asked_again_after_its_lease_ended_is_a_new_seat() {
        let mut ledger = SeatLedger::new();
        let LedgerOutcome::Granted { lease: first, .. } = ledger.apply(&grant(0, 7, "a")).0 else {
            panic!("granted");
        };
        let LedgerOutcome::Granted { lease: again, .. } = ledger.apply(&grant(1_500, 7, "a")).0
        else {
            panic!("granted");
        };
        assert_ne!(first, again);
        assert_eq!(ledger.in_use(1001), 1);
    }

    #[test]
    fn a_reclaim_keeps_the_seats_named_and_ends_the_others() {
        let mut ledger = SeatLedger::new();
        let LedgerOutcome::Granted { lease: kept, .. } = ledger.apply(&grant(0, 1, "a")).0 else {
            panic!("granted");
        };
        ledger.apply(&grant(1, 2, "a"));
        ledger.apply(&grant(2, 9, "b"));
        let reclaim = LedgerEntry {
            at_ms: 900,
            command: LedgerCommand::Reclaim {
                holder: "a".into(),
                requests: vec![1, 5],
                lease_ms: 1_000,
                as_of: None,
            },
        };
        let (outcome, events) = ledger.apply(&reclaim);
        assert_eq!(
            outcome,
            LedgerOutcome::Reclaimed {
                kept: vec![(1, kept)]
            }
        );
        assert_eq!(
            events,
            vec![SeatEvent::Released {
                lease: 1,
                at_ms: 900
            }]
        );
        assert_eq!(ledger.leases()[&kept].until_ms, 1_900);
        // b's lease was not touched: it ends at 1002.
        ledger.tick(1_500);
        assert_eq!(ledger.in_use(1001), 1);
    }

    #[test]
    fn a_reclaim_spares_the_seats_taken_after_its_asker_listed_them() {
        let mut ledger = SeatLedger::new();
        ledger.apply(&grant(0, 1, "a"));
        ledger.apply(&grant(1, 2, "a"));
        // The asker lists a's seats (none: both grants ended on its side) ...
        let listed = ledger.applied();
        // ... while a grant of seat 2 takes it again.
        ledger.apply(&grant(3, 2, "a"));
        let reclaim = |as_of| LedgerEntry {
            at_ms: 10,
            command: LedgerCommand::Reclaim {
                holder: "a".into(),
                requests: vec![],
                lease_ms: 1_000,
                as_of,
            },
        };
        let (_, events) = ledger.apply(&reclaim(Some(listed)));
        assert_eq!(
            events,
            vec![SeatEvent::Released {
                lease: 0,
                at_ms: 10
            }]
        );
        assert_eq!(ledger.in_use(1001), 1);
        // A seat taken anew after the list is spared too; listed after it, it ends.
        ledger.apply(&grant(4, 3, "a"));
        let (_, events) = ledger.apply(&reclaim(Some(listed)));
        assert!(events.is_empty());
        let (_, events) = ledger.apply(&reclaim(Some(ledger.applied())));
        assert_eq!(events.len(), 2);
        assert_eq!(ledger.in_use(1001), 0);
    }

    #[test]
    fn positions_are_the_logs_whatever_the_ledger_started_from() {
        // Two members, one rebuilt from a snapshot taken at position 7: the same entries at the
        // same log positions take their seats at the same positions.
        let renew = LedgerEntry {
            at_ms: 0,
            command: LedgerCommand::Renew {
                holder: "x".into(),
                lease_ms: 1,
            },
        };
        let mut fresh = SeatLedger::new();
        let mut restored = SeatLedger::new();
        for position in 1..=7 {
            fresh.apply_at(position, &renew);
        }
        restored.apply_at(7, &renew);
        for ledger in [&mut fresh, &mut restored] {
            ledger.apply_at(9, &grant(1, 100, "a"));
            assert_eq!(ledger.applied(), 9);
        }
        let taken = |l: &SeatLedger| {
            l.leases()
                .values()
                .find(|lease| lease.holder == "a")
                .map(|lease| lease.taken_at)
        };
        assert_eq!(taken(&fresh), Some(9));
        assert_eq!(taken(&fresh), taken(&restored));
    }

    #[test]
    fn a_ledger_survives_a_json_snapshot() {
        let mut ledger = SeatLedger::new();
        ledger.apply(&grant(0, 1, "a"));
        ledger.apply(&grant(1, 2, "b"));
        let text = serde_json::to_string(&ledger).unwrap();
        let back: SeatLedger = serde_json::from_str(&text).unwrap();
        assert_eq!(back, ledger);
    }
}
