//! Installed licence files and trusted vendor keys: turning signed files into allocation items.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use meter_core::allocation::{
    AllocationTable, ContainerClass, ContainerId, ItemEntry, ItemState, ProductKey,
};
use meter_core::licence::{SignedLicence, VendorPublicKey, open_products};
use meter_core::policy::{Allowance, Counting, ItemRules};
use meter_core::reason::Reason;
use meter_core::traits::MachineTraits;

use crate::store::Change;

/// Why a licence file was refused.
#[derive(Debug, thiserror::Error)]
pub enum LicenceRefusal {
    /// The file is not a licence or its signature does not verify.
    #[error("Licence {source_name} refused: {detail}")]
    Refused {
        /// The file.
        source_name: String,
        /// What is wrong.
        detail: String,
        /// The reason code.
        reason: Reason,
    },
    /// A vendor key could not be stored or read.
    #[error("Cannot access vendor key {path}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A vendor key file is not a key.
    #[error("Invalid vendor key: {0}")]
    BadKey(String),
}

impl LicenceRefusal {
    /// The reason code, for refusals.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            LicenceRefusal::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// One installed licence file.
#[derive(Debug, Clone)]
pub struct InstalledLicence {
    /// Licence id.
    pub id: String,
    /// Vendor firm.
    pub firm: u32,
    /// Container id in the allocation table.
    pub container: ContainerId,
    /// The container's state (corrupt when the binding does not open here).
    pub state: ItemState,
    /// Why it is not valid, if it is not.
    pub reason: Option<Reason>,
}

/// Installed licences and trusted vendor keys.
#[derive(Debug)]
pub struct Licences {
    trust_dir: PathBuf,
    installed: BTreeMap<String, InstalledLicence>,
}

/// The metadata key of an item's remaining units.
fn units_key(container: &ContainerId, product: ProductKey) -> String {
    format!("units/{container}/{product}")
}

/// The store change that records an item's remaining units.
pub fn units_change(container: &ContainerId, product: ProductKey, units: u64) -> Change {
    Change::PutMeta(units_key(container, product), units.to_le_bytes().to_vec())
}

impl Licences {
    /// Licences trusting the keys in `trust_dir` (`<firm>.pub`).
    pub fn new(trust_dir: PathBuf) -> Self {
        Licences {
            trust_dir,
            installed: BTreeMap::new(),
        }
    }

