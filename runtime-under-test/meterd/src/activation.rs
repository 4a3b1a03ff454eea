//! Soft-licence activation: the runtime's sealed request and the vendor's answer.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use meter_core::activation::{self, ActivationAnswer, ActivationRequest, SealedRequest};
use meter_core::licence::{SignedLicence, VendorPublicKey};
use meter_core::reason::Reason;
use serde_json::json;

use crate::client::LocalClient;
use crate::daemon::Runtime;
use crate::outcome::{EXIT_DENIED, EXIT_OK, Outcome};
use crate::protocol::{LocalReply, LocalRequest};
use crate::store::{self, Change};

use crate::os_sources::{entropy, wall_clock_ms as now_ms};

impl Runtime {
    /// Builds this machine's activation request for `products` of `firm`, sealed to the vendor key
    /// given (or the one trusted for the firm). Creates the runtime's random id and receipt key
    /// on first need and stores them with the state, so they travel with the disk.
    pub async fn activation_request(
        self: &Arc<Self>,
        firm: u32,
        products: Vec<u32>,
        vendor: Option<Vec<u8>>,
    ) -> Result<String, (String, Option<Reason>)> {
        let vendor: VendorPublicKey = match vendor {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| (format!("Not a vendor public key: {e}"), None))?,
            None => self
                .licences
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trusted_vendor(firm)
                .map_err(|e| (e.to_string(), None))?
                .ok_or_else(|| {
                    (
                        format!(
                            "No vendor key is trusted for firm {firm}: run `meter trust --firm {firm} <vendor.pub>` or pass --vendor"
                        ),
                        None,
                    )
                })?,
        };
        let mut kind = self
            .platform
            .kind()
            .map_err(|e| (format!("Cannot read the machine kind: {e}"), None))?;
        if crate::weakened::is(crate::weakened::Defence::VmActivationSwitch) {
            // Weakened: the hypervisor is not looked for; every machine says it is physical.
            kind = meter_core::traits::MachineKind::Physical;
        }
        let now = self
            .platform
            .now_ms()
            .map_err(|e| (format!("Cannot read the machine clock: {e}"), None))?;
        let (changes, runtime_key) = self
            .licences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ensure_identity(|| entropy().map_err(|e| e.to_string()))
            .map_err(|e| (e, None))?;
        if !changes.is_empty() {
            store::wait(self.store.submit(changes))
                .await
                .map_err(|e| (format!("Runtime identity not saved: {e}"), None))?;
        }
        let traits = self
            .soft_traits()
            .map_err(|e| (format!("Cannot read machine traits: {e}"), None))?;
        let request = ActivationRequest {
            firm,
            products,
            kind,
            traits,
            runtime_key,
            requested_at: now,
        };
        let sealed = request
            .seal(&vendor, entropy().map_err(|e| (e.to_string(), None))?)
            .map_err(|e| (crate::licences::error_chain(&e), None))?;
        Ok(sealed.to_json())
    }
}

/// A new runtime identity to store: `(random id, receipt key)` changes.
pub fn identity_changes(random_id: &str, receipt_key: &[u8; 32]) -> Vec<Change> {
    vec![
        Change::PutMeta(
            crate::licences::RANDOM_ID_KEY.into(),
            random_id.as_bytes().to_vec(),
        ),
        Change::PutMeta(
            crate::licences::RECEIPT_KEY_KEY.into(),
            receipt_key.to_vec(),
        ),
    ]
}

/// `meter activate request`: asks meterd for the sealed request and writes it to `out`.
pub async fn request_command(
    socket: &Path,
    json_mode: bool,
    product: u32,
    firm: u32,
    vendor: Option<PathBuf>,
    out: &Path,
) -> anyhow::Result<Outcome> {
    let vendor = match vendor {
        Some(path) => {
            Some(fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?)
        }
        None => None,
    };
    let mut client = LocalClient::connect(socket).await?;
    let reply = client
        .request(&LocalRequest::ActivationRequest {
            firm,
            products: vec![product],
            vendor,
        })
        .await?;
    match reply {
        LocalReply::Json(text) => {
            fs::write(out, text.as_bytes())
                .with_context(|| format!("Cannot write {}", out.display()))?;
            let document = json!({"request": out, "firm": firm, "products": [product]});
            if json_mode {
                println!("{document}");
            } else {
                println!("activation request written to {}", out.display());
            }
            Ok(Outcome { code: EXIT_OK })
        }
        LocalReply::Error { message, reason } => {
            if json_mode {
                println!(
                    "{}",
                    json!({"error": message, "reason": reason.map(|r| r.code())})
                );
            } else {
                eprintln!("meter: {message}");
            }
            Ok(Outcome {
                code: if reason.is_some() {
                    EXIT_DENIED
                } else {
                    crate::outcome::EXIT_UNREACHABLE
                },
            })
        }
        other => anyhow::bail!("Unexpected reply {other:?}"),
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
        ActivationAnswer::Refused { reason, message } => {
            if json_mode {
                println!(
                    "{}",
                    json!({"error": format!("Activation refused: {message}"), "reason": reason.code()})
                );
            } else {
                eprintln!("meter: activation refused: {message} ({reason})");
            }
            Ok(Outcome { code: EXIT_DENIED })
        }
    }
}

/// The licence inside a file given to `meter activate apply`: a licence file, or a vendor answer
/// carrying one. Anything else is passed on unchanged for meterd to refuse with its reason.
pub fn licence_bytes(bytes: Vec<u8>, source_name: &str) -> Vec<u8> {
    if SignedLicence::from_json(&bytes, source_name).is_ok() {
        return bytes;
    }
    match ActivationAnswer::from_json(&bytes, source_name) {
        Ok(ActivationAnswer::Licence(licence)) => licence.to_json().into_bytes(),
        _ => bytes,
    }
}
