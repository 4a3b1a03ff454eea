//! Runtime root keys and firm certificates: the chain that makes a vendor key trusted.
//!
//! The runtime's maker holds a root key. It certifies a vendor's public keys for one firm code
//! (a [`FirmCertificate`]); a runtime trusts a vendor only through such a certificate signed by
//! a root it carries. A key the licensee makes and certifies with a root of their own is not
//! trusted, however the certificate is installed.
//!
//! A certificate file is JSON: `{"firm": 10, "vendor": {<vendor.pub>}, "issued-ms": …,
//! "root-key": "<hex>", "signature": "<hex>"}`. The Ed25519 signature (strict verification)
//! covers a domain tag, the firm, both vendor keys and the issue time.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::licence::{KeyError, VendorPublicKey, hex32};

const SIGNATURE_DOMAIN: &[u8] = b"meter-firm-certificate-v1\0";

/// A root's secret key: certifies vendors.
#[derive(Clone, Serialize, Deserialize)]
#[serde(into = "RootKeyText", try_from = "RootKeyText")]
pub struct RootKey {
    signing: SigningKey,
}

/// A root's public key: what a runtime carries to check firm certificates.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "RootPublicKeyText", try_from = "RootPublicKeyText")]
pub struct RootPublicKey {
    key: VerifyingKey,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RootKeyText {
    root_secret: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RootPublicKeyText {
    key_id: String,
    root_key: String,
}

/// A vendor's public keys certified for one firm code by a root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FirmCertificate {
    /// The firm code the vendor may sign licences and dongles for.
    pub firm: u32,
    /// The vendor's public keys.
    pub vendor: VendorPublicKey,
    /// When the root signed it (ms since the epoch).
    pub issued_ms: u64,
    /// The root's public key (hex), named so a refusal can say which root signed.
    pub root_key: String,
    /// Ed25519 signature (hex).
    pub signature: String,
}

/// Why a firm certificate is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The file is not a firm certificate.
    #[error("Firm certificate {file} is malformed")]
    Malformed {
        /// File name given by the caller.
        file: String,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Signed by a root this runtime does not carry.
    #[error(
        "Firm certificate {file} for firm {firm} is signed by root {root}, which this runtime does not trust"
    )]
    UnknownRoot {
        /// File name given by the caller.
        file: String,
        /// The firm it names.
        firm: u32,
        /// Key id of the root that signed it.
        root: String,
    },
    /// The signature does not match the content.
    #[error("Firm certificate {file} was tampered with: its signature does not match its content")]
    Tampered {
        /// File name given by the caller.
        file: String,
    },
    /// The certificate names another firm than the one it is used for.
    #[error("Firm certificate {file} is for firm {certified}, not firm {wanted}")]
    OtherFirm {
        /// File name given by the caller.
        file: String,
        /// Firm in the certificate.
        certified: u32,
        /// Firm it was used for.
        wanted: u32,
    },
}

impl RootKey {
    /// A root key from a 32-byte secret supplied by the caller's entropy source.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        RootKey {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The matching public key.
    pub fn public(&self) -> RootPublicKey {
        RootPublicKey {
            key: self.signing.verifying_key(),
        }
    }

    /// Certifies a vendor's keys for a firm.
    pub fn certify(&self, firm: u32, vendor: VendorPublicKey, issued_ms: u64) -> FirmCertificate {
        let signature = self.signing.sign(&signed_message(firm, &vendor, issued_ms));
        FirmCertificate {
            firm,
            vendor,
            issued_ms,
            root_key: self.public().to_hex(),
            signature: hex::encode(signature.to_bytes()),
        }
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootKey({})", self.public().key_id())
    }
}

impl RootPublicKey {
    /// Parses 32 bytes of hex.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(&hex32(text.trim(), "root-key")?)
            .map(|key| RootPublicKey { key })
            .map_err(|_| KeyError::BadSigningKey)
    }

    /// The key as 32 bytes of hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    /// Short id: the first 8 bytes of the key's SHA-256, hex.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.key.as_bytes())[..8])
    }
}

impl fmt::Debug for RootPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootPublicKey({})", self.key_id())
    }
}

impl From<RootKey> for RootKeyText {
    fn from(key: RootKey) -> Self {
        RootKeyText {
            root_secret: hex::encode(key.signing.to_bytes()),
        }
    }
}

impl TryFrom<RootKeyText> for RootKey {
    type Error = KeyError;

    fn try_from(text: RootKeyText) -> Result<Self, Self::Error> {
        Ok(RootKey::from_seed(hex32(&text.root_secret, "root-secret")?))
    }
}

impl From<RootPublicKey> for RootPublicKeyText {
    fn from(key: RootPublicKey) -> Self {
        RootPublicKeyText {
            key_id: key.key_id(),
            root_key: key.to_hex(),
        }
    }
}

impl TryFrom<RootPublicKeyText> for RootPublicKey {
    type Error = KeyError;

    fn try_from(text: RootPublicKeyText) -> Result<Self, Self::Error> {
        let key = RootPublicKey::from_hex(&text.root_key)?;
        if key.key_id() != text.key_id {
            return Err(KeyError::KeyIdMismatch {
                given: text.key_id,
                actual: key.key_id(),
            });
        }
        Ok(key)
    }
}

impl FirmCertificate {
    /// Parses a certificate file; `source_name` names it in errors.
    pub fn from_json(bytes: &[u8], source_name: &str) -> Result<Self, CertificateError> {
        serde_json::from_slice(bytes).map_err(|source| CertificateError::Malformed {
            file: source_name.to_owned(),
            source,
        })
    }

