//! Signed licence files, vendor keys, and the sealed product content of soft licences.
//!
//! A licence file is JSON: `{"body": {...}, "signer": "<key id>", "signature": "<hex>"}`. The
//! Ed25519 signature covers a domain tag and the canonical JSON of the body, so any change to
//! the body, signer or signature is detected and named.
//!
//! A *bound* licence (issued by answering an activation) carries its product items only
//! encrypted (ChaCha20Poly1305) under a random content key; the content key is sealed to the
//! machine's traits with [`binding::seal`]. Without matching traits there is no key and no
//! items. An *unbound* licence (`meter vendor issue`: dongle programming, a network server
//! that needs no binding, tests) carries its items in the clear and is valid on any machine
//! that trusts the vendor key. Both list product codes and names in the clear
//! ([`LicenceBody::catalogue`]) so a runtime can say "corrupt" rather than "unknown product".

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::binding::{self, BindingEnvelope, BindingError, BindingPolicy, ContentKey};
use crate::policy::{Allowance, ProductItem, ProductPolicy};
use crate::reason::Reason;
use crate::traits::{MachineKind, MachineTraits};

/// Current licence body format.
pub const LICENCE_FORMAT: u32 = 1;

const SIGNATURE_DOMAIN: &[u8] = b"meter-licence-v1\0";

/// A vendor's secret keys: Ed25519 for signing licences, X25519 for opening activation requests.
#[derive(Clone, Serialize, Deserialize)]
#[serde(into = "VendorKeyText", try_from = "VendorKeyText")]
pub struct VendorKey {
    signing: SigningKey,
    exchange: x25519_dalek::StaticSecret,
}

/// A vendor's public keys, trusted by runtimes and used to seal activation requests.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "VendorPublicKeyText", try_from = "VendorPublicKeyText")]
pub struct VendorPublicKey {
    signing: VerifyingKey,
    exchange: x25519_dalek::PublicKey,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct VendorKeyText {
    signing_key: String,
    exchange_key: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct VendorPublicKeyText {
    key_id: String,
    signing_key: String,
    exchange_key: String,
}

/// A vendor key file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A key field is not 32 bytes of hex.
    #[error("Invalid vendor key: {field} is not 32 bytes of hex")]
    NotHex32 {
        /// Field name.
        field: &'static str,
    },
    /// The signing public key is not a valid Ed25519 point.
    #[error("Invalid vendor key: signing-key is not an Ed25519 public key")]
    BadSigningKey,
    /// The key id does not match the signing key.
    #[error("Invalid vendor key: key-id {given} does not match the signing key ({actual})")]
    KeyIdMismatch {
        /// Key id written in the file.
        given: String,
        /// Key id of the signing key.
        actual: String,
    },
}

impl VendorKey {
    /// Builds a key pair from two 32-byte secrets supplied by the caller's entropy source.
    pub fn from_seeds(signing_seed: [u8; 32], exchange_seed: [u8; 32]) -> Self {
        VendorKey {
            signing: SigningKey::from_bytes(&signing_seed),
            exchange: x25519_dalek::StaticSecret::from(exchange_seed),
        }
    }

    /// The matching public keys.
    pub fn public(&self) -> VendorPublicKey {
        VendorPublicKey {
            signing: self.signing.verifying_key(),
            exchange: x25519_dalek::PublicKey::from(&self.exchange),
        }
    }

    /// Signs a licence body.
    pub fn sign_licence(&self, body: LicenceBody) -> SignedLicence {
        let signature = self.signing.sign(&signed_message(&body));
        SignedLicence {
            body,
            signer: self.public().key_id(),
            signature: hex::encode(signature.to_bytes()),
            source: UNSAVED.to_owned(),
        }
    }

    /// X25519 Diffie-Hellman with the vendor's exchange key; `None` for a low-order public key.
    pub(crate) fn exchange(&self, their_public: &x25519_dalek::PublicKey) -> Option<[u8; 32]> {
        let shared = self.exchange.diffie_hellman(their_public);
        shared.was_contributory().then(|| shared.to_bytes())
    }
}

impl fmt::Debug for VendorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VendorKey({})", self.public().key_id())
    }
}

