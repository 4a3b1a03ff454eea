//! An attack the harness stages with a harness build: this runtime hands the witness receipts of
//! a licence that is not its own, signed with its own receipt key, before the licence's owner
//! sends any, as a licensee's second machine would to claim the licence's chain first.

use std::collections::BTreeMap;
use std::sync::Arc;

use meter_core::rollback::MeteredState;
use serde_json::{Value, json};

use crate::daemon::Runtime;
use crate::os_sources::entropy;
use crate::protocol::{FromServer, ToServer};
use crate::store;

/// Why a claim could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Only a harness build stages attacks.
    #[error("Only a harness build claims witnesses")]
    NotHarnessBuild,
    /// The runtime's receipt key could not be made or kept.
    #[error("No receipt key: {0}")]
    NoReceiptKey(String),
    /// No witness answered.
    #[error("No server is linked")]
    NoServer,
    /// The receipt could not be made.
    #[error("Cannot make a receipt")]
    Receipt(#[source] meter_core::rollback::RollbackError),
}

impl Runtime {
    /// Sends every linked server one receipt of `licence` signed with this runtime's key;
    /// answers what each server said.
    pub async fn claim_witness(self: &Arc<Self>, licence: &str) -> Result<Value, ClaimError> {
        if !crate::harness_build::enabled() {
            return Err(ClaimError::NotHarnessBuild);
        }
        let (changes, _) = self
            .lock_licences()
            .ensure_identity(|| entropy().map_err(|e| e.to_string()))
            .map_err(ClaimError::NoReceiptKey)?;
        if !changes.is_empty() {
            store::wait(self.store.submit(changes))
                .await
                .map_err(|e| ClaimError::NoReceiptKey(e.to_string()))?;
        }
        let signer = self
            .lock_licences()
            .signer()
            .ok_or_else(|| ClaimError::NoReceiptKey("not made".into()))?;
        self.wait_for_a_link().await;
        let now = self.platform.now_ms().unwrap_or(0);
        let mut chain = MeteredState::new(licence, BTreeMap::from([(0, 1)]), now, None);
        let receipt = chain
            .spend(0, 1, now, None, &signer)
            .map_err(ClaimError::Receipt)?;
        let key = signer.verifier().to_bytes();
        let answers = self
            .remotes
            .ask_all(|request| ToServer::WitnessReceipts {
                request,
                licence: licence.to_owned(),
                key,
                receipts: vec![receipt.clone()],
            })
            .await;
        if answers.is_empty() {
            return Err(ClaimError::NoServer);
        }
        let servers: Vec<Value> = answers
            .into_iter()
            .map(|(server, answer)| match answer {
                FromServer::Witnessed { head, refused, .. } => {
                    json!({"server": server, "head": head.seq, "refused": refused})
                }
                other => json!({"server": server, "answer": format!("{other:?}")}),
            })
            .collect();
        tracing::warn!(
            licence,
            "Claimed another machine's witness chain (harness attack)"
        );
        Ok(json!({"licence": licence, "servers": servers}))
    }
}
