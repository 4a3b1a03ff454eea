//! Soft-licence activation: a request sealed to the vendor, and the vendor's answer.
//!
//! The runtime collects its traits and seals them to the vendor's X25519 key (ephemeral
//! X25519, HKDF-SHA256, ChaCha20Poly1305), so only the vendor learns the machine's identity.
//! The vendor opens the request, applies its product policy and answers with a signed licence
//! whose items are sealed to those traits, or with a refusal naming the reason.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::licence::{
    LicenceBody, LicenceError, SignedLicence, TriadBinding, VendorKey, VendorPublicKey, expand,
    licence_id,
};
use crate::policy::{Allowance, ContainerKind, ProductItem, ProductPolicy};
use crate::reason::Reason;
use crate::traits::{MachineKind, MachineTraits};

/// Current activation request format.
pub const REQUEST_FORMAT: u32 = 1;

const REQUEST_KDF_INFO: &[u8] = b"meter activation request v1";

/// What a runtime asks the vendor for (the plaintext inside a [`SealedRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ActivationRequest {
    /// Vendor (firm) code.
    pub firm: u32,
    /// Product codes asked for; empty asks for every soft item of the vendor's policy.
    pub products: Vec<u32>,
    /// Physical machine or virtual machine.
    pub kind: MachineKind,
    /// The machine's traits.
    pub traits: MachineTraits,
    /// The runtime's public key, hex; copied into the licence.
    pub runtime_key: String,
    /// When the request was made, unix milliseconds.
    pub requested_at: u64,
    /// The requesting network server's certificate pin, when it asks to be a triad member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_pin: Option<String>,
}

/// An activation request file: the request encrypted to the vendor's exchange key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SealedRequest {
    /// Format version ([`REQUEST_FORMAT`]).
    pub format: u32,
    /// Vendor (firm) code, in the clear so the vendor tool can pick its key.
    pub firm: u32,
    /// Key id of the vendor key the request is sealed to.
    pub vendor_key_id: String,
    /// The runtime's ephemeral X25519 public key, hex.
    pub ephemeral: String,
    /// AEAD nonce, hex.
    pub nonce: String,
    /// Encrypted [`ActivationRequest`] JSON, hex.
    pub ciphertext: String,
    /// Name of the file it was read from, for error messages.
    #[serde(skip, default = "unsaved")]
    pub source: String,
}

/// The vendor's answer to an activation request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ActivationAnswer {
    /// A signed licence bound to the requesting machine.
    Licence(SignedLicence),
    /// The vendor refuses to activate.
    Refused {
        /// Why.
        reason: Reason,
        /// Explanation for humans.
        message: String,
    },
}

/// Why an activation request or answer cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The file is not an activation request or answer.
    #[error("Activation file {file} is malformed")]
    Malformed {
        /// File name given by the caller.
        file: String,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The request is sealed to another vendor key.
    #[error("Activation request {file} is sealed to vendor key {found}, not {expected}")]
    WrongVendor {
        /// File name given by the caller.
        file: String,
        /// Key id in the request.
        found: String,
        /// Key id of the vendor key at hand.
        expected: String,
    },
    /// The request does not decrypt: damaged, or not made for this key.
    #[error("Activation request {file} cannot be decrypted")]
    Undecryptable {
        /// File name given by the caller.
        file: String,
    },
    /// A request format this code does not know.
    #[error("Activation request {file} has unsupported format {format}")]
    UnsupportedFormat {
        /// File name given by the caller.
        file: String,
        /// Format found.
        format: u32,
    },
    /// The request cannot be encoded.
    #[error("Cannot encode activation request")]
    Encode(#[source] serde_json::Error),
    /// The licence cannot be issued.
    #[error("Cannot issue the activation licence")]
    Licence(#[source] LicenceError),
}

impl ActivationRequest {
    /// Encrypts the request to the vendor; `entropy` makes the ephemeral key and nonce.
    pub fn seal(
        &self,
        vendor: &VendorPublicKey,
        entropy: [u8; 32],
    ) -> Result<SealedRequest, ActivationError> {
        let ephemeral =
            x25519_dalek::StaticSecret::from(expand::<32>(&entropy, b"meter activation ephemeral"));
        let ephemeral_public = x25519_dalek::PublicKey::from(&ephemeral);
        let vendor_exchange = vendor.exchange_key();
        let shared = ephemeral.diffie_hellman(&vendor_exchange).to_bytes();
        let cipher = request_cipher(&shared, &ephemeral_public, &vendor_exchange);
        let nonce: [u8; 12] = expand(&entropy, b"meter activation nonce");
        let key_id = vendor.key_id();
        let plaintext = serde_json::to_vec(self).map_err(ActivationError::Encode)?;
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: &request_aad(self.firm, &key_id),
                },
            )
            .map_err(|_| ActivationError::Undecryptable { file: unsaved() })?;
        Ok(SealedRequest {
            format: REQUEST_FORMAT,
            firm: self.firm,
            vendor_key_id: key_id,
            ephemeral: hex::encode(ephemeral_public.as_bytes()),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ciphertext),
            source: unsaved(),
        })
    }
}

