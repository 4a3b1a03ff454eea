//! `meter vendor dongle …`: manufacturing and programming licence dongles.

use std::fs;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use dongle::{DonglePolicy, Flash, ItemCounting, ProductItem, Serial};
use meter_core::policy::{Allowance, Counting};
use serde_json::json;

use crate::outcome::Outcome;
use crate::vendor_files::{read_policy, read_vendor_signing_key};

/// `meter vendor dongle` subcommands.
#[derive(Debug, Subcommand)]
pub enum DongleCommand {
    /// Manufacture a dongle certified by the vendor key and program products into its flash.
    Program {
        /// The product policy the products are taken from, and the key that certifies.
        #[command(flatten)]
        vendor: crate::vendor_files::VendorInputs,
        /// The dongle's serial number.
        #[arg(long)]
        serial: u64,
        /// Product codes to program, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        products: Vec<u32>,
        /// Rebinds allowed within the rebind window; one more locks the dongle out.
        #[arg(long, default_value_t = 3)]
        max_rebinds: u32,
        /// The rebind window, dongle milliseconds.
        #[arg(long, default_value_t = 60_000)]
        rebind_window_ms: u64,
        /// How long a lockout lasts, dongle milliseconds.
        #[arg(long, default_value_t = 300_000)]
        lockout_ms: u64,
        /// Where to write the dongle flash (JSON).
        #[arg(long)]
        out: PathBuf,
    },
}

fn dongle_counting(counting: Counting) -> ItemCounting {
    match counting {
        Counting::UserLimit => ItemCounting::UserLimit,
        Counting::StationShare => ItemCounting::StationShare,
        Counting::NoCount => ItemCounting::NoCount,
    }
}

use crate::os_sources::entropy;

/// Runs a `meter vendor dongle` command.
pub fn run(json_mode: bool, command: DongleCommand) -> anyhow::Result<Outcome> {
    match command {
        DongleCommand::Program {
            vendor: crate::vendor_files::VendorInputs { policy, key },
            serial,
            products,
            max_rebinds,
            rebind_window_ms,
            lockout_ms,
            out,
        } => {
            let policy = read_policy(&policy)?;
            let vendor = read_vendor_signing_key(&key)?;
            let mut flash = Flash::manufacture(Serial(serial), entropy()?, entropy()?, &vendor);
            flash
                .set_policy(
                    &vendor,
                    DonglePolicy {
                        max_rebinds,
                        rebind_window_ms,
                        lockout_ms,
                        ..DonglePolicy::default()
                    },
                )
                .context("Cannot program the dongle policy")?;
            for code in &products {
                let product = policy
                    .products
                    .iter()
                    .find(|p| p.code == *code)
                    .with_context(|| format!("Product {code} is not in the policy"))?;
                flash
                    .program_item(
                        &vendor,
                        ProductItem {
                            firm: policy.firm,
                            code: product.code,
                            name: product.name.clone(),
                            quantity: product.quantity,
                            counting: dongle_counting(product.counting),
                            expires_at: product.expires_at,
                            units: product.units,
                            deny_virtual_machines: product.virtual_machines == Allowance::Deny,
                            deny_terminal_server: product.terminal_server == Allowance::Deny,
                        },
                    )
                    .with_context(|| format!("Cannot program product {code}"))?;
            }
            let bytes = serde_json::to_vec_pretty(&flash)?;
            let tmp = out.with_extension("tmp");
            fs::write(&tmp, bytes).with_context(|| format!("Cannot write {}", tmp.display()))?;
            fs::rename(&tmp, &out).with_context(|| format!("Cannot write {}", out.display()))?;
            let document = json!({
                "serial": serial, "firm": policy.firm, "products": products, "out": out,
                "policy": {"max_rebinds": max_rebinds, "rebind_window_ms": rebind_window_ms, "lockout_ms": lockout_ms},
            });
            if json_mode {
                println!("{document}");
            } else {
                println!(
                    "dongle {serial} programmed, flash written to {}",
                    out.display()
                );
            }
            Ok(Outcome { code: 0 })
        }
    }
}
