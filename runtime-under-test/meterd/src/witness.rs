//! Witnessing receipt chains: a network server keeps the chains of its client runtimes' metered
//! licences, and a client reconciles with it after a rollback.

use std::collections::BTreeMap;

use meter_core::rollback::{ChainHead, Receipt, ReceiptVerifier, WitnessLog, genesis};
use serde::{Deserialize, Serialize};

use crate::store::Change;

/// Metadata key prefix of a witnessed chain (JSON), followed by its chain id.
const WITNESS_KEY_PREFIX: &str = "witness/";

/// Receipts sent to a witness in one frame at most (frames are limited to 64 KiB).
pub(crate) const RECEIPTS_PER_FRAME: usize = 64;

/// Most chains one client runtime may have witnessed.
pub const MAX_CHAINS_PER_RUNTIME: usize = 64;

/// One witnessed chain, the key its receipts are signed with and the client runtime it is
/// witnessed for (the first to send receipts; chains kept before runtimes were recorded are
/// bound to the next one).
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
    /// Keep a chain per licence *and receipt key*, so receipts of a licence signed with another
    /// key (another runtime's) start a chain of their own and never block or replace the
    /// licence's own; without, a licence has one chain, owned by the first key and runtime.
    pub key_chains: bool,
}

impl WitnessRules {
    /// The id a licence's chain signed with `key` is kept under.
    fn chain_id(&self, licence: &str, key: &[u8; 32]) -> String {
        if self.key_chains {
            format!("{licence}/{}", hex::encode(key))
        } else {
            licence.to_owned()
        }
    }
}

/// Chains this runtime witnesses, by chain id (licence id and receipt key).
#[derive(Debug, Default)]
pub struct WitnessStore {
    chains: BTreeMap<String, Witnessed>,
}

impl WitnessStore {
    /// Witnessed chains as the store holds them (a chain stored under its licence id alone,
    /// as older runtimes kept them, is taken as the chain of that licence and its key).
    pub fn load(meta: &BTreeMap<String, Vec<u8>>) -> Self {
        let chains = meta
            .iter()
            .filter_map(|(key, bytes)| {
                let id = key.strip_prefix(WITNESS_KEY_PREFIX)?;
                match serde_json::from_slice::<Witnessed>(bytes) {
                    Ok(chain) if !id.contains('/') => Some((format!("{id}/{}", chain.key), chain)),
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

    /// Appends receipts to the chain of a licence and key. Answers the head, and why a receipt
    /// was refused (a fork, a gap, another runtime), with the change to store when something
    /// was added.
    pub fn accept(
        &mut self,
        licence: &str,
        runtime: &str,
        key: [u8; 32],
        receipts: &[Receipt],
        rules: WitnessRules,
    ) -> (ChainHead, Option<String>, Option<Change>) {
        let id = rules.chain_id(licence, &key);
        let verifier = match ReceiptVerifier::from_bytes(&key) {
            Ok(verifier) => verifier,
            Err(e) => {
                let head = self.head(licence, &id);
                return (head, Some(e.to_string()), None);
            }
        };
        if !self.chains.contains_key(&id)
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
        if !self.chains.contains_key(&id) {
            // A chain starts only with a receipt that verifies under its key: naming someone
            // else's key (it is in their licence) with no receipt, or a forged one, binds nothing.
            let mut trial = WitnessLog::new(licence);
            match receipts.first().map(|r| trial.accept(r, &verifier)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return (WitnessLog::new(licence).head(), Some(e.to_string()), None);
                }
                None => {
                    let why = "no receipt to start the chain with".to_owned();
                    return (trial.head(), Some(why), None);
                }
            }
            self.chains.insert(
                id.clone(),
                Witnessed {
                    key: hex::encode(key),
                    runtime: None,
                    log: WitnessLog::new(licence),
                },
            );
        }
        let chain = self.chains.get_mut(&id).expect("inserted above");
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
                format!("{WITNESS_KEY_PREFIX}{id}"),
                serde_json::to_vec(chain).expect("witnessed chains always encode"),
            )
        });
        (head, refused, change)
    }

    /// The witnessed chain of a licence signed with `key`, if any receipt of it was seen from
    /// `runtime` (with `bind_to_runtime` off: from any runtime).
    pub fn log(
        &self,
        licence: &str,
        key: &[u8; 32],
        runtime: &str,
        rules: WitnessRules,
    ) -> Option<WitnessLog> {
        self.chains
            .get(&rules.chain_id(licence, key))
            .filter(|c| !rules.bind_to_runtime || c.runtime.as_deref().is_none_or(|r| r == runtime))
            .map(|c| c.log.clone())
    }

    fn head(&self, licence: &str, id: &str) -> ChainHead {
        self.chains
            .get(id)
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
        key_chains: true,
    };

    fn key() -> [u8; 32] {
        ReceiptSigner::from_bytes(&[7; 32]).verifier().to_bytes()
    }