impl SealedRequest {
    /// Parses a request file; `source_name` names it in errors.
    pub fn from_json(bytes: &[u8], source_name: &str) -> Result<Self, ActivationError> {
        let mut request: SealedRequest =
            serde_json::from_slice(bytes).map_err(|source| ActivationError::Malformed {
                file: source_name.to_owned(),
                source,
            })?;
        request.source = source_name.to_owned();
        Ok(request)
    }

    /// The request file text (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Decrypts the request with the vendor's secret key.
    pub fn open(&self, vendor: &VendorKey) -> Result<ActivationRequest, ActivationError> {
        let file = self.source.clone();
        if self.format != REQUEST_FORMAT {
            return Err(ActivationError::UnsupportedFormat {
                file,
                format: self.format,
            });
        }
        let public = vendor.public();
        if self.vendor_key_id != public.key_id() {
            return Err(ActivationError::WrongVendor {
                file,
                found: self.vendor_key_id.clone(),
                expected: public.key_id(),
            });
        }
        let undecryptable = || ActivationError::Undecryptable { file: file.clone() };
        let ephemeral = x25519_dalek::PublicKey::from(
            hex_array::<32>(&self.ephemeral).ok_or_else(undecryptable)?,
        );
        let nonce = hex_array::<12>(&self.nonce).ok_or_else(undecryptable)?;
        let ciphertext = hex::decode(&self.ciphertext).map_err(|_| undecryptable())?;
        let shared = vendor.exchange(&ephemeral).ok_or_else(undecryptable)?;
        let plaintext = request_cipher(&shared, &ephemeral, &public.exchange_key())
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &request_aad(self.firm, &self.vendor_key_id),
                },
            )
            .map_err(|_| undecryptable())?;
        let request: ActivationRequest =
            serde_json::from_slice(&plaintext).map_err(|_| undecryptable())?;
        if request.firm != self.firm {
            return Err(undecryptable());
        }
        Ok(request)
    }
}

impl ActivationAnswer {
    /// Parses an answer file; `source_name` names it in errors.
    pub fn from_json(bytes: &[u8], source_name: &str) -> Result<Self, ActivationError> {
        let mut answer: ActivationAnswer =
            serde_json::from_slice(bytes).map_err(|source| ActivationError::Malformed {
                file: source_name.to_owned(),
                source,
            })?;
        if let ActivationAnswer::Licence(licence) = &mut answer {
            licence.source = source_name.to_owned();
        }
        Ok(answer)
    }

    /// The answer file text (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The vendor's decision: a licence bound to the request's traits, or a refusal.
///
/// Refuses with `unknown-product` for another firm, unknown codes, dongle items or no soft
/// items, and with `vm-not-allowed` when the machine is a guest and an item says
/// `virtual-machines: deny`.
pub fn answer(
    request: &ActivationRequest,
    policy: &ProductPolicy,
    vendor: &VendorKey,
    now: u64,
    entropy: [u8; 32],
) -> Result<ActivationAnswer, ActivationError> {
    Ok(match bound_body(request, policy, now, entropy)? {
        Ok(body) => ActivationAnswer::Licence(vendor.sign_licence(body)),
        Err(Refusal { reason, message }) => ActivationAnswer::Refused { reason, message },
    })
}

/// The vendor's answer to a server triad's three requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriadAnswer {
    /// One licence per member, in the requests' order, each bound to its member and naming
    /// all three.
    Licences(Vec<SignedLicence>),
    /// The vendor refuses (the reason of the first request it refuses).
    Refused {
        /// Why.
        reason: Reason,
        /// Explanation for humans.
        message: String,
    },
}

