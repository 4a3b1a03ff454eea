//! What a triad's leader lets another member forward: the seats of that member's own apps,
//! within the licence the leader holds. A member's runtime is its licensee's to modify, so
//! the leader does not take a forwarded command's word for the licence's quantity or lease.

use std::sync::{Arc, Weak};

use meter_core::seat_ledger::LedgerCommand;
use meter_core::usage_seats::product_of_ledger;

use crate::daemon::Runtime;
use crate::triad::ForwardCheck;

/// How many seats of a ledger product the licence gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatLimit {
    /// No counted licence of the product is installed here.
    Unlicensed,
    /// At most this many seats at once.
    Seats(u32),
    /// Uncounted.
    Unlimited,
}

/// `command` as the leader commits it for another member: a grant asking for more seats than
/// `limit` gives its product is refused (`Err` says why), and every lease is cut to
/// `window_ms`, the leader's own lease window.
pub fn within_licence(
    mut command: LedgerCommand,
    limit: impl Fn(u64) -> SeatLimit,
    window_ms: u64,
) -> Result<LedgerCommand, String> {
    match &mut command {
        LedgerCommand::Grant {
            product,
            quantity,
            lease_ms,
            ..
        } => {
            match limit(*product) {
                SeatLimit::Unlicensed => {
                    return Err(format!("no counted licence of ledger product {product}"));
                }
                SeatLimit::Seats(seats) if *quantity > seats => {
                    return Err(format!(
                        "a seat of ledger product {product} counted as one of {quantity}, where the licence has {seats}"
                    ));
                }
                SeatLimit::Seats(_) | SeatLimit::Unlimited => {}
            }
            *lease_ms = (*lease_ms).min(window_ms);
        }
        LedgerCommand::Renew { lease_ms, .. } | LedgerCommand::Reclaim { lease_ms, .. } => {
            *lease_ms = (*lease_ms).min(window_ms);
        }
        LedgerCommand::Release { .. } | LedgerCommand::MemberMachine { .. } => {}
        LedgerCommand::Grace { .. } | LedgerCommand::Batch(_) => {
            return Err("only the leader writes a grace or a batch".into());
        }
    }
    Ok(command)
}

impl Runtime {
    /// How many seats of ledger product `product` the licences installed here give.
    pub(crate) fn seat_limit(&self, product: u64) -> SeatLimit {
        let state = self.lock();
        let mut limit = SeatLimit::Unlicensed;
        for rules in state.table.rules_of_product(product_of_ledger(product)) {
            if rules.is_local() {
                continue;
            }
            limit = match (limit, rules.capacity()) {
                (SeatLimit::Unlimited, _) | (_, None) => SeatLimit::Unlimited,
                (SeatLimit::Seats(a), Some(b)) => SeatLimit::Seats(a.max(b)),
                (SeatLimit::Unlicensed, Some(b)) => SeatLimit::Seats(b),
            };
        }
        limit
    }
}

/// The check a member's leader applies to what the other members forward, against `runtime`'s
/// licences and a lease window of `window_ms` (none in the weakened build's
/// `triad-forward-check`).
pub(crate) fn forward_check(runtime: Weak<Runtime>, window_ms: u64) -> ForwardCheck {
    Arc::new(move |command| {
        if crate::weakened::is(crate::weakened::Defence::TriadForwardCheck) {
            // Weakened: whatever a member forwards is committed as it came.
            return Ok(command);
        }
        let Some(runtime) = runtime.upgrade() else {
            return Err("the runtime stopped".into());
        };
        within_licence(command, |product| runtime.seat_limit(product), window_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(quantity: u32, lease_ms: u64) -> LedgerCommand {
        LedgerCommand::Grant {
            request: 7,
            product: 42,
            quantity,
            holder: "b/apps".into(),
            lease_ms,
        }
    }

    #[test]
    fn a_grant_within_the_licence_passes_with_its_lease_cut_to_the_window() {
        let checked = within_licence(grant(2, 60_000), |_| SeatLimit::Seats(2), 4_000);
        assert_eq!(checked, Ok(grant(2, 4_000)));
        assert_eq!(
            within_licence(grant(1, 1_000), |_| SeatLimit::Seats(2), 4_000),
            Ok(grant(1, 1_000))
        );
    }

    #[test]
    fn a_grant_beyond_the_licence_is_refused() {
        let refused = within_licence(grant(3, 1_000), |_| SeatLimit::Seats(1), 4_000);
        assert!(
            refused
                .unwrap_err()
                .contains("one of 3, where the licence has 1")
        );
        assert!(within_licence(grant(1, 1_000), |_| SeatLimit::Unlicensed, 4_000).is_err());
        assert!(within_licence(grant(900, 1_000), |_| SeatLimit::Unlimited, 4_000).is_ok());
    }

    #[test]
    fn renewals_and_reclaims_run_no_longer_than_the_window() {
        let renew = LedgerCommand::Renew {
            holder: "b/apps".into(),
            lease_ms: u64::MAX,
        };
        assert_eq!(
            within_licence(renew, |_| SeatLimit::Seats(1), 4_000),
            Ok(LedgerCommand::Renew {
                holder: "b/apps".into(),
                lease_ms: 4_000
            })
        );
        let grace = LedgerCommand::Grace { lease_ms: 1 };
        assert!(within_licence(grace, |_| SeatLimit::Seats(1), 4_000).is_err());
    }
}
