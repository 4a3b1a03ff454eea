//! Drives the runtime under test through its contract (`meter … --json`, see
//! docs/runtime-contract.md). Nothing here knows which backend runs the machine.

pub mod folder;
pub mod policy;
pub mod weakening;
pub mod world_root;

pub use weakening::WEAKEN_VARIABLE;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::backend::{Backend, BackendError, Caller, CommandOutput};

/// How long one `meter` command may take before the runtime counts as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the runtime answered to an access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessAnswer {
    /// Granted, with the runtime's handle.
    Granted {
        /// Handle of the grant.
        handle: Option<u64>,
    },
    /// Denied, with the reason code.
    Denied {
        /// Reason code.
        reason: String,
        /// Human message.
        message: String,
    },
}

impl AccessAnswer {
    /// Reads the first JSON line `meter access`/`meter hold` printed.
    pub fn from_json(line: &str) -> Option<AccessAnswer> {
        let value: Value = serde_json::from_str(line).ok()?;
        let granted = value.get("granted")?.as_bool()?;
        Some(if granted {
            AccessAnswer::Granted {
                handle: value.get("handle").and_then(Value::as_u64),
            }
        } else {
            AccessAnswer::Denied {
                reason: value
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
                message: value
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            }
        })
    }

    /// Short text for reports: `granted` or `denied (reason)`.
    pub fn describe(&self) -> String {
        match self {
            AccessAnswer::Granted { .. } => "granted".into(),
            AccessAnswer::Denied { reason, .. } => format!("denied ({reason})"),
        }
    }
}

/// Runs `meter --json <args>` on a machine and parses its one JSON answer.
pub fn meter_json(
    backend: &mut dyn Backend,
    machine: &str,
    caller: Caller<'_>,
    args: &[String],
) -> Result<(Option<i32>, Value), BackendError> {
    let mut full = args.to_vec();
    full.push("--json".into());
    let out = backend.run_meter(machine, caller, &full, COMMAND_TIMEOUT)?;
    let value = parse_first_json(&out).ok_or_else(|| BackendError::Runtime {
        machine: machine.into(),
        message: format!(
            "`meter {}` printed no JSON (exit {:?}); stderr: {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        ),
    })?;
    Ok((out.code, value))
}

fn parse_first_json(out: &CommandOutput) -> Option<Value> {
    out.stdout
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
}

/// The reason of the first `revoked` event an app printed (`meter hold` prints
/// `{"event": "revoked", "handle": 7, "reason": "…"}`), if it printed one.
pub fn revocation_in(lines: &[String]) -> Option<String> {
    lines.iter().find_map(|line| {
        let event: Value = serde_json::from_str(line).ok()?;
        (event.get("event")?.as_str()? == "revoked").then(|| {
            event
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        })
    })
}

/// Takes a licence and gives it back at once: does the runtime grant it right now?
pub fn probe_access(
    backend: &mut dyn Backend,
    machine: &str,
    session: &str,
    firm: u32,
    product: u32,
) -> Result<AccessAnswer, BackendError> {
    let args = vec![
        "access".to_string(),
        "--firm".into(),
        firm.to_string(),
        "--product".into(),
        product.to_string(),
    ];
    let (_, value) = meter_json(backend, machine, Caller::Session(session), &args)?;
    AccessAnswer::from_json(&value.to_string()).ok_or_else(|| BackendError::Runtime {
        machine: machine.into(),
        message: format!("`meter access` answered without `granted`: {value}"),
    })
}

/// Arguments that start an app holding a licence.
pub fn hold_args(firm: u32, product: u32) -> Vec<String> {
    vec![
        "hold".into(),
        "--firm".into(),
        firm.to_string(),
        "--product".into(),
        product.to_string(),
        "--json".into(),
    ]
}

/// The runtime's `status` document.
pub fn status(backend: &mut dyn Backend, machine: &str) -> Result<Value, BackendError> {
    let (_, value) = meter_json(backend, machine, Caller::Admin, &["status".to_string()])?;
    Ok(value)
}

/// The licence id of the soft container that holds `product` in a status document.
pub fn soft_licence_of(status: &Value, product: u32) -> Option<String> {
    status["containers"]
        .as_array()?
        .iter()
        .filter(|c| c["kind"] == "soft")
        .find(|c| {
            c["products"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["code"] == product))
        })?["id"]
        .as_str()?
        .strip_prefix("soft:")
        .map(str::to_owned)
}

