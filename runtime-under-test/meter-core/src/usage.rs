//! The usage log: one record per grant, denial, release, reclaim and revocation, each chained to
//! the one before by its hash and sealed with the runtime's usage key.
//!
//! A record's stored form is its body (postcard), then its seal: nothing for a record inside a
//! commit; for the last record of each commit an HMAC-SHA256 tag (key derived from the usage
//! key), and, at most once a second or so (the writer decides), an Ed25519 signature after the
//! tag. Both cover the body with a domain prefix. A record's hash, over its stored form, is the
//! next record's `prev`, so each seal covers, through the chain, every record before it. The tag
//! costs a microsecond where a signature costs tens; the runtime, which holds the key, checks
//! both, and anyone with the public key alone checks every record up to the last signature.
//! Verifying walks the records in order and finds a removed record (a gap in the sequence and a
//! broken chain), an altered one (a broken chain after it, or a bad seal), a reordered one (a
//! sequence out of place), records appended without the key (an unsealed tail) and a removed or
//! added tail (a head other than the one kept beside the log). Whoever holds the usage key can
//! rewrite the whole log consistently: kept in the runtime's state, it stops users who cannot
//! read the state, and a head copied elsewhere stops the rest (see `meter usage verify`).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::allocation::ProductKey;
use crate::reason::Reason;

/// Domain of usage-record signatures and hashes.
const DOMAIN: &[u8] = b"meter-usage-v1\0";

/// Length of a record's signature at the end of its stored form.
const SIGNATURE_LEN: usize = 64;
/// Length of a record's tag at the end of its body.
const TAG_LEN: usize = 32;
/// What the tag key is derived for (HKDF info).
const TAG_KEY_INFO: &[u8] = b"meter-usage-tag-v1";

/// HMAC-SHA256 over records' bodies.
type TagMac = hmac::Hmac<Sha256>;

/// How a record is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// Inside a commit: the chain alone (a later seal covers it).
    Chained,
    /// The last of a commit: a tag only the runtime can make and check.
    Tagged,
    /// The last of a commit, and a signature anyone with the public key can check.
    Signed,
}

/// The key records' tags are made and checked with (secret: the runtime keeps it).
#[derive(Clone)]
pub struct TagKey([u8; 32]);

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TagKey(..)")
    }
}

impl TagKey {
    /// The tag key of the 32-byte usage secret.
    pub fn of_secret(secret: &[u8; 32]) -> Self {
        let mut key = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(Some(DOMAIN), secret)
            .expand(TAG_KEY_INFO, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 length");
        TagKey(key)
    }

    /// The HMAC over a record's body, with the domain prefix.
    fn mac_over(&self, body: &[u8]) -> TagMac {
        let mut mac =
            <TagMac as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(DOMAIN);
        mac.update(body);
        mac
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        self.mac_over(body).finalize().into_bytes().into()
    }

    /// Whether `tag` is the body's (compared in constant time).
    fn check(&self, body: &[u8], tag: &[u8]) -> bool {
        self.mac_over(body).verify_slice(tag).is_ok()
    }
}

/// Most problems one verification lists (the count goes on).
pub const MAX_LISTED_PROBLEMS: usize = 100;

/// What happened to a licence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UsageKind {
    /// A licence was granted.
    Grant,
    /// An access was refused.
    Denial {
        /// Why.
        reason: Reason,
        /// The access rule that refused it, by index in the rules document.
        rule: Option<u32>,
    },
    /// The holder released it (or exited).
    Release,
    /// The runtime took it back: its holder's lease ran out.
    Reclaim,
    /// The runtime took it back and told its holder why.
    Revocation {
        /// Why.
        reason: Reason,
    },
}

impl UsageKind {
    /// The kebab-case name used in reports.
    pub fn name(&self) -> &'static str {
        match self {
            UsageKind::Grant => "grant",
            UsageKind::Denial { .. } => "denial",
            UsageKind::Release => "release",
            UsageKind::Reclaim => "reclaim",
            UsageKind::Revocation { .. } => "revocation",
        }
    }

    /// Whether it ends a grant.
    pub fn ends_grant(&self) -> bool {
        matches!(
            self,
            UsageKind::Release | UsageKind::Reclaim | UsageKind::Revocation { .. }
        )
    }
}

