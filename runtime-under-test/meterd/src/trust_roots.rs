//! The root keys this runtime takes firm certificates from, and the vendor keys they certify.
//!
//! Every build carries the production root. The reference root's secret was discarded when it
//! was made, so a shipped reference build trusts no vendor: whoever ships the runtime builds it
//! with their own root (`METER_PRODUCTION_ROOT=<hex>` at compile time, the public half of a
//! `meter root keygen`) and certifies vendors with its secret. A harness build also trusts the root of the harness's world, given at start in
//! `METER_HARNESS_ROOT`; any other build ignores that variable.

use std::path::Path;
use std::sync::OnceLock;

use meter_core::firm_certificate::{CertificateError, FirmCertificate, RootPublicKey};
use meter_core::licence::{KeyError, VendorPublicKey};

/// The environment variable a harness build reads its world's root key from (hex).
pub const HARNESS_ROOT_VARIABLE: &str = "METER_HARNESS_ROOT";

/// The production root's public key (hex).
pub const PRODUCTION_ROOT: &str = match option_env!("METER_PRODUCTION_ROOT") {
    Some(key) => key,
    None => "a385750688589756e74bf5f8be5bc38d60c889908397c893cffd370b5c97bb35",
};

/// A root key that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TrustRootError {
    /// `METER_HARNESS_ROOT` is set but is not a key.
    #[error("{HARNESS_ROOT_VARIABLE} is not a root key (32 bytes of hex)")]
    HarnessRoot(#[source] KeyError),
    /// The compiled-in production root is not a key.
    #[error("The production root compiled into this build is not a key")]
    ProductionRoot(#[source] KeyError),
}

/// The roots this process trusts; fails on a root key that does not parse.
pub fn load() -> Result<&'static [RootPublicKey], &'static TrustRootError> {
    static ROOTS: OnceLock<Result<Vec<RootPublicKey>, TrustRootError>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = vec![
                RootPublicKey::from_hex(PRODUCTION_ROOT).map_err(TrustRootError::ProductionRoot)?,
            ];
            if crate::harness_build::enabled()
                && let Ok(text) = std::env::var(HARNESS_ROOT_VARIABLE)
                && !text.is_empty()
            {
                roots.push(RootPublicKey::from_hex(&text).map_err(TrustRootError::HarnessRoot)?);
            }
            Ok(roots)
        })
        .as_ref()
        .map(Vec::as_slice)
}

/// The roots this process trusts (none when a root key does not parse: the daemon refuses to
/// start then, see [`load`]).
pub fn roots() -> &'static [RootPublicKey] {
    load().unwrap_or(&[])
}

/// The vendor keys a firm certificate vouches for, used for `firm`.
pub fn vendor_of(
    certificate: &FirmCertificate,
    firm: u32,
    source_name: &str,
) -> Result<VendorPublicKey, CertificateError> {
    if crate::weakened::is(crate::weakened::Defence::VendorTrust) {
        // Weakened: the certificate is checked against the root it names, whatever that is.
        if certificate.firm == firm {
            return certificate.verify_self_signed(source_name);
        }
    }
    certificate.verify_for(firm, roots(), source_name)
}

/// The certificate file of a firm in a trust folder (`<firm>.cert`).
pub fn certificate_path(trust_dir: &Path, firm: u32) -> std::path::PathBuf {
    trust_dir.join(format!("{firm}.cert"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_production_root_is_a_key() {
        assert_eq!(
            RootPublicKey::from_hex(PRODUCTION_ROOT).unwrap().to_hex(),
            PRODUCTION_ROOT
        );
    }
}
