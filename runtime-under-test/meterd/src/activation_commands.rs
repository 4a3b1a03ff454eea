//! `meter activate request` and `meter activate apply`: the app side of soft-licence activation.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use meter_core::activation::ActivationAnswer;
use meter_core::licence::SignedLicence;
use serde_json::json;

use crate::client::LocalClient;
use crate::outcome::{EXIT_OK, Outcome, report_error};
use crate::protocol::{LocalReply, LocalRequest};

/// What `meter activate request` asks for.
#[derive(Debug)]
pub struct Asked {
    /// The product.
    pub product: u32,
    /// The vendor's firm.
    pub firm: u32,
    /// The vendor's public key file, if not the one trusted for the firm.
    pub vendor: Option<PathBuf>,
    /// A triad licence (the request names this server's certificate pin).
    pub triad_member: bool,
}

/// `meter activate request`: asks meterd for the sealed request and writes it to `out`.
pub async fn request_command(
    socket: &Path,
    json_mode: bool,
    asked: Asked,
    out: &Path,
) -> anyhow::Result<Outcome> {
    let Asked {
        product,
        firm,
        vendor,
        triad_member,
    } = asked;
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
            triad_member,
        })
        .await?;
    match reply {
        LocalReply::Json(text) => {
            fs::write(out, text.as_bytes())
                .with_context(|| format!("Cannot write {}", out.display()))?;
            let document = json!({"request": out, "firm": firm, "products": [product], "triad_member": triad_member});
            if json_mode {
                println!("{document}");
            } else {
                println!("activation request written to {}", out.display());
            }
            Ok(Outcome { code: EXIT_OK })
        }
        LocalReply::Error { message, reason } => Ok(report_error(json_mode, &message, reason)),
        other => anyhow::bail!("Unexpected reply {other:?}"),
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