/// The vendor's decision for a server triad: three requests, each from a network server that
/// named its certificate pin, answered with one licence (one id, counted once) whose copy for
/// each member is bound to that member and names the three pins. `entropy` gives one seed per
/// member and one for the triad licence's id.
pub fn answer_triad(
    requests: &[ActivationRequest],
    policy: &ProductPolicy,
    vendor: &VendorKey,
    now: u64,
    entropy: &[[u8; 32]],
) -> Result<TriadAnswer, ActivationError> {
    let refused = |message: String| TriadAnswer::Refused {
        reason: Reason::TriadRequired,
        message,
    };
    if requests.len() != 3 || entropy.len() != 4 {
        return Ok(refused(format!(
            "A triad licence answers three requests, not {}",
            requests.len()
        )));
    }
    let mut pins = Vec::new();
    for (number, request) in requests.iter().enumerate() {
        let Some(pin) = &request.server_pin else {
            return Ok(refused(format!(
                "Request {} names no server certificate: make it on the member with `meter activate request --triad-member`",
                number + 1
            )));
        };
        if pins.contains(pin) {
            return Ok(refused(format!(
                "Requests name server certificate {pin} twice: a triad is three servers"
            )));
        }
        pins.push(pin.clone());
    }
    for request in requests.iter().filter(|r| r.kind == MachineKind::Guest) {
        let items = match requested_items(request, policy) {
            Ok(items) => items,
            Err(Refusal { reason, message }) => {
                return Ok(TriadAnswer::Refused { reason, message });
            }
        };
        if let Some(item) = items
            .iter()
            .find(|item| item.triad_in_guests == Allowance::Deny)
        {
            return Ok(TriadAnswer::Refused {
                reason: Reason::VmNotAllowed,
                message: format!(
                    "Product {} ({}) may not be served by a server triad member in a virtual machine: the vendor's policy says triad-in-guests: deny",
                    item.code, item.name
                ),
            });
        }
    }
    let binding = TriadBinding {
        id: licence_id(&entropy[3]),
        members: pins,
    };
    let mut licences = Vec::new();
    for (request, seed) in requests.iter().zip(entropy) {
        match bound_body(request, policy, now, *seed)? {
            Ok(mut body) => {
                body.triad = Some(binding.clone());
                licences.push(vendor.sign_licence(body));
            }
            Err(Refusal { reason, message }) => {
                return Ok(TriadAnswer::Refused { reason, message });
            }
        }
    }
    Ok(TriadAnswer::Licences(licences))
}

/// The licence body the vendor would sign for `request`, or its refusal.
fn bound_body(
    request: &ActivationRequest,
    policy: &ProductPolicy,
    now: u64,
    entropy: [u8; 32],
) -> Result<Result<LicenceBody, Refusal>, ActivationError> {
    let items = match requested_items(request, policy) {
        Ok(items) => items,
        Err(refusal) => return Ok(Err(refusal)),
    };
    if request.kind == MachineKind::Guest
        && let Some(item) = items
            .iter()
            .find(|item| item.virtual_machines == Allowance::Deny)
    {
        return Ok(Err(refuse(
            Reason::VmNotAllowed,
            format!(
                "Product {} ({}) may not be activated in a virtual machine: the vendor's policy says virtual-machines: deny",
                item.code, item.name
            ),
        )));
    }
    LicenceBody::bound(
        policy,
        items,
        &request.traits,
        request.kind,
        Some(request.runtime_key.clone()),
        now,
        entropy,
    )
    .map(Ok)
    .map_err(ActivationError::Licence)
}

fn requested_items(
    request: &ActivationRequest,
    policy: &ProductPolicy,
) -> Result<Vec<ProductItem>, Refusal> {
    if request.firm != policy.firm {
        return Err(refuse(
            Reason::UnknownProduct,
            format!(
                "The request is for firm {}, this policy is for firm {}",
                request.firm, policy.firm
            ),
        ));
    }
    let soft = |item: &&ProductItem| item.container == ContainerKind::Soft;
    if request.products.is_empty() {
        let items: Vec<_> = policy.products.iter().filter(soft).cloned().collect();
        if items.is_empty() {
            return Err(refuse(
                Reason::UnknownProduct,
                "The policy has no soft-licence products".to_owned(),
            ));
        }
        return Ok(items);
    }
    request
        .products
        .iter()
        .map(|code| match policy.product(*code) {
            Some(item) if soft(&item) => Ok(item.clone()),
            Some(item) => Err(refuse(
                Reason::UnknownProduct,
                format!(
                    "Product {code} ({}) is issued on dongles only, not by activation",
                    item.name
                ),
            )),
            None => Err(refuse(
                Reason::UnknownProduct,
                format!("Product {code} is not in the vendor's policy"),
            )),
        })
        .collect()
}

/// Why the vendor refuses a request.
struct Refusal {
    reason: Reason,
    message: String,
}

fn refuse(reason: Reason, message: String) -> Refusal {
    Refusal { reason, message }
}

fn request_cipher(
    shared: &[u8; 32],
    ephemeral: &x25519_dalek::PublicKey,
    vendor: &x25519_dalek::PublicKey,
) -> ChaCha20Poly1305 {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral.as_bytes());
    salt[32..].copy_from_slice(vendor.as_bytes());
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF's output limit.
    let _ = Hkdf::<Sha256>::new(Some(&salt), shared).expand(REQUEST_KDF_INFO, &mut key);
    ChaCha20Poly1305::new(&Key::from(key))
}

fn request_aad(firm: u32, key_id: &str) -> Vec<u8> {
    let mut aad = firm.to_be_bytes().to_vec();
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    hex::decode(text).ok()?.try_into().ok()
}

fn unsaved() -> String {
    "(unsaved request)".to_owned()
}