impl From<VendorKey> for VendorKeyText {
    fn from(key: VendorKey) -> Self {
        VendorKeyText {
            signing_key: hex::encode(key.signing.to_bytes()),
            exchange_key: hex::encode(key.exchange.to_bytes()),
        }
    }
}

impl TryFrom<VendorKeyText> for VendorKey {
    type Error = KeyError;

    fn try_from(text: VendorKeyText) -> Result<Self, Self::Error> {
        Ok(VendorKey::from_seeds(
            hex32(&text.signing_key, "signing-key")?,
            hex32(&text.exchange_key, "exchange-key")?,
        ))
    }
}

impl VendorPublicKey {
    /// Short id of the signing key: the first 8 bytes of its SHA-256, hex.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.signing.as_bytes())[..8])
    }

    /// The X25519 key activation requests are sealed to.
    pub fn exchange_key(&self) -> x25519_dalek::PublicKey {
        self.exchange
    }

    /// The Ed25519 key licences and dongle certificates are signed with.
    pub fn signing_key(&self) -> VerifyingKey {
        self.signing
    }

    /// Checks a signature over a body.
    fn verifies(&self, body: &LicenceBody, signature: &str) -> bool {
        let Ok(bytes) = hex::decode(signature) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        self.signing
            .verify_strict(&signed_message(body), &Signature::from_bytes(&bytes))
            .is_ok()
    }
}

impl fmt::Debug for VendorPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VendorPublicKey({})", self.key_id())
    }
}

impl From<VendorPublicKey> for VendorPublicKeyText {
    fn from(key: VendorPublicKey) -> Self {
        VendorPublicKeyText {
            key_id: key.key_id(),
            signing_key: hex::encode(key.signing.as_bytes()),
            exchange_key: hex::encode(key.exchange.as_bytes()),
        }
    }
}

impl TryFrom<VendorPublicKeyText> for VendorPublicKey {
    type Error = KeyError;

    fn try_from(text: VendorPublicKeyText) -> Result<Self, Self::Error> {
        let signing = VerifyingKey::from_bytes(&hex32(&text.signing_key, "signing-key")?)
            .map_err(|_| KeyError::BadSigningKey)?;
        let key = VendorPublicKey {
            signing,
            exchange: x25519_dalek::PublicKey::from(hex32(&text.exchange_key, "exchange-key")?),
        };
        if key.key_id() != text.key_id {
            return Err(KeyError::KeyIdMismatch {
                given: text.key_id,
                actual: key.key_id(),
            });
        }
        Ok(key)
    }
}

/// Product code and name, listed in the clear in every licence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CatalogueEntry {
    /// Product code.
    pub code: u32,
    /// Product name.
    pub name: String,
    /// Whether the item may run in a virtual machine; in the clear so a runtime can refuse a
    /// copied licence in a guest before trying its binding.
    #[serde(default, skip_serializing_if = "is_allowed")]
    pub virtual_machines: Allowance,
}

fn is_allowed(allowance: &Allowance) -> bool {
    *allowance == Allowance::Allow
}

/// Product items encrypted under the content key, plus the key sealed to machine traits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SealedContent {
    /// The content key bound to the activating machine's traits.
    pub envelope: BindingEnvelope,
    /// AEAD nonce, hex.
    pub nonce: String,
    /// Encrypted JSON array of product items, hex.
    pub ciphertext: String,
}

/// The signed part of a licence file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LicenceBody {
    /// Body format version ([`LICENCE_FORMAT`]).
    pub format: u32,
    /// Vendor (firm) code.
    pub firm: u32,
    /// Vendor name.
    pub firm_name: String,
    /// Unique licence id.
    pub licence_id: String,
    /// Issue time, unix milliseconds.
    pub issued_at: u64,
    /// Codes and names of the products inside, in the clear.
    pub catalogue: Vec<CatalogueEntry>,
    /// Product items in the clear (unbound licences only; empty when sealed).
    pub products: Vec<ProductItem>,
    /// Product items sealed to a machine (bound licences only).
    pub sealed: Option<SealedContent>,
    /// Public key of the runtime that asked for activation, hex (bound licences only).
    pub runtime_key: Option<String>,
    /// The server triad this licence was issued for (it serves only in that triad).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triad: Option<TriadBinding>,
}

