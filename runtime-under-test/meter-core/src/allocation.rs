//! The allocation table: who holds which product item, and every counting rule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::policy::{Allowance, Counting, ItemRules};
use crate::reason::Reason;
use crate::station::{MachineRole, SessionKind, StationId};

/// A product of one vendor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProductKey {
    /// Vendor (firm) code.
    pub firm: u32,
    /// Product code.
    pub code: u32,
}

impl fmt::Display for ProductKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.firm, self.code)
    }
}

/// Where a container's licences live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainerClass {
    /// A soft licence file on this machine.
    Soft,
    /// A dongle attached to this machine.
    Dongle,
    /// A network server this runtime forwards to.
    Remote,
}

impl ContainerClass {
    /// The kebab-case name used in ids and JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            ContainerClass::Soft => "soft",
            ContainerClass::Dongle => "dongle",
            ContainerClass::Remote => "remote",
        }
    }
}

/// A licence container, written `soft:<licence id>`, `dongle:<serial>` or `remote:<addr>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct ContainerId {
    /// Kind of container.
    pub class: ContainerClass,
    /// Licence id, dongle serial or server address.
    pub id: String,
}

impl ContainerId {
    /// A container of `class` named `id`.
    pub fn new(class: ContainerClass, id: impl Into<String>) -> Self {
        ContainerId {
            class,
            id: id.into(),
        }
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.class.as_str(), self.id)
    }
}

/// Text that is not a container id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid container id {0:?}")]
pub struct InvalidContainerId(pub String);

impl FromStr for ContainerId {
    type Err = InvalidContainerId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidContainerId(text.to_owned());
        let (class, id) = text.split_once(':').ok_or_else(invalid)?;
        let class = match class {
            "soft" => ContainerClass::Soft,
            "dongle" => ContainerClass::Dongle,
            "remote" => ContainerClass::Remote,
            _ => return Err(invalid()),
        };
        if id.is_empty() {
            return Err(invalid());
        }
        Ok(ContainerId::new(class, id))
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> Self {
        id.to_string()
    }
}

impl TryFrom<String> for ContainerId {
    type Error = InvalidContainerId;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// Who holds an allocation; used to release it when the holder goes away.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HolderId {
    /// A process on this machine, known by its pid.
    Local {
        /// Process id.
        pid: u32,
    },
    /// A station reached over the network.
    Remote {
        /// Peer socket address of the connection (`ip:port`).
        peer: String,
        /// The station the remote runtime reported.
        station: StationId,
    },
}

/// Whether an access came from this machine or over the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// From a process on the container's own machine.
    Local,
    /// Over the network from another runtime.
    Remote,
}

/// One request for a licence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRequest {
    /// Product asked for.
    pub product: ProductKey,
    /// Station the access is counted for.
    pub station: StationId,
    /// Who will hold the allocation.
    pub holder: HolderId,
    /// Local or over the network.
    pub origin: Origin,
    /// Role of the requesting station's machine.
    pub role: MachineRole,
    /// Session the requesting process runs in.
    pub session: SessionKind,
    /// True when the requesting machine is a virtual machine.
    pub is_guest: bool,
}

/// State of a product item in a container, as the daemon sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemState {
    /// Usable.
    #[default]
    Valid,
    /// Cannot be decrypted or verified.
    Corrupt,
    /// Locked (e.g. rollback detected).
    Locked,
    /// Past its expiry time.
    Expired,
}

impl ItemState {
    /// The denial reason for a state other than valid.
    pub fn denial(&self) -> Option<Reason> {
        match self {
            ItemState::Valid => None,
            ItemState::Corrupt => Some(Reason::LicenceCorrupt),
            ItemState::Locked => Some(Reason::LicenceLocked),
            ItemState::Expired => Some(Reason::LicenceExpired),
        }
    }
}

