//! The typed views `meter status --json` prints (runtime contract: "Commands for admins").

use meter_core::allocation::{ItemState, ItemView, Usage};
use meter_core::policy::Counting;
use meter_core::station::MachineRole;
use meter_core::traits::MachineKind;
use serde::Serialize;

/// One product of a container, as `meter status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductStatus {
    /// Product code.
    pub code: u32,
    /// Vendor (firm) code.
    pub firm: u32,
    /// Product name.
    pub name: String,
    /// Licence quantity (0 = local).
    pub quantity: u32,
    /// How use is counted.
    pub counting: Counting,
    /// The item's state.
    pub state: ItemState,
    /// Stations and accesses holding it now.
    pub in_use: Usage,
    /// Pay-per-use units left (`null` = not metered).
    pub units_left: Option<u64>,
    /// Expiry, epoch milliseconds (`null` = never).
    pub expires_at: Option<u64>,
}

impl From<&ItemView> for ProductStatus {
    fn from(view: &ItemView) -> Self {
        Self {
            code: view.entry.product.code,
            firm: view.entry.product.firm,
            name: view.entry.name.clone(),
            quantity: view.entry.rules.quantity,
            counting: view.entry.rules.counting,
            state: view.entry.state,
            in_use: view.in_use,
            units_left: view.entry.units_left,
            expires_at: view.entry.rules.expires_at,
        }
    }
}

/// A container's state as `meter status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerState {
    /// Usable.
    Valid,
    /// Cannot be decrypted or verified.
    Corrupt,
    /// Locked (rollback, lockout, refusal).
    Locked,
    /// Past its expiry.
    Expired,
    /// Not reachable now (a dongle still connecting, a server link down).
    Unreachable,
    /// Issued for a server triad this server is not a member of now.
    OutsideTriad,
}

impl From<ItemState> for ContainerState {
    fn from(state: ItemState) -> Self {
        match state {
            ItemState::Valid => ContainerState::Valid,
            ItemState::Corrupt => ContainerState::Corrupt,
            ItemState::Locked => ContainerState::Locked,
            ItemState::Expired => ContainerState::Expired,
            ItemState::OutsideTriad => ContainerState::OutsideTriad,
        }
    }
}

/// One container (a soft licence, a dongle, a network server) as `meter status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerStatus {
    /// `soft`, `dongle` or `remote`.
    pub kind: String,
    /// The container id (`soft:…`, `dongle:…`, `remote:…`).
    pub id: String,
    /// Its state.
    pub state: ContainerState,
    /// Why it is not valid, as a reason code.
    pub reason: Option<&'static str>,
    /// What only a dongle has.
    #[serde(flatten)]
    pub dongle: Option<DongleDetails>,
    /// Its products.
    pub products: Vec<ProductStatus>,
}

/// What `meter status` shows of a dongle beyond any container's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DongleDetails {
    /// Its serial number.
    pub serial: String,
    /// End of its lockout, epoch milliseconds (`null` = not locked out).
    pub lockout_until: Option<u64>,
    /// Whether it has answered this runtime since it was attached.
    pub answered: bool,
    /// The USB endpoint it is reached through.
    pub endpoint: std::path::PathBuf,
}

/// The status document (`meter status --json`).
#[derive(Debug, Clone, Serialize)]
pub struct StatusDocument {
    /// The machine the runtime runs on.
    pub machine: MachineStatus,
    /// Every container: soft licences, dongles, network servers.
    pub containers: Vec<ContainerStatus>,
    /// The runtime's own network server, when it serves.
    pub server: Option<ServerStatus>,
    /// The server triad this server is a member of, when it joined one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triad: Option<TriadStatus>,
}

/// This server's triad as `meter status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TriadStatus {
    /// This member's number.
    pub member: u64,
    /// The leader's number, when one is known.
    pub leader: Option<u64>,
    /// The ledger holder under which this member's own apps hold their seats.
    pub apps_holder: String,
    /// The members that run in virtual machines, by number (as each said).
    pub members_in_guests: Vec<u64>,
    /// What the administrator should know (members in guests may share one host).
    pub warnings: Vec<String>,
}

