//! Cryptographic binding of a licence content key to machine traits.
//!
//! The 32-byte content key is split by threshold secret sharing. Each trait in the recipe receives
//! as many shares as its weight; those shares are encrypted under a key derived from one value of
//! that trait. Opening decrypts whatever shares the current machine's trait values unlock and
//! interpolates the key: with fewer shares than the threshold there is nothing to interpolate.

use std::collections::BTreeMap;
use std::fmt;

use blahaj::{Share, Sharks};
use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::traits::{MachineKind, MachineTraits, names};

/// How many trait changes a bound licence survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tolerance {
    /// Survives a move to other hardware as long as enough identity travels with it.
    Loose,
    /// Survives one changed component; detects a copy to another host.
    #[default]
    Medium,
    /// Any changed weighted hardware trait breaks the binding.
    Strict,
}

/// Which machine property a licence is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindingScheme {
    /// Weighted hardware traits (physical or virtual-machine recipe).
    #[default]
    Smartbind,
    /// A random id created at activation that travels with the disk.
    Random,
    /// The machine's IP address.
    Ip,
}

/// Vendor choice of binding scheme and tolerance for one product item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct BindingPolicy {
    /// Binding scheme.
    pub scheme: BindingScheme,
    /// Tolerance to trait changes.
    pub tolerance: Tolerance,
}

/// Why a key could not be bound or recovered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    /// Too few of the machine's traits match the bound ones to rebuild the key.
    #[error("Too few matching traits: {matched} shares of {needed} needed")]
    TooFewTraits {
        /// Shares unlocked by the current traits.
        matched: u32,
        /// Shares needed to rebuild the key.
        needed: u32,
    },
    /// The machine lacks the traits the recipe needs to seal a key.
    #[error("Not enough traits to bind to: {available} shares available, {needed} needed")]
    NotEnoughTraitsToSeal {
        /// Shares the present traits could carry.
        available: u32,
        /// Shares the recipe needs at least.
        needed: u32,
    },
    /// The envelope is inconsistent: shares decrypted but rebuild a different key.
    #[error("Binding envelope corrupt")]
    EnvelopeCorrupt,
    /// The envelope has a version or field this code does not understand.
    #[error("Binding envelope malformed: {0}")]
    Malformed(String),
}

/// The 32-byte symmetric key protecting a licence's content.
#[derive(Clone, PartialEq, Eq)]
pub struct ContentKey([u8; 32]);

impl ContentKey {
    /// Wraps raw key bytes (e.g. fresh entropy from the vendor tool).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentKey(..)")
    }
}

/// Weight of one trait in a recipe: the number of shares it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraitWeight {
    /// Trait name.
    pub name: &'static str,
    /// Number of shares.
    pub weight: u8,
    /// True for traits a guest inherits from its host (virtual-machine recipes only).
    pub host_derived: bool,
}

const fn w(name: &'static str, weight: u8, host_derived: bool) -> TraitWeight {
    TraitWeight {
        name,
        weight,
        host_derived,
    }
}

/// Physical machines: one component (board, disk, NIC, CPU) carries at most 4 shares.
pub const PHYSICAL_RECIPE: &[TraitWeight] = &[
    w(names::BOARD_SERIAL, 4, false),
    w(names::DISK_SERIAL, 4, false),
    w(names::PRODUCT_UUID, 3, false),
    w(names::NIC_MAC, 3, false),
    w(names::CPU_VENDOR, 1, false),
    w(names::CPU_MODEL_NAME, 1, false),
    w(names::CPU_FAMILY, 1, false),
    w(names::CPU_MODEL, 1, false),
];

/// Guests under medium and strict: the host's CPU as seen by the guest outweighs the VM identity.
pub const GUEST_HOST_ANCHORED_RECIPE: &[TraitWeight] = &[
    w(names::CPU_VENDOR, 5, true),
    w(names::CPU_MODEL_NAME, 6, true),
    w(names::CPU_FAMILY, 5, true),
    w(names::CPU_MODEL, 6, true),
    w(names::CPU_STEPPING, 5, true),
    w(names::CPU_MICROCODE, 5, true),
    w(names::CPU_FLAGS, 6, true),
    w(names::PRODUCT_UUID, 1, false),
    w(names::PRODUCT_SERIAL, 1, false),
    w(names::NIC_MAC, 1, false),
    w(names::DISK_SERIAL, 1, false),
];

