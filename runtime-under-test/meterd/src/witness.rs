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

/// One witnessed chain and the key its receipts must be signed with (the first key seen).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Witnessed {
    key: String,
    log: WitnessLog,
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
        key: [u8; 32],
        receipts: &[Receipt],
    ) -> (ChainHead, Option<String>, Option<Change>) {
        let verifier = match ReceiptVerifier::from_bytes(&key) {
            Ok(verifier) => verifier,
            Err(e) => {
                let head = self.head(licence);
                return (head, Some(e.to_string()), None);
            }
        };
        let chain = self
            .chains
            .entry(licence.to_owned())
            .or_insert_with(|| Witnessed {
                key: hex::encode(key),
                log: WitnessLog::new(licence),
            });
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
        let change = (head != before).then(|| {
            Change::PutMeta(
                format!("{WITNESS_KEY_PREFIX}{licence}"),
                serde_json::to_vec(chain).expect("witnessed chains always encode"),
            )
        });
        (head, refused, change)
    }

    /// The witnessed chain of a licence, if any receipt of it was seen.
    pub fn log(&self, licence: &str) -> Option<WitnessLog> {
        self.chains.get(licence).map(|c| c.log.clone())
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