impl TriadStatus {
    /// The status of member `member` (leader `leader`, its apps' seats held as `apps_holder`)
    /// whose members `in_guests` said they run in virtual machines.
    pub fn new(
        member: u64,
        leader: Option<u64>,
        apps_holder: &str,
        in_guests: Vec<u64>,
    ) -> TriadStatus {
        let mut warnings = Vec::new();
        if in_guests.len() >= 2 {
            let mut listed: Vec<String> = in_guests.iter().map(u64::to_string).collect();
            let last = listed.pop().unwrap_or_default();
            warnings.push(format!(
                "Members {} and {last} of this server triad run in virtual machines: if two share a host, that host's failure takes the triad's quorum",
                listed.join(", ")
            ));
        }
        TriadStatus {
            member,
            leader,
            apps_holder: apps_holder.to_owned(),
            members_in_guests: in_guests,
            warnings,
        }
    }
}

/// The machine as the runtime sees it (each fact `null` when the platform cannot tell).
#[derive(Debug, Clone, Serialize)]
pub struct MachineStatus {
    /// Its name.
    pub name: Option<String>,
    /// Physical or guest.
    pub kind: Option<MachineKind>,
    /// Workstation or terminal server.
    pub role: Option<MachineRole>,
    /// Which platform answers (host or sim).
    pub platform: String,
    /// The hypervisor's generation id, in a guest.
    pub vmgenid: Option<String>,
    /// The machine's clock, epoch milliseconds.
    pub clock_ms: Option<u64>,
    /// The runtime's id.
    pub runtime_id: String,
}

/// The runtime's network server.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    /// Where it listens.
    pub listen: String,
    /// Its certificate's SHA-256, the pin clients use.
    pub cert_sha256: String,
    /// The client runtimes linked to it.
    pub stations: Vec<StationStatus>,
}

/// A client runtime linked to this server.
#[derive(Debug, Clone, Serialize)]
pub struct StationStatus {
    /// The client runtime's id.
    pub runtime: String,
    /// Its machine's name.
    pub machine: String,
    /// Its network peer address.
    pub peer: String,
    /// Grants it holds here.
    pub allocations: usize,
}

/// The allocation list (`meter list --json`).
#[derive(Debug, Clone, Serialize)]
pub struct AllocationList {
    /// Every grant held now.
    pub allocations: Vec<AllocationStatus>,
}

/// One grant.
#[derive(Debug, Clone, Serialize)]
pub struct AllocationStatus {
    /// Its handle.
    pub handle: u64,
    /// Product code.
    pub product: u32,
    /// Vendor (firm) code.
    pub firm: u32,
    /// The station it counts for.
    pub station: String,
    /// The holding process, for a local holder.
    pub pid: Option<u32>,
    /// The client runtime's peer, for a network holder.
    pub peer: Option<String>,
    /// The container it was taken from.
    pub container: String,
    /// The server it was forwarded to, if any.
    pub server: Option<String>,
    /// When it was granted, epoch milliseconds.
    pub granted_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_members_in_guests_are_warned_of_one_is_not() {
        assert!(
            TriadStatus::new(1, Some(1), "p/apps", vec![3])
                .warnings
                .is_empty()
        );
        let warned = TriadStatus::new(2, None, "p/apps", vec![1, 2, 3]);
        assert_eq!(
            warned.warnings,
            [
                "Members 1, 2 and 3 of this server triad run in virtual machines: if two share a host, that host's failure takes the triad's quorum"
            ]
        );
        assert!(
            TriadStatus::new(2, None, "p/apps", vec![1, 3]).warnings[0]
                .starts_with("Members 1 and 3 ")
        );
    }

    #[test]
    fn containers_keep_the_contract_shape() {
        let soft = ContainerStatus {
            kind: "soft".into(),
            id: "soft:abc".into(),
            state: ItemState::Locked.into(),
            reason: Some("rollback-detected"),
            dongle: None,
            products: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(&soft).unwrap(),
            serde_json::json!({"kind": "soft", "id": "soft:abc", "state": "locked",
                "reason": "rollback-detected", "products": []})
        );
        let dongle = ContainerStatus {
            kind: "dongle".into(),
            id: "dongle:7".into(),
            state: ContainerState::Unreachable,
            reason: None,
            dongle: Some(DongleDetails {
                serial: "7".into(),
                lockout_until: None,
                answered: true,
                endpoint: "/dev/hidraw0".into(),
            }),
            products: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(&dongle).unwrap(),
            serde_json::json!({"kind": "dongle", "id": "dongle:7", "serial": "7",
                "state": "unreachable", "reason": null, "lockout_until": null,
                "answered": true, "endpoint": "/dev/hidraw0", "products": []})
        );
    }
}