/// One event, as the runtime saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct UsageEvent {
    /// When, unix ms (the runtime's clock).
    pub at_ms: u64,
    /// What happened.
    pub kind: UsageKind,
    /// The product.
    pub product: ProductKey,
    /// The grant's handle (0 for a denial).
    pub handle: u64,
    /// The user who asked, when known.
    pub user: Option<String>,
    /// The machine the access counts for.
    pub machine: String,
    /// The terminal-server session, for a session's station.
    pub session: Option<u32>,
    /// The client computer of a remote-desktop session.
    pub client_name: Option<String>,
    /// The address the access came from (a client runtime's peer, a session's client).
    pub address: Option<String>,
    /// Grants of the product this runtime holds after the event.
    pub in_use: u32,
    /// How long the grant was held (events that end one).
    pub held_ms: Option<u64>,
}

/// A record of the log: an event, its place and the hash of the record before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Place in the log, from 1.
    pub seq: u64,
    /// Hash of the previous record's stored form (zeros for the first).
    pub prev: [u8; 32],
    /// The event.
    pub event: UsageEvent,
}

/// The last record of a log: its place and hash (place 0: an empty log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogHead {
    /// The last record's place.
    pub seq: u64,
    /// The last record's hash.
    pub hash: [u8; 32],
}

impl LogHead {
    /// Stored form: place (8 bytes, little endian) then hash.
    pub fn to_bytes(&self) -> [u8; 40] {
        let mut bytes = [0u8; 40];
        bytes[..8].copy_from_slice(&self.seq.to_le_bytes());
        bytes[8..].copy_from_slice(&self.hash);
        bytes
    }

    /// Reads a stored head.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let seq = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let hash = bytes.get(8..)?.try_into().ok()?;
        Some(LogHead { seq, hash })
    }

    /// `seq:hash-hex`, as `meter usage verify` prints it.
    pub fn display(&self) -> String {
        format!("{}:{}", self.seq, hex::encode(self.hash))
    }
}

/// A usage event encoded ahead of sealing (the sealer only places and seals it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEvent(Vec<u8>);

impl EncodedEvent {
    /// Encodes `event` as a record's body holds it.
    pub fn of(event: &UsageEvent) -> Self {
        EncodedEvent(postcard::to_stdvec(event).expect("usage events always encode"))
    }
}

/// The hash of a record's stored form.
pub fn record_hash(stored: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    hasher.update(stored);
    hasher.finalize().into()
}

/// Seals events into records: places them after the head, tags and signs them.
pub struct UsageSealer {
    key: SigningKey,
    tag_key: TagKey,
    head: LogHead,
}

impl std::fmt::Debug for UsageSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageSealer")
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl UsageSealer {
    /// A sealer with the 32-byte secret key, continuing the log after `head`.
    pub fn new(secret: &[u8; 32], head: LogHead) -> Self {
        UsageSealer {
            key: SigningKey::from_bytes(secret),
            tag_key: TagKey::of_secret(secret),
            head,
        }
    }

    /// The key this sealer's tags check under.
    pub fn tag_key(&self) -> TagKey {
        self.tag_key.clone()
    }

    /// The public key records verify under.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The last sealed record.
    pub fn head(&self) -> LogHead {
        self.head
    }

    /// Goes on after `head` (the records after it were not written).
    pub fn rewind(&mut self, head: LogHead) {
        self.head = head;
    }

    /// Seals the next record as `seal` says; its place and stored form.
    pub fn seal(&mut self, event: &EncodedEvent, seal: Seal) -> (u64, Vec<u8>) {
        let seq = self.head.seq.saturating_add(1);
        // The body is a `UsageRecord` in postcard: the fields one after the other, the event
        // encoded already (by whoever asked, not by the writer that seals in commit order).
        let mut varint = [0u8; 10];
        let seq_bytes = postcard::to_slice(&seq, &mut varint).expect("a u64 fits ten bytes");
        let mut stored = Vec::with_capacity(
            seq_bytes.len() + self.head.hash.len() + event.0.len() + TAG_LEN + SIGNATURE_LEN,
        );
        stored.extend_from_slice(seq_bytes);
        stored.extend_from_slice(&self.head.hash);
        stored.extend_from_slice(&event.0);
        if seal != Seal::Chained {
            let tag = self.tag_key.tag(&stored);
            let signature = (seal == Seal::Signed).then(|| self.key.sign(&signed_message(&stored)));
            stored.extend_from_slice(&tag);
            if let Some(signature) = signature {
                stored.extend_from_slice(&signature.to_bytes());
            }
        }
        self.head = LogHead {
            seq,
            hash: record_hash(&stored),
        };
        (seq, stored)
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    [DOMAIN, body].concat()
}

/// Reads a stored record without checking its seal.
pub fn read_record(stored: &[u8]) -> Option<UsageRecord> {
    split_record(stored).map(|s| s.record)
}

/// A stored record taken apart.
struct StoredRecord<'s> {
    record: UsageRecord,
    /// The body's bytes (what the tag and signature cover).
    body: &'s [u8],
    /// The tag, on the last record of a commit.
    tag: Option<&'s [u8]>,
    /// The signature, on some of those.
    signature: Option<&'s [u8]>,
}