/// Guests under loose: the VM's own identity carries the licence from host to host.
pub const GUEST_PORTABLE_RECIPE: &[TraitWeight] = &[
    w(names::PRODUCT_UUID, 3, false),
    w(names::PRODUCT_SERIAL, 3, false),
    w(names::DISK_SERIAL, 3, false),
    w(names::NIC_MAC, 2, false),
    w(names::CPU_VENDOR, 1, true),
    w(names::CPU_MODEL_NAME, 1, true),
    w(names::CPU_FAMILY, 1, true),
    w(names::CPU_MODEL, 1, true),
    w(names::CPU_STEPPING, 1, true),
    w(names::CPU_MICROCODE, 1, true),
    w(names::CPU_FLAGS, 1, true),
];

const RANDOM_RECIPE: &[TraitWeight] = &[w(names::RUNTIME_RANDOM_ID, 1, false)];
const IP_RECIPE: &[TraitWeight] = &[w(names::NET_IP, 1, false)];

/// Slack of the portable guest recipe under loose: at most this many of its shares may be missing.
const PORTABLE_LOOSE_SLACK: u32 = 10;
/// Slack of the physical recipe under medium (one component) and loose (about half).
const PHYSICAL_MEDIUM_SLACK: u32 = 4;
const PHYSICAL_LOOSE_SLACK: u32 = 9;
/// Host-anchored guest recipe under medium: threshold one share below the host-derived total, so one
/// weight-5 host trait (in practice: a microcode update) may change while all four VM-only traits match.
const GUEST_MEDIUM_HOST_SLACK: u32 = 1;

/// A recipe: weighted traits plus the rule that turns present weights into a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// Weighted traits.
    pub weights: &'static [TraitWeight],
    rule: ThresholdRule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThresholdRule {
    /// Threshold = all present shares minus this slack.
    TotalMinus(u32),
    /// Threshold = present host-derived shares minus this slack (VM-only shares are a bonus).
    HostMinus(u32),
}

impl Recipe {
    /// The recipe used for a machine kind, scheme and tolerance.
    pub fn select(kind: MachineKind, policy: &BindingPolicy) -> Recipe {
        use ThresholdRule::*;
        match (policy.scheme, kind, policy.tolerance) {
            (BindingScheme::Random, _, _) => Recipe {
                weights: RANDOM_RECIPE,
                rule: TotalMinus(0),
            },
            (BindingScheme::Ip, _, _) => Recipe {
                weights: IP_RECIPE,
                rule: TotalMinus(0),
            },
            (BindingScheme::Smartbind, MachineKind::Physical, tolerance) => Recipe {
                weights: PHYSICAL_RECIPE,
                rule: TotalMinus(match tolerance {
                    Tolerance::Strict => 0,
                    Tolerance::Medium => PHYSICAL_MEDIUM_SLACK,
                    Tolerance::Loose => PHYSICAL_LOOSE_SLACK,
                }),
            },
            (BindingScheme::Smartbind, MachineKind::Guest, Tolerance::Strict) => Recipe {
                weights: GUEST_HOST_ANCHORED_RECIPE,
                rule: HostMinus(0),
            },
            (BindingScheme::Smartbind, MachineKind::Guest, Tolerance::Medium) => Recipe {
                weights: GUEST_HOST_ANCHORED_RECIPE,
                rule: HostMinus(GUEST_MEDIUM_HOST_SLACK),
            },
            (BindingScheme::Smartbind, MachineKind::Guest, Tolerance::Loose) => Recipe {
                weights: GUEST_PORTABLE_RECIPE,
                rule: TotalMinus(PORTABLE_LOOSE_SLACK),
            },
        }
    }

    /// Threshold for the given present weights (all shares, host-derived shares).
    fn threshold(&self, total: u32, host: u32) -> u32 {
        match self.rule {
            ThresholdRule::TotalMinus(slack) => total.saturating_sub(slack),
            ThresholdRule::HostMinus(slack) => host.saturating_sub(slack),
        }
    }

