//! Vendor tools (keys, licence issue, activation answers) and the runtime's activation request.

use std::fs;
use std::path::Path;

use anyhow::Context;
use meter_core::licence::{LicenceBody, VendorKey, VendorPublicKey};
use meter_core::policy::ProductPolicy;
use serde_json::json;

use crate::cli::{Outcome, VendorCommand};

use crate::os_sources::{entropy, wall_clock_ms as now_ms};

fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
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

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
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

fn read_policy(path: &Path) -> anyhow::Result<ProductPolicy> {
    let text =
        fs::read_to_string(path).with_context(|| format!("Cannot read {}", path.display()))?;
    ProductPolicy::from_yaml(&text).with_context(|| format!("Invalid policy {}", path.display()))
}

/// Runs a `meter vendor` command.
pub fn run(json_mode: bool, command: VendorCommand) -> anyhow::Result<Outcome> {
    match command {
        VendorCommand::Keygen { out } => {
            fs::create_dir_all(&out).with_context(|| format!("Cannot create {}", out.display()))?;
            let key = VendorKey::from_seeds(entropy()?, entropy()?);
            let public = key.public();
            write_secret(
                &out.join("vendor.key"),
                serde_json::to_string_pretty(&key)?.as_bytes(),
            )?;
            write_file(
                &out.join("vendor.pub"),
                serde_json::to_string_pretty(&public)?.as_bytes(),
            )?;
            let document = json!({"key": out.join("vendor.key"), "public": out.join("vendor.pub"), "key_id": public.key_id()});
            report(json_mode, &document, || {
                format!(
                    "vendor key {} written to {}",
                    public.key_id(),
                    out.display()
                )
            });
            Ok(Outcome { code: 0 })
        }
        VendorCommand::Issue { vendor, out } => {
            let policy = read_policy(&vendor.policy)?;
            let key = read_vendor_key(&vendor.key)?;
            let body = LicenceBody::unbound(&policy, now_ms(), entropy()?);
            let licence_id = body.licence_id.clone();
            let signed = key.sign_licence(body);
            write_file(&out, signed.to_json().as_bytes())?;
            let document = json!({"licence": licence_id, "firm": policy.firm, "out": out, "products": policy.products.iter().map(|p| p.code).collect::<Vec<_>>()});
            report(json_mode, &document, || {
                format!("licence {licence_id} written to {}", out.display())
            });
            Ok(Outcome { code: 0 })
        }
        VendorCommand::Dongle { command } => crate::dongle_vendor::run(json_mode, command),
        VendorCommand::Activate {
            request,
            vendor,
            out,
        } => {
            crate::activation::vendor_answer(json_mode, &request, &vendor.policy, &vendor.key, &out)
        }
    }
}

fn report(json_mode: bool, document: &serde_json::Value, human: impl FnOnce() -> String) {
    if json_mode {
        println!("{document}");
    } else {
        println!("{}", human());
    }
}
