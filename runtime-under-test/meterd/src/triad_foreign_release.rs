//! An attack the harness stages with a harness build: a triad member's runtime, modified by its
//! licensee, gives back the seats the other members' apps hold, so that a client can take them
//! while those apps still run (the leader's check that a member forwards only its own apps'
//! seats, in `triad_network`, is what stops it).

use crate::daemon::Runtime;
use crate::triad_network::MEMBER_APPS_SUFFIX;

/// Why the `release-member-seats` attack cannot be staged.
#[derive(Debug, thiserror::Error)]
pub enum ForeignReleaseError {
    /// Only a harness build stages attacks.
    #[error("Only a harness build gives back other members' seats")]
    NotHarnessBuild,
    /// The attack is a triad member's.
    #[error("This runtime is no triad member")]
    NotAMember,
}

impl Runtime {
    /// Stages the `release-member-seats` attack: every seat the other members' apps hold on
    /// this member's copy of the ledger is given back through the leader; what the leader said
    /// to each.
    pub(crate) async fn release_member_seats(
        &self,
    ) -> Result<serde_json::Value, ForeignReleaseError> {
        if !crate::harness_build::enabled() {
            return Err(ForeignReleaseError::NotHarnessBuild);
        }
        let Some(triad) = self.triad().cloned() else {
            return Err(ForeignReleaseError::NotAMember);
        };
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