/// A product item offered by a container, as registered by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemEntry {
    /// Container holding the item.
    pub container: ContainerId,
    /// Product of the item.
    pub product: ProductKey,
    /// Product name.
    pub name: String,
    /// Counting rules.
    pub rules: ItemRules,
    /// Current state.
    pub state: ItemState,
    /// Pay-per-use units left (`None` = not metered).
    pub units_left: Option<u64>,
}

/// Handle of one allocation.
pub type Handle = u64;

/// One granted access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// Handle given to the holder.
    pub handle: Handle,
    /// Product granted.
    pub product: ProductKey,
    /// Container the item is in.
    pub container: ContainerId,
    /// Station the access counts for.
    pub station: StationId,
    /// Who holds it.
    pub holder: HolderId,
    /// Local or over the network.
    pub origin: Origin,
    /// When it was granted, unix milliseconds.
    pub granted_at: u64,
}

/// The answer to a granted access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Handle to release with.
    pub handle: Handle,
    /// Product granted.
    pub product: ProductKey,
    /// Container the item is in.
    pub container: ContainerId,
    /// Station the access counts for.
    pub station: StationId,
    /// True if this access took one of the quantity (false: station already counted, or no-count).
    pub counted: bool,
    /// Units left after this access took one (`None` = not metered).
    pub units_left: Option<u64>,
}

/// How much of an item or product is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Distinct stations holding it.
    pub stations: u32,
    /// Allocations (accesses) holding it.
    pub accesses: u32,
}

/// An item with its current use, for status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemView {
    /// The registered item.
    pub entry: ItemEntry,
    /// Its current use.
    pub in_use: Usage,
}

/// Every product item this runtime offers and every allocation on them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationTable {
    items: Vec<ItemEntry>,
    allocations: BTreeMap<Handle, Allocation>,
    next_handle: Handle,
}

impl AllocationTable {
    /// An empty table.
    pub fn new() -> Self {
        AllocationTable {
            items: Vec::new(),
            allocations: BTreeMap::new(),
            next_handle: 1,
        }
    }

    /// Adds an item, or replaces the rules, name, state and units of an existing one.
    ///
    /// Allocations on a replaced item are kept. Items are tried in registration order.
    pub fn upsert_item(&mut self, entry: ItemEntry) {
        match self.item_index(&entry.container, entry.product) {
            Some(index) => self.items[index] = entry,
            None => self.items.push(entry),
        }
    }

    /// Sets the state of an item; `NotHeld` if no such item is registered.
    pub fn set_state(
        &mut self,
        container: &ContainerId,
        product: ProductKey,
        state: ItemState,
    ) -> Result<(), Reason> {
        self.item_mut(container, product)?.state = state;
        Ok(())
    }

    /// Sets the state of every item of a container.
    pub fn set_container_state(&mut self, container: &ContainerId, state: ItemState) {
        for item in self.items.iter_mut().filter(|i| &i.container == container) {
            item.state = state;
        }
    }

    /// Sets the units left of an item; `NotHeld` if no such item is registered.
    pub fn set_units_left(
        &mut self,
        container: &ContainerId,
        product: ProductKey,
        units_left: Option<u64>,
    ) -> Result<(), Reason> {
        self.item_mut(container, product)?.units_left = units_left;
        Ok(())
    }

    /// Removes a container's items and returns the allocations that were on them.
    pub fn remove_container(&mut self, container: &ContainerId) -> Vec<Allocation> {
        self.items.retain(|item| &item.container != container);
        self.take_allocations(|allocation| &allocation.container == container)
    }

    /// The registered items with their use, in registration order.
    pub fn items(&self) -> Vec<ItemView> {
        self.items
            .iter()
            .map(|entry| ItemView {
                entry: entry.clone(),
                in_use: self.item_usage(&entry.container, entry.product),
            })
            .collect()
    }

    /// Every allocation, by handle.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// The allocation behind a handle.
    pub fn allocation(&self, handle: Handle) -> Option<&Allocation> {
        self.allocations.get(&handle)
    }