/// The three servers a triad licence is issued for: each member's copy names all three.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TriadBinding {
    /// The licence the three copies are of (counted once across the triad).
    pub id: String,
    /// The members' server certificate pins (SHA-256 of each member's TLS certificate, hex).
    pub members: Vec<String>,
}

impl TriadBinding {
    /// Whether `pins` (a triad's members, in any order) are exactly the members named here.
    pub fn names_exactly(&self, pins: &[String]) -> bool {
        let mut named: Vec<&str> = self.members.iter().map(String::as_str).collect();
        let mut given: Vec<&str> = pins.iter().map(String::as_str).collect();
        named.sort_unstable();
        given.sort_unstable();
        named == given
    }
}

impl LicenceBody {
    /// An unbound licence carrying every item of `policy` in the clear.
    pub fn unbound(policy: &ProductPolicy, issued_at: u64, entropy: [u8; 32]) -> Self {
        LicenceBody {
            format: LICENCE_FORMAT,
            firm: policy.firm,
            firm_name: policy.firm_name.clone(),
            licence_id: licence_id(&entropy),
            issued_at,
            catalogue: catalogue(&policy.products),
            products: policy.products.clone(),
            sealed: None,
            runtime_key: None,
            triad: None,
        }
    }

    /// A licence whose `items` are sealed to `traits`; all items must share one binding policy.
    #[allow(clippy::too_many_arguments)]
    pub fn bound(
        policy: &ProductPolicy,
        items: Vec<ProductItem>,
        traits: &MachineTraits,
        kind: MachineKind,
        runtime_key: Option<String>,
        issued_at: u64,
        entropy: [u8; 32],
    ) -> Result<Self, LicenceError> {
        let binding = common_binding(&items)?;
        let id = licence_id(&entropy);
        let key = ContentKey::from_bytes(expand(&entropy, b"meter licence content key"));
        let nonce: [u8; 12] = expand(&entropy, b"meter licence content nonce");
        let envelope = binding::seal(
            &key,
            traits,
            kind,
            &binding,
            expand(&entropy, b"meter licence binding"),
        )
        .map_err(|source| LicenceError::Seal {
            licence: id.clone(),
            source,
        })?;
        let plaintext = serde_json::to_vec(&items).map_err(|source| LicenceError::Encode {
            licence: id.clone(),
            source,
        })?;
        let ciphertext = content_cipher(&key)
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| LicenceError::ContentCorrupt {
                licence: id.clone(),
            })?;
        Ok(LicenceBody {
            format: LICENCE_FORMAT,
            firm: policy.firm,
            firm_name: policy.firm_name.clone(),
            licence_id: id,
            issued_at,
            catalogue: catalogue(&items),
            products: Vec::new(),
            sealed: Some(SealedContent {
                envelope,
                nonce: hex::encode(nonce),
                ciphertext: hex::encode(ciphertext),
            }),
            runtime_key,
            triad: None,
        })
    }

    /// True when the items are sealed to a machine.
    pub fn is_bound(&self) -> bool {
        self.sealed.is_some()
    }
}

/// The product items of a licence; for a bound licence the traits must rebuild the content key.
pub fn open_products(
    body: &LicenceBody,
    traits: &MachineTraits,
) -> Result<Vec<ProductItem>, LicenceError> {
    let Some(sealed) = &body.sealed else {
        return Ok(body.products.clone());
    };
    let licence = body.licence_id.clone();
    let key =
        open_content_key(&sealed.envelope, traits).map_err(|source| LicenceError::Binding {
            licence: licence.clone(),
            source,
        })?;
    let corrupt = || LicenceError::ContentCorrupt {
        licence: licence.clone(),
    };
    let nonce: [u8; 12] = hex::decode(&sealed.nonce)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(corrupt)?;
    let ciphertext = hex::decode(&sealed.ciphertext).map_err(|_| corrupt())?;
    let plaintext = content_cipher(&key)
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &ciphertext,
                aad: body.licence_id.as_bytes(),
            },
        )
        .map_err(|_| corrupt())?;
    serde_json::from_slice(&plaintext).map_err(|_| corrupt())
}