    /// Smallest threshold this recipe accepts when sealing; below it the binding would mean little.
    fn minimum_threshold(&self) -> u32 {
        match self.rule {
            ThresholdRule::TotalMinus(0) if self.weights.len() == 1 => 1,
            _ => 2,
        }
    }
}

/// One encrypted copy of a trait's shares, unlocked by one value of that trait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SealedShares {
    /// AEAD nonce, hex.
    pub nonce: String,
    /// Encrypted shares (x byte + 32 y bytes each), hex.
    pub ciphertext: String,
}

/// The shares of one trait, sealed once per value the trait had at activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TraitSlot {
    /// Trait name.
    #[serde(rename = "trait")]
    pub trait_name: String,
    /// Number of shares this trait carries.
    pub weight: u8,
    /// One sealed copy per value.
    pub sealed: Vec<SealedShares>,
}

/// A content key bound to a machine's traits; travels inside the signed licence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BindingEnvelope {
    /// Format version.
    pub version: u8,
    /// Scheme and tolerance the key was bound with.
    pub policy: BindingPolicy,
    /// Kind of machine the key was bound on.
    pub kind: MachineKind,
    /// Shares needed to rebuild the key.
    pub threshold: u32,
    /// Per-licence HKDF salt, hex.
    pub salt: String,
    /// Commitment to the key (SHA-256 over salt and key), hex.
    pub key_check: String,
    /// Sealed shares per trait.
    pub slots: Vec<TraitSlot>,
}

impl BindingEnvelope {
    /// Total number of shares in the envelope.
    pub fn total_shares(&self) -> u32 {
        self.slots.iter().map(|s| u32::from(s.weight)).sum()
    }
}

const ENVELOPE_VERSION: u8 = 1;
const SHARE_LEN: usize = 33;

/// Binds `key` to `traits` with the recipe for `kind` and `policy`; `entropy` drives every random choice.
pub fn seal(
    key: &ContentKey,
    traits: &MachineTraits,
    kind: MachineKind,
    policy: &BindingPolicy,
    entropy: [u8; 32],
) -> Result<BindingEnvelope, BindingError> {
    let recipe = Recipe::select(kind, policy);
    let present: Vec<(&TraitWeight, Vec<String>)> = recipe
        .weights
        .iter()
        .map(|tw| (tw, traits.binding_values(tw.name)))
        .filter(|(_, values)| !values.is_empty())
        .collect();
    let total: u32 = present.iter().map(|(tw, _)| u32::from(tw.weight)).sum();
    let host: u32 = present
        .iter()
        .filter(|(tw, _)| tw.host_derived)
        .map(|(tw, _)| u32::from(tw.weight))
        .sum();
    let threshold = recipe.threshold(total, host);
    let minimum = recipe.minimum_threshold();
    if threshold < minimum || total < threshold {
        return Err(BindingError::NotEnoughTraitsToSeal {
            available: total,
            needed: minimum.max(threshold),
        });
    }
    let threshold_u8 = u8::try_from(threshold)
        .map_err(|_| BindingError::Malformed(format!("threshold {threshold} above 255 shares")))?;

    let mut rng = ChaCha20Rng::from_seed(entropy);
    let mut salt = [0u8; 32];
    rng.fill_bytes(&mut salt);
    let mut shares = Sharks(threshold_u8).dealer_rng(key.as_bytes(), &mut rng);

    let mut slots = Vec::with_capacity(present.len());
    for (tw, values) in present {
        let mut plaintext = Vec::with_capacity(usize::from(tw.weight) * SHARE_LEN);
        for _ in 0..tw.weight {
            let share = shares.next().ok_or_else(|| {
                BindingError::Malformed("more than 255 shares requested".to_owned())
            })?;
            plaintext.extend(Vec::<u8>::from(&share));
        }
        let mut sealed = Vec::with_capacity(values.len());
        for value in &values {
            let mut nonce = [0u8; 12];
            rng.fill_bytes(&mut nonce);
            let cipher = share_cipher(&salt, tw.name, value);
            let ciphertext = cipher
                .encrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: &plaintext,
                        aad: &aad(&salt, tw.name),
                    },
                )
                .map_err(|_| BindingError::Malformed("share encryption failed".to_owned()))?;
            sealed.push(SealedShares {
                nonce: hex::encode(nonce),
                ciphertext: hex::encode(ciphertext),
            });
        }
        slots.push(TraitSlot {
            trait_name: tw.name.to_owned(),
            weight: tw.weight,
            sealed,
        });
    }

    Ok(BindingEnvelope {
        version: ENVELOPE_VERSION,
        policy: *policy,
        kind,
        threshold,
        salt: hex::encode(salt),
        key_check: hex::encode(key_check(&salt, key.as_bytes())),
        slots,
    })
}