    /// Grants an access or says why not.
    ///
    /// Items of the product are tried in registration order; the first that can grant does.
    /// If none can, the denial of the first item is returned (`UnknownProduct` if there is none).
    pub fn access(&mut self, request: AccessRequest, now: u64) -> Result<Grant, Reason> {
        let mut first_denial = None;
        let mut chosen = None;
        for (index, item) in self.items.iter().enumerate() {
            if item.product != request.product {
                continue;
            }
            match self.admit(item, &request, now) {
                Ok(counted) => {
                    chosen = Some((index, counted));
                    break;
                }
                Err(reason) => {
                    first_denial.get_or_insert(reason);
                }
            }
        }
        let Some((index, counted)) = chosen else {
            return Err(first_denial.unwrap_or(Reason::UnknownProduct));
        };
        let item = &mut self.items[index];
        if let Some(units) = item.units_left.as_mut() {
            *units -= 1;
        }
        let handle = self.next_handle.max(1);
        self.next_handle = handle + 1;
        let allocation = Allocation {
            handle,
            product: request.product,
            container: item.container.clone(),
            station: request.station.clone(),
            holder: request.holder,
            origin: request.origin,
            granted_at: now,
        };
        let grant = Grant {
            handle,
            product: request.product,
            container: item.container.clone(),
            station: request.station,
            counted,
            units_left: item.units_left,
        };
        self.allocations.insert(handle, allocation);
        Ok(grant)
    }

    /// Releases one allocation; `NotHeld` if the handle is unknown.
    pub fn release(&mut self, handle: Handle) -> Result<Allocation, Reason> {
        self.allocations.remove(&handle).ok_or(Reason::NotHeld)
    }

    /// Releases everything a holder holds (a process exited, a connection closed).
    pub fn release_holder(&mut self, holder: &HolderId) -> Vec<Handle> {
        self.take_allocations(|allocation| &allocation.holder == holder)
            .into_iter()
            .map(|allocation| allocation.handle)
            .collect()
    }

    /// Releases everything held over the network from one peer address (`ip:port` or `ip`).
    pub fn release_station_remote(&mut self, peer: &str) -> Vec<Handle> {
        self.take_allocations(|allocation| match &allocation.holder {
            HolderId::Remote { peer: held_by, .. } => {
                held_by == peer || held_by.rsplit_once(':').is_some_and(|(ip, _)| ip == peer)
            }
            HolderId::Local { .. } => false,
        })
        .into_iter()
        .map(|allocation| allocation.handle)
        .collect()
    }

    /// Releases every allocation whose item can no longer be used, with the reason.
    ///
    /// Call after changing item states or as time passes; the daemon tells the holders.
    pub fn revoke_unusable(&mut self, now: u64) -> Vec<(Allocation, Reason)> {
        let unusable: BTreeMap<(ContainerId, ProductKey), Reason> = self
            .items
            .iter()
            .filter_map(|item| {
                item_state_denial(item, now)
                    .map(|reason| ((item.container.clone(), item.product), reason))
            })
            .collect();
        let mut revoked = Vec::new();
        self.allocations.retain(|_, allocation| {
            match unusable.get(&(allocation.container.clone(), allocation.product)) {
                Some(reason) => {
                    revoked.push((allocation.clone(), *reason));
                    false
                }
                None => true,
            }
        });
        revoked
    }

    /// Use of a product summed over all containers.
    pub fn usage(&self, product: ProductKey) -> Usage {
        self.usage_where(|allocation| allocation.product == product)
    }

    /// Use of one item.
    pub fn item_usage(&self, container: &ContainerId, product: ProductKey) -> Usage {
        self.usage_where(|allocation| {
            allocation.product == product && &allocation.container == container
        })
    }

    fn usage_where(&self, keep: impl Fn(&Allocation) -> bool) -> Usage {
        let mut stations = BTreeSet::new();
        let mut accesses = 0;
        for allocation in self.allocations.values().filter(|a| keep(a)) {
            stations.insert((&allocation.container, &allocation.station));
            accesses += 1;
        }
        Usage {
            stations: u32::try_from(stations.len()).unwrap_or(u32::MAX),
            accesses,
        }
    }

