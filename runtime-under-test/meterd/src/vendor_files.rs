//! The vendor's files: its key pair and its product policy, read and written by the vendor tools.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use dongle::SigningKey;
use meter_core::licence::{VendorKey, VendorPublicKey};
use meter_core::policy::ProductPolicy;

/// What every vendor command that makes a licence or a dongle reads.
#[derive(Debug, Clone, Args)]
pub struct VendorInputs {
    /// Product policy (YAML; docs/runtime-contract.md, "Policy document").
    #[arg(long)]
    pub policy: PathBuf,
    /// The vendor's secret key (vendor.key).
    #[arg(long)]
    pub key: PathBuf,
}

/// Writes a secret file only its owner may read (0600).
pub fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("Cannot write {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("Cannot write {}", path.display()))
}

/// Writes a file, naming it in the error.
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("Cannot write {}", path.display()))
}

/// Reads a vendor secret key file.
pub fn read_vendor_key(path: &Path) -> anyhow::Result<VendorKey> {
    let bytes = fs::read(path).with_context(|| format!("Cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a vendor key", path.display()))
}

/// Reads a vendor public key file.
pub fn read_vendor_public(path: &Path) -> anyhow::Result<VendorPublicKey> {
    let bytes = fs::read(path).with_context(|| format!("Cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a vendor public key", path.display()))
}

/// Reads and checks a product policy document.
pub fn read_policy(path: &Path) -> anyhow::Result<ProductPolicy> {
    let text =
        fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))?;
    ProductPolicy::from_yaml(&text).with_context(|| format!("Invalid policy {}", path.display()))
}

/// The Ed25519 signing key inside a vendor key file (`signing-key`, 32 bytes hex).
pub fn read_vendor_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    // Parsing as a vendor key first rejects files that are not vendor keys at all.
    read_vendor_key(path)?;
    let bytes = fs::read(path).with_context(|| format!("Cannot read {}", path.display()))?;
    let text: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a vendor key", path.display()))?;
    let seed = text["signing-key"]
        .as_str()
        .and_then(|hex_text| hex::decode(hex_text).ok())
        .and_then(|seed| <[u8; 32]>::try_from(seed.as_slice()).ok())
        .with_context(|| format!("{} has no signing key", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}
