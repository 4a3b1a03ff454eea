//! Soft-licence activation, the daemon's side: the sealed request it builds for this machine.

use std::sync::Arc;

use meter_core::activation::ActivationRequest;
use meter_core::licence::VendorPublicKey;
use meter_core::reason::Reason;

use crate::daemon::Runtime;
use crate::store;

use crate::os_sources::entropy;

impl Runtime {
    /// Builds this machine's activation request for `products` of `firm`, sealed to the vendor key
    /// given (or the one trusted for the firm). Creates the runtime's random id and receipt key
    /// on first need and stores them with the state, so they travel with the disk.
    pub async fn activation_request(
        self: &Arc<Self>,
        firm: u32,
        products: Vec<u32>,
        vendor: Option<Vec<u8>>,
        triad_member: bool,
    ) -> Result<String, (String, Option<Reason>)> {
        let vendor: VendorPublicKey = match vendor {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| (format!("Not a vendor public key: {e}"), None))?,
            None => self.lock_licences()
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
            .lock_licences()
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
        let server_pin = if triad_member {
            let identity = crate::tls::load_or_create_identity(&self.settings.state_dir)
                .map_err(|e| (format!("Cannot read the server's TLS identity: {e}"), None))?;
            Some(identity.fingerprint())
        } else {
            None
        };
        let request = ActivationRequest {
            firm,
            products,
            kind,
            traits,
            runtime_key,
            requested_at: now,
            server_pin,
        };
        let sealed = request
            .seal(&vendor, entropy().map_err(|e| (e.to_string(), None))?)
            .map_err(|e| (crate::licences::error_chain(&e), None))?;
        Ok(sealed.to_json())
    }
}
