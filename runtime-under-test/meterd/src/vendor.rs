//! `meter vendor …`: the vendor's tools (keys, licence issue, activation answers).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use meter_core::activation::{self, ActivationAnswer, SealedRequest, TriadAnswer};
use meter_core::licence::{LicenceBody, VendorKey};
use serde_json::json;

use crate::outcome::{EXIT_DENIED, EXIT_OK, Outcome};
use crate::vendor_files::{VendorInputs, read_policy, read_vendor_key, write_file, write_secret};

use crate::os_sources::{entropy, wall_clock_ms as now_ms};

/// `meter vendor` subcommands.
#[derive(Debug, Subcommand)]
pub enum VendorCommand {
    /// Create a vendor key pair: vendor.key (secret) and vendor.pub.
    Keygen {
        /// Folder to write the keys to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue an unbound signed licence file from a product policy YAML.
    Issue {
        /// The product policy and the key that signs.
        #[command(flatten)]
        vendor: VendorInputs,
        /// Where to write the licence.
        #[arg(long)]
        out: PathBuf,
    },
    /// Licence dongles: manufacture and program.
    Dongle {
        /// What to do.
        #[command(subcommand)]
        command: crate::dongle_vendor::DongleCommand,
    },
    /// Answer an activation request with a licence bound to the requesting machine.
    Activate {
        /// The activation request.
        #[arg(long)]
        request: PathBuf,
        /// The product policy and the key that signs.
        #[command(flatten)]
        vendor: VendorInputs,
        /// Where to write the licence.
        #[arg(long)]
        out: PathBuf,
    },
    /// Answer the three members' requests of a server triad with one triad licence: a copy
    /// for each member, bound to it and naming the three servers' certificates (made with
    /// `meter activate request --triad-member`); it serves only in that triad.
    ActivateTriad {
        /// The members' activation requests (three, repeat the option).
        #[arg(long = "request", num_args = 1, required = true)]
        requests: Vec<PathBuf>,
        /// The product policy and the key that signs.
        #[command(flatten)]
        vendor: VendorInputs,
        /// Where to write each member's copy, in the requests' order (three).
        #[arg(long = "out", num_args = 1, required = true)]
        outs: Vec<PathBuf>,
    },
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
        } => vendor_answer(json_mode, &request, &vendor.policy, &vendor.key, &out),
        VendorCommand::ActivateTriad {
            requests,
            vendor,
            outs,
        } => triad_answer(json_mode, &requests, &vendor, &outs),
    }
}

/// `meter vendor activate-triad`: answers a triad's three requests with one licence, or
/// refuses (exit 1).
fn triad_answer(
    json_mode: bool,
    requests: &[PathBuf],
    vendor: &VendorInputs,
    outs: &[PathBuf],
) -> anyhow::Result<Outcome> {
    if requests.len() != 3 || outs.len() != 3 {
        anyhow::bail!(
            "A triad licence answers three requests into three files: got {} --request and {} --out",
            requests.len(),
            outs.len()
        );
    }
    let key = read_vendor_key(&vendor.key)?;
    let policy = read_policy(&vendor.policy)?;
    let mut opened = Vec::new();
    for path in requests {
        let bytes = fs::read(path).with_context(|| format!("Cannot read {}", path.display()))?;
        let sealed = SealedRequest::from_json(&bytes, &path.display().to_string())?;
        opened.push(sealed.open(&key)?);
    }
    let seeds = [entropy()?, entropy()?, entropy()?, entropy()?];
    match activation::answer_triad(&opened, &policy, &key, now_ms(), &seeds)? {
        TriadAnswer::Licences(licences) => {
            for (licence, out) in licences.iter().zip(outs) {
                write_file(out, licence.to_json().as_bytes())?;
            }
            let triad = licences
                .first()
                .and_then(|l| l.body.triad.as_ref())
                .map(|t| t.id.clone())
                .unwrap_or_default();
            tracing::info!(triad = %triad, "Triad activation answered");
            let document = json!({
                "triad": triad,
                "licences": licences.iter().map(|l| &l.body.licence_id).collect::<Vec<_>>(),
                "out": outs,
            });
            report(json_mode, &document, || {
                format!("triad licence {triad}: one copy per member written")
            });
            Ok(Outcome { code: EXIT_OK })
        }
        TriadAnswer::Refused { reason, message } => Ok(refused(json_mode, reason, &message)),
    }
}

fn report(json_mode: bool, document: &serde_json::Value, human: impl FnOnce() -> String) {
    if json_mode {
        println!("{document}");
    } else {
        println!("{}", human());
    }
}

/// `meter vendor activate`: answers a request with a bound licence, or refuses (exit 1).
pub fn vendor_answer(
    json_mode: bool,
    request: &Path,
    policy: &Path,
    key: &Path,
    out: &Path,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let bytes = fs::read(request).with_context(|| format!("Cannot read {}", request.display()))?;
    let sealed = SealedRequest::from_json(&bytes, &request.display().to_string())?;
    let key = crate::vendor_files::read_vendor_key(key)?;
    let text =
        fs::read_to_string(policy).with_context(|| format!("Cannot read {}", policy.display()))?;
    let mut policy = meter_core::policy::ProductPolicy::from_yaml(&text)
        .with_context(|| format!("Invalid policy {}", policy.display()))?;
    if crate::weakened::is(crate::weakened::Defence::BindingTolerance) {
        // Weakened: the vendor tool seals every licence with its most forgiving tolerance.
        for product in &mut policy.products {
            product.binding.tolerance = meter_core::policy::Tolerance::Loose;
        }
    }
    let opened = sealed.open(&key)?;
    let answer = activation::answer(&opened, &policy, &key, now_ms(), entropy()?)?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    match answer {
        ActivationAnswer::Licence(licence) => {
            fs::write(out, licence.to_json())
                .with_context(|| format!("Cannot write {}", out.display()))?;
            tracing::info!(licence = %licence.body.licence_id, elapsed_ms, "Activation answered");
            let products: Vec<u32> = licence.body.catalogue.iter().map(|c| c.code).collect();
            let document = json!({
                "licence": licence.body.licence_id, "firm": licence.body.firm, "out": out,
                "products": products, "kind": opened.kind, "elapsed_ms": elapsed_ms,
            });
            if json_mode {
                println!("{document}");
            } else {
                println!(
                    "licence {} bound to the requesting machine written to {}",
                    licence.body.licence_id,
                    out.display()
                );
            }
            Ok(Outcome { code: EXIT_OK })
        }
        ActivationAnswer::Refused { reason, message } => Ok(refused(json_mode, reason, &message)),
    }
}

/// Says the vendor refuses to activate (exit 1).
fn refused(json_mode: bool, reason: meter_core::reason::Reason, message: &str) -> Outcome {
    if json_mode {
        println!(
            "{}",
            json!({"error": format!("Activation refused: {message}"), "reason": reason.code()})
        );
    } else {
        eprintln!("meter: activation refused: {message} ({reason})");
    }
    Outcome { code: EXIT_DENIED }
}
