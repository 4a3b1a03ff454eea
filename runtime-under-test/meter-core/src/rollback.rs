//! Rollback resistance for metered items: a signed, hash-chained receipt log of unit use, a time
//! high-water mark and the vmgenid of the last state write, checked against a witness.
//!
//! Everything here is pure data: the caller passes the current time, the current vmgenid, signing
//! key bytes and the witness's chain, and persists the state it gets back.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::policy::RollbackPolicy;

/// A SHA-256 digest linking receipts into a chain; hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChainHash(pub [u8; 32]);

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &hex::encode(self.0)[..16])
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for ChainHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        let array = <[u8; 32]>::try_from(bytes)
            .map_err(|_| serde::de::Error::custom("chain hash must be 32 bytes"))?;
        Ok(ChainHash(array))
    }
}

/// The position and hash of the newest receipt of a chain (seq 0 = the genesis).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ChainHead {
    /// Number of receipts in the chain.
    pub seq: u64,
    /// Hash of the newest receipt, or the genesis hash.
    pub hash: ChainHash,
}

/// The genesis hash of the receipt chain of one licence.
pub fn genesis(licence_id: &str) -> ChainHash {
    let mut hasher = Sha256::new();
    hasher.update(b"meter-receipts-v1 genesis ");
    hasher.update(licence_id.as_bytes());
    ChainHash(hasher.finalize().into())
}

/// One signed record of units spent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Receipt {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// Hash of the previous receipt (or the genesis).
    pub prev: ChainHash,
    /// When the units were spent, unix milliseconds.
    pub at_ms: u64,
    /// Product code.
    pub product: u32,
    /// Units spent.
    pub units: u64,
    /// The vmgenid of the machine when it wrote this receipt (guests only).
    pub vmgenid: Option<String>,
    /// Ed25519 signature over the receipt hash, hex.
    pub signature: String,
}

impl Receipt {
    /// Hash of the signed fields; the next receipt's `prev`.
    pub fn hash(&self) -> ChainHash {
        let mut hasher = Sha256::new();
        hasher.update(b"meter-receipts-v1 receipt ");
        hasher.update(self.seq.to_be_bytes());
        hasher.update(self.prev.0);
        hasher.update(self.at_ms.to_be_bytes());
        hasher.update(self.product.to_be_bytes());
        hasher.update(self.units.to_be_bytes());
        match &self.vmgenid {
            Some(id) => {
                hasher.update([1]);
                hasher.update((id.len() as u64).to_be_bytes());
                hasher.update(id.as_bytes());
            }
            None => hasher.update([0]),
        }
        ChainHash(hasher.finalize().into())
    }

    /// The head of a chain ending with this receipt.
    pub fn head(&self) -> ChainHead {
        ChainHead {
            seq: self.seq,
            hash: self.hash(),
        }
    }

    fn verify_signature(&self, verifier: &ReceiptVerifier) -> bool {
        let Some(bytes) = hex::decode(&self.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        verifier
            .0
            .verify_strict(&self.hash().0, &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

/// Signs receipts with the runtime's Ed25519 key.
pub struct ReceiptSigner(SigningKey);

impl ReceiptSigner {
    /// A signer from 32 secret key bytes.
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(secret))
    }

    /// The matching verifier.
    pub fn verifier(&self) -> ReceiptVerifier {
        ReceiptVerifier(self.0.verifying_key())
    }

    fn sign(&self, mut receipt: Receipt) -> Receipt {
        let signature = self.0.sign(&receipt.hash().0);
        receipt.signature = hex::encode(signature.to_bytes());
        receipt
    }
}

impl fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReceiptSigner(..)")
    }
}

/// Verifies receipts with the runtime's Ed25519 public key.
#[derive(Debug, Clone)]
pub struct ReceiptVerifier(VerifyingKey);

impl ReceiptVerifier {
    /// A verifier from 32 public key bytes.
    pub fn from_bytes(public: &[u8; 32]) -> Result<Self, RollbackError> {
        VerifyingKey::from_bytes(public)
            .map(Self)
            .map_err(|_| RollbackError::BadPublicKey)
    }

