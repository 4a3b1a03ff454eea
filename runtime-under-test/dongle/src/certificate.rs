//! The vendor's certificate over a dongle's device key and serial.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::serial::Serial;

const CERTIFICATE_LABEL: &[u8] = b"vigil-dongle-certificate-v1";

/// A vendor's signature binding a device public key to a dongle serial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceCertificate {
    /// The dongle's serial.
    pub serial: Serial,
    /// The dongle's Ed25519 device public key.
    #[serde(with = "crate::byte_array")]
    pub device_key: [u8; 32],
    /// The certifying vendor's Ed25519 public key.
    #[serde(with = "crate::byte_array")]
    pub vendor_key: [u8; 32],
    /// The vendor's signature over serial and both keys.
    #[serde(with = "crate::byte_array")]
    pub signature: [u8; 64],
}

/// A device certificate that does not prove a trusted vendor made the dongle.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The certifying vendor key is not among the trusted ones.
    #[error("Dongle certified by an untrusted vendor key {0}")]
    UntrustedVendor(String),
    /// The vendor signature does not verify.
    #[error("Dongle certificate signature does not verify")]
    BadSignature(#[source] ed25519_dalek::SignatureError),
    /// A key in the certificate is not a valid Ed25519 point.
    #[error("Dongle certificate holds an invalid key")]
    BadKey(#[source] ed25519_dalek::SignatureError),
}

impl DeviceCertificate {
    /// Certifies `device_key` as the key of dongle `serial`, signed by `vendor`.
    pub fn issue(serial: Serial, device_key: &VerifyingKey, vendor: &SigningKey) -> Self {
        let device_key = device_key.to_bytes();
        let vendor_key = vendor.verifying_key().to_bytes();
        let signature = vendor
            .sign(&Self::message(serial, &device_key, &vendor_key))
            .to_bytes();
        Self {
            serial,
            device_key,
            vendor_key,
            signature,
        }
    }

    /// Checks the certificate against trusted vendor keys; returns the device key.
    pub fn verify(
        &self,
        trusted_vendors: &[VerifyingKey],
    ) -> Result<VerifyingKey, CertificateError> {
        let vendor = trusted_vendors
            .iter()
            .find(|key| key.to_bytes() == self.vendor_key)
            .ok_or_else(|| CertificateError::UntrustedVendor(hex::encode(self.vendor_key)))?;
        let signature = Signature::from_bytes(&self.signature);
        vendor
            .verify_strict(
                &Self::message(self.serial, &self.device_key, &self.vendor_key),
                &signature,
            )
            .map_err(CertificateError::BadSignature)?;
        VerifyingKey::from_bytes(&self.device_key).map_err(CertificateError::BadKey)
    }

    fn message(serial: Serial, device_key: &[u8; 32], vendor_key: &[u8; 32]) -> Vec<u8> {
        let mut message = Vec::with_capacity(CERTIFICATE_LABEL.len() + 8 + 64);
        message.extend_from_slice(CERTIFICATE_LABEL);
        message.extend_from_slice(&serial.0.to_le_bytes());
        message.extend_from_slice(device_key);
        message.extend_from_slice(vendor_key);
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (SigningKey, SigningKey, DeviceCertificate) {
        let vendor = SigningKey::from_bytes(&[1; 32]);
        let device = SigningKey::from_bytes(&[2; 32]);
        let certificate = DeviceCertificate::issue(Serial(77), &device.verifying_key(), &vendor);
        (vendor, device, certificate)
    }

    #[test]
    fn verifies_against_its_vendor() {
        let (vendor, device, certificate) = setup();
        assert_eq!(
            certificate.verify(&[vendor.verifying_key()]).unwrap(),
            device.verifying_key()
        );
    }

    #[test]
    fn untrusted_vendor_refused() {
        let (_, _, certificate) = setup();
        let other = SigningKey::from_bytes(&[3; 32]).verifying_key();
        assert!(matches!(
            certificate.verify(&[other]),
            Err(CertificateError::UntrustedVendor(_))
        ));
    }

    #[test]
    fn altered_serial_or_key_refused() {
        let (vendor, _, certificate) = setup();
        let mut serial_changed = certificate.clone();
        serial_changed.serial = Serial(78);
        assert!(matches!(
            serial_changed.verify(&[vendor.verifying_key()]),
            Err(CertificateError::BadSignature(_))
        ));
        let mut key_changed = certificate;
        key_changed.device_key = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        assert!(matches!(
            key_changed.verify(&[vendor.verifying_key()]),
            Err(CertificateError::BadSignature(_))
        ));
    }
}
