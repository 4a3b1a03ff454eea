//! Witnessing receipt chains: a network server keeps the chains of its client runtimes' metered
//! licences, and a client reconciles with it after a rollback.

use std::collections::BTreeMap;

use meter_core::rollback::{ChainHead, Receipt, ReceiptVerifier, WitnessLog, genesis};
use serde::{Deserialize, Serialize};

use crate::store::Change;

/// Metadata key prefix of a witnessed chain (JSON).
const WITNESS_KEY_PREFIX: &str = "witness/";

/// Receipts sent to a witness in one frame at most (frames are limited to 64 KiB).
pub(crate) const RECEIPTS_PER_FRAME: usize = 64;

/// Most chains one client runtime may have witnessed.
pub const MAX_CHAINS_PER_RUNTIME: usize = 64;

/// One witnessed chain, the key its receipts must be signed with (the first key seen) and the
/// client runtime it is witnessed for (the first to send receipts; chains kept before runtimes
/// were recorded are bound to the next one).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Witnessed {
    key: String,
    #[serde(default)]
    runtime: Option<String>,
    log: WitnessLog,
}

/// Whose chains a witness keeps apart, and how many it keeps for one runtime.
#[derive(Debug, Clone, Copy)]
pub struct WitnessRules {
    /// Answer and extend a chain only for the runtime it is witnessed for.
    pub bind_to_runtime: bool,
    /// Keep at most [`MAX_CHAINS_PER_RUNTIME`] chains per runtime.
    pub limit_chains: bool,
}

/// Chains this runtime witnesses, by licence id.
#[derive(Debug, Default)]
pub struct WitnessStore {
    chains: BTreeMap<String, Witnessed>,
}

impl WitnessStore {
    /// Witnessed chains as the store holds them.
    pub fn load(meta: &BTreeMap<String, Vec<u8>>) -> Self {
        let chains = meta
            .iter()
            .filter_map(|(key, bytes)| {
                let id = key.strip_prefix(WITNESS_KEY_PREFIX)?;
                match serde_json::from_slice(bytes) {
                    Ok(chain) => Some((id.to_owned(), chain)),
                    Err(e) => {
                        tracing::error!(licence = id, error = %e, "Unreadable witnessed chain");
                        None
                    }
                }
            })
            .collect();
        WitnessStore { chains }
    }

    /// Appends receipts to a licence's chain. Answers the head, and why a receipt was refused
    /// (a fork, a gap, another key), with the change to store when something was added.
    pub fn accept(
        &mut self,
        licence: &str,
        runtime: &str,
        key: [u8; 32],
        receipts: &[Receipt],
        rules: WitnessRules,
    ) -> (ChainHead, Option<String>, Option<Change>) {
        let verifier = match ReceiptVerifier::from_bytes(&key) {
            Ok(verifier) => verifier,
            Err(e) => {
                let head = self.head(licence);
                return (head, Some(e.to_string()), None);
            }
        };
        if !self.chains.contains_key(licence)
            && rules.limit_chains
            && self
                .chains
                .values()
                .filter(|c| c.runtime.as_deref() == Some(runtime))
                .count()
                >= MAX_CHAINS_PER_RUNTIME
        {
            return (
                WitnessLog::new(licence).head(),
                Some(format!(
                    "this runtime has {MAX_CHAINS_PER_RUNTIME} witnessed chains already"
                )),
                None,
            );
        }
        let chain = self
            .chains
            .entry(licence.to_owned())
            .or_insert_with(|| Witnessed {
                key: hex::encode(key),
                runtime: None,
                log: WitnessLog::new(licence),
            });
        let mut newly_bound = false;
        if rules.bind_to_runtime {
            match &chain.runtime {
                Some(bound) if bound != runtime => {
                    return (
                        WitnessLog::new(licence).head(),
                        Some("the licence is witnessed for another runtime".into()),
                        None,
                    );
                }
                Some(_) => {}
                None => {
                    chain.runtime = Some(runtime.to_owned());
                    newly_bound = true;
                }
            }
        }
        if chain.key != hex::encode(key) {
            return (
                chain.log.head(),
                Some("receipts signed by another runtime key".into()),
                None,
            );
        }
        let before = chain.log.head();
        let mut refused = None;
        for receipt in receipts {
            if let Err(e) = chain.log.accept(receipt, &verifier) {
                refused = Some(e.to_string());
                break;
            }
        }
        let head = chain.log.head();
        let change = (head != before || newly_bound).then(|| {
            Change::PutMeta(
                format!("{WITNESS_KEY_PREFIX}{licence}"),
                serde_json::to_vec(chain).expect("witnessed chains always encode"),
            )
        });
        (head, refused, change)
    }

    /// The witnessed chain of a licence, if any receipt of it was seen from `runtime` (with
    /// `bind_to_runtime` off: from any runtime).
    pub fn log(&self, licence: &str, runtime: &str, rules: WitnessRules) -> Option<WitnessLog> {
        self.chains
            .get(licence)
            .filter(|c| !rules.bind_to_runtime || c.runtime.as_deref().is_none_or(|r| r == runtime))
            .map(|c| c.log.clone())
    }

    fn head(&self, licence: &str) -> ChainHead {
        self.chains
            .get(licence)
            .map_or_else(|| WitnessLog::new(licence).head(), |c| c.log.head())
    }
}

/// The head of the local chain `receipts` after `seq` receipts.
pub(crate) fn head_at(licence: &str, receipts: &[Receipt], seq: u64) -> Option<ChainHead> {
    match seq {
        0 => Some(ChainHead {
            seq: 0,
            hash: genesis(licence),
        }),
        n => receipts
            .get(usize::try_from(n - 1).ok()?)
            .map(Receipt::head),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter_core::rollback::ReceiptSigner;

    const RULES: WitnessRules = WitnessRules {
        bind_to_runtime: true,
        limit_chains: true,
    };

    fn key() -> [u8; 32] {
        ReceiptSigner::from_bytes(&[7; 32]).verifier().to_bytes()
    }

    #[test]
    fn a_chain_is_witnessed_for_the_runtime_that_started_it() {
        let mut store = WitnessStore::default();
        let (_, refused, change) = store.accept("L-1", "r1", key(), &[], RULES);
        assert_eq!(refused, None);
        assert!(change.is_some(), "the binding is stored");
        let (_, refused, _) = store.accept("L-1", "r2", key(), &[], RULES);
        assert_eq!(
            refused.as_deref(),
            Some("the licence is witnessed for another runtime")
        );
        assert!(store.log("L-1", "r1", RULES).is_some());
        assert!(store.log("L-1", "r2", RULES).is_none());
        let open = WitnessRules {
            bind_to_runtime: false,
            limit_chains: true,
        };
        assert!(store.log("L-1", "r2", open).is_some());
    }

    #[test]
    fn one_runtime_keeps_a_bounded_number_of_chains() {
        let mut store = WitnessStore::default();
        for i in 0..MAX_CHAINS_PER_RUNTIME {
            let (_, refused, _) = store.accept(&format!("L-{i}"), "r1", key(), &[], RULES);
            assert_eq!(refused, None);
        }
        let (_, refused, change) = store.accept("L-more", "r1", key(), &[], RULES);
        assert!(refused.is_some() && change.is_none());
        let (_, refused, _) = store.accept("L-more", "r2", key(), &[], RULES);
        assert_eq!(refused, None);
    }
}
