//! Dongles as rollback witnesses: each open dongle keeps one receipt-chain head for this
//! runtime (every metered licence's chain folded into one), so a state folder restored behind
//! its back shows fewer receipts than the dongle saw. A dongle keeps heads, not receipts: it
//! can tell a restore but not reconcile one.

use dongle::{Denial, Request, Response, RuntimeId, WitnessHead};

use crate::dongles::Dongles;

/// The first head an open dongle keeps for `runtime` that `local` does not lead to: the
/// dongle saw more receipts, or other ones (the state was restored or copied). `None` when
/// every open dongle agrees, is behind (it missed spends while away), or keeps nothing.
pub async fn find_fork(
    dongles: &Dongles,
    runtime: &RuntimeId,
    local: WitnessHead,
) -> Option<(String, WitnessHead)> {
    for (serial, link) in dongles.open_links() {
        let request = Request::WitnessGet {
            runtime: runtime.clone(),
        };
        match link.call(&request).await {
            Ok(Response::Witness(Some(stored))) if forks(local, stored) => {
                return Some((serial, stored));
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(serial, %error, "Dongle witness not asked"),
        }
    }
    None
}

/// Hands `head` to every open dongle; the first one that refuses it, with the head it keeps
/// (longer or different: the state was restored or copied).
pub async fn store(dongles: &Dongles, head: WitnessHead) -> Option<(String, WitnessHead)> {
    let mut conflict = None;
    for (serial, link) in dongles.open_links() {
        match link.call(&Request::WitnessStore { head }).await {
            Ok(Response::WitnessStored) => {}
            Ok(Response::Denied(Denial::WitnessConflict { stored })) => {
                conflict.get_or_insert((serial, stored));
            }
            Ok(other) => tracing::warn!(serial, ?other, "Unexpected answer to WitnessStore"),
            Err(error) => tracing::debug!(serial, %error, "Dongle witness not told"),
        }
    }
    conflict
}

/// True when a dongle's `stored` head is not on the way to `local`: more receipts, or as many
/// and another hash.
fn forks(local: WitnessHead, stored: WitnessHead) -> bool {
    stored.sequence > local.sequence || (stored.sequence == local.sequence && stored != local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(sequence: u64, byte: u8) -> WitnessHead {
        WitnessHead {
            sequence,
            head: [byte; 32],
        }
    }

    #[test]
    fn a_dongle_that_saw_more_or_other_receipts_forks() {
        assert!(forks(head(3, 1), head(5, 2)));
        assert!(forks(head(3, 1), head(3, 2)));
        assert!(!forks(head(3, 1), head(3, 1)));
        // Behind: the dongle was away for some spends; it is caught up, not a fork.
        assert!(!forks(head(5, 1), head(3, 2)));
    }
}