/// The one place licences use the binding module to recover a content key.
fn open_content_key(
    envelope: &BindingEnvelope,
    traits: &MachineTraits,
) -> Result<ContentKey, BindingError> {
    binding::open(envelope, traits)
}

const UNSAVED: &str = "(unsaved licence)";

/// A licence body with its vendor signature: the licence file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SignedLicence {
    /// The signed content.
    pub body: LicenceBody,
    /// Key id of the vendor key that signed it.
    pub signer: String,
    /// Ed25519 signature, hex.
    pub signature: String,
    /// Name of the file it was read from, for error messages.
    #[serde(skip, default = "unsaved")]
    pub source: String,
}

impl SignedLicence {
    /// Parses a licence file; `source_name` names it in errors.
    pub fn from_json(bytes: &[u8], source_name: &str) -> Result<Self, LicenceError> {
        let mut licence: SignedLicence =
            serde_json::from_slice(bytes).map_err(|source| LicenceError::Malformed {
                file: source_name.to_owned(),
                source,
            })?;
        licence.source = source_name.to_owned();
        Ok(licence)
    }

    /// The licence file text (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the signature against a trusted vendor key and returns the body.
    pub fn verify(&self, trusted: &VendorPublicKey) -> Result<&LicenceBody, LicenceError> {
        if self.signer != trusted.key_id() {
            return Err(LicenceError::ForeignSigner {
                file: self.source.clone(),
                signer: self.signer.clone(),
                trusted: trusted.key_id(),
            });
        }
        if !trusted.verifies(&self.body, &self.signature) {
            return Err(LicenceError::Tampered {
                file: self.source.clone(),
            });
        }
        if self.body.format != LICENCE_FORMAT {
            return Err(LicenceError::UnsupportedFormat {
                file: self.source.clone(),
                format: self.body.format,
            });
        }
        Ok(&self.body)
    }
}

/// Why a licence cannot be read, verified, issued or opened.
#[derive(Debug, thiserror::Error)]
pub enum LicenceError {
    /// The file is not a licence (bad JSON, truncated, unknown field).
    #[error("Licence file {file} is malformed")]
    Malformed {
        /// File name given by the caller.
        file: String,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Signed by a key other than the trusted vendor key.
    #[error("Licence file {file} is signed by foreign key {signer}, not the trusted key {trusted}")]
    ForeignSigner {
        /// File name given by the caller.
        file: String,
        /// Key id named in the file.
        signer: String,
        /// Key id of the trusted key.
        trusted: String,
    },
    /// The signature does not match the content: the file was changed after signing.
    #[error("Licence file {file} was tampered with: its signature does not match its content")]
    Tampered {
        /// File name given by the caller.
        file: String,
    },
    /// A body format this runtime does not know.
    #[error("Licence file {file} has unsupported format {format}")]
    UnsupportedFormat {
        /// File name given by the caller.
        file: String,
        /// Format found.
        format: u32,
    },
    /// This machine's traits do not rebuild the content key.
    #[error("Licence {licence} is bound to another machine")]
    Binding {
        /// Licence id.
        licence: String,
        /// Binding failure.
        #[source]
        source: BindingError,
    },
    /// The sealed content does not decrypt or decode although the key was rebuilt.
    #[error("Licence {licence} content is corrupt")]
    ContentCorrupt {
        /// Licence id.
        licence: String,
    },
    /// The items cannot be bound to the traits given.
    #[error("Cannot bind licence {licence}")]
    Seal {
        /// Licence id.
        licence: String,
        /// Binding failure.
        #[source]
        source: BindingError,
    },
    /// The items cannot be encoded.
    #[error("Cannot encode licence {licence}")]
    Encode {
        /// Licence id.
        licence: String,
        /// Encoding failure.
        #[source]
        source: serde_json::Error,
    },
    /// Items sharing one content key ask for different binding policies.
    #[error(
        "Products {first} and {other} need different binding policies; activate them separately"
    )]
    MixedBinding {
        /// First product code.
        first: u32,
        /// Product code with another policy.
        other: u32,
    },
    /// No items to put in the licence.
    #[error("Licence has no products")]
    NoProducts,
}

