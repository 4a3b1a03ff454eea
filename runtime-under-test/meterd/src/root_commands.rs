//! `meter root …`: the runtime maker's tools: a root key, and firm certificates signed with it.

use std::fs;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use meter_core::firm_certificate::RootKey;
use serde_json::json;

use crate::os_sources::{entropy, wall_clock_ms};
use crate::outcome::{EXIT_OK, Outcome};
use crate::vendor_files::{read_vendor_public, write_file, write_secret};

/// `meter root` subcommands.
#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// Create a root key pair: root.key (secret) and root.pub. Runtimes trust only the roots
    /// they were built with (a harness build also the harness's, from METER_HARNESS_ROOT).
    Keygen {
        /// Folder to write the keys to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Certify a vendor's public key for a firm code; `meter trust` installs the certificate.
    Certify {
        /// The root's secret key (root.key).
        #[arg(long)]
        root: PathBuf,
        /// The firm code the vendor may sign for.
        #[arg(long)]
        firm: u32,
        /// The vendor's public key file (vendor.pub).
        #[arg(long)]
        vendor: PathBuf,
        /// Where to write the certificate.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs a `meter root` command.
pub fn run(json_mode: bool, command: RootCommand) -> anyhow::Result<Outcome> {
    let document = match command {
        RootCommand::Keygen { out } => {
            fs::create_dir_all(&out).with_context(|| format!("Cannot create {}", out.display()))?;
            let key = RootKey::from_seed(entropy()?);
            let public = key.public();
            write_secret(
                &out.join("root.key"),
                serde_json::to_string_pretty(&key)?.as_bytes(),
            )?;
            write_file(
                &out.join("root.pub"),
                serde_json::to_string_pretty(&public)?.as_bytes(),
            )?;
            json!({"key": out.join("root.key"), "public": out.join("root.pub"),
                   "key_id": public.key_id(), "root_key": public.to_hex()})
        }
        RootCommand::Certify {
            root,
            firm,
            vendor,
            out,
        } => {
            let bytes =
                fs::read(&root).with_context(|| format!("Cannot read {}", root.display()))?;
            let key: RootKey = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a root key", root.display()))?;
            let vendor_key = read_vendor_public(&vendor)?;
            let certificate = key.certify(firm, vendor_key, wall_clock_ms());
            write_file(&out, certificate.to_json().as_bytes())?;
            json!({"certificate": out, "firm": firm, "vendor": vendor_key.key_id(),
                   "root": key.public().key_id()})
        }
    };
    if json_mode {
        println!("{document}");
    } else {
        println!("{}", serde_json::to_string_pretty(&document)?);
    }
    Ok(Outcome { code: EXIT_OK })
}
