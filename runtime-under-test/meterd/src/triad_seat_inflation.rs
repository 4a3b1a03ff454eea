//! An attack the harness stages with a harness build: a triad member's runtime, modified by its
//! licensee, asks the leader for its own apps' seats as if the licence had more seats than it
//! has (the leader's `triad_forward_check` is what stops it).

use std::sync::atomic::Ordering;

use crate::daemon::Runtime;

/// Why the `inflate-seats` attack cannot be staged.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    /// Only a harness build stages attacks.
    #[error("Only a harness build inflates its seats")]
    NotHarnessBuild,
    /// The attack is a triad member's.
    #[error("This runtime is no triad member")]
    NotAMember,
}

impl Runtime {
    /// Stages the `inflate-seats` attack: from now on this member asks for its apps' triad
    /// seats as if the licence had `quantity`; what it does.
    pub(crate) fn inflate_seats(&self, quantity: u32) -> Result<serde_json::Value, InflateError> {
        if !crate::harness_build::enabled() {
            return Err(InflateError::NotHarnessBuild);
        }
        let Some(triad) = self.triad() else {
            return Err(InflateError::NotAMember);
        };
        self.inflated_seats.store(quantity, Ordering::Relaxed);
        tracing::warn!(
            quantity,
            "Attack staged: this member's apps' seats are asked for inflated"
        );
        Ok(serde_json::json!({
            "inflated": quantity,
            "member": triad.describe(),
        }))
    }

    /// The quantity this member asks the leader for its apps' seats under: the licence's
    /// `licensed`, unless the attack inflated it.
    pub(crate) fn asked_seat_quantity(&self, licensed: u32) -> u32 {
        match self.inflated_seats.load(Ordering::Relaxed) {
            0 => licensed,
            inflated => inflated,
        }
    }
}