/// Takes a stored record apart.
fn split_record(stored: &[u8]) -> Option<StoredRecord<'_>> {
    let (record, rest) = postcard::take_from_bytes::<UsageRecord>(stored).ok()?;
    let body = &stored[..stored.len() - rest.len()];
    let (tag, signature) = match rest.len() {
        0 => (None, None),
        TAG_LEN => (Some(rest), None),
        n if n == TAG_LEN + SIGNATURE_LEN => {
            let (tag, signature) = rest.split_at(TAG_LEN);
            (Some(tag), Some(signature))
        }
        _ => return None,
    };
    Some(StoredRecord {
        record,
        body,
        tag,
        signature,
    })
}

/// Something wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "problem")]
pub enum LogProblem {
    /// A record cannot be read.
    Unreadable {
        /// Its place in the table.
        at: u64,
    },
    /// A record says it belongs elsewhere (records moved).
    OutOfPlace {
        /// Its place in the table.
        at: u64,
        /// The place it names.
        names: u64,
    },
    /// Records are missing before this place.
    Missing {
        /// The first missing place.
        from: u64,
        /// The next record present.
        to: u64,
    },
    /// A record does not follow the one before it (one before was removed, altered or moved).
    ChainBroken {
        /// Its place.
        at: u64,
    },
    /// A record's tag or signature does not verify (it was altered or forged).
    BadSignature {
        /// Its place.
        at: u64,
    },
    /// The log ends in records no seal the verifier can check covers (appended by someone
    /// without the key; with the public key alone, the tail after the last signature).
    UnsignedTail {
        /// The first record after the last checked seal.
        from: u64,
    },
    /// The log ends elsewhere than the head kept beside it says (its tail was cut or added to).
    HeadMismatch {
        /// The head kept, `seq:hash`.
        kept: String,
        /// The head found, `seq:hash`.
        found: String,
    },
}

/// What verifying a log found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Verification {
    /// Records read.
    pub records: u64,
    /// The head found, `seq:hash`.
    pub head: String,
    /// Problems found (at most [`MAX_LISTED_PROBLEMS`] listed).
    pub problems: Vec<LogProblem>,
    /// How many problems there were in all.
    pub problem_count: u64,
}

impl Verification {
    /// True when nothing was found wrong.
    pub fn intact(&self) -> bool {
        self.problem_count == 0
    }
}