    /// The public key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

/// Why metered items are locked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum LockReason {
    /// The VM generation id differs from the one recorded at the last state write (snapshot revert, clone).
    #[error("vmgenid-changed")]
    VmgenidChanged {
        /// Recorded vmgenid.
        recorded: Option<String>,
        /// Current vmgenid.
        current: Option<String>,
    },
    /// The clock is earlier than a time the state has already seen.
    #[error("clock-behind-high-water-mark")]
    ClockBehindHighWaterMark {
        /// Current time, unix ms.
        now_ms: u64,
        /// High-water mark, unix ms.
        high_water_ms: u64,
    },
    /// The witness holds a different receipt at the same position.
    #[error("chain-forked")]
    ChainForked {
        /// Local head at the witness's position.
        local: ChainHead,
        /// The witness's head.
        witness: ChainHead,
    },
    /// The witness has seen receipts the local chain no longer holds.
    #[error("chain-behind-witness")]
    ChainBehindWitness {
        /// Local head.
        local: ChainHead,
        /// The witness's head.
        witness: ChainHead,
    },
}

impl LockReason {
    /// Short kebab-case code naming the reason.
    pub fn code(&self) -> &'static str {
        match self {
            LockReason::VmgenidChanged { .. } => "vmgenid-changed",
            LockReason::ClockBehindHighWaterMark { .. } => "clock-behind-high-water-mark",
            LockReason::ChainForked { .. } => "chain-forked",
            LockReason::ChainBehindWitness { .. } => "chain-behind-witness",
        }
    }
}

/// Failures of metered-state operations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RollbackError {
    /// Metered items are locked.
    #[error("Metered items locked: {0}")]
    Locked(#[source] LockReason),
    /// The vendor policy locks rather than reconciling automatically.
    #[error("Locked by policy until reconciled: {0}")]
    LockedByPolicy(#[source] LockReason),
    /// Reconciliation needs a witness and none was given.
    #[error("No witness to reconcile with")]
    NoWitness,
    /// Not enough units left.
    #[error("Units exhausted for product {product}: {remaining} left, {requested} requested")]
    UnitsExhausted {
        /// Product code.
        product: u32,
        /// Units left.
        remaining: u64,
        /// Units requested.
        requested: u64,
    },
    /// The product has no metered units in this state.
    #[error("Product {0} is not metered")]
    NotMetered(u32),
    /// A chain does not link, or a signature does not verify.
    #[error("Receipt chain broken at {seq}: {what}")]
    ChainBroken {
        /// Position of the first bad receipt.
        seq: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// Public key bytes are not a valid Ed25519 key.
    #[error("Invalid receipt public key")]
    BadPublicKey,
    /// The witness holds no receipt of a chain that has some here: it cannot vouch for it.
    #[error("The witness has seen none of the {local} receipts kept here")]
    WitnessUnaware {
        /// Receipts in the local chain.
        local: u64,
    },
}

/// Checks that `receipts` link from `genesis` and carry valid signatures.
pub fn verify_chain(
    genesis: ChainHash,
    receipts: &[Receipt],
    verifier: &ReceiptVerifier,
) -> Result<ChainHead, RollbackError> {
    let mut head = ChainHead {
        seq: 0,
        hash: genesis,
    };
    for receipt in receipts {
        let seq = head.seq + 1;
        if receipt.seq != seq {
            return Err(RollbackError::ChainBroken {
                seq,
                what: "sequence gap",
            });
        }
        if receipt.prev != head.hash {
            return Err(RollbackError::ChainBroken {
                seq,
                what: "previous hash mismatch",
            });
        }
        if !receipt.verify_signature(verifier) {
            return Err(RollbackError::ChainBroken {
                seq,
                what: "bad signature",
            });
        }
        head = receipt.head();
    }
    Ok(head)
}

/// A receipt chain as both its keepers hold it (the runtime's metered state, a witness's log).
#[derive(Debug, Clone, Copy)]
struct Chain<'a> {
    genesis: ChainHash,
    receipts: &'a [Receipt],
}

impl Chain<'_> {
    /// The head after `seq` receipts (the genesis at 0).
    fn head_at(&self, seq: u64) -> ChainHead {
        let index = usize::try_from(seq).ok().and_then(|n| n.checked_sub(1));
        match index.and_then(|i| self.receipts.get(i)) {
            Some(receipt) => receipt.head(),
            None => ChainHead {
                seq: 0,
                hash: self.genesis,
            },
        }
    }

    /// The head after every receipt.
    fn head(&self) -> ChainHead {
        self.receipts.last().map_or(
            ChainHead {
                seq: 0,
                hash: self.genesis,
            },
            Receipt::head,
        )
    }

    /// Units of `product` the chain records as spent.
    fn spent(&self, product: u32) -> u64 {
        self.receipts
            .iter()
            .filter(|r| r.product == product)
            .map(|r| r.units)
            .sum()
    }
}

