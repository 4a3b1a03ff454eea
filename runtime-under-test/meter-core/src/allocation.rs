//! The allocation table: who holds which product item, and every counting rule.

use std::collections::{BTreeMap, HashMap};
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
    /// Issued for a server triad this runtime is not a member of now.
    OutsideTriad,
}

impl ItemState {
    /// The denial reason for a state other than valid.
    pub fn denial(&self) -> Option<Reason> {
        match self {
            ItemState::Valid => None,
            ItemState::Corrupt => Some(Reason::LicenceCorrupt),
            ItemState::Locked => Some(Reason::LicenceLocked),
            ItemState::Expired => Some(Reason::LicenceExpired),
            ItemState::OutsideTriad => Some(Reason::TriadRequired),
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
#[serde(from = "StoredTable", into = "StoredTable")]
pub struct AllocationTable {
    items: Vec<ItemEntry>,
    allocations: BTreeMap<Handle, Allocation>,
    next_handle: Handle,
    /// Use of each (container, product) pair, kept in step with `allocations`.
    in_use: HashMap<(ContainerId, ProductKey), ItemUse>,
    /// Quantities are counted by someone else (a server triad's replicated ledger): this
    /// table records and counts its allocations but refuses none for quantity.
    quantity_elsewhere: bool,
}

/// The allocations on one item: how many, and how many per station.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ItemUse {
    accesses: u32,
    stations: HashMap<StationId, u32>,
}

impl ItemUse {
    fn usage(&self) -> Usage {
        Usage {
            stations: u32::try_from(self.stations.len()).unwrap_or(u32::MAX),
            accesses: self.accesses,
        }
    }
}

/// The serialized form of the table: what it holds, without the derived use counts.
#[derive(Serialize, Deserialize)]
struct StoredTable {
    items: Vec<ItemEntry>,
    allocations: BTreeMap<Handle, Allocation>,
    next_handle: Handle,
    #[serde(default)]
    quantity_elsewhere: bool,
}

impl From<StoredTable> for AllocationTable {
    fn from(stored: StoredTable) -> Self {
        let mut table = AllocationTable {
            items: stored.items,
            allocations: BTreeMap::new(),
            next_handle: stored.next_handle,
            in_use: HashMap::new(),
            quantity_elsewhere: stored.quantity_elsewhere,
        };
        for (handle, allocation) in stored.allocations {
            table.count_in(&allocation);
            table.allocations.insert(handle, allocation);
        }
        table
    }
}

impl From<AllocationTable> for StoredTable {
    fn from(table: AllocationTable) -> Self {
        StoredTable {
            items: table.items,
            allocations: table.allocations,
            next_handle: table.next_handle,
            quantity_elsewhere: table.quantity_elsewhere,
        }
    }
}

impl AllocationTable {
    /// An empty table.
    pub fn new() -> Self {
        AllocationTable {
            items: Vec::new(),
            allocations: BTreeMap::new(),
            next_handle: 1,
            in_use: HashMap::new(),
            quantity_elsewhere: false,
        }
    }

    /// Leaves quantities to another count (a server triad's ledger, which knows the seats
    /// every member gave): allocations are still counted, but none is refused for quantity.
    pub fn count_quantity_elsewhere(&mut self, elsewhere: bool) {
        self.quantity_elsewhere = elsewhere;
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

    /// The counting rules of the first item of `product` (the one an access tries first).
    pub fn first_rules(&self, product: ProductKey) -> Option<ItemRules> {
        self.rules_of_product(product).next()
    }

    /// The counting rules of every item of `product`, in registration order.
    pub fn rules_of_product(&self, product: ProductKey) -> impl Iterator<Item = ItemRules> + '_ {
        self.items
            .iter()
            .filter(move |item| item.product == product)
            .map(|item| item.rules)
    }

    /// The counting rules of the item of `product` in `container`.
    pub fn rules_of(&self, container: &ContainerId, product: ProductKey) -> Option<ItemRules> {
        self.items
            .iter()
            .find(|item| &item.container == container && item.product == product)
            .map(|item| item.rules)
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
        self.count_in(&allocation);
        self.allocations.insert(handle, allocation);
        Ok(grant)
    }

    /// Releases one allocation; `NotHeld` if the handle is unknown.
    pub fn release(&mut self, handle: Handle) -> Result<Allocation, Reason> {
        let allocation = self.allocations.remove(&handle).ok_or(Reason::NotHeld)?;
        self.count_out(&allocation);
        Ok(allocation)
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
        if unusable.is_empty() {
            return Vec::new();
        }
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
        for (allocation, _) in &revoked {
            self.count_out(allocation);
        }
        revoked
    }

    /// Use of a product summed over all containers.
    pub fn usage(&self, product: ProductKey) -> Usage {
        self.in_use.iter().filter(|((_, p), _)| *p == product).fold(
            Usage::default(),
            |sum, (_, used)| {
                let used = used.usage();
                Usage {
                    stations: sum.stations.saturating_add(used.stations),
                    accesses: sum.accesses.saturating_add(used.accesses),
                }
            },
        )
    }

    /// Use of one item.
    pub fn item_usage(&self, container: &ContainerId, product: ProductKey) -> Usage {
        self.item_use(container, product)
            .map(ItemUse::usage)
            .unwrap_or_default()
    }

    fn item_use(&self, container: &ContainerId, product: ProductKey) -> Option<&ItemUse> {
        // Keyed by owned ids; a lookup builds the key once (cheap next to a scan of every grant).
        self.in_use.get(&(container.clone(), product))
    }

    /// Counts a new allocation in its item's use.
    fn count_in(&mut self, allocation: &Allocation) {
        let used = self
            .in_use
            .entry((allocation.container.clone(), allocation.product))
            .or_default();
        used.accesses += 1;
        *used.stations.entry(allocation.station.clone()).or_default() += 1;
    }

    /// Takes a removed allocation out of its item's use.
    fn count_out(&mut self, allocation: &Allocation) {
        let key = (allocation.container.clone(), allocation.product);
        let Some(used) = self.in_use.get_mut(&key) else {
            return;
        };
        used.accesses = used.accesses.saturating_sub(1);
        if let Some(count) = used.stations.get_mut(&allocation.station) {
            *count -= 1;
            if *count == 0 {
                used.stations.remove(&allocation.station);
            }
        }
        if used.accesses == 0 {
            self.in_use.remove(&key);
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
        let used = self.item_use(&item.container, item.product);
        let usage = used.map(ItemUse::usage).unwrap_or_default();
        match rules.counting {
            Counting::UserLimit => {
                if usage.accesses >= capacity && !self.quantity_elsewhere {
                    return Err(Reason::QuantityExhausted);
                }
                Ok(true)
            }
            Counting::StationShare => {
                let station_counted =
                    used.is_some_and(|used| used.stations.contains_key(&request.station));
                if station_counted {
                    return Ok(false);
                }
                if usage.stations >= capacity && !self.quantity_elsewhere {
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
        for allocation in &taken {
            self.count_out(allocation);
        }
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

    fn item(container: &ContainerId, product: ProductKey, counting: Counting) -> ItemEntry {
        ItemEntry {
            container: container.clone(),
            product,
            name: "p".to_owned(),
            rules: ItemRules {
                quantity: 100,
                counting,
                virtual_machines: Allowance::Allow,
                terminal_server: Allowance::Allow,
                expires_at: None,
            },
            state: ItemState::Valid,
            units_left: None,
        }
    }

    fn request(product: ProductKey, machine: &str, pid: u32) -> AccessRequest {
        AccessRequest {
            product,
            station: StationId::machine(machine),
            holder: HolderId::Local { pid },
            origin: Origin::Local,
            role: MachineRole::Workstation,
            session: SessionKind::Console,
            is_guest: false,
        }
    }

    /// The kept use counts equal a recount from the allocations themselves.
    fn assert_counts_match(table: &AllocationTable) {
        let recounted = AllocationTable::from(StoredTable::from(table.clone()));
        assert_eq!(table.in_use, recounted.in_use);
        for view in table.items() {
            let mut stations = std::collections::BTreeSet::new();
            let mut accesses = 0;
            for allocation in table
                .allocations()
                .filter(|a| a.container == view.entry.container && a.product == view.entry.product)
            {
                stations.insert(&allocation.station);
                accesses += 1;
            }
            assert_eq!(view.in_use.accesses, accesses);
            assert_eq!(view.in_use.stations as usize, stations.len());
        }
    }

    #[test]
    fn use_counts_follow_every_way_an_allocation_leaves() {
        let a = ProductKey { firm: 10, code: 1 };
        let b = ProductKey { firm: 10, code: 2 };
        let soft = ContainerId::new(ContainerClass::Soft, "lic-1");
        let dongle = ContainerId::new(ContainerClass::Dongle, "3-1");
        let mut table = AllocationTable::new();
        table.upsert_item(item(&soft, a, Counting::StationShare));
        table.upsert_item(item(&dongle, b, Counting::UserLimit));
        let mut handles = Vec::new();
        for (pid, machine) in [(1, "ws1"), (2, "ws1"), (3, "ws2"), (4, "ws3")] {
            handles.push(table.access(request(a, machine, pid), 0).unwrap().handle);
            handles.push(table.access(request(b, machine, pid), 0).unwrap().handle);
        }
        assert_counts_match(&table);
        assert_eq!(table.item_usage(&soft, a).stations, 3);
        assert_eq!(table.usage(b).accesses, 4);

        table.release(handles[0]).unwrap();
        assert_counts_match(&table);
        assert_eq!(
            table.item_usage(&soft, a).stations,
            3,
            "ws1 still held by pid 2"
        );
        table.release_holder(&HolderId::Local { pid: 2 });
        assert_counts_match(&table);
        assert_eq!(table.item_usage(&soft, a).stations, 2);

        table.set_state(&dongle, b, ItemState::Locked).unwrap();
        assert_eq!(table.revoke_unusable(0).len(), 3);
        assert_counts_match(&table);
        assert_eq!(table.usage(b), Usage::default());

        table.remove_container(&soft);
        assert_counts_match(&table);
        assert!(table.in_use.is_empty());
    }

    #[test]
    fn release_of_unknown_handle_is_not_held() {
        assert_eq!(AllocationTable::new().release(9), Err(Reason::NotHeld));
    }
}