/// Walks a log (place and stored form, in place order), checking places, chain, signatures
/// under `public_key` and tags under `tag_key` (the runtime's; without it tags are skipped and
/// only signatures seal), and its end against `kept_head` when one is kept.
pub fn verify<'a>(
    rows: impl IntoIterator<Item = (u64, &'a [u8])>,
    public_key: &[u8; 32],
    tag_key: Option<&TagKey>,
    kept_head: Option<LogHead>,
) -> Verification {
    let key = VerifyingKey::from_bytes(public_key).ok();
    let mut problems = Vec::new();
    let mut problem_count = 0u64;
    let mut note = |problem: LogProblem| {
        problem_count += 1;
        if problems.len() < MAX_LISTED_PROBLEMS {
            problems.push(problem);
        }
    };
    let mut head = LogHead::default();
    let mut records = 0u64;
    let mut unsigned_from: Option<u64> = None;
    for (at, stored) in rows {
        records += 1;
        let expected = head.seq.saturating_add(1);
        if at != expected {
            note(LogProblem::Missing {
                from: expected,
                to: at,
            });
        }
        match split_record(stored) {
            None => note(LogProblem::Unreadable { at }),
            Some(StoredRecord {
                record,
                body,
                tag,
                signature,
            }) => {
                if record.seq != at {
                    note(LogProblem::OutOfPlace {
                        at,
                        names: record.seq,
                    });
                }
                if record.prev != head.hash {
                    note(LogProblem::ChainBroken { at });
                }
                let tag_checked = match (tag, tag_key) {
                    (Some(tag), Some(tag_key)) => Some(tag_key.check(body, tag)),
                    _ => None,
                };
                let signature_checked = signature.map(|signature| {
                    key.as_ref().is_some_and(|key| {
                        Signature::from_slice(signature)
                            .is_ok_and(|s| key.verify_strict(&signed_message(body), &s).is_ok())
                    })
                });
                match (tag_checked, signature_checked) {
                    (None, None) => {
                        unsigned_from.get_or_insert(at);
                    }
                    (Some(false), _) | (_, Some(false)) => {
                        note(LogProblem::BadSignature { at });
                        unsigned_from = None;
                    }
                    _ => unsigned_from = None,
                }
            }
        }
        head = LogHead {
            seq: at,
            hash: record_hash(stored),
        };
    }
    if let Some(from) = unsigned_from {
        note(LogProblem::UnsignedTail { from });
    }
    if let Some(kept) = kept_head
        && kept != head
    {
        note(LogProblem::HeadMismatch {
            kept: kept.display(),
            found: head.display(),
        });
    }
    Verification {
        records,
        head: head.display(),
        problems,
        problem_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> UsageEvent {
        UsageEvent {
            at_ms: 1_000 * n,
            kind: if !n.is_multiple_of(2) {
                UsageKind::Grant
            } else {
                UsageKind::Release
            },
            product: ProductKey {
                firm: 10,
                code: 1001,
            },
            handle: n.div_ceil(2),
            user: Some("dan".into()),
            machine: "ts1".into(),
            session: Some(3),
            client_name: Some("pc-1".into()),
            address: Some("10.0.0.1".into()),
            in_use: u32::try_from(n % 2).unwrap(),
            held_ms: n.is_multiple_of(2).then_some(1_000),
        }
    }

    /// The seal of record `i` of `n` committed two at a time, every second commit signed.
    fn seal_of(i: u64, n: u64) -> Seal {
        if i.is_multiple_of(4) || i == n {
            Seal::Signed
        } else if i.is_multiple_of(2) {
            Seal::Tagged
        } else {
            Seal::Chained
        }
    }

    /// A log of `n` records, committed two at a time, and its sealer.
    fn log(n: u64) -> (Vec<(u64, Vec<u8>)>, UsageSealer) {
        let mut sealer = UsageSealer::new(&[7; 32], LogHead::default());
        let rows = (1..=n)
            .map(|i| sealer.seal(&EncodedEvent::of(&event(i)), seal_of(i, n)))
            .collect();
        (rows, sealer)
    }

    fn check(rows: &[(u64, Vec<u8>)], sealer: &UsageSealer) -> Verification {
        verify(
            rows.iter().map(|(k, v)| (*k, v.as_slice())),
            &sealer.public_key(),
            Some(&sealer.tag_key()),
            Some(sealer.head()),
        )
    }

    fn check_public(rows: &[(u64, Vec<u8>)], sealer: &UsageSealer) -> Verification {
        verify(
            rows.iter().map(|(k, v)| (*k, v.as_slice())),
            &sealer.public_key(),
            None,
            Some(sealer.head()),
        )
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (rows, sealer) = log(6);
        let found = check(&rows, &sealer);
        assert!(found.intact(), "{found:?}");
        assert_eq!(found.records, 6);
        assert_eq!(found.head, sealer.head().display());
    }

    #[test]
    fn a_removed_record_is_found() {
        let (mut rows, sealer) = log(6);
        rows.remove(2);
        let found = check(&rows, &sealer);
        assert_eq!(
            found.problems,
            vec![
                LogProblem::Missing { from: 3, to: 4 },
                LogProblem::ChainBroken { at: 4 }
            ]
        );
    }

    /// Record `index` of `rows` with its user changed, its seal (if any) kept.
    fn alter(rows: &mut [(u64, Vec<u8>)], index: usize) {
        let stored = split_record(&rows[index].1).unwrap();
        let seal: Vec<u8> = [stored.tag, stored.signature]
            .into_iter()
            .flatten()
            .flatten()
            .copied()
            .collect();
        let mut record = stored.record;
        record.event.user = Some("sam".into());
        let mut stored = postcard::to_stdvec(&record).unwrap();
        stored.extend(seal);
        rows[index].1 = stored;
    }

    #[test]
    fn an_altered_record_is_found() {
        // A tagged record (the second): its tag and the chain after it.
        let (mut rows, sealer) = log(6);
        alter(&mut rows, 1);
        let found = check(&rows, &sealer);
        assert_eq!(
            found.problems,
            vec![
                LogProblem::BadSignature { at: 2 },
                LogProblem::ChainBroken { at: 3 }
            ]
        );
        // A signed one (the fourth): found with the public key alone too.
        let (mut rows, sealer) = log(6);
        alter(&mut rows, 3);
        let found = check_public(&rows, &sealer);
        assert_eq!(
            found.problems,
            vec![
                LogProblem::BadSignature { at: 4 },
                LogProblem::ChainBroken { at: 5 }
            ]
        );
        // An unsigned one (the first): the chain after it.
        let (mut rows, sealer) = log(6);
        alter(&mut rows, 0);
        let found = check(&rows, &sealer);
        assert_eq!(found.problems, vec![LogProblem::ChainBroken { at: 2 }]);
    }

    #[test]
    fn records_appended_without_the_key_are_found() {
        let cases = [
            // Chained correctly, but whoever appends without the key cannot seal the last one.
            (Seal::Chained, LogProblem::UnsignedTail { from: 5 }),
            (Seal::Tagged, LogProblem::BadSignature { at: 5 }),
            (Seal::Signed, LogProblem::BadSignature { at: 5 }),
        ];
        for (seal, problem) in cases {
            let (mut rows, mut sealer) = log(4);
            let mut forger = UsageSealer::new(&[9; 32], sealer.head());
            rows.push(forger.seal(&EncodedEvent::of(&event(5)), seal));
            sealer.rewind(forger.head());
            assert_eq!(check(&rows, &sealer).problems, vec![problem], "{seal:?}");
        }
    }

    #[test]
    fn with_the_public_key_alone_a_tagged_tail_is_unchecked() {
        let (mut rows, mut sealer) = log(4);
        rows.push(sealer.seal(&EncodedEvent::of(&event(5)), Seal::Chained));
        rows.push(sealer.seal(&EncodedEvent::of(&event(6)), Seal::Tagged));
        assert!(check(&rows, &sealer).intact());
        let found = check_public(&rows, &sealer);
        assert_eq!(found.problems, vec![LogProblem::UnsignedTail { from: 5 }]);
    }

    #[test]
    fn reordered_records_are_found() {
        let (mut rows, sealer) = log(6);
        let second = rows[1].1.clone();
        rows[1].1 = rows[2].1.clone();
        rows[2].1 = second;
        let found = check(&rows, &sealer);
        assert!(
            found
                .problems
                .contains(&LogProblem::OutOfPlace { at: 2, names: 3 })
        );
        assert!(found.problems.contains(&LogProblem::ChainBroken { at: 2 }));
    }

    #[test]
    fn a_cut_tail_is_found_by_the_kept_head_only() {
        // Cut back to a commit's end: what is left is chained and signed.
        let (mut rows, sealer) = log(6);
        rows.truncate(4);
        let found = check(&rows, &sealer);
        assert!(matches!(
            found.problems.as_slice(),
            [LogProblem::HeadMismatch { .. }]
        ));
        let unanchored = verify(
            rows.iter().map(|(k, v)| (*k, v.as_slice())),
            &sealer.public_key(),
            Some(&sealer.tag_key()),
            None,
        );
        assert!(unanchored.intact());
    }

    #[test]
    fn another_key_verifies_nothing() {
        let (rows, _) = log(4);
        let other = UsageSealer::new(&[8; 32], LogHead::default());
        let found = verify(
            rows.iter().map(|(k, v)| (*k, v.as_slice())),
            &other.public_key(),
            Some(&other.tag_key()),
            None,
        );
        // Records 2 (tagged) and 4 (signed and tagged).
        assert_eq!(found.problem_count, 2);
    }

    #[test]
    fn a_reopened_log_continues_its_chain() {
        let (mut rows, sealer) = log(3);
        let mut reopened = UsageSealer::new(&[7; 32], sealer.head());
        rows.push(reopened.seal(&EncodedEvent::of(&event(4)), Seal::Tagged));
        assert!(check(&rows, &reopened).intact());
    }

    #[test]
    fn a_body_is_the_record_in_postcard() {
        let (rows, _) = log(3);
        let mut prev = [0u8; 32];
        for (seq, stored) in &rows {
            let record = UsageRecord {
                seq: *seq,
                prev,
                event: event(*seq),
            };
            let body = postcard::to_stdvec(&record).unwrap();
            assert_eq!(split_record(stored).unwrap().body, body.as_slice());
            assert_eq!(read_record(stored), Some(record));
            prev = record_hash(stored);
        }
    }

    #[test]
    fn heads_round_trip() {
        let (_, sealer) = log(3);
        let head = sealer.head();
        assert_eq!(LogHead::from_bytes(&head.to_bytes()), Some(head));
        assert_eq!(LogHead::from_bytes(&[1, 2]), None);
    }
}