/// A units grant that a rolled-back branch used again after the witness had counted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RefusedUse {
    /// Product code.
    pub product: u32,
    /// Units refused.
    pub units: u64,
    /// When the forked branch spent them, unix ms.
    pub at_ms: u64,
}

/// Outcome of reconciling with a witness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Reconciliation {
    /// Receipts taken over from the witness that the local chain lacked.
    pub adopted: usize,
    /// Receipts the witness has not seen yet and must be sent to it, in order.
    pub to_witness: Vec<Receipt>,
    /// Uses from a forked branch refused because their units were already spent.
    pub refused: Vec<RefusedUse>,
    /// Still locked afterwards (e.g. the clock is still behind), or unlocked.
    pub lock: Option<LockReason>,
}

/// Metered state of one soft licence: grants, receipt chain, high-water mark, vmgenid and lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MeteredState {
    /// Genesis hash of this licence's chain.
    pub genesis: ChainHash,
    /// Units granted per product code.
    pub grants: BTreeMap<u32, u64>,
    /// The receipt chain.
    pub receipts: Vec<Receipt>,
    /// Latest time this state has seen, unix ms.
    pub high_water_ms: u64,
    /// vmgenid at the last state write (None on physical machines).
    pub vmgenid: Option<String>,
    /// Set when a rollback was detected; cleared only by reconciliation.
    pub lock: Option<LockReason>,
}

impl MeteredState {
    /// A fresh state for a licence, created at `now_ms` on a machine with `vmgenid`.
    pub fn new(
        licence_id: &str,
        grants: BTreeMap<u32, u64>,
        now_ms: u64,
        vmgenid: Option<&str>,
    ) -> Self {
        Self {
            genesis: genesis(licence_id),
            grants,
            receipts: Vec::new(),
            high_water_ms: now_ms,
            vmgenid: vmgenid.map(str::to_owned),
            lock: None,
        }
    }