    /// The certificate file text (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Key id of the root that signed it, or the raw text when it is not a key.
    pub fn root_id(&self) -> String {
        RootPublicKey::from_hex(&self.root_key)
            .map(|k| k.key_id())
            .unwrap_or_else(|_| self.root_key.clone())
    }

    /// The vendor's keys, if the certificate is signed by one of `roots`.
    pub fn verify(
        &self,
        roots: &[RootPublicKey],
        source_name: &str,
    ) -> Result<VendorPublicKey, CertificateError> {
        let root = roots
            .iter()
            .find(|root| root.to_hex() == self.root_key)
            .ok_or_else(|| CertificateError::UnknownRoot {
                file: source_name.to_owned(),
                firm: self.firm,
                root: self.root_id(),
            })?;
        self.verify_with(root, source_name)
    }

    /// The vendor's keys, if the certificate is signed by the root it names (any root: only a
    /// deliberately weakened runtime trusts this).
    pub fn verify_self_signed(
        &self,
        source_name: &str,
    ) -> Result<VendorPublicKey, CertificateError> {
        let root =
            RootPublicKey::from_hex(&self.root_key).map_err(|_| CertificateError::Tampered {
                file: source_name.to_owned(),
            })?;
        self.verify_with(&root, source_name)
    }

    /// The vendor's keys, if certified for `firm` by one of `roots`.
    pub fn verify_for(
        &self,
        firm: u32,
        roots: &[RootPublicKey],
        source_name: &str,
    ) -> Result<VendorPublicKey, CertificateError> {
        if self.firm != firm {
            return Err(CertificateError::OtherFirm {
                file: source_name.to_owned(),
                certified: self.firm,
                wanted: firm,
            });
        }
        self.verify(roots, source_name)
    }

    fn verify_with(
        &self,
        root: &RootPublicKey,
        source_name: &str,
    ) -> Result<VendorPublicKey, CertificateError> {
        let tampered = || CertificateError::Tampered {
            file: source_name.to_owned(),
        };
        let bytes = hex::decode(&self.signature).map_err(|_| tampered())?;
        let bytes = <[u8; 64]>::try_from(bytes.as_slice()).map_err(|_| tampered())?;
        root.key
            .verify_strict(
                &signed_message(self.firm, &self.vendor, self.issued_ms),
                &Signature::from_bytes(&bytes),
            )
            .map_err(|_| tampered())?;
        Ok(self.vendor)
    }
}

/// What a root signs: the domain tag, the firm, both vendor keys and the issue time.
fn signed_message(firm: u32, vendor: &VendorPublicKey, issued_ms: u64) -> Vec<u8> {
    let mut message = SIGNATURE_DOMAIN.to_vec();
    message.extend_from_slice(&firm.to_le_bytes());
    message.extend_from_slice(vendor.signing_key().as_bytes());
    message.extend_from_slice(vendor.exchange_key().as_bytes());
    message.extend_from_slice(&issued_ms.to_le_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::licence::VendorKey;

    fn vendor(seed: u8) -> VendorPublicKey {
        VendorKey::from_seeds([seed; 32], [seed ^ 0xff; 32]).public()
    }

    #[test]
    fn a_certificate_from_a_carried_root_yields_the_vendor() {
        let root = RootKey::from_seed([1; 32]);
        let cert = root.certify(10, vendor(7), 1_000);
        let parsed = FirmCertificate::from_json(cert.to_json().as_bytes(), "f.cert").unwrap();
        assert_eq!(
            parsed.verify_for(10, &[root.public()], "f.cert").unwrap(),
            vendor(7)
        );
    }

    #[test]
    fn a_self_made_root_is_not_trusted() {
        let real = RootKey::from_seed([1; 32]);
        let own = RootKey::from_seed([2; 32]);
        let cert = own.certify(10, vendor(8), 1_000);
        let error = cert.verify(&[real.public()], "forged.cert").unwrap_err();
        assert!(
            matches!(error, CertificateError::UnknownRoot { ref root, firm: 10, .. } if *root == own.public().key_id()),
            "{error}"
        );
        // Only the weakened path takes it at its word.
        assert_eq!(cert.verify_self_signed("forged.cert").unwrap(), vendor(8));
    }

    #[test]
    fn a_changed_firm_or_vendor_is_tampering() {
        let root = RootKey::from_seed([1; 32]);
        let mut cert = root.certify(10, vendor(7), 1_000);
        cert.firm = 11;
        assert!(matches!(
            cert.verify(&[root.public()], "f").unwrap_err(),
            CertificateError::Tampered { .. }
        ));
        let mut cert = root.certify(10, vendor(7), 1_000);
        cert.vendor = vendor(9);
        assert!(matches!(
            cert.verify(&[root.public()], "f").unwrap_err(),
            CertificateError::Tampered { .. }
        ));
    }

    #[test]
    fn a_certificate_for_another_firm_is_refused() {
        let root = RootKey::from_seed([1; 32]);
        let cert = root.certify(11, vendor(7), 1_000);
        assert!(matches!(
            cert.verify_for(10, &[root.public()], "f").unwrap_err(),
            CertificateError::OtherFirm {
                certified: 11,
                wanted: 10,
                ..
            }
        ));
    }

    #[test]
    fn root_key_files_round_trip() {
        let root = RootKey::from_seed([3; 32]);
        let secret: RootKey = serde_json::from_str(&serde_json::to_string(&root).unwrap()).unwrap();
        assert_eq!(secret.public(), root.public());
        let public: RootPublicKey =
            serde_json::from_str(&serde_json::to_string(&root.public()).unwrap()).unwrap();
        assert_eq!(public, root.public());
    }
}