    fn first_receipt(licence: &str, signer: &ReceiptSigner) -> Receipt {
        let mut state = meter_core::rollback::MeteredState::new(
            licence,
            BTreeMap::from([(1, 10)]),
            1_000,
            None,
        );
        state.spend(1, 1, 1_000, None, signer).unwrap()
    }

    #[test]
    fn a_licence_claimed_first_under_another_key_keeps_its_own_chain() {
        let owner = ReceiptSigner::from_bytes(&[7; 32]);
        let thief = ReceiptSigner::from_bytes(&[8; 32]);
        let mut store = WitnessStore::default();
        let claimed = first_receipt("L-1", &thief);
        let (head, refused, _) = store.accept(
            "L-1",
            "thief",
            thief.verifier().to_bytes(),
            &[claimed],
            RULES,
        );
        assert_eq!((head.seq, refused), (1, None));
        let own = first_receipt("L-1", &owner);
        let (head, refused, change) =
            store.accept("L-1", "owner", key(), std::slice::from_ref(&own), RULES);
        assert_eq!((head.seq, refused), (1, None));
        assert!(change.is_some());
        let log = store.log("L-1", &key(), "owner", RULES).unwrap();
        assert_eq!(log.receipts, vec![own]);
        // Reloaded from what was stored, the two chains stay apart.
        let meta: BTreeMap<String, Vec<u8>> = match change.unwrap() {
            Change::PutMeta(k, v) => BTreeMap::from([(k, v)]),
            other => panic!("{other:?}"),
        };
        let reloaded = WitnessStore::load(&meta);
        assert!(reloaded.log("L-1", &key(), "owner", RULES).is_some());

        // With one chain per licence, the first key owns it and the licence's own is refused.
        let weak = WitnessRules {
            key_chains: false,
            ..RULES
        };
        let mut store = WitnessStore::default();
        let claimed = first_receipt("L-1", &thief);
        store.accept(
            "L-1",
            "thief",
            thief.verifier().to_bytes(),
            &[claimed],
            weak,
        );
        let (_, refused, _) =
            store.accept("L-1", "owner", key(), &[first_receipt("L-1", &owner)], weak);
        assert!(refused.is_some());
    }

    #[test]
    fn a_chain_is_witnessed_for_the_runtime_that_started_it() {
        let owner = ReceiptSigner::from_bytes(&[7; 32]);
        let mut store = WitnessStore::default();
        let (_, refused, change) =
            store.accept("L-1", "r1", key(), &[first_receipt("L-1", &owner)], RULES);
        assert_eq!(refused, None);
        assert!(change.is_some(), "the binding is stored");
        let (_, refused, _) = store.accept("L-1", "r2", key(), &[], RULES);
        assert_eq!(
            refused.as_deref(),
            Some("the licence is witnessed for another runtime")
        );
        assert!(store.log("L-1", &key(), "r1", RULES).is_some());
        assert!(store.log("L-1", &key(), "r2", RULES).is_none());
        let open = WitnessRules {
            bind_to_runtime: false,
            ..RULES
        };
        assert!(store.log("L-1", &key(), "r2", open).is_some());
    }

    #[test]
    fn naming_someone_elses_key_without_their_receipts_binds_nothing() {
        let owner = ReceiptSigner::from_bytes(&[7; 32]);
        let thief = ReceiptSigner::from_bytes(&[8; 32]);
        let mut store = WitnessStore::default();
        // The owner's public key is in their licence: a thief names it with no receipt, or
        // with a receipt of their own signing.
        let (_, refused, change) = store.accept("L-1", "thief", key(), &[], RULES);
        assert!(refused.is_some() && change.is_none());
        let forged = first_receipt("L-1", &thief);
        let (_, refused, change) = store.accept("L-1", "thief", key(), &[forged], RULES);
        assert!(refused.is_some() && change.is_none());
        let (head, refused, _) = store.accept(
            "L-1",
            "owner",
            key(),
            &[first_receipt("L-1", &owner)],
            RULES,
        );
        assert_eq!((head.seq, refused), (1, None));
    }

    #[test]
    fn one_runtime_keeps_a_bounded_number_of_chains() {
        let owner = ReceiptSigner::from_bytes(&[7; 32]);
        let mut store = WitnessStore::default();
        for i in 0..MAX_CHAINS_PER_RUNTIME {
            let licence = format!("L-{i}");
            let first = first_receipt(&licence, &owner);
            let (_, refused, _) = store.accept(&licence, "r1", key(), &[first], RULES);
            assert_eq!(refused, None);
        }
        let first = first_receipt("L-more", &owner);
        let (_, refused, change) =
            store.accept("L-more", "r1", key(), std::slice::from_ref(&first), RULES);
        assert!(refused.is_some() && change.is_none());
        let (_, refused, _) = store.accept("L-more", "r2", key(), &[first], RULES);
        assert_eq!(refused, None);
    }
}