    fn chain(&self) -> Chain<'_> {
        Chain {
            genesis: self.genesis,
            receipts: &self.receipts,
        }
    }

    /// Head of the local chain.
    pub fn head(&self) -> ChainHead {
        self.chain().head()
    }

    /// Units of `product` spent so far.
    pub fn spent(&self, product: u32) -> u64 {
        self.chain().spent(product)
    }

    /// Units of `product` left; None when the product is not metered.
    pub fn remaining(&self, product: u32) -> Option<u64> {
        self.grants
            .get(&product)
            .map(|grant| grant.saturating_sub(self.spent(product)))
    }

    /// Checks the local chain's links and signatures.
    pub fn verify(&self, verifier: &ReceiptVerifier) -> Result<ChainHead, RollbackError> {
        verify_chain(self.genesis, &self.receipts, verifier)
    }

    /// The first rollback sign found for the given time, vmgenid and (optional) witness head.
    pub fn detect(
        &self,
        now_ms: u64,
        vmgenid: Option<&str>,
        witness: Option<&ChainHead>,
    ) -> Option<LockReason> {
        if self.vmgenid.as_deref() != vmgenid {
            return Some(LockReason::VmgenidChanged {
                recorded: self.vmgenid.clone(),
                current: vmgenid.map(str::to_owned),
            });
        }
        if let Some(witness) = witness {
            let local = self.head();
            if witness.seq > local.seq {
                return Some(LockReason::ChainBehindWitness {
                    local,
                    witness: *witness,
                });
            }
            let at = self.head_at(witness.seq);
            if at.hash != witness.hash {
                return Some(LockReason::ChainForked {
                    local: at,
                    witness: *witness,
                });
            }
        }
        if now_ms < self.high_water_ms {
            return Some(LockReason::ClockBehindHighWaterMark {
                now_ms,
                high_water_ms: self.high_water_ms,
            });
        }
        None
    }

    /// Detects rollback signs and locks on the first; errors while locked.
    pub fn check(
        &mut self,
        now_ms: u64,
        vmgenid: Option<&str>,
        witness: Option<&ChainHead>,
    ) -> Result<(), RollbackError> {
        if let Some(lock) = &self.lock {
            return Err(RollbackError::Locked(lock.clone()));
        }
        if let Some(reason) = self.detect(now_ms, vmgenid, witness) {
            self.lock = Some(reason.clone());
            return Err(RollbackError::Locked(reason));
        }
        Ok(())
    }

    /// Records a state write without unit use: advances the high-water mark and records the vmgenid.
    pub fn touch(&mut self, now_ms: u64, vmgenid: Option<&str>) -> Result<(), RollbackError> {
        self.check(now_ms, vmgenid, None)?;
        self.high_water_ms = self.high_water_ms.max(now_ms);
        self.vmgenid = vmgenid.map(str::to_owned);
        Ok(())
    }

    /// Spends units of a product: checks for rollback, appends a signed receipt and returns it (to send to the witness).
    pub fn spend(
        &mut self,
        product: u32,
        units: u64,
        now_ms: u64,
        vmgenid: Option<&str>,
        signer: &ReceiptSigner,
    ) -> Result<Receipt, RollbackError> {
        self.check(now_ms, vmgenid, None)?;
        let remaining = self
            .remaining(product)
            .ok_or(RollbackError::NotMetered(product))?;
        if units > remaining {
            return Err(RollbackError::UnitsExhausted {
                product,
                remaining,
                requested: units,
            });
        }
        let receipt = self.append(product, units, now_ms, vmgenid, signer);
        self.high_water_ms = self.high_water_ms.max(now_ms);
        self.vmgenid = vmgenid.map(str::to_owned);
        Ok(receipt)
    }

    /// Applies the vendor's rollback policy: `reconcile` reconciles with the witness, `lock` stays locked.
    pub fn resolve(
        &mut self,
        policy: RollbackPolicy,
        witness: Option<&WitnessLog>,
        now_ms: u64,
        vmgenid: Option<&str>,
        signer: &ReceiptSigner,
    ) -> Result<Reconciliation, RollbackError> {
        match (policy, &self.lock, witness) {
            (RollbackPolicy::Lock, Some(lock), _) => {
                Err(RollbackError::LockedByPolicy(lock.clone()))
            }
            (_, _, None) => Err(RollbackError::NoWitness),
            (_, _, Some(witness)) => self.reconcile(witness, now_ms, vmgenid, signer),
        }
    }

    /// Reconciles with a witness's chain: adopts the receipts it holds, replays forked local uses
    /// while units remain, refuses those spent twice, and unlocks unless a sign remains.
    pub fn reconcile(
        &mut self,
        witness: &WitnessLog,
        now_ms: u64,
        vmgenid: Option<&str>,
        signer: &ReceiptSigner,
    ) -> Result<Reconciliation, RollbackError> {
        let verifier = signer.verifier();
        if witness.genesis != self.genesis {
            return Err(RollbackError::ChainBroken {
                seq: 0,
                what: "witness chain belongs to another licence",
            });
        }
        verify_chain(witness.genesis, &witness.receipts, &verifier)?;
        self.verify(&verifier)?;
        // An empty chain is what a fresh server, or a witness nobody told, holds: taking it
        // as "we are ahead" would let a reverted guest pointed at one unlock its regained units.
        if witness.receipts.is_empty() && !self.receipts.is_empty() {
            return Err(RollbackError::WitnessUnaware {
                local: self.receipts.len() as u64,
            });
        }

        let common = self
            .receipts
            .iter()
            .zip(&witness.receipts)
            .take_while(|(local, remote)| local == remote)
            .count();
        let mut refused = Vec::new();
        let mut to_witness = Vec::new();
        let mut adopted = 0;
        if common == witness.receipts.len() {
            // The witness has seen a prefix of ours: we are ahead, nothing was rolled back.
            to_witness.extend_from_slice(&self.receipts[common..]);
        } else {
            let forked: Vec<Receipt> = self.receipts.split_off(common);
            adopted = witness.receipts.len() - common;
            self.receipts.extend_from_slice(&witness.receipts[common..]);
            for used in forked {
                let left = self.remaining(used.product).unwrap_or(0);
                if used.units <= left {
                    let replayed =
                        self.append(used.product, used.units, used.at_ms, vmgenid, signer);
                    to_witness.push(replayed);
                } else {
                    refused.push(RefusedUse {
                        product: used.product,
                        units: used.units,
                        at_ms: used.at_ms,
                    });
                }
            }
        }
        let latest = self.receipts.iter().map(|r| r.at_ms).max().unwrap_or(0);
        self.high_water_ms = self.high_water_ms.max(latest);
        self.vmgenid = vmgenid.map(str::to_owned);
        self.lock = None;
        self.lock = self.detect(now_ms, vmgenid, None);
        if self.lock.is_none() {
            self.high_water_ms = self.high_water_ms.max(now_ms);
        }
        Ok(Reconciliation {
            adopted,
            to_witness,
            refused,
            lock: self.lock.clone(),
        })
    }

    fn head_at(&self, seq: u64) -> ChainHead {
        self.chain().head_at(seq)
    }

    fn append(
        &mut self,
        product: u32,
        units: u64,
        at_ms: u64,
        vmgenid: Option<&str>,
        signer: &ReceiptSigner,
    ) -> Receipt {
        let head = self.head();
        let receipt = signer.sign(Receipt {
            seq: head.seq + 1,
            prev: head.hash,
            at_ms,
            product,
            units,
            vmgenid: vmgenid.map(str::to_owned),
            signature: String::new(),
        });
        self.receipts.push(receipt.clone());
        receipt
    }
}