impl LicenceError {
    /// The reason code a runtime reports for this error.
    pub fn reason(&self) -> Reason {
        match self {
            LicenceError::ForeignSigner { .. } | LicenceError::Tampered { .. } => {
                Reason::SignatureInvalid
            }
            LicenceError::Malformed { .. }
            | LicenceError::UnsupportedFormat { .. }
            | LicenceError::Binding { .. }
            | LicenceError::ContentCorrupt { .. }
            | LicenceError::Seal { .. }
            | LicenceError::Encode { .. }
            | LicenceError::MixedBinding { .. }
            | LicenceError::NoProducts => Reason::LicenceCorrupt,
        }
    }
}

fn common_binding(items: &[ProductItem]) -> Result<BindingPolicy, LicenceError> {
    let first = items.first().ok_or(LicenceError::NoProducts)?;
    match items.iter().find(|item| item.binding != first.binding) {
        Some(other) => Err(LicenceError::MixedBinding {
            first: first.code,
            other: other.code,
        }),
        None => Ok(first.binding),
    }
}

fn catalogue(items: &[ProductItem]) -> Vec<CatalogueEntry> {
    items
        .iter()
        .map(|item| CatalogueEntry {
            code: item.code,
            name: item.name.clone(),
            virtual_machines: item.virtual_machines,
        })
        .collect()
}

fn signed_message(body: &LicenceBody) -> Vec<u8> {
    let mut message = SIGNATURE_DOMAIN.to_vec();
    // Serializing plain structs, strings and integers cannot fail.
    message.extend(serde_json::to_vec(body).unwrap_or_default());
    message
}

fn content_cipher(key: &ContentKey) -> ChaCha20Poly1305 {
    ChaCha20Poly1305::new(&Key::from(*key.as_bytes()))
}

/// A new licence id drawn from `entropy`.
pub fn licence_id(entropy: &[u8; 32]) -> String {
    let id: [u8; 8] = expand(entropy, b"meter licence id");
    format!("L-{}", hex::encode(id))
}

fn unsaved() -> String {
    UNSAVED.to_owned()
}

/// HKDF-SHA256 of `entropy` for one purpose.
pub(crate) fn expand<const N: usize>(entropy: &[u8; 32], info: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    // N is at most a few dozen bytes, far below HKDF's 255 * 32 byte limit.
    let _ = Hkdf::<Sha256>::new(None, entropy).expand(info, &mut out);
    out
}

pub(crate) fn hex32(text: &str, field: &'static str) -> Result<[u8; 32], KeyError> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(KeyError::NotHex32 { field })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let key = VendorKey::from_seeds([1; 32], [2; 32]);
        let text = serde_json::to_string(&key).unwrap();
        let back: VendorKey = serde_json::from_str(&text).unwrap();
        assert_eq!(back.public(), key.public());
        let public = serde_json::to_string(&key.public()).unwrap();
        assert!(public.contains(&key.public().key_id()));
        assert_eq!(
            serde_json::from_str::<VendorPublicKey>(&public).unwrap(),
            key.public()
        );
    }

    #[test]
    fn a_public_key_with_a_wrong_id_is_refused() {
        let public = VendorKey::from_seeds([1; 32], [2; 32]).public();
        let other = VendorKey::from_seeds([3; 32], [2; 32]).public();
        let text = serde_json::to_string(&public)
            .unwrap()
            .replace(&public.key_id(), &other.key_id());
        let error = serde_json::from_str::<VendorPublicKey>(&text).unwrap_err();
        assert!(error.to_string().contains("does not match"), "{error}");
    }

    #[test]
    fn the_key_debug_output_hides_secrets() {
        let key = VendorKey::from_seeds([7; 32], [8; 32]);
        let debug = format!("{key:?}");
        assert!(!debug.contains(&hex::encode([7u8; 32])));
    }
}
