//! Installed licence files and trusted vendors (firm certificates): turning signed files into allocation items.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use meter_core::allocation::{
    AllocationTable, ContainerClass, ContainerId, ItemEntry, ItemState, ProductKey,
};
use meter_core::firm_certificate::{CertificateError, FirmCertificate};
use meter_core::licence::{LicenceBody, SignedLicence, VendorPublicKey, open_products};
use meter_core::policy::{Counting, ItemRules, ProductItem};
use meter_core::reason::Reason;
use meter_core::rollback::{Receipt, ReceiptSigner, ReceiptVerifier};
use meter_core::traits::MachineTraits;

use crate::metering::Metering;
use crate::status_view::{ContainerStatus, ProductStatus};
use crate::store::Change;

/// A recorded unit use: the store changes and, for a witnessed licence, its id and receipt.
pub(crate) type UnitUse = (Vec<Change>, Option<(String, Receipt)>);

/// Metadata key of the runtime's random id (the `runtime.random-id` trait).
pub const RANDOM_ID_KEY: &str = "random-id";
/// Metadata key of the runtime's receipt signing key (its public half is the runtime key).
pub const RECEIPT_KEY_KEY: &str = "receipt-key";

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
    /// A firm certificate that no root this runtime carries signed, or that is tampered with
    /// or malformed.
    #[error("Vendor not trusted: {detail}")]
    VendorUntrusted {
        /// What is wrong.
        detail: String,
    },
    /// A firm certificate could not be stored or read.
    #[error("Cannot access firm certificate {path}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl LicenceRefusal {
    /// The reason code, for refusals.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            LicenceRefusal::Refused { reason, .. } => Some(*reason),
            LicenceRefusal::VendorUntrusted { .. } => Some(Reason::SignatureInvalid),
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
    /// Verified bodies of the installed licences, re-opened when the machine's traits change.
    bodies: BTreeMap<String, LicenceBody>,
    /// Items of the licences that open on this machine.
    opened: BTreeMap<String, Vec<ProductItem>>,
    /// The traits the licences were last opened with.
    opened_with: Option<MachineTraits>,
    /// The runtime's random id, once created.
    random_id: Option<String>,
    /// The runtime's receipt signing key, once created.
    receipt_key: Option<[u8; 32]>,
    /// Receipt chains, high-water marks and vmgenids of metered licences.
    pub metering: Metering,
    /// Chains this runtime witnesses for client runtimes (server side).
    pub witnesses: crate::witness::WitnessStore,
    /// The certificate pins of the triad this server is a member of, once joined.
    triad: Option<Vec<String>>,
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
            bodies: BTreeMap::new(),
            opened: BTreeMap::new(),
            opened_with: None,
            random_id: None,
            receipt_key: None,
            metering: Metering::default(),
            witnesses: crate::witness::WitnessStore::default(),
            triad: None,
        }
    }

    /// Takes the runtime identity, metered states and witnessed chains from the store.
    pub fn load_meta(&mut self, meta: &BTreeMap<String, Vec<u8>>) {
        self.random_id = meta
            .get(RANDOM_ID_KEY)
            .map(|b| String::from_utf8_lossy(b).into_owned());
        self.receipt_key = meta
            .get(RECEIPT_KEY_KEY)
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
        self.metering = Metering::load(meta);
        self.witnesses = crate::witness::WitnessStore::load(meta);
    }

    /// Creates the random id and receipt key on first need; returns the changes to store and the
    /// runtime key (public receipt key, hex).
    pub fn ensure_identity(
        &mut self,
        entropy: impl Fn() -> Result<[u8; 32], String>,
    ) -> Result<(Vec<Change>, String), String> {
        let mut changes = Vec::new();
        if self.random_id.is_none() || self.receipt_key.is_none() {
            let id = hex::encode(&entropy()?[..16]);
            let key = entropy()?;
            let id = self.random_id.clone().unwrap_or(id);
            let key = self.receipt_key.unwrap_or(key);
            changes = identity_changes(&id, &key);
            self.random_id = Some(id);
            self.receipt_key = Some(key);
            // The traits changed: re-open everything on next use.
            self.opened_with = None;
        }
        let key = self.receipt_key.expect("set above");
        Ok((
            changes,
            hex::encode(ReceiptSigner::from_bytes(&key).verifier().to_bytes()),
        ))
    }

    /// The runtime's random id, if created.
    pub fn random_id(&self) -> Option<&str> {
        self.random_id.as_deref()
    }

    /// The key receipts are signed with, if created.
    pub fn signer(&self) -> Option<ReceiptSigner> {
        self.receipt_key.as_ref().map(ReceiptSigner::from_bytes)
    }

    /// The public half of the receipt key.
    pub fn verifier(&self) -> Option<ReceiptVerifier> {
        self.signer().map(|s| s.verifier())
    }

    /// The vendor key certified for `firm` in the trust folder, checked against the roots at
    /// every use: a certificate the licensee writes there is no better than one they install.
    pub fn trusted_vendor(&self, firm: u32) -> Result<Option<VendorPublicKey>, LicenceRefusal> {
        trusted_vendor(&self.trust_dir, firm)
    }

    /// Installs a firm certificate after checking a root this runtime carries signed it;
    /// returns the firm and the vendor key id it trusts now.
    pub fn trust(
        &mut self,
        source_name: &str,
        bytes: &[u8],
    ) -> Result<(u32, String), LicenceRefusal> {
        let refused = |e: CertificateError| LicenceRefusal::VendorUntrusted {
            detail: error_chain(&e),
        };
        let certificate = FirmCertificate::from_json(bytes, source_name).map_err(refused)?;
        let firm = certificate.firm;
        let vendor =
            crate::trust_roots::vendor_of(&certificate, firm, source_name).map_err(refused)?;
        fs::create_dir_all(&self.trust_dir).map_err(|source| LicenceRefusal::Key {
            path: self.trust_dir.clone(),
            source,
        })?;
        let path = crate::trust_roots::certificate_path(&self.trust_dir, firm);
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, certificate.to_json())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| LicenceRefusal::Key { path, source })?;
        Ok((firm, vendor.key_id()))
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
        let key = self
            .trusted_vendor(firm)
            .map_err(|e| match e {
                LicenceRefusal::VendorUntrusted { detail } => {
                    refused(detail, Reason::SignatureInvalid)
                }
                other => other,
            })?
            .ok_or_else(|| {
                refused(
                    format!("no vendor key is trusted for firm {firm}"),
                    Reason::SignatureInvalid,
                )
            })?;
        let body = signed
            .verify(&key)
            .map_err(|e| refused(error_chain(&e), e.reason()))?;
        let body = body.clone();
        let id = body.licence_id.clone();
        let container = ContainerId::new(ContainerClass::Soft, id.clone());
        if crate::weakened::is(crate::weakened::Defence::ReapplyKeepsCounts) {
            // Weakened: the licence is installed afresh, its allocations dropped with it.
            let _ = table.remove_container(&container);
        }
        // The same licence applied again keeps what is in use of it and the units spent: its
        // items are registered afresh over the old ones, never removed first.
        let spent: Vec<(ProductKey, Option<u64>)> = table
            .items()
            .into_iter()
            .filter(|view| view.entry.container == container)
            .map(|view| (view.entry.product, view.entry.units_left))
            .collect();
        self.opened.remove(&id);
        let (state, reason) = self.register_items(&body, traits, table, now);
        for (product, units_left) in spent {
            let _ = table.set_units_left(&container, product, units_left);
        }
        self.bodies.insert(id.clone(), body);
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

    /// Registers the items of a verified body: opened with `traits`, or its clear catalogue as
    /// corrupt items when the binding does not open here.
    fn register_items(
        &mut self,
        body: &LicenceBody,
        traits: &MachineTraits,
        table: &mut AllocationTable,
        now: u64,
    ) -> (ItemState, Option<Reason>) {
        let id = body.licence_id.clone();
        let firm = body.firm;
        let container = ContainerId::new(ContainerClass::Soft, id.clone());
        match open_products(body, traits) {
            Ok(items) => {
                let outside_triad = body.triad.as_ref().is_some_and(|binding| {
                    !self
                        .triad
                        .as_ref()
                        .is_some_and(|pins| binding.names_exactly(pins))
                        && !crate::weakened::is(crate::weakened::Defence::TriadLicence)
                });
                for item in &items {
                    let rules = crate::weakened::rules(item.rules());
                    let expired = rules.expires_at.is_some_and(|at| at <= now);
                    table.upsert_item(ItemEntry {
                        container: container.clone(),
                        product: ProductKey {
                            firm,
                            code: item.code,
                        },
                        name: item.name.clone(),
                        rules,
                        state: if expired {
                            ItemState::Expired
                        } else if outside_triad {
                            ItemState::OutsideTriad
                        } else {
                            ItemState::Valid
                        },
                        units_left: item.units,
                    });
                }
                self.opened.insert(id, items);
                (ItemState::Valid, None)
            }
            Err(e) => {
                tracing::warn!(licence = %id, error = %error_chain(&e), "Licence does not open on this machine");
                self.opened.remove(&id);
                // Weakened: a binding that does not open is shrugged off and the clear catalogue used.
                let fallback = crate::weakened::is(crate::weakened::Defence::TraitBinding);
                let state = if fallback {
                    ItemState::Valid
                } else {
                    ItemState::Corrupt
                };
                // Only the clear catalogue is known: list its products as corrupt.
                for entry in &body.catalogue {
                    let product = ProductKey {
                        firm,
                        code: entry.code,
                    };
                    let rules = crate::weakened::rules(ItemRules {
                        quantity: 1,
                        counting: Counting::StationShare,
                        virtual_machines: entry.virtual_machines,
                        terminal_server: meter_core::policy::Allowance::Allow,
                        expires_at: None,
                    });
                    if table.set_state(&container, product, state).is_err() {
                        table.upsert_item(ItemEntry {
                            container: container.clone(),
                            product,
                            name: entry.name.clone(),
                            rules,
                            state,
                            units_left: None,
                        });
                    }
                }
                if fallback {
                    return (ItemState::Valid, None);
                }
                (ItemState::Corrupt, Some(e.reason()))
            }
        }
    }

    /// Re-opens every installed licence when the machine's traits differ from those it was last
    /// opened with; returns the containers that stopped opening (their grants must go).
    pub fn revalidate(
        &mut self,
        traits: &MachineTraits,
        table: &mut AllocationTable,
        now: u64,
    ) -> Vec<ContainerId> {
        // Compared as they are (a few short strings): cheaper than any digest of them.
        if self.opened_with.as_ref() == Some(traits) {
            return Vec::new();
        }
        self.opened_with = Some(traits.clone());
        let mut broken = Vec::new();
        let bodies: Vec<LicenceBody> = self.bodies.values().cloned().collect();
        for body in bodies {
            let was_open = self.opened.contains_key(&body.licence_id);
            let (state, reason) = self.register_items(&body, traits, table, now);
            let id = body.licence_id.clone();
            if let Some(installed) = self.installed.get_mut(&id) {
                installed.state = state;
                installed.reason = reason;
            }
            let container = ContainerId::new(ContainerClass::Soft, id.clone());
            match (was_open, state) {
                (true, ItemState::Corrupt) => {
                    tracing::warn!(licence = %id, "Machine traits changed: licence no longer opens");
                    broken.push(container);
                }
                (false, ItemState::Valid) => {
                    tracing::info!(licence = %id, "Machine traits changed: licence opens again");
                }
                _ => {}
            }
        }
        broken
    }

    /// This server joined the triad of the members with certificate pins `pins`: the items of
    /// the licences issued for exactly that triad serve from now on.
    pub fn enter_triad(&mut self, pins: Vec<String>, table: &mut AllocationTable) {
        for body in self.bodies.values() {
            if !body
                .triad
                .as_ref()
                .is_some_and(|binding| binding.names_exactly(&pins))
            {
                continue;
            }
            let container = ContainerId::new(ContainerClass::Soft, body.licence_id.clone());
            for view in table.items() {
                if view.entry.container == container && view.entry.state == ItemState::OutsideTriad
                {
                    let _ = table.set_state(&container, view.entry.product, ItemState::Valid);
                }
            }
        }
        self.triad = Some(pins);
    }

    /// Forgets the opened traits so the next [`Licences::revalidate`] re-opens everything.
    pub fn invalidate(&mut self) {
        self.opened_with = None;
    }

    /// Creates the metered state of opened licences that have metered or time-limited items.
    pub fn register_metering(&mut self, now: u64, vmgenid: Option<&str>) -> Vec<Change> {
        let mut changes = Vec::new();
        for (id, items) in &self.opened {
            changes.extend(self.metering.register(id, items, now, vmgenid));
        }
        changes
    }

    /// The licence id of a soft container, if it is an installed licence.
    pub fn licence_of(&self, container: &ContainerId) -> Option<&str> {
        (container.class == ContainerClass::Soft)
            .then(|| self.installed.get(&container.id).map(|l| l.id.as_str()))
            .flatten()
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
    pub fn containers(&self, table: &AllocationTable) -> Vec<ContainerStatus> {
        let mut by_container: BTreeMap<String, Vec<ProductStatus>> = BTreeMap::new();
        let mut states: BTreeMap<String, (ItemState, Option<Reason>)> = BTreeMap::new();
        for view in table.items() {
            let id = view.entry.container.to_string();
            by_container
                .entry(id.clone())
                .or_default()
                .push(ProductStatus::from(&view));
            let entry = states.entry(id).or_insert((ItemState::Valid, None));
            if view.entry.state != ItemState::Valid && entry.0 == ItemState::Valid {
                *entry = (view.entry.state, view.entry.state.denial());
            }
        }
        by_container
            .into_iter()
            .map(|(id, products)| {
                let (state, mut reason) =
                    states.get(&id).copied().unwrap_or((ItemState::Valid, None));
                if let Some(licence) = id.strip_prefix("soft:")
                    && self.metering.is_locked(licence)
                {
                    reason = Some(Reason::RollbackDetected);
                }
                ContainerStatus {
                    kind: id.split(':').next().unwrap_or("soft").to_owned(),
                    id,
                    state: state.into(),
                    reason: reason.map(|r| r.code()),
                    dongle: None,
                    products,
                }
            })
            .collect()
    }
}

/// The vendor key certified for `firm` in a trust folder (`<firm>.cert`), if any; a certificate
/// no carried root signed is refused.
pub fn trusted_vendor(
    trust_dir: &Path,
    firm: u32,
) -> Result<Option<VendorPublicKey>, LicenceRefusal> {
    let path = crate::trust_roots::certificate_path(trust_dir, firm);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LicenceRefusal::Key { path, source }),
    };
    let name = path.display().to_string();
    FirmCertificate::from_json(&bytes, &name)
        .and_then(|certificate| crate::trust_roots::vendor_of(&certificate, firm, &name))
        .map(Some)
        .map_err(|e| LicenceRefusal::VendorUntrusted {
            detail: error_chain(&e),
        })
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

/// A new runtime identity to store: `(random id, receipt key)` changes.
pub fn identity_changes(random_id: &str, receipt_key: &[u8; 32]) -> Vec<Change> {
    vec![
        Change::PutMeta(RANDOM_ID_KEY.into(), random_id.as_bytes().to_vec()),
        Change::PutMeta(RECEIPT_KEY_KEY.into(), receipt_key.to_vec()),
    ]
}
