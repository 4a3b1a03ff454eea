//! The attacks the harness stages with a harness build on a triad member's runtime, as its
//! licensee would modify it: asking the leader for its own apps' seats as if the licence had
//! more (`inflate-seats`; the leader's `triad_forward_check` stops it), and giving back the
//! seats the other members' apps hold, so that a client can take them while those apps still
//! run (`release-member-seats`; the leader's check that a member forwards only its own apps'
//! seats, in `triad_network`, stops it).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::daemon::Runtime;
use crate::triad_network::MEMBER_APPS_SUFFIX;
use crate::triad_server::TriadSeats;

/// Why an attack on a triad member's runtime cannot be staged.
#[derive(Debug, thiserror::Error)]
pub enum MemberAttackError {
    /// Only a harness build stages attacks.
    #[error("Only a harness build stages the {0} attack")]
    NotHarnessBuild(&'static str),
    /// The attack is a triad member's.
    #[error("This runtime is no triad member")]
    NotAMember,
}

impl Runtime {
    /// The triad this runtime is a member of, to stage `attack` on; why it cannot otherwise.
    fn attacking_member(
        &self,
        attack: &'static str,
    ) -> Result<&Arc<TriadSeats>, MemberAttackError> {
        if !crate::harness_build::enabled() {
            return Err(MemberAttackError::NotHarnessBuild(attack));
        }
        self.triad().ok_or(MemberAttackError::NotAMember)
    }

    /// Stages the `inflate-seats` attack: from now on this member asks for its apps' triad
    /// seats as if the licence had `quantity`; what it does.
    pub(crate) fn inflate_seats(
        &self,
        quantity: u32,
    ) -> Result<serde_json::Value, MemberAttackError> {
        let triad = self.attacking_member("inflate-seats")?;
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

    /// Stages the `release-member-seats` attack: every seat the other members' apps hold on
    /// this member's copy of the ledger is given back through the leader; what the leader said
    /// to each.
    pub(crate) async fn release_member_seats(
        &self,
    ) -> Result<serde_json::Value, MemberAttackError> {
        let triad = Arc::clone(self.attacking_member("release-member-seats")?);
        let mut answers = Vec::new();
        for (lease, holder) in triad.lease_holders().await {
            if !holder.ends_with(MEMBER_APPS_SUFFIX) || holder == triad.apps_holder() {
                continue;
            }
            let answer = match triad.release(lease, &holder).await {
                Ok(outcome) => serde_json::json!({"committed": format!("{outcome:?}")}),
                Err(e) => serde_json::json!({"refused": e.to_string()}),
            };
            tracing::warn!(lease, holder, %answer, "Attack: another member's apps' seat given back");
            answers.push(serde_json::json!({"lease": lease, "holder": holder, "answer": answer}));
        }
        Ok(serde_json::json!({
            "releases": answers,
            "member": triad.describe(),
        }))
    }
}