    /// Stores a vendor's public key for `firm` after checking it parses.
    pub fn trust(&mut self, firm: u32, key: &[u8]) -> Result<(), LicenceRefusal> {
        parse_vendor_key(key)?;
        fs::create_dir_all(&self.trust_dir).map_err(|source| LicenceRefusal::Key {
            path: self.trust_dir.clone(),
            source,
        })?;
        let path = self.trust_dir.join(format!("{firm}.pub"));
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, key)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| LicenceRefusal::Key { path, source })
    }

    fn trusted_key(&self, firm: u32) -> Result<Option<VendorPublicKey>, LicenceRefusal> {
        let path = self.trust_dir.join(format!("{firm}.pub"));
        match fs::read(&path) {
            Ok(bytes) => parse_vendor_key(&bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LicenceRefusal::Key { path, source }),
        }
    }

    /// Verifies a licence file and opens its items with this machine's traits.
    ///
    /// Refuses (state untouched) files that are malformed, tampered with, or signed by a key
    /// not trusted for their firm. Items whose binding does not open here are registered as corrupt.
    pub fn verify_and_register(
        &mut self,
        source_name: &str,
        bytes: &[u8],
        traits: &MachineTraits,
        table: &mut AllocationTable,
        now: u64,
    ) -> Result<InstalledLicence, LicenceRefusal> {
        let refused = |detail: String, reason: Reason| LicenceRefusal::Refused {
            source_name: source_name.to_owned(),
            detail,
            reason,
        };
        let signed = SignedLicence::from_json(bytes, source_name)
            .map_err(|e| refused(error_chain(&e), e.reason()))?;
        let firm = signed.body.firm;
        let key = self.trusted_key(firm)?.ok_or_else(|| {
            refused(
                format!("no vendor key is trusted for firm {firm}"),
                Reason::SignatureInvalid,
            )
        })?;
        let body = signed
            .verify(&key)
            .map_err(|e| refused(error_chain(&e), e.reason()))?;
        let id = body.licence_id.clone();
        let container = ContainerId::new(ContainerClass::Soft, id.clone());
        table.remove_container(&container);
        let (state, reason) = match open_products(body, traits) {
            Ok(items) => {
                for item in items {
                    let expired = item.expires_at.is_some_and(|at| at <= now);
                    table.upsert_item(ItemEntry {
                        container: container.clone(),
                        product: ProductKey {
                            firm,
                            code: item.code,
                        },
                        name: item.name.clone(),
                        rules: item.rules(),
                        state: if expired {
                            ItemState::Expired
                        } else {
                            ItemState::Valid
                        },
                        units_left: item.units,
                    });
                }
                (ItemState::Valid, None)
            }
            Err(e) => {
                tracing::warn!(licence = %id, error = %error_chain(&e), "Licence does not open on this machine");
                // Only the clear catalogue is known: list its products as corrupt.
                for entry in &body.catalogue {
                    table.upsert_item(ItemEntry {
                        container: container.clone(),
                        product: ProductKey {
                            firm,
                            code: entry.code,
                        },
                        name: entry.name.clone(),
                        rules: ItemRules {
                            quantity: 1,
                            counting: Counting::StationShare,
                            virtual_machines: Allowance::Allow,
                            terminal_server: Allowance::Allow,
                            expires_at: None,
                        },
                        state: ItemState::Corrupt,
                        units_left: None,
                    });
                }
                (ItemState::Corrupt, Some(e.reason()))
            }
        };
        let installed = InstalledLicence {
            id: id.clone(),
            firm,
            container,
            state,
            reason,
        };
        self.installed.insert(id, installed.clone());
        Ok(installed)
    }

    /// Re-registers a licence stored in the state database.
    pub fn load_installed(
        &mut self,
        id: &str,
        bytes: &[u8],
        traits: &MachineTraits,
        table: &mut AllocationTable,
        now: u64,
    ) -> Result<(), LicenceRefusal> {
        self.verify_and_register(id, bytes, traits, table, now)
            .map(|_| ())
    }

    /// Puts back the remaining units recorded in the store.
    pub fn restore_units(&self, meta: &BTreeMap<String, Vec<u8>>, table: &mut AllocationTable) {
        for view in table.items() {
            let key = units_key(&view.entry.container, view.entry.product);
            if let Some(units) = meta
                .get(&key)
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map(u64::from_le_bytes)
            {
                let _ =
                    table.set_units_left(&view.entry.container, view.entry.product, Some(units));
            }
        }
    }

    /// The `containers` part of `meter status --json`.
    pub fn containers_json(&self, table: &AllocationTable) -> Vec<serde_json::Value> {
        let mut by_container: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        let mut states: BTreeMap<String, (ItemState, Option<Reason>)> = BTreeMap::new();
        for view in table.items() {
            let id = view.entry.container.to_string();
            by_container
                .entry(id.clone())
                .or_default()
                .push(serde_json::json!({
                    "code": view.entry.product.code,
                    "firm": view.entry.product.firm,
                    "name": view.entry.name,
                    "quantity": view.entry.rules.quantity,
                    "counting": view.entry.rules.counting,
                    "state": view.entry.state,
                    "in_use": {"stations": view.in_use.stations, "accesses": view.in_use.accesses},
                    "units_left": view.entry.units_left,
                    "expires_at": view.entry.rules.expires_at,
                }));
            let entry = states.entry(id).or_insert((ItemState::Valid, None));
            if view.entry.state != ItemState::Valid && entry.0 == ItemState::Valid {
                *entry = (view.entry.state, view.entry.state.denial());
            }
        }
        by_container
            .into_iter()
            .map(|(id, products)| {
                let (state, reason) = states.get(&id).copied().unwrap_or((ItemState::Valid, None));
                let kind = id.split(':').next().unwrap_or("soft").to_owned();
                serde_json::json!({
                    "kind": kind, "id": id, "state": state,
                    "reason": reason.map(|r| r.code()), "products": products,
                })
            })
            .collect()
    }
}

fn parse_vendor_key(bytes: &[u8]) -> Result<VendorPublicKey, LicenceRefusal> {
    serde_json::from_slice(bytes).map_err(|e| LicenceRefusal::BadKey(e.to_string()))
}

/// An error and its sources, joined with ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