/// A witness's copy of a licence's receipt chain (kept by a network server or a dongle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WitnessLog {
    /// Genesis hash of the chain.
    pub genesis: ChainHash,
    /// Receipts accepted so far.
    pub receipts: Vec<Receipt>,
}

/// Why a witness refuses a receipt.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WitnessError {
    /// The receipt does not extend the witness's head: the sender's chain forked.
    #[error("Receipt {seq} does not extend the witnessed chain at {head_seq}")]
    Forked {
        /// Receipt position.
        seq: u64,
        /// The witness's head position.
        head_seq: u64,
    },
    /// The receipt's signature does not verify.
    #[error("Receipt {0} has an invalid signature")]
    BadSignature(u64),
}

impl WitnessLog {
    /// An empty witness chain for a licence.
    pub fn new(licence_id: &str) -> Self {
        Self {
            genesis: genesis(licence_id),
            receipts: Vec::new(),
        }
    }

    fn chain(&self) -> Chain<'_> {
        Chain {
            genesis: self.genesis,
            receipts: &self.receipts,
        }
    }

    /// Head of the witnessed chain.
    pub fn head(&self) -> ChainHead {
        self.chain().head()
    }

    /// Units of `product` the witness has counted.
    pub fn spent(&self, product: u32) -> u64 {
        self.chain().spent(product)
    }

    /// Accepts a receipt extending the chain; a receipt already held is accepted again unchanged.
    pub fn accept(
        &mut self,
        receipt: &Receipt,
        verifier: &ReceiptVerifier,
    ) -> Result<ChainHead, WitnessError> {
        if !receipt.verify_signature(verifier) {
            return Err(WitnessError::BadSignature(receipt.seq));
        }
        let head = self.head();
        let held = usize::try_from(receipt.seq)
            .ok()
            .and_then(|seq| seq.checked_sub(1))
            .and_then(|index| self.receipts.get(index));
        match held {
            Some(held) if held == receipt => Ok(head),
            _ if receipt.seq == head.seq + 1 && receipt.prev == head.hash => {
                self.receipts.push(receipt.clone());
                Ok(receipt.head())
            }
            _ => Err(WitnessError::Forked {
                seq: receipt.seq,
                head_seq: head.seq,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRODUCT: u32 = 2001;
    const T0: u64 = 1_700_000_000_000;
    const GEN_A: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const GEN_B: &str = "aa1e2d3c4b5a69788796a5b4c3d2e1bb";

    fn signer() -> ReceiptSigner {
        ReceiptSigner::from_bytes(&[9; 32])
    }

    fn state(units: u64) -> MeteredState {
        MeteredState::new("lic-1", BTreeMap::from([(PRODUCT, units)]), T0, Some(GEN_A))
    }

    /// Spends units and hands each receipt to the witness, as the daemon does when one is reachable.
    fn spend_witnessed(s: &mut MeteredState, w: &mut WitnessLog, units: u64, at: u64) {
        let receipt = s.spend(PRODUCT, units, at, Some(GEN_A), &signer()).unwrap();
        w.accept(&receipt, &signer().verifier()).unwrap();
    }

    #[test]
    fn spending_counts_down_and_stops_at_zero() {
        let mut s = state(3);
        s.spend(PRODUCT, 2, T0 + 1, Some(GEN_A), &signer()).unwrap();
        assert_eq!(s.remaining(PRODUCT), Some(1));
        assert_eq!(
            s.spend(PRODUCT, 2, T0 + 2, Some(GEN_A), &signer()),
            Err(RollbackError::UnitsExhausted {
                product: PRODUCT,
                remaining: 1,
                requested: 2
            })
        );
        assert_eq!(
            s.spend(9, 1, T0 + 2, Some(GEN_A), &signer()),
            Err(RollbackError::NotMetered(9))
        );
        assert_eq!(s.verify(&signer().verifier()).unwrap().seq, 1);
    }

    #[test]
    fn vmgenid_change_locks_with_its_reason() {
        let mut s = state(10);
        s.spend(PRODUCT, 1, T0 + 10, Some(GEN_A), &signer())
            .unwrap();
        let err = s
            .spend(PRODUCT, 1, T0 + 20, Some(GEN_B), &signer())
            .unwrap_err();
        let RollbackError::Locked(reason) = err else {
            panic!("{err}")
        };
        assert_eq!(reason.code(), "vmgenid-changed");
        // The lock is sticky: the old vmgenid does not unlock it.
        assert!(matches!(
            s.touch(T0 + 30, Some(GEN_A)),
            Err(RollbackError::Locked(_))
        ));
        assert_eq!(s.remaining(PRODUCT), Some(9));
    }

    #[test]
    fn clock_below_high_water_mark_locks() {
        let mut s = state(10);
        s.touch(T0 + 60_000, Some(GEN_A)).unwrap();
        let err = s
            .spend(PRODUCT, 1, T0 + 1_000, Some(GEN_A), &signer())
            .unwrap_err();
        assert_eq!(
            err,
            RollbackError::Locked(LockReason::ClockBehindHighWaterMark {
                now_ms: T0 + 1_000,
                high_water_ms: T0 + 60_000
            })
        );
    }

    #[test]
    fn forked_chain_is_detected_against_the_witness_head() {
        let mut s = state(10);
        let mut w = WitnessLog::new("lic-1");
        spend_witnessed(&mut s, &mut w, 1, T0 + 1);
        let snapshot = s.clone();
        spend_witnessed(&mut s, &mut w, 2, T0 + 2);
        // A disk restore without vmgenid (same id) followed by a new use: same seq, other receipt.
        let mut restored = snapshot;
        let forked = restored
            .spend(PRODUCT, 1, T0 + 3, Some(GEN_A), &signer())
            .unwrap();
        let err = restored
            .check(T0 + 4, Some(GEN_A), Some(&w.head()))
            .unwrap_err();
        let RollbackError::Locked(reason) = err else {
            panic!()
        };
        assert_eq!(reason.code(), "chain-forked");
        // The witness itself refuses the forked receipt.
        assert_eq!(
            w.accept(&forked, &signer().verifier()),
            Err(WitnessError::Forked {
                seq: 2,
                head_seq: 2
            })
        );
    }

    #[test]
    fn chain_behind_the_witness_is_detected() {
        let mut s = state(10);
        let mut w = WitnessLog::new("lic-1");
        let snapshot = s.clone();
        spend_witnessed(&mut s, &mut w, 4, T0 + 1);
        let mut restored = snapshot;
        let err = restored
            .check(T0 + 2, Some(GEN_A), Some(&w.head()))
            .unwrap_err();
        let RollbackError::Locked(reason) = err else {
            panic!()
        };
        assert_eq!(reason.code(), "chain-behind-witness");
    }

    #[test]
    fn snapshot_revert_regains_no_units_after_reconciliation() {
        let mut s = state(10);
        let mut w = WitnessLog::new("lic-1");
        let snapshot = s.clone();
        spend_witnessed(&mut s, &mut w, 3, T0 + 1_000);
        // Revert: the old state comes back and the hypervisor hands out a new vmgenid.
        let mut reverted = snapshot;
        assert_eq!(reverted.remaining(PRODUCT), Some(10));
        assert!(
            reverted
                .spend(PRODUCT, 1, T0 + 2_000, Some(GEN_B), &signer())
                .is_err()
        );
        let outcome = reverted
            .reconcile(&w, T0 + 2_000, Some(GEN_B), &signer())
            .unwrap();
        assert_eq!(outcome.adopted, 1);
        assert!(outcome.refused.is_empty());
        assert_eq!(outcome.lock, None);
        assert_eq!(reverted.remaining(PRODUCT), Some(7));
        reverted
            .spend(PRODUCT, 1, T0 + 3_000, Some(GEN_B), &signer())
            .unwrap();
        assert_eq!(reverted.remaining(PRODUCT), Some(6));
    }

    #[test]
    fn reconciliation_refuses_units_spent_twice() {
        let mut s = state(5);
        let mut w = WitnessLog::new("lic-1");
        let snapshot = s.clone();
        spend_witnessed(&mut s, &mut w, 4, T0 + 1);
        // A restored copy that never saw those 4 units spends 1 and then 3 more offline.
        let mut restored = snapshot;
        restored
            .spend(PRODUCT, 1, T0 + 2, Some(GEN_A), &signer())
            .unwrap();
        restored
            .spend(PRODUCT, 3, T0 + 3, Some(GEN_A), &signer())
            .unwrap();
        assert!(
            restored
                .check(T0 + 4, Some(GEN_A), Some(&w.head()))
                .is_err()
        );
        let outcome = restored
            .reconcile(&w, T0 + 4, Some(GEN_A), &signer())
            .unwrap();
        assert_eq!(outcome.adopted, 1);
        assert_eq!(
            outcome.to_witness.len(),
            1,
            "the 1-unit use fits and is replayed"
        );
        assert_eq!(
            outcome.refused,
            vec![RefusedUse {
                product: PRODUCT,
                units: 3,
                at_ms: T0 + 3
            }]
        );
        assert_eq!(restored.remaining(PRODUCT), Some(0));
        for receipt in &outcome.to_witness {
            w.accept(receipt, &signer().verifier()).unwrap();
        }
        assert_eq!(w.spent(PRODUCT), 5);
        assert_eq!(restored.check(T0 + 5, Some(GEN_A), Some(&w.head())), Ok(()));
    }

    #[test]
    fn reconciliation_keeps_the_lock_while_the_clock_is_still_behind() {
        let mut s = state(10);
        let mut w = WitnessLog::new("lic-1");
        let snapshot = s.clone();
        spend_witnessed(&mut s, &mut w, 1, T0 + 3_600_000);
        let mut reverted = snapshot;
        // Revert plus the clock set back to the snapshot's time.
        let outcome = reverted
            .reconcile(&w, T0 + 10, Some(GEN_B), &signer())
            .unwrap();
        assert_eq!(
            outcome.lock.as_ref().map(LockReason::code),
            Some("clock-behind-high-water-mark")
        );
        assert!(matches!(
            reverted.spend(PRODUCT, 1, T0 + 20, Some(GEN_B), &signer()),
            Err(RollbackError::Locked(_))
        ));
    }

    #[test]
    fn local_chain_ahead_of_the_witness_is_sent_not_rolled_back() {
        let mut s = state(10);
        let mut w = WitnessLog::new("lic-1");
        spend_witnessed(&mut s, &mut w, 1, T0 + 1);
        s.spend(PRODUCT, 2, T0 + 2, Some(GEN_A), &signer()).unwrap();
        let outcome = s.reconcile(&w, T0 + 3, Some(GEN_A), &signer()).unwrap();
        assert_eq!(outcome.adopted, 0);
        assert_eq!(outcome.to_witness.len(), 1);
        assert_eq!(s.remaining(PRODUCT), Some(7));
    }

    #[test]
    fn lock_policy_does_not_reconcile_automatically() {
        let mut s = state(10);
        let w = WitnessLog::new("lic-1");
        assert!(s.touch(T0 + 1, Some(GEN_B)).is_err());
        let err = s
            .resolve(
                RollbackPolicy::Lock,
                Some(&w),
                T0 + 2,
                Some(GEN_B),
                &signer(),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            RollbackError::LockedByPolicy(LockReason::VmgenidChanged { .. })
        ));
        assert_eq!(
            s.resolve(
                RollbackPolicy::Reconcile,
                None,
                T0 + 2,
                Some(GEN_B),
                &signer()
            ),
            Err(RollbackError::NoWitness)
        );
        let outcome = s
            .resolve(
                RollbackPolicy::Reconcile,
                Some(&w),
                T0 + 2,
                Some(GEN_B),
                &signer(),
            )
            .unwrap();
        assert_eq!(outcome.lock, None);
        assert!(s.touch(T0 + 3, Some(GEN_B)).is_ok());
    }

    #[test]
    fn an_empty_witness_chain_never_unlocks_an_item_with_local_receipts() {
        let mut s = state(10);
        let mut witnessed = WitnessLog::new("lic-1");
        spend_witnessed(&mut s, &mut witnessed, 3, T0 + 1);
        spend_witnessed(&mut s, &mut witnessed, 2, T0 + 2);
        // The guest goes back to a snapshot taken after the first spend.
        s.receipts.truncate(1);
        assert!(s.touch(T0 + 3, Some(GEN_B)).is_err());
        let fresh_server = WitnessLog::new("lic-1");
        assert_eq!(
            s.reconcile(&fresh_server, T0 + 4, Some(GEN_B), &signer()),
            Err(RollbackError::WitnessUnaware { local: 1 })
        );
        assert!(s.touch(T0 + 4, Some(GEN_B)).is_err(), "still locked");
        // The witness that saw both spends unlocks it, with nothing regained.
        let outcome = s
            .reconcile(&witnessed, T0 + 5, Some(GEN_B), &signer())
            .unwrap();
        assert_eq!(outcome.lock, None);
        assert_eq!(s.remaining(PRODUCT), Some(5));
    }

    #[test]
    fn tampered_receipts_break_the_chain() {
        let mut s = state(10);
        s.spend(PRODUCT, 5, T0 + 1, Some(GEN_A), &signer()).unwrap();
        s.spend(PRODUCT, 1, T0 + 2, Some(GEN_A), &signer()).unwrap();
        let mut tampered = s.clone();
        tampered.receipts[0].units = 1;
        assert_eq!(
            tampered.verify(&signer().verifier()),
            Err(RollbackError::ChainBroken {
                seq: 1,
                what: "bad signature"
            })
        );
        let mut dropped = s.clone();
        dropped.receipts.remove(0);
        assert!(matches!(
            dropped.verify(&signer().verifier()),
            Err(RollbackError::ChainBroken { seq: 1, .. })
        ));
        let foreign = ReceiptSigner::from_bytes(&[1; 32]).verifier();
        assert!(s.verify(&foreign).is_err());
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = state(10);
        s.spend(PRODUCT, 2, T0 + 1, Some(GEN_A), &signer()).unwrap();
        let _ = s.touch(T0, Some(GEN_B));
        let json = serde_json::to_string(&s).unwrap();
        let back: MeteredState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(json.contains("\"reason\":\"vmgenid-changed\""));
    }
}