/// Whether a status document shows that the dongle `serial` has answered the runtime (a
/// session opened, or refused by the dongle). A runtime that does not say `answered` is taken
/// at its container's state.
pub fn dongle_seen(status: &Value, serial: &str) -> bool {
    status
        .get("containers")
        .and_then(Value::as_array)
        .is_some_and(|containers| {
            containers.iter().any(|c| {
                c["kind"] == "dongle"
                    && c["serial"].as_str() == Some(serial)
                    && c["answered"]
                        .as_bool()
                        .unwrap_or(c["state"] != "unreachable")
            })
        })
}

/// A product's entry in a status document: the container holding it and the product itself.
pub fn product_in_status(status: &Value, product: u32) -> Option<(&Value, &Value)> {
    status
        .get("containers")?
        .as_array()?
        .iter()
        .find_map(|container| {
            let entry = container
                .get("products")?
                .as_array()?
                .iter()
                .find(|p| p.get("code").and_then(Value::as_u64) == Some(u64::from(product)))?;
            Some((container, entry))
        })
}

/// The vendor's side of the contract, run on the harness's own machine (the vendor's office),
/// with the world's root (the runtime maker's office) that certifies the vendor.
#[derive(Debug, Clone)]
pub struct VendorDesk {
    meter: PathBuf,
    dir: PathBuf,
    root_key: String,
}

impl VendorDesk {
    /// Creates the world's root, a vendor key pair and the vendor's certificate for `firm` in
    /// `dir`.
    pub fn open(runtime_bin: &Path, dir: &Path, firm: u32) -> Result<VendorDesk, BackendError> {
        std::fs::create_dir_all(dir).map_err(BackendError::io("create the vendor folder"))?;
        let mut desk = VendorDesk {
            meter: runtime_bin.join("meter"),
            dir: dir.to_path_buf(),
            root_key: String::new(),
        };
        let root_dir = dir.join("root");
        let (_, root) = desk.run(&[
            "root".into(),
            "keygen".into(),
            "--out".into(),
            root_dir.display().to_string(),
        ])?;
        desk.root_key = root["root_key"]
            .as_str()
            .filter(|key| key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| BackendError::Runtime {
                machine: "vendor".into(),
                message: format!("`meter root keygen` named no root key: {root}"),
            })?
            .to_owned();
        desk.run(&[
            "vendor".into(),
            "keygen".into(),
            "--out".into(),
            dir.display().to_string(),
        ])?;
        desk.run(&[
            "root".into(),
            "certify".into(),
            "--root".into(),
            root_dir.join("root.key").display().to_string(),
            "--firm".into(),
            firm.to_string(),
            "--vendor".into(),
            desk.public_key().display().to_string(),
            "--out".into(),
            desk.certificate().display().to_string(),
        ])?;
        Ok(desk)
    }

    /// The world's root key (hex): runtimes trust the vendors it certifies.
    pub fn root_key(&self) -> &str {
        &self.root_key
    }

    /// The vendor's public key file.
    pub fn public_key(&self) -> PathBuf {
        self.dir.join("vendor.pub")
    }

    /// The vendor's firm certificate, signed by the world's root.
    pub fn certificate(&self) -> PathBuf {
        self.dir.join("firm.cert")
    }

    /// The vendor's private key file.
    pub fn private_key(&self) -> PathBuf {
        self.dir.join("vendor.key")
    }

    /// A file in the vendor's folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs a vendor command; returns its exit code and JSON answer.
    pub fn run(&self, args: &[String]) -> Result<(Option<i32>, Value), BackendError> {
        let out = Command::new(&self.meter)
            .args(args)
            .arg("--json")
            .output()
            .map_err(BackendError::io(format!("run {}", self.meter.display())))?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let parsed = CommandOutput {
            code: out.status.code(),
            stdout,
            stderr: stderr.clone(),
        };
        let value = parse_first_json(&parsed).ok_or_else(|| BackendError::Runtime {
            machine: "vendor".into(),
            message: format!(
                "`meter {}` printed no JSON (exit {:?}); stderr: {}",
                args.join(" "),
                out.status.code(),
                stderr.trim()
            ),
        })?;
        if matches!(out.status.code(), Some(0) | Some(1)) {
            Ok((out.status.code(), value))
        } else {
            Err(BackendError::Runtime {
                machine: "vendor".into(),
                message: format!("`meter {}` failed: {value}", args.join(" ")),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grants_and_denials() {
        assert_eq!(
            AccessAnswer::from_json(r#"{"granted": true, "handle": 4}"#),
            Some(AccessAnswer::Granted { handle: Some(4) })
        );
        let denied =
            AccessAnswer::from_json(r#"{"granted": false, "reason": "licence-corrupt"}"#).unwrap();
        assert_eq!(denied.describe(), "denied (licence-corrupt)");
        assert_eq!(AccessAnswer::from_json("not json"), None);
    }
}