/// Rebuilds the content key from the shares the current `traits` unlock.
pub fn open(env: &BindingEnvelope, traits: &MachineTraits) -> Result<ContentKey, BindingError> {
    if env.version != ENVELOPE_VERSION {
        return Err(BindingError::Malformed(format!(
            "unknown version {}",
            env.version
        )));
    }
    let salt = decode_array::<32>(&env.salt, "salt")?;
    let expected_check = decode_array::<32>(&env.key_check, "key-check")?;
    let threshold = u8::try_from(env.threshold)
        .ok()
        .filter(|t| *t >= 1)
        .ok_or_else(|| BindingError::Malformed(format!("threshold {}", env.threshold)))?;

    let mut unlocked: BTreeMap<u8, Share> = BTreeMap::new();
    for slot in &env.slots {
        let values = traits.binding_values(&slot.trait_name);
        if values.is_empty() {
            continue;
        }
        'values: for value in &values {
            let cipher = share_cipher(&salt, &slot.trait_name, value);
            for sealed in &slot.sealed {
                let nonce = decode_array::<12>(&sealed.nonce, "nonce")?;
                let ciphertext = hex::decode(&sealed.ciphertext)
                    .map_err(|_| BindingError::Malformed("ciphertext is not hex".to_owned()))?;
                let Ok(plaintext) = cipher.decrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: &ciphertext,
                        aad: &aad(&salt, &slot.trait_name),
                    },
                ) else {
                    continue;
                };
                if plaintext.len() != usize::from(slot.weight) * SHARE_LEN {
                    return Err(BindingError::EnvelopeCorrupt);
                }
                for chunk in plaintext.chunks_exact(SHARE_LEN) {
                    let share =
                        Share::try_from(chunk).map_err(|_| BindingError::EnvelopeCorrupt)?;
                    unlocked.insert(share.x.0, share);
                }
                break 'values;
            }
        }
    }

    let matched = u32::try_from(unlocked.len()).unwrap_or(u32::MAX);
    if matched < u32::from(threshold) {
        return Err(BindingError::TooFewTraits {
            matched,
            needed: u32::from(threshold),
        });
    }
    let secret = Sharks(threshold)
        .recover(unlocked.values())
        .map_err(|_| BindingError::EnvelopeCorrupt)?;
    let key: [u8; 32] = secret
        .as_slice()
        .try_into()
        .map_err(|_| BindingError::EnvelopeCorrupt)?;
    if key_check(&salt, &key) != expected_check {
        return Err(BindingError::EnvelopeCorrupt);
    }
    Ok(ContentKey(key))
}

fn share_cipher(salt: &[u8; 32], trait_name: &str, value: &str) -> ChaCha20Poly1305 {
    let hkdf = Hkdf::<Sha256>::new(Some(salt), value.as_bytes());
    let mut okm = [0u8; 32];
    let info = [
        b"meter-binding-v1 share-key ".as_slice(),
        trait_name.as_bytes(),
    ]
    .concat();
    hkdf.expand(&info, &mut okm)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    ChaCha20Poly1305::new(&Key::from(okm))
}

fn aad(salt: &[u8; 32], trait_name: &str) -> Vec<u8> {
    [b"meter-binding-v1".as_slice(), salt, trait_name.as_bytes()].concat()
}

fn key_check(salt: &[u8; 32], key: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"meter-binding-v1 key-check");
    hasher.update(salt);
    hasher.update(key);
    hasher.finalize().into()
}