    /// Whether `item` can grant `request`; `Ok(counted)` says if it takes one of the quantity.
    fn admit(&self, item: &ItemEntry, request: &AccessRequest, now: u64) -> Result<bool, Reason> {
        let rules = &item.rules;
        // The VM switch is clear signed metadata: it is decided before the item's state, so a
        // licence copied into a guest is refused as such even though its binding cannot open.
        if rules.virtual_machines == Allowance::Deny
            && request.is_guest
            && request.origin == Origin::Local
        {
            return Err(Reason::VmNotAllowed);
        }
        if let Some(reason) = item_state_denial(item, now) {
            return Err(reason);
        }
        let on_terminal_server_session = request.role == MachineRole::TerminalServer
            && !matches!(request.session, SessionKind::Service);
        if rules.terminal_server == Allowance::Deny && request.role == MachineRole::TerminalServer {
            return Err(Reason::TerminalServerNotAllowed);
        }
        if rules.is_local() {
            if request.origin == Origin::Remote {
                return Err(Reason::LocalLicenceRemote);
            }
            if on_terminal_server_session {
                return Err(Reason::LocalLicenceTerminalServer);
            }
        }
        if item.units_left == Some(0) {
            return Err(Reason::UnitsExhausted);
        }
        let Some(capacity) = rules.capacity() else {
            return Ok(false);
        };
        let usage = self.item_usage(&item.container, item.product);
        match rules.counting {
            Counting::UserLimit => {
                if usage.accesses >= capacity {
                    return Err(Reason::QuantityExhausted);
                }
                Ok(true)
            }
            Counting::StationShare => {
                let station_counted = self.allocations.values().any(|allocation| {
                    allocation.product == item.product
                        && allocation.container == item.container
                        && allocation.station == request.station
                });
                if station_counted {
                    return Ok(false);
                }
                if usage.stations >= capacity {
                    return Err(Reason::QuantityExhausted);
                }
                Ok(true)
            }
            Counting::NoCount => Ok(false),
        }
    }

    fn item_index(&self, container: &ContainerId, product: ProductKey) -> Option<usize> {
        self.items
            .iter()
            .position(|item| &item.container == container && item.product == product)
    }

    fn item_mut(
        &mut self,
        container: &ContainerId,
        product: ProductKey,
    ) -> Result<&mut ItemEntry, Reason> {
        let index = self.item_index(container, product).ok_or(Reason::NotHeld)?;
        Ok(&mut self.items[index])
    }

    fn take_allocations(&mut self, take: impl Fn(&Allocation) -> bool) -> Vec<Allocation> {
        let mut taken = Vec::new();
        self.allocations.retain(|_, allocation| {
            if take(allocation) {
                taken.push(allocation.clone());
                false
            } else {
                true
            }
        });
        taken
    }
}

/// The reason an item cannot be used at `now` regardless of who asks.
fn item_state_denial(item: &ItemEntry, now: u64) -> Option<Reason> {
    if let Some(reason) = item.state.denial() {
        return Some(reason);
    }
    match item.rules.expires_at {
        Some(expires_at) if now >= expires_at => Some(Reason::LicenceExpired),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_id_round_trips_as_text() {
        let id = ContainerId::new(ContainerClass::Soft, "lic-1");
        assert_eq!(id.to_string(), "soft:lic-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"soft:lic-1\"");
        assert_eq!("dongle:3-1234".parse::<ContainerId>().unwrap().id, "3-1234");
        assert!("usb:1".parse::<ContainerId>().is_err());
        assert!("soft:".parse::<ContainerId>().is_err());
    }

    #[test]
    fn release_of_unknown_handle_is_not_held() {
        assert_eq!(AllocationTable::new().release(9), Err(Reason::NotHeld));
    }
}
