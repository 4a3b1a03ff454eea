//! A lone runtime's seat history, read back from its usage log: when each seat began and
//! ended, as the same events a triad's ledger commits, so that one check reads both.

use std::collections::HashMap;

use crate::allocation::ProductKey;
use crate::policy::Counting;
use crate::seat_ledger::SeatEvent;
use crate::usage::{UsageEvent, UsageKind};

/// The lease number an end names when its grant never began in the log.
pub const NO_SEAT: u64 = 0;

/// What one seat is held for: a station (station-share) or a single grant (user-limit).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SeatKey {
    Station {
        product: ProductKey,
        machine: String,
        session: Option<u32>,
    },
    Grant(u64),
}

/// A seat running: its lease number and the grants holding it.
struct Running {
    lease: u64,
    grants: u32,
}

/// The product number a ledger gives `product` (firm in the high half).
pub fn ledger_product(product: ProductKey) -> u64 {
    (u64::from(product.firm) << 32) | u64::from(product.code)
}

/// The product a ledger's product number stands for (the inverse of [`ledger_product`]).
pub fn product_of_ledger(product: u64) -> ProductKey {
    ProductKey {
        firm: (product >> 32) as u32,
        code: product as u32,
    }
}

/// The seat events `events` (a usage log in order) amount to, each product counted as
/// `counting` says: a station-share station's grants hold one seat, a user-limit grant one
/// each, an uncounted grant none. Seats are numbered from 1 in the order they began; a grant
/// logged twice begins its seat again, and an end whose grant never began ends seat
/// [`NO_SEAT`] (both what a checker reports as not adding up).
pub fn seat_history(
    events: impl IntoIterator<Item = UsageEvent>,
    counting: impl Fn(ProductKey) -> Counting,
) -> Vec<SeatEvent> {
    let mut history = Vec::new();
    let mut grants: HashMap<u64, SeatKey> = HashMap::new();
    let mut seats: HashMap<SeatKey, Running> = HashMap::new();
    let mut next_lease = NO_SEAT;
    for event in events {
        match event.kind {
            UsageKind::Grant => {
                let key = match counting(event.product) {
                    Counting::NoCount => continue,
                    Counting::StationShare => SeatKey::Station {
                        product: event.product,
                        machine: event.machine.clone(),
                        session: event.session,
                    },
                    Counting::UserLimit => SeatKey::Grant(event.handle),
                };
                if let Some(again) = grants.get(&event.handle).and_then(|k| seats.get(k)) {
                    history.push(SeatEvent::Granted {
                        lease: again.lease,
                        product: ledger_product(event.product),
                        holder: event.machine,
                        at_ms: event.at_ms,
                    });
                    continue;
                }
                grants.insert(event.handle, key.clone());
                match seats.get_mut(&key) {
                    Some(running) => running.grants = running.grants.saturating_add(1),
                    None => {
                        next_lease = next_lease.saturating_add(1);
                        seats.insert(
                            key,
                            Running {
                                lease: next_lease,
                                grants: 1,
                            },
                        );
                        history.push(SeatEvent::Granted {
                            lease: next_lease,
                            product: ledger_product(event.product),
                            holder: event.machine,
                            at_ms: event.at_ms,
                        });
                    }
                }
            }
            UsageKind::Denial { .. } => {}
            UsageKind::Release | UsageKind::Revocation { .. } | UsageKind::Reclaim => {
                let lease = match grants.remove(&event.handle) {
                    Some(key) => match seats.get_mut(&key) {
                        Some(running) if running.grants > 1 => {
                            running.grants -= 1;
                            continue;
                        }
                        Some(_) => seats.remove(&key).map_or(NO_SEAT, |r| r.lease),
                        None => NO_SEAT,
                    },
                    // An uncounted grant's end, or one whose grant the log never had.
                    None if counting(event.product) == Counting::NoCount => continue,
                    None => NO_SEAT,
                };
                history.push(match event.kind {
                    UsageKind::Reclaim => SeatEvent::Expired {
                        lease,
                        at_ms: event.at_ms,
                    },
                    _ => SeatEvent::Released {
                        lease,
                        at_ms: event.at_ms,
                    },
                });
            }
        }
    }
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAD: ProductKey = ProductKey { firm: 10, code: 1 };
    const CAM: ProductKey = ProductKey { firm: 10, code: 2 };

    #[test]
    fn a_ledger_product_number_gives_its_product_back() {
        let product = ProductKey {
            firm: u32::MAX,
            code: 7,
        };
        assert_eq!(product_of_ledger(ledger_product(product)), product);
        assert_eq!(product_of_ledger(ledger_product(CAD)), CAD);
    }

    fn event(kind: UsageKind, product: ProductKey, handle: u64, machine: &str) -> UsageEvent {
        UsageEvent {
            at_ms: handle * 10,
            kind,
            product,
            handle,
            user: None,
            machine: machine.into(),
            session: None,
            client_name: None,
            address: None,
            in_use: 0,
            held_ms: None,
        }
    }

    fn counting(product: ProductKey) -> Counting {
        if product == CAD {
            Counting::StationShare
        } else {
            Counting::UserLimit
        }
    }

    fn leases(history: &[SeatEvent]) -> Vec<(char, u64)> {
        history
            .iter()
            .map(|e| match e {
                SeatEvent::Granted { lease, .. } => ('+', *lease),
                SeatEvent::Released { lease, .. } => ('-', *lease),
                SeatEvent::Expired { lease, .. } => ('x', *lease),
            })
            .collect()
    }

    #[test]
    fn a_stations_grants_share_a_seat_and_a_user_limit_grant_takes_its_own() {
        use UsageKind::*;
        let log = vec![
            event(Grant, CAD, 1, "vm1"),
            event(Grant, CAD, 2, "vm1"),
            event(Grant, CAM, 3, "vm1"),
            event(Grant, CAM, 4, "vm1"),
            event(Release, CAD, 1, "vm1"),
            event(Reclaim, CAM, 3, "vm1"),
            event(Release, CAD, 2, "vm1"),
        ];
        let history = seat_history(log, counting);
        assert_eq!(
            leases(&history),
            [('+', 1), ('+', 2), ('+', 3), ('x', 2), ('-', 1)]
        );
        assert!(matches!(
            &history[0],
            SeatEvent::Granted { product, holder, .. }
                if *product == (10u64 << 32 | 1) && holder == "vm1"
        ));
    }

    #[test]
    fn what_does_not_add_up_shows_as_a_seat_begun_twice_or_one_that_never_began() {
        use UsageKind::*;
        let log = vec![
            event(Grant, CAM, 1, "vm1"),
            event(Grant, CAM, 1, "vm1"),
            event(Release, CAM, 7, "vm2"),
            event(
                Denial {
                    reason: crate::reason::Reason::QuantityExhausted,
                    rule: None,
                },
                CAM,
                0,
                "vm3",
            ),
        ];
        assert_eq!(
            leases(&seat_history(log, counting)),
            [('+', 1), ('+', 1), ('-', NO_SEAT)]
        );
    }

    #[test]
    fn uncounted_grants_hold_no_seat() {
        use UsageKind::*;
        let log = vec![event(Grant, CAM, 1, "vm1"), event(Release, CAM, 1, "vm1")];
        assert!(seat_history(log, |_| Counting::NoCount).is_empty());
    }
}