fn decode_array<const N: usize>(text: &str, field: &str) -> Result<[u8; N], BindingError> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| <[u8; N]>::try_from(bytes).ok())
        .ok_or_else(|| BindingError::Malformed(format!("{field} is not {N} hex bytes")))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rstest::rstest;

    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn policy(tolerance: Tolerance) -> BindingPolicy {
        BindingPolicy {
            scheme: BindingScheme::Smartbind,
            tolerance,
        }
    }

    fn intel_host_cpu(traits: MachineTraits) -> MachineTraits {
        traits
            .with(names::CPU_VENDOR, "GenuineIntel")
            .with(
                names::CPU_MODEL_NAME,
                "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz",
            )
            .with(names::CPU_FAMILY, "6")
            .with(names::CPU_MODEL, "85")
            .with(names::CPU_STEPPING, "7")
            .with(names::CPU_MICROCODE, "0x5003604")
            .with(names::CPU_FLAGS, "3f1c0a77e2")
    }

    fn amd_host_cpu(traits: MachineTraits) -> MachineTraits {
        traits
            .with(names::CPU_VENDOR, "AuthenticAMD")
            .with(names::CPU_MODEL_NAME, "AMD EPYC 7543 32-Core Processor")
            .with(names::CPU_FAMILY, "25")
            .with(names::CPU_MODEL, "1")
            .with(names::CPU_STEPPING, "1")
            .with(names::CPU_MICROCODE, "0xa0011d1")
            .with(names::CPU_FLAGS, "9b20e4c5d1")
    }

    fn guest_identity() -> MachineTraits {
        MachineTraits::new()
            .with(names::PRODUCT_UUID, "5b0f6a0e-4c1d-4f3b-9a55-1f2e3d4c5b6a")
            .with(names::PRODUCT_SERIAL, "vm-serial-0001")
            .with(names::NIC_MAC, ["52:54:00:12:34:56"])
            .with(names::DISK_SERIAL, ["QM00001"])
    }

    fn guest_on_intel() -> MachineTraits {
        intel_host_cpu(guest_identity())
    }

    fn physical_host() -> MachineTraits {
        intel_host_cpu(MachineTraits::new())
            .with(names::BOARD_SERIAL, "BRD-4711")
            .with(names::PRODUCT_UUID, "a1b2c3d4-0000-4000-8000-000000000001")
            .with(names::DISK_SERIAL, ["S3Z9NB0K123456", "WD-WX11A1234567"])
            .with(names::NIC_MAC, ["3c:ec:ef:00:00:01", "3c:ec:ef:00:00:02"])
    }

    fn seal_for(
        traits: &MachineTraits,
        kind: MachineKind,
        tolerance: Tolerance,
    ) -> BindingEnvelope {
        seal(
            &ContentKey::from_bytes(KEY),
            traits,
            kind,
            &policy(tolerance),
            [42; 32],
        )
        .unwrap()
    }

    fn opens(env: &BindingEnvelope, traits: &MachineTraits) -> bool {
        match open(env, traits) {
            Ok(key) => {
                assert_eq!(key.as_bytes(), &KEY);
                true
            }
            Err(BindingError::TooFewTraits { matched, needed }) => {
                assert!(matched < needed);
                false
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[rstest]
    fn same_machine_opens(
        #[values(Tolerance::Loose, Tolerance::Medium, Tolerance::Strict)] tolerance: Tolerance,
        #[values(MachineKind::Physical, MachineKind::Guest)] kind: MachineKind,
    ) {
        let traits = match kind {
            MachineKind::Physical => physical_host(),
            MachineKind::Guest => guest_on_intel(),
        };
        assert!(opens(&seal_for(&traits, kind, tolerance), &traits));
    }

    #[rstest]
    fn guest_moved_within_host_with_new_mac_and_uuid_stays_valid(
        #[values(Tolerance::Loose, Tolerance::Medium, Tolerance::Strict)] tolerance: Tolerance,
    ) {
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, tolerance);
        let new_mac = guest_on_intel().with(names::NIC_MAC, ["52:54:00:ab:cd:ef"]);
        assert!(opens(&env, &new_mac));
        let new_mac_and_uuid =
            new_mac.with(names::PRODUCT_UUID, "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a");
        assert!(opens(&env, &new_mac_and_uuid));
    }

    #[rstest]
    #[case::medium(Tolerance::Medium)]
    #[case::strict(Tolerance::Strict)]
    fn guest_with_whole_new_vm_identity_on_same_host_stays_valid(#[case] tolerance: Tolerance) {
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, tolerance);
        let renewed = intel_host_cpu(
            MachineTraits::new()
                .with(names::PRODUCT_UUID, "11111111-2222-4333-8444-555555555555")
                .with(names::PRODUCT_SERIAL, "vm-serial-9999")
                .with(names::NIC_MAC, ["52:54:00:99:99:99"])
                .with(names::DISK_SERIAL, ["QM00099"]),
        );
        assert!(opens(&env, &renewed));
    }

    #[rstest]
    #[case::loose(Tolerance::Loose, true)]
    #[case::medium(Tolerance::Medium, false)]
    #[case::strict(Tolerance::Strict, false)]
    fn guest_copied_to_other_vendor_host(#[case] tolerance: Tolerance, #[case] valid: bool) {
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, tolerance);
        let copy = amd_host_cpu(guest_identity());
        assert_eq!(opens(&env, &copy), valid);
    }

    #[rstest]
    #[case::loose(Tolerance::Loose, true)]
    #[case::medium(Tolerance::Medium, false)]
    #[case::strict(Tolerance::Strict, false)]
    fn guest_copied_to_host_with_sibling_cpu(#[case] tolerance: Tolerance, #[case] valid: bool) {
        // Same vendor and family, another model and stepping: only the coarse CPU traits agree.
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, tolerance);
        let copy = guest_on_intel()
            .with(
                names::CPU_MODEL_NAME,
                "Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz",
            )
            .with(names::CPU_MODEL, "106")
            .with(names::CPU_STEPPING, "6")
            .with(names::CPU_MICROCODE, "0xd0003a5")
            .with(names::CPU_FLAGS, "77aa01bc3e");
        assert_eq!(opens(&env, &copy), valid);
    }

    #[rstest]
    #[case::loose(Tolerance::Loose, true)]
    #[case::medium(Tolerance::Medium, true)]
    #[case::strict(Tolerance::Strict, false)]
    fn host_microcode_update_under_a_guest(#[case] tolerance: Tolerance, #[case] valid: bool) {
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, tolerance);
        let updated = guest_on_intel().with(names::CPU_MICROCODE, "0x5003707");
        assert_eq!(opens(&env, &updated), valid);
    }

    #[rstest]
    #[case::loose(Tolerance::Loose, true)]
    #[case::medium(Tolerance::Medium, false)]
    #[case::strict(Tolerance::Strict, false)]
    fn host_microcode_update_while_the_guest_got_a_new_mac(
        #[case] tolerance: Tolerance,
        #[case] valid: bool,
    ) {
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, tolerance);
        let updated = guest_on_intel()
            .with(names::CPU_MICROCODE, "0x5003707")
            .with(names::NIC_MAC, ["52:54:00:ab:cd:ef"]);
        assert_eq!(opens(&env, &updated), valid);
    }

    #[rstest]
    #[case::loose(Tolerance::Loose, true)]
    #[case::medium(Tolerance::Medium, false)]
    #[case::strict(Tolerance::Strict, false)]
    fn guest_copied_to_host_exposing_other_cpu_flags(
        #[case] tolerance: Tolerance,
        #[case] valid: bool,
    ) {
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, tolerance);
        let copy = guest_on_intel().with(names::CPU_FLAGS, "0000ffff11");
        assert_eq!(opens(&env, &copy), valid);
    }

    #[rstest]
    #[case::loose(Tolerance::Loose, true)]
    #[case::medium(Tolerance::Medium, true)]
    #[case::strict(Tolerance::Strict, false)]
    fn physical_machine_with_replaced_nics(#[case] tolerance: Tolerance, #[case] valid: bool) {
        let env = seal_for(&physical_host(), MachineKind::Physical, tolerance);
        let replaced = physical_host().with(names::NIC_MAC, ["a0:36:9f:11:22:33"]);
        assert_eq!(opens(&env, &replaced), valid);
    }

    #[rstest]
    #[case::loose(Tolerance::Loose, false)]
    #[case::medium(Tolerance::Medium, false)]
    #[case::strict(Tolerance::Strict, false)]
    fn physical_machine_with_new_board_and_disks(
        #[case] tolerance: Tolerance,
        #[case] valid: bool,
    ) {
        let env = seal_for(&physical_host(), MachineKind::Physical, tolerance);
        let rebuilt = physical_host()
            .with(names::BOARD_SERIAL, "BRD-9999")
            .with(names::PRODUCT_UUID, "a1b2c3d4-0000-4000-8000-000000000999")
            .with(names::DISK_SERIAL, ["S3Z9NB0K999999"]);
        assert_eq!(opens(&env, &rebuilt), valid);
    }

    #[rstest]
    fn host_licence_copied_into_one_of_its_guests_does_not_open(
        #[values(Tolerance::Loose, Tolerance::Medium, Tolerance::Strict)] tolerance: Tolerance,
    ) {
        let env = seal_for(&physical_host(), MachineKind::Physical, tolerance);
        assert!(!opens(&env, &guest_on_intel()));
    }

    #[test]
    fn any_value_of_a_multi_valued_trait_unlocks_its_shares() {
        let env = seal_for(&physical_host(), MachineKind::Physical, Tolerance::Strict);
        // One disk and one NIC removed: the remaining ones still carry their traits' shares.
        let fewer = physical_host()
            .with(names::DISK_SERIAL, ["WD-WX11A1234567"])
            .with(names::NIC_MAC, ["3c:ec:ef:00:00:01", "02:00:00:00:00:09"]);
        assert!(opens(&env, &fewer));
    }

    #[test]
    fn random_scheme_follows_the_id_not_the_hardware() {
        let policy = BindingPolicy {
            scheme: BindingScheme::Random,
            tolerance: Tolerance::Strict,
        };
        let here = guest_on_intel().with(names::RUNTIME_RANDOM_ID, "f00dfeed00112233");
        let env = seal(
            &ContentKey::from_bytes(KEY),
            &here,
            MachineKind::Guest,
            &policy,
            [1; 32],
        )
        .unwrap();
        let moved =
            amd_host_cpu(MachineTraits::new()).with(names::RUNTIME_RANDOM_ID, "f00dfeed00112233");
        assert!(opens(&env, &moved));
        assert!(!opens(&env, &guest_on_intel()));
        assert!(!opens(
            &env,
            &guest_on_intel().with(names::RUNTIME_RANDOM_ID, "other")
        ));
    }

    #[test]
    fn ip_scheme_opens_on_any_machine_holding_the_address() {
        let policy = BindingPolicy {
            scheme: BindingScheme::Ip,
            tolerance: Tolerance::Medium,
        };
        let here = physical_host().with(names::NET_IP, ["127.0.1.3", "10.0.0.5"]);
        let env = seal(
            &ContentKey::from_bytes(KEY),
            &here,
            MachineKind::Physical,
            &policy,
            [2; 32],
        )
        .unwrap();
        assert!(opens(
            &env,
            &amd_host_cpu(MachineTraits::new()).with(names::NET_IP, "10.0.0.5")
        ));
        assert!(!opens(
            &env,
            &physical_host().with(names::NET_IP, "10.0.0.6")
        ));
    }

    #[test]
    fn sealing_without_the_scheme_trait_is_refused() {
        let policy = BindingPolicy {
            scheme: BindingScheme::Random,
            tolerance: Tolerance::Medium,
        };
        let err = seal(
            &ContentKey::from_bytes(KEY),
            &guest_on_intel(),
            MachineKind::Guest,
            &policy,
            [1; 32],
        )
        .unwrap_err();
        assert_eq!(
            err,
            BindingError::NotEnoughTraitsToSeal {
                available: 0,
                needed: 1
            }
        );
    }

    #[test]
    fn sealing_a_machine_without_traits_is_refused() {
        let err = seal(
            &ContentKey::from_bytes(KEY),
            &MachineTraits::new().with(names::CPU_VENDOR, "GenuineIntel"),
            MachineKind::Physical,
            &policy(Tolerance::Medium),
            [1; 32],
        )
        .unwrap_err();
        assert!(matches!(err, BindingError::NotEnoughTraitsToSeal { .. }));
    }

    #[test]
    fn envelope_survives_json_and_sealing_is_deterministic_in_its_entropy() {
        let env = seal_for(&guest_on_intel(), MachineKind::Guest, Tolerance::Medium);
        let json = serde_json::to_string(&env).unwrap();
        let back: BindingEnvelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back, env);
        assert!(opens(&back, &guest_on_intel()));
        assert_eq!(
            seal_for(&guest_on_intel(), MachineKind::Guest, Tolerance::Medium),
            env
        );
        let other = seal(
            &ContentKey::from_bytes(KEY),
            &guest_on_intel(),
            MachineKind::Guest,
            &policy(Tolerance::Medium),
            [43; 32],
        )
        .unwrap();
        assert_ne!(other.salt, env.salt);
    }

    #[test]
    fn lowering_the_threshold_in_the_envelope_does_not_yield_the_key() {
        let mut env = seal_for(&guest_on_intel(), MachineKind::Guest, Tolerance::Strict);
        env.threshold = 4;
        // The four VM-only shares decrypt, but they lie on a polynomial of higher degree.
        let copy = amd_host_cpu(guest_identity());
        assert_eq!(open(&env, &copy), Err(BindingError::EnvelopeCorrupt));
    }

    #[test]
    fn thresholds_follow_the_documented_table() {
        let t = |traits: &MachineTraits, kind, tol| seal_for(traits, kind, tol).threshold;
        assert_eq!(
            t(&physical_host(), MachineKind::Physical, Tolerance::Strict),
            18
        );
        assert_eq!(
            t(&physical_host(), MachineKind::Physical, Tolerance::Medium),
            14
        );
        assert_eq!(
            t(&physical_host(), MachineKind::Physical, Tolerance::Loose),
            9
        );
        assert_eq!(
            t(&guest_on_intel(), MachineKind::Guest, Tolerance::Strict),
            38
        );
        assert_eq!(
            t(&guest_on_intel(), MachineKind::Guest, Tolerance::Medium),
            37
        );
        assert_eq!(
            t(&guest_on_intel(), MachineKind::Guest, Tolerance::Loose),
            8
        );
    }

    fn changed(traits: &MachineTraits, name: &str) -> MachineTraits {
        let mut out = traits.clone();
        out.set(name, format!("changed-{name}"));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any subset of matching traits whose weight reaches the threshold rebuilds the key; any below does not.
        #[test]
        fn key_rebuilds_exactly_at_or_above_threshold(
            guest in any::<bool>(),
            tolerance in prop_oneof![Just(Tolerance::Loose), Just(Tolerance::Medium), Just(Tolerance::Strict)],
            keep_mask in any::<u16>(),
            key in any::<[u8; 32]>(),
            entropy in any::<[u8; 32]>(),
        ) {
            let (kind, traits) = if guest {
                (MachineKind::Guest, guest_on_intel())
            } else {
                (MachineKind::Physical, physical_host())
            };
            let env = seal(&ContentKey::from_bytes(key), &traits, kind, &policy(tolerance), entropy).unwrap();
            let mut now = traits.clone();
            let mut matched = 0u32;
            for (i, slot) in env.slots.iter().enumerate() {
                if keep_mask & (1 << i) != 0 {
                    matched += u32::from(slot.weight);
                } else {
                    now = changed(&now, &slot.trait_name);
                }
            }
            match open(&env, &now) {
                Ok(rebuilt) => {
                    prop_assert!(matched >= env.threshold);
                    prop_assert_eq!(rebuilt.as_bytes(), &key);
                }
                Err(BindingError::TooFewTraits { matched: m, needed }) => {
                    prop_assert!(matched < env.threshold);
                    prop_assert_eq!(m, matched);
                    prop_assert_eq!(needed, env.threshold);
                }
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
        }
    }
}
