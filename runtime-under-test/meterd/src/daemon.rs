//! The daemon's shared state: the allocation table, grant records, holders and their watchers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use meter_core::allocation::{AccessRequest, AllocationTable, HolderId, Origin, ProductKey};
use meter_core::reason::Reason;
use meter_core::station::{MachineRole, SessionKind, StationId};
use meter_core::traits::MachineKind;
use meter_core::usage::UsageKind;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::pidfd::ProcessWatch;
use crate::platform::{Platform, process_session_and_start};
use crate::protocol::{Claim, FromServer, LocalReply, WireSession};
use crate::remote::Remotes;
use crate::station_registry::StationRegistry;
use crate::store::{self, Change, Snapshot, Store};

/// Handles recorded ahead at a time (the state keeps a ceiling, not every handle).
const HANDLE_BLOCK: u64 = 1024;

/// Metadata key prefix of the client runtimes linked to this server.
pub(crate) const RUNTIME_KEY_PREFIX: &str = "remote-runtime/";

/// Firm code used when an app names no firm and no local item tells which.
pub const DEFAULT_FIRM: u32 = meter_core::policy::DEFAULT_FIRM;

/// Who holds a grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Holder {
    /// A local process, identified by pid and start time (so a reused pid is not mistaken).
    Local {
        /// Process id.
        pid: u32,
        /// Start time, clock ticks since boot.
        start: u64,
        /// User id.
        uid: u32,
    },
    /// A remote station served by this runtime's network server.
    Remote {
        /// The client runtime's id.
        runtime: String,
        /// The client runtime's handle.
        client_handle: u64,
        /// The peer address the server saw.
        peer: String,
    },
}

/// Where a grant came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Via {
    /// This runtime's own allocation table.
    Table {
        /// The container that granted it.
        container: String,
    },
    /// A network server this runtime forwarded to.
    Forwarded {
        /// The server, `addr:port`.
        server: String,
        /// The server's handle.
        server_handle: u64,
        /// The server's container.
        container: String,
    },
}

/// One grant as stored durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// The product.
    pub product: ProductKey,
    /// The station it counts for.
    pub station: StationId,
    /// The session of the app.
    pub session: WireSession,
    /// The role of the app's machine.
    pub role: MachineRole,
    /// True when the app's machine is a virtual machine.
    pub guest: bool,
    /// Who holds it.
    pub holder: Holder,
    /// Where it came from.
    pub via: Via,
    /// When it was granted, unix ms (platform clock).
    pub granted_at: u64,
    /// The allocation table's handle (rebuilt at start-up).
    #[serde(skip)]
    pub table_handle: Option<u64>,
}

impl GrantRecord {
    pub(crate) fn access_request(&self) -> AccessRequest {
        let (holder, origin) = match &self.holder {
            Holder::Local { pid, .. } => (HolderId::Local { pid: *pid }, Origin::Local),
            Holder::Remote { peer, .. } => (
                HolderId::Remote {
                    peer: peer.clone(),
                    station: self.station.clone(),
                },
                Origin::Remote,
            ),
        };
        AccessRequest {
            product: self.product,
            station: self.station.clone(),
            holder,
            origin,
            role: self.role,
            session: SessionKind::from(&self.session),
            is_guest: self.guest,
        }
    }

    pub(crate) fn container(&self) -> &str {
        match &self.via {
            Via::Table { container } | Via::Forwarded { container, .. } => container,
        }
    }
}

/// A connected client runtime (server side).
#[derive(Debug)]
pub(crate) struct RemoteLink {
    pub(crate) generation: u64,
    pub(crate) peer: String,
    pub(crate) machine: String,
    /// The machine part of its stations, as the server names them (see `station_registry`).
    pub(crate) station_machine: String,
    /// Frames the server sends unprompted on this runtime's connection (revocations).
    pub(crate) events: mpsc::UnboundedSender<FromServer>,
}

/// The mutable state behind one lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) table: AllocationTable,
    pub(crate) grants: BTreeMap<u64, GrantRecord>,
    next_handle: u64,
    /// The handle the state records as next: handles below it may have been handed out (0
    /// after a start, so the first handle taken records a new ceiling).
    handle_ceiling: u64,
    /// Remote grants kept in memory only (network leases, see `resume`): no row to delete.
    pub(crate) leases: HashSet<u64>,
    watched: HashMap<u32, u64>,
    /// Where each local grant's revocation is told: the connection that took it and any that
    /// watch it for the same user (added, never replaced).
    listeners: HashMap<u64, Vec<mpsc::UnboundedSender<LocalReply>>>,
    pub(crate) links: HashMap<String, RemoteLink>,
    pub(crate) link_generation: u64,
    pub(crate) awaiting_reconnect: HashMap<String, Instant>,
    pub(crate) known_runtimes: std::collections::BTreeSet<String>,
    /// Client runtimes whose connection ended: their grants stay counted until the deadline (the
    /// end of their lease), unless they reconnect and re-claim them first.
    pub(crate) lapsing: HashMap<String, Instant>,
    /// Key bindings and station names of client runtimes.
    pub(crate) stations: StationRegistry,
    /// Live remote grants per client runtime and product.
    remote_grants: HashMap<(String, ProductKey), u32>,
    /// The handles of each client runtime's live grants (its keepalives look them up, rather
    /// than scan every grant).
    remote_handles: HashMap<String, std::collections::BTreeSet<u64>>,
    /// The users client runtimes named for their live grants (access rules count by user).
    pub(crate) remote_users: HashMap<u64, String>,
    /// Grants whose triad seat is being taken, from the moment the table grants them until
    /// their own take decides whether they keep it (a keepalive leaves them to it).
    pub(crate) seating: HashSet<u64>,
    /// Live grants per product.
    in_use: HashMap<ProductKey, u32>,
}

impl State {
    /// A new handle; `changes` gets the recorded handle ceiling when it is due, so a restart
    /// never hands out a handle again without a write for each one.
    pub(crate) fn allocate_handle(&mut self, changes: &mut Vec<Change>) -> u64 {
        let handle = self.next_handle.max(1);
        self.next_handle = handle + 1;
        if self.next_handle.saturating_add(HANDLE_BLOCK / 2) > self.handle_ceiling {
            self.handle_ceiling = self.next_handle.saturating_add(HANDLE_BLOCK);
            changes.push(Change::PutMeta(
                "next-handle".into(),
                self.handle_ceiling.to_le_bytes().to_vec(),
            ));
        }
        handle
    }

    /// Records a grant (and counts it for its remote runtime).
    pub(crate) fn insert_grant(&mut self, handle: u64, record: GrantRecord) {
        if let Some(old) = self.grants.remove(&handle) {
            self.uncount(handle, &old);
        }
        *self.in_use.entry(record.product).or_default() += 1;
        if let Holder::Remote { runtime, .. } = &record.holder {
            *self
                .remote_grants
                .entry((runtime.clone(), record.product))
                .or_default() += 1;
            self.remote_handles
                .entry(runtime.clone())
                .or_default()
                .insert(handle);
        }
        self.grants.insert(handle, record);
    }

    /// The handles of the live grants client runtime `runtime` holds here.
    pub(crate) fn grants_of_runtime(&self, runtime: &str) -> Vec<u64> {
        self.remote_handles
            .get(runtime)
            .map(|handles| handles.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Forgets a grant: its count, its allocation in the table, and its row (the deletion
    /// goes into `changes`) unless it is a lease kept in memory only.
    pub(crate) fn remove_grant(
        &mut self,
        handle: u64,
        changes: &mut Vec<Change>,
    ) -> Option<GrantRecord> {
        let record = self.grants.remove(&handle)?;
        self.remote_users.remove(&handle);
        self.seating.remove(&handle);
        if !self.leases.remove(&handle) {
            changes.push(Change::DeleteGrant(handle));
        }
        if let Some(table_handle) = record.table_handle {
            let _ = self.table.release(table_handle);
        }
        self.uncount(handle, &record);
        Some(record)
    }

    fn uncount(&mut self, handle: u64, record: &GrantRecord) {
        if let Some(count) = self.in_use.get_mut(&record.product) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.in_use.remove(&record.product);
            }
        }
        if let Holder::Remote { runtime, .. } = &record.holder {
            let key = (runtime.clone(), record.product);
            if let Some(count) = self.remote_grants.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    self.remote_grants.remove(&key);
                }
            }
            if let Some(handles) = self.remote_handles.get_mut(runtime) {
                handles.remove(&handle);
                if handles.is_empty() {
                    self.remote_handles.remove(runtime);
                }
            }
        }
    }

    /// How many grants of `product` are held.
    pub(crate) fn in_use(&self, product: ProductKey) -> u32 {
        self.in_use.get(&product).copied().unwrap_or(0)
    }

    /// How many grants of `product` the client runtime `runtime` holds.
    pub(crate) fn remote_grants_of(&self, runtime: &str, product: ProductKey) -> u32 {
        self.remote_grants
            .get(&(runtime.to_owned(), product))
            .copied()
            .unwrap_or(0)
    }
}

/// Who asked for a licence that was refused (for the usage log).
#[derive(Debug, Clone)]
pub(crate) struct Asker {
    /// The user, when known.
    pub user: Option<String>,
    /// The machine counted.
    pub machine: String,
    /// The terminal-server session, for a session's station.
    pub session: Option<u32>,
    /// Its remote-desktop session, if any.
    pub wire_session: WireSession,
    /// A client runtime's address (`ip:port`), for an access it forwarded.
    pub peer: Option<String>,
}

/// Facts about the calling process and its machine that decide its station.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Process id.
    pub pid: u32,
    /// Start time, clock ticks since boot.
    pub start: u64,
    /// User id.
    pub uid: u32,
    /// The process's session.
    pub session: SessionKind,
    /// Its station.
    pub station: StationId,
    /// The machine's role.
    pub role: MachineRole,
    /// True on a virtual machine.
    pub guest: bool,
}

/// Settings of one daemon.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// State folder.
    pub state_dir: PathBuf,
    /// Keepalive window for remote stations (server) and the interval base (client).
    pub keepalive: Duration,
    /// A runtime id to present instead of the stored one (an impersonation attack's tool).
    pub runtime_id: Option<String>,
    /// Whether grants, denials and their ends are written to the usage log.
    pub usage_log: bool,
}

/// The daemon: shared by every connection task.
#[derive(Debug)]
pub struct Runtime {
    /// Where the runtime learns about its machine.
    pub platform: Arc<dyn Platform>,
    /// Durable state.
    pub store: Store,
    state: Mutex<State>,
    /// Settings.
    pub settings: DaemonSettings,
    /// This runtime's persistent random id (identifies it to servers).
    pub runtime_id: String,
    /// The key this runtime proves to dongles at every hello.
    pub dongle_key: dongle::SigningKey,
    /// Network servers this runtime forwards to.
    pub remotes: Remotes,
    /// Installed licences and trusted vendors.
    pub licences: Mutex<crate::licences::Licences>,
    /// The network server's listen address and certificate fingerprint, when serving.
    pub server_info: Mutex<Option<(String, String)>>,
    /// Licence dongles attached to this machine.
    pub dongles: crate::dongles::Dongles,
    /// Look-ups of the machine before accesses, coalesced: see [`Runtime::observe_machine`].
    observations: MachineObservations,
    /// True while client runtimes linked before the start may still re-claim their grants.
    reclaims_awaited: AtomicBool,
    /// Whether the machine is a terminal server, from its table and its live login sessions.
    pub(crate) role_judge: crate::machine_role::MachineRoleJudge,
    /// The administrator's access rules.
    access: Mutex<crate::access_control::AccessControl>,
    /// The usage log's public key; none when the runtime keeps no log.
    pub(crate) usage_key: Option<[u8; 32]>,
    /// The key the usage log's tags check under (secret, like the signing key).
    pub(crate) usage_tag_key: Option<meter_core::usage::TagKey>,
    /// The triad this server joined, if any.
    pub(crate) triad: std::sync::OnceLock<Arc<crate::triad_server::TriadSeats>>,
    /// This runtime was a triad member when it stopped: until it has joined again, its own
    /// apps are refused (they could take no seat in the triad's ledger).
    pub(crate) triad_saved: bool,
    /// The quantity this member's apps' triad seats are asked for under instead of the
    /// licence's (0: the licence's): the `inflate-seats` attack of a harness build.
    pub(crate) inflated_seats: std::sync::atomic::AtomicU32,
}

/// Tickets of accesses waiting to see the machine, and the ticket of the last completed look.
#[derive(Debug, Default)]
struct MachineObservations {
    tickets: AtomicU64,
    /// The ticket taken when the last completed look started; held while a look runs.
    last_started: tokio::sync::Mutex<u64>,
}

fn reply_denied(reason: Reason) -> LocalReply {
    LocalReply::Denied {
        reason,
        message: reason.message().to_owned(),
    }
}

impl Runtime {
    /// Builds the runtime from what the store holds; holders are re-watched by [`Runtime::resume`].
    pub fn new(
        platform: Arc<dyn Platform>,
        store: Store,
        snapshot: Snapshot,
        settings: DaemonSettings,
    ) -> anyhow::Result<Arc<Runtime>> {
        let triad_saved = snapshot
            .meta
            .contains_key(crate::triad_server::TRIAD_META_KEY);
        let runtime_id = match (&settings.runtime_id, snapshot.meta.get("runtime-id")) {
            (Some(presented), _) => presented.clone(),
            (None, stored) => {
                let stored = match stored {
                    Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    None => {
                        let mut id = [0u8; 16];
                        getrandom::fill(&mut id)
                            .map_err(|e| anyhow::anyhow!("No randomness: {e}"))?;
                        let id = hex::encode(id);
                        drop(store.submit(vec![Change::PutMeta(
                            "runtime-id".into(),
                            id.clone().into_bytes(),
                        )]));
                        id
                    }
                };
                let machine = platform.traits().ok().and_then(|t| {
                    t.one(meter_core::traits::names::PRODUCT_UUID)
                        .map(str::to_owned)
                });
                crate::runtime_identity::runtime_id(&stored, machine.as_deref())
            }
        };
        let next_handle = snapshot
            .meta
            .get("next-handle")
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(1);
        let mut licences = crate::licences::Licences::new(settings.state_dir.join("trust"));
        licences.load_meta(&snapshot.meta);
        let access = crate::access_control::AccessControl::load(&snapshot.meta);
        let mut state = State {
            table: AllocationTable::new(),
            next_handle,
            stations: StationRegistry::load(&snapshot.meta),
            ..State::default()
        };
        state.known_runtimes = snapshot
            .meta
            .keys()
            .filter_map(|k| k.strip_prefix(RUNTIME_KEY_PREFIX))
            .map(str::to_owned)
            .collect();
        let now = platform.now_ms()?;
        let mut traits = platform.traits()?;
        if let Some(id) = licences.random_id() {
            traits.set(meter_core::traits::names::RUNTIME_RANDOM_ID, id.to_owned());
        }
        for (id, bytes) in &snapshot.licences {
            match licences.load_installed(id, bytes, &traits, &mut state.table, now) {
                Ok(()) => {}
                Err(e) => tracing::warn!(licence = %id, error = %e, "Installed licence unusable"),
            }
        }
        // Replay grants in handle order so the table counts exactly what was granted before. The
        // items still have their licence's units here, so a grant that took an item's last unit
        // replays too; the stored figures are restored after.
        let machine_name = platform.machine_name()?;
        let mut dropped = Vec::new();
        // Grants recorded in another boot: no process of that boot is alive any more (after a
        // reboot, or in a clone booted from a copy of this state), whatever its pid says now.
        let boot_id = platform.boot_id()?;
        let stored_boot = snapshot
            .meta
            .get("boot-id")
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let other_boot = matches!((&boot_id, &stored_boot), (Some(now), Some(then)) if now != then);
        if let Some(id) = &boot_id {
            dropped.push(Change::PutMeta("boot-id".into(), id.clone().into_bytes()));
        }
        for (handle, bytes) in &snapshot.grants {
            let mut record: GrantRecord = match postcard::from_bytes(bytes) {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(handle, error = %e, "Unreadable grant record dropped");
                    dropped.push(Change::DeleteGrant(*handle));
                    continue;
                }
            };
            // A local holder recorded under another machine name belongs to the machine this
            // state was copied from (a clone or a copied disk): its process is not ours.
            if matches!(record.holder, Holder::Local { .. })
                && (other_boot || record.station.machine != machine_name)
            {
                tracing::info!(handle, station = %record.station, "Grant of another machine or an earlier boot dropped");
                dropped.push(Change::DeleteGrant(*handle));
                continue;
            }
            if let Via::Table { .. } = record.via {
                match state.table.access(record.access_request(), now) {
                    Ok(grant) => record.table_handle = Some(grant.handle),
                    Err(reason) => {
                        tracing::warn!(handle, %reason, "Grant no longer valid after restart");
                        dropped.push(Change::DeleteGrant(*handle));
                        continue;
                    }
                }
            }
            state.next_handle = state.next_handle.max(handle + 1);
            state.insert_grant(*handle, record);
        }
        // Replaying decremented the licence's units: the stored figures are the truth.
        licences.restore_units(&snapshot.meta, &mut state.table);
        if !dropped.is_empty() {
            drop(store.submit(dropped));
        }
        let identity = crate::tls::load_or_create_runtime_identity(&settings.state_dir)?;
        let remotes = Remotes::new(identity);
        let key_secret = stored_secret(&snapshot, &store, "dongle-key-secret")?;
        let dongle_key = crate::runtime_identity::dongle_key(&key_secret, &runtime_id);
        let (usage_key, usage_tag_key) = if settings.usage_log {
            let secret = stored_secret(&snapshot, &store, crate::store::USAGE_KEY_KEY)?;
            let (public, tag) = store.start_usage_log(&secret);
            (Some(public), Some(tag))
        } else {
            (None, None)
        };
        Ok(Arc::new(Runtime {
            platform,
            store,
            state: Mutex::new(state),
            settings,
            runtime_id,
            dongle_key,
            remotes,
            licences: Mutex::new(licences),
            server_info: Mutex::new(None),
            dongles: crate::dongles::Dongles::new(),
            observations: MachineObservations::default(),
            reclaims_awaited: AtomicBool::new(false),
            role_judge: Default::default(),
            access: Mutex::new(access),
            usage_key,
            usage_tag_key,
            triad: std::sync::OnceLock::new(),
            triad_saved,
            inflated_seats: std::sync::atomic::AtomicU32::new(0),
        }))
    }

    pub(crate) fn lock_access(&self) -> MutexGuard<'_, crate::access_control::AccessControl> {
        self.access.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The installed licences, their metering and witnessed chains.
    pub(crate) fn lock_licences(&self) -> MutexGuard<'_, crate::licences::Licences> {
        self.licences.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After start-up: re-watches surviving local holders, releases dead ones, and gives remote
    /// stations one keepalive window to reconnect.
    ///
    /// A server's seats (network leases) need not be on disk; which client runtimes were
    /// linked is, before any of them is welcomed. Until each of those has reconnected and
    /// re-claimed its seats, or one window has passed (their own leases ended a margin before),
    /// nothing new is granted: a seat answered before a crash is never given twice.
    pub fn resume(self: &Arc<Self>) {
        let (local, remote): (Vec<_>, Vec<_>) = {
            let state = self.lock();
            let local: Vec<(u32, u64)> = state
                .grants
                .values()
                .filter_map(|g| match g.holder {
                    Holder::Local { pid, start, .. } => Some((pid, start)),
                    Holder::Remote { .. } => None,
                })
                .collect();
            let mut remote: Vec<String> = state
                .grants
                .values()
                .filter_map(|g| match &g.holder {
                    Holder::Remote { runtime, .. } => Some(runtime.clone()),
                    Holder::Local { .. } => None,
                })
                .collect();
            // Runtimes linked when the server stopped may hold grants not yet on disk.
            remote.extend(state.known_runtimes.iter().cloned());
            (local, remote)
        };
        for (pid, start) in local {
            self.watch_holder(pid, start);
        }
        if crate::weakened::is(crate::weakened::Defence::RestartGrace) {
            return;
        }
        let deadline = Instant::now() + self.settings.keepalive;
        let mut state = self.lock();
        for runtime in remote {
            state.awaiting_reconnect.insert(runtime, deadline);
        }
        if !state.awaiting_reconnect.is_empty() {
            self.reclaims_awaited.store(true, Ordering::SeqCst);
        }
    }

    /// Grants wait for no re-claims any more: a triad's seats are in its replicated ledger, not
    /// in this member's memory, so nothing a restart lost needs them.
    pub(crate) fn stop_awaiting_reclaims(&self) {
        self.lock().awaiting_reconnect.clear();
        self.reclaims_awaited.store(false, Ordering::SeqCst);
    }

    /// Who the process `pid` is, as far as licensing cares.
    pub fn identify(&self, pid: u32, uid: u32) -> Result<Caller, anyhow::Error> {
        let process = process_session_and_start(pid)?;
        let login = process.login.then_some(process.id);
        let machine = self.platform.machine_name()?;
        let role = self.role_judge.role(&*self.platform, login)?;
        let guest = self.platform.kind()? == MachineKind::Guest;
        let session = match self.platform.session(process.id)? {
            Some(info) => info.kind,
            // A login the table does not list is still someone's login: interactive.
            None if process.login
                && !crate::weakened::is(crate::weakened::Defence::TerminalServerRole) =>
            {
                SessionKind::Console
            }
            None => SessionKind::Service,
        };
        let start = process.start;
        let station = StationId::for_session(machine, role, process.id, &session);
        Ok(Caller {
            pid,
            start,
            uid,
            session,
            station,
            role,
            guest,
        })
    }

    /// Resolves the firm of a product: the named one, the first local item's, or the default.
    fn product_key(&self, state: &State, firm: Option<u32>, product: u32) -> ProductKey {
        let firm = firm.unwrap_or_else(|| {
            state
                .table
                .items()
                .iter()
                .find(|view| view.entry.product.code == product)
                .map(|view| view.entry.product.firm)
                .unwrap_or(DEFAULT_FIRM)
        });
        ProductKey {
            firm,
            code: product,
        }
    }

    /// Who a local caller is, for the usage log.
    fn asker_of(&self, caller: &Caller) -> Asker {
        Asker {
            user: self.user_of(caller.uid),
            machine: caller.station.machine.clone(),
            session: caller.station.session,
            wire_session: WireSession::from(&caller.session),
            peer: None,
        }
    }

    /// A local app asks for a licence; `events` receives revocations of the grant.
    pub async fn access_local(
        self: &Arc<Self>,
        caller: &Caller,
        firm: Option<u32>,
        product: u32,
        events: Option<mpsc::UnboundedSender<LocalReply>>,
    ) -> LocalReply {
        let holder = Holder::Local {
            pid: caller.pid,
            start: caller.start,
            uid: caller.uid,
        };
        self.wait_for_reconnects().await;
        self.observe_machine().await;
        self.witness_before_first_spend(product).await;
        let mut spent = None;
        let mut refusing_rule = None;
        let (step, now) = {
            let mut state = self.lock();
            // Read under the lock: the high-water mark of metered licences only moves under it,
            // so a reading taken before it (or before the look above) could be behind it.
            let now = match self.platform.now_ms() {
                Ok(now) => now,
                Err(e) => {
                    return LocalReply::Error {
                        message: format!("Cannot read the machine clock: {e}"),
                        reason: None,
                    };
                }
            };
            let key = self.product_key(&state, firm, product);
            let mut record = GrantRecord {
                product: key,
                station: caller.station.clone(),
                session: WireSession::from(&caller.session),
                role: caller.role,
                guest: caller.guest,
                holder: holder.clone(),
                via: Via::Table {
                    container: String::new(),
                },
                granted_at: now,
                table_handle: None,
            };
            let recorded = match self.rules_refusal(&state, key, caller) {
                Some(denial) => {
                    refusing_rule = denial.rule;
                    Err(denial.reason)
                }
                None => state.table.access(record.access_request(), now),
            }
            .and_then(|grant| {
                match grant.units_left {
                    Some(units) => match self.record_unit_spent(&grant.container, key, now) {
                        Ok(use_record) => Ok((grant, Some(use_record))),
                        Err(reason) => {
                            // The use could not be recorded (a rollback sign locked the licence
                            // meanwhile): no grant, and the unit goes back.
                            let _ = state.table.release(grant.handle);
                            let _ =
                                state
                                    .table
                                    .set_units_left(&grant.container, key, Some(units + 1));
                            Err(reason)
                        }
                    },
                    None => Ok((grant, None)),
                }
            });
            let step = match recorded {
                Ok((grant, use_record)) => {
                    record.table_handle = Some(grant.handle);
                    record.via = Via::Table {
                        container: grant.container.to_string(),
                    };
                    let mut changes = Vec::new();
                    let handle = state.allocate_handle(&mut changes);
                    changes.push(Change::PutGrant(handle, encode_record(&record)));
                    if let (Some(units), Some((more, receipt))) = (grant.units_left, use_record) {
                        changes.push(crate::licences::units_change(&grant.container, key, units));
                        changes.extend(more);
                        spent = receipt;
                    }
                    let reply = LocalReply::Granted {
                        handle,
                        product,
                        container: grant.container.to_string(),
                        station: caller.station.to_string(),
                    };
                    state.insert_grant(handle, record);
                    changes.extend(self.usage_grant(&state, handle));
                    if let Some(events) = events.clone() {
                        state.listeners.entry(handle).or_default().push(events);
                    }
                    Ok((key, reply, self.store.submit(changes)))
                }
                Err(reason) => {
                    // The handle a forwarded grant will have (recorded with it).
                    let mut ceiling = Vec::new();
                    let handle = state.allocate_handle(&mut ceiling);
                    if !ceiling.is_empty() {
                        self.store.submit_eventually(ceiling);
                    }
                    Err((key, self.explain_denial(&state.table, key, reason), handle))
                }
            };
            (step, now)
        };
        let (key, local_denial, client_handle) = match step {
            Ok((key, reply, durable)) => {
                if let LocalReply::Granted { handle, .. } = &reply
                    && let Err(reason) = self.dongles.confirm_grant(self, *handle).await
                {
                    // The dongle refused what the table granted: the grant went back (logged
                    // as a release) and the app is denied (logged as a denial).
                    self.log_denial(self.asker_of(caller), key, reason, None)
                        .await;
                    return reply_denied(reason);
                }
                if let LocalReply::Granted { handle, .. } = &reply
                    && let Err(reason) = self.take_member_app_seat(*handle).await
                {
                    // A triad member's app without a seat in the triad's ledger: the grant
                    // goes back (logged as a release) and the app is denied.
                    let _ = self.release_inner(*handle, false).await;
                    self.log_denial(self.asker_of(caller), key, reason, None)
                        .await;
                    return reply_denied(reason);
                }
                self.watch_holder(caller.pid, caller.start);
                if let Err(e) = store::wait(durable).await {
                    return LocalReply::Error {
                        message: format!("Cannot record the grant: {e}"),
                        reason: None,
                    };
                }
                if let Some((licence, receipt)) = spent {
                    let taken = self.witness_receipts(&licence, vec![receipt]).await;
                    if !taken
                        && self
                            .lock_licences()
                            .metering
                            .needs_witness(&licence, product)
                        && !crate::weakened::is(crate::weakened::Defence::WitnessRequired)
                        && let LocalReply::Granted { handle, .. } = &reply
                    {
                        // The vendor wants every unit seen by a witness and none took this one:
                        // no grant (the unit stays spent, in the chain the witness will get).
                        tracing::warn!(
                            licence,
                            product,
                            "No witness took the receipt: grant withdrawn"
                        );
                        let _ = self.release_inner(*handle, false).await;
                        let forked = self.lock_licences().metering.is_locked(&licence);
                        let reason = if forked {
                            // A witness holds another chain: it locked the licence.
                            Reason::RollbackDetected
                        } else {
                            Reason::WitnessUnreachable
                        };
                        self.log_denial(self.asker_of(caller), key, reason, None)
                            .await;
                        return reply_denied(reason);
                    }
                }
                return reply;
            }
            Err(denied) => denied,
        };
        let local_denial = self.dongles.explain_denial(key, local_denial);
        let asker = self.asker_of(caller);
        // The administrator's rules of this machine are final: never worked round by a server.
        if self.remotes.is_empty() || local_denial.is_rule() {
            self.log_denial(asker, key, local_denial, refusing_rule)
                .await;
            return reply_denied(local_denial);
        }
        // Not grantable here: forward to the network servers.
        let user = self.user_of(caller.uid);
        let claim = Claim {
            client_handle,
            product: key,
            station: caller.station.clone(),
            session: WireSession::from(&caller.session),
            role: caller.role,
            guest: caller.guest,
            user,
        };
        match self.remotes.access(claim.clone()).await {
            Ok(forwarded) => {
                let record = GrantRecord {
                    product: key,
                    station: caller.station.clone(),
                    session: claim.session.clone(),
                    role: caller.role,
                    guest: caller.guest,
                    holder,
                    via: Via::Forwarded {
                        server: forwarded.server.clone(),
                        server_handle: forwarded.server_handle,
                        container: forwarded.container.clone(),
                    },
                    granted_at: now,
                    table_handle: None,
                };
                let durable = {
                    let mut state = self.lock();
                    state.insert_grant(client_handle, record.clone());
                    if let Some(events) = events {
                        state
                            .listeners
                            .entry(client_handle)
                            .or_default()
                            .push(events);
                    }
                    let mut changes = vec![Change::PutGrant(client_handle, encode_record(&record))];
                    changes.extend(self.usage_grant(&state, client_handle));
                    self.store.submit(changes)
                };
                self.watch_holder(caller.pid, caller.start);
                if let Err(e) = store::wait(durable).await {
                    return LocalReply::Error {
                        message: format!("Cannot record the grant: {e}"),
                        reason: None,
                    };
                }
                LocalReply::Granted {
                    handle: client_handle,
                    product,
                    container: forwarded.container,
                    station: caller.station.to_string(),
                }
            }
            Err(remote_reason) => {
                // A product this runtime holds locally keeps its local answer.
                let reason = if local_denial == Reason::UnknownProduct {
                    remote_reason
                } else {
                    local_denial
                };
                self.log_denial(asker, key, reason, None).await;
                reply_denied(reason)
            }
        }
    }

    /// Before an access: scans the dongles and re-validates the licences against the machine.
    ///
    /// Concurrent accesses share one look: an access waits for a look that started after it
    /// asked (so it sees every change made before it asked) instead of making its own.
    pub(crate) async fn observe_machine(self: &Arc<Self>) {
        let asked = self.observations.tickets.fetch_add(1, Ordering::SeqCst);
        let mut last_started = self.observations.last_started.lock().await;
        if *last_started > asked {
            return;
        }
        let started = self.observations.tickets.fetch_add(1, Ordering::SeqCst);
        // Boxed: the look's state is large, and most accesses share another's look (every
        // request's future, moved into its connection's set, stays small).
        Box::pin(async {
            self.dongles.before_access(self).await;
            self.refresh_licences().await;
        })
        .await;
        *last_started = started;
    }

    /// After a restart, new grants wait until the linked client runtimes have re-claimed theirs
    /// (or their keepalive window ran out), so nothing is granted twice.
    pub(crate) async fn wait_for_reconnects(&self) {
        // Nobody is awaited once everyone came back or lapsed: no lock for each access then.
        if !self.reclaims_awaited.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        loop {
            if self.lock().awaiting_reconnect.is_empty() {
                // Only `resume` adds to it, once: empty now, empty for good.
                self.reclaims_awaited.store(false, Ordering::SeqCst);
                return;
            }
            if started.elapsed() >= self.settings.keepalive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Releases one grant; forwarded grants are released on their server too.
    pub async fn release(self: &Arc<Self>, handle: u64) -> Result<(), Reason> {
        self.release_inner(handle, true).await
    }

    pub(crate) async fn release_inner(
        self: &Arc<Self>,
        handle: u64,
        durable_wait: bool,
    ) -> Result<(), Reason> {
        self.end_grant(handle, durable_wait, UsageKind::Release)
            .await
    }

    /// Ends one grant, logged as `end` (a release, a reclaim or a revocation); forwarded grants
    /// are released on their server too.
    pub(crate) async fn end_grant(
        self: &Arc<Self>,
        handle: u64,
        durable_wait: bool,
        end: UsageKind,
    ) -> Result<(), Reason> {
        self.end_grant_of(handle, None, durable_wait, end).await
    }

    /// Ends one grant as [`Runtime::end_grant`] does, when `runtime` (if any) is the client
    /// runtime that holds it; `NotHeld` otherwise.
    pub(crate) async fn end_grant_of(
        self: &Arc<Self>,
        handle: u64,
        runtime: Option<&str>,
        durable_wait: bool,
        end: UsageKind,
    ) -> Result<(), Reason> {
        let (record, durable) = {
            let mut state = self.lock();
            if let Some(runtime) = runtime {
                let held = state.grants.get(&handle).is_some_and(
                    |g| matches!(&g.holder, Holder::Remote { runtime: r, .. } if r == runtime),
                );
                if !held {
                    return Err(Reason::NotHeld);
                }
            }
            let user = self.usage_user(&state, handle);
            let mut changes = Vec::new();
            let record = state
                .remove_grant(handle, &mut changes)
                .ok_or(Reason::NotHeld)?;
            state.listeners.remove(&handle);
            if self.usage_key.is_some() {
                let at = self.platform.now_ms().unwrap_or(record.granted_at);
                changes.extend(self.usage_change(&state, end, handle, &record, user, at));
            }
            let durable = if changes.is_empty() {
                None
            } else if durable_wait {
                Some(self.store.submit(changes))
            } else {
                self.store.submit_eventually(changes);
                None
            };
            (record, durable)
        };
        self.dongles.release_grant(handle);
        if matches!(record.holder, Holder::Local { .. }) {
            self.give_back_member_app_seats().await;
        }
        if let Some(durable) = durable
            && let Err(e) = store::wait(durable).await
        {
            tracing::error!(handle, error = %e, "Release not recorded");
        }
        if let Via::Forwarded {
            server,
            server_handle,
            ..
        } = &record.via
        {
            self.remotes.release(server, *server_handle).await;
        }
        Ok(())
    }

    /// Releases every grant of a local process (it exited).
    pub async fn release_holder(self: &Arc<Self>, pid: u32, start: u64) -> usize {
        let handles: Vec<u64> = {
            let mut state = self.lock();
            if state.watched.get(&pid) == Some(&start) {
                state.watched.remove(&pid);
            }
            state
                .grants
                .iter()
                .filter(|(_, g)| matches!(g.holder, Holder::Local { pid: p, start: s, .. } if p == pid && s == start))
                .map(|(h, _)| *h)
                .collect()
        };
        let count = handles.len();
        for handle in handles {
            let _ = self.release(handle).await;
        }
        if count > 0 {
            tracing::info!(pid, released = count, "Holder exited, licences released");
        }
        count
    }

    /// Takes a grant back and tells its holder why (a remote holder through its connection).
    pub async fn revoke(self: &Arc<Self>, handle: u64, reason: Reason) {
        let (listener, remote) = {
            let state = self.lock();
            let remote = match state.grants.get(&handle).map(|g| &g.holder) {
                Some(Holder::Remote { runtime, .. }) => {
                    state.links.get(runtime).map(|link| link.events.clone())
                }
                _ => None,
            };
            (state.listeners.get(&handle).cloned(), remote)
        };
        if let Some(events) = remote
            && !crate::weakened::is(crate::weakened::Defence::RemoteRevocation)
        {
            let _ = events.send(FromServer::Revoked { handle, reason });
        }
        if self
            .end_grant(handle, true, UsageKind::Revocation { reason })
            .await
            .is_ok()
        {
            tracing::info!(handle, %reason, "Licence revoked");
            for listener in listener.unwrap_or_default() {
                let _ = listener.send(LocalReply::Revoked { handle, reason });
            }
        }
    }

    /// Releases a local grant for a caller of the local socket: only the holder's own user may,
    /// and when another process than the holder does, the holder is told (`revoked`,
    /// `not-held`) so it stops using the licence.
    pub async fn release_for(
        self: &Arc<Self>,
        pid: u32,
        uid: u32,
        handle: u64,
    ) -> Result<(), Reason> {
        let (listeners, someone_else) = {
            let state = self.lock();
            match state.grants.get(&handle).map(|g| &g.holder) {
                Some(Holder::Local {
                    pid: holder_pid,
                    uid: holder_uid,
                    ..
                }) if *holder_uid == uid
                    || crate::weakened::is(crate::weakened::Defence::HolderOwnership) =>
                {
                    (
                        state.listeners.get(&handle).cloned().unwrap_or_default(),
                        *holder_pid != pid,
                    )
                }
                _ => return Err(Reason::NotHeld),
            }
        };
        self.release(handle).await?;
        if someone_else && !crate::weakened::is(crate::weakened::Defence::HolderOwnership) {
            tracing::info!(
                handle,
                pid,
                "Licence released by another process of its user"
            );
            for listener in listeners {
                let _ = listener.send(LocalReply::Revoked {
                    handle,
                    reason: Reason::NotHeld,
                });
            }
        }
        Ok(())
    }

    /// Also sends revocations of `handle` to `events`, when `uid` is its holder's user; false
    /// if the handle is not held by that user.
    pub fn add_listener(
        &self,
        handle: u64,
        uid: u32,
        events: mpsc::UnboundedSender<LocalReply>,
    ) -> bool {
        let mut state = self.lock();
        let owned = matches!(
            state.grants.get(&handle).map(|g| &g.holder),
            Some(Holder::Local { uid: holder, .. }) if *holder == uid
        );
        if !owned {
            return false;
        }
        let listeners = state.listeners.entry(handle).or_default();
        if crate::weakened::is(crate::weakened::Defence::HolderOwnership) {
            // Weakened: a watcher takes the holder's place.
            listeners.clear();
        }
        listeners.retain(|l| !l.is_closed());
        listeners.push(events);
        true
    }

    /// Stops sending events to `events` (its connection closed).
    pub fn forget_listeners(&self, handles: &[u64], events: &mpsc::UnboundedSender<LocalReply>) {
        let mut state = self.lock();
        for handle in handles {
            if let Some(listeners) = state.listeners.get_mut(handle) {
                listeners.retain(|l| !l.same_channel(events) && !l.is_closed());
            }
        }
    }

    /// Watches a local holder and releases its licences when it exits.
    pub fn watch_holder(self: &Arc<Self>, pid: u32, start: u64) {
        {
            let mut state = self.lock();
            if state.watched.get(&pid) == Some(&start) {
                return;
            }
            state.watched.insert(pid, start);
        }
        if crate::weakened::is(crate::weakened::Defence::CrashRelease) {
            // Weakened: process exits are not watched; a crashed holder keeps its licences.
            return;
        }
        let runtime = Arc::clone(self);
        tokio::spawn(async move {
            if let Ok(watch) = ProcessWatch::open(pid) {
                // The pid may have been reused since the grant: compare start times.
                let same = process_session_and_start(pid)
                    .map(|process| process.start == start)
                    .unwrap_or(false);
                if same && let Err(e) = watch.exited().await {
                    tracing::warn!(pid, error = %e, "Lost the watch on a holder");
                }
            }
            runtime.release_holder(pid, start).await;
        });
    }
}

/// The 32-byte secret stored under the metadata `key`, made and stored on first need.
fn stored_secret(snapshot: &Snapshot, store: &Store, key: &str) -> anyhow::Result<[u8; 32]> {
    if let Some(secret) = snapshot
        .meta
        .get(key)
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
    {
        return Ok(secret);
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("No randomness: {e}"))?;
    drop(store.submit(vec![Change::PutMeta(key.into(), secret.to_vec())]));
    Ok(secret)
}

pub(crate) fn encode_record(record: &GrantRecord) -> Vec<u8> {
    postcard::to_stdvec(record).expect("grant records always encode")
}

impl Runtime {
    /// Installs a signed licence file; refusals leave the state untouched.
    pub async fn install_licence(
        self: &Arc<Self>,
        source_name: &str,
        bytes: &[u8],
    ) -> Result<serde_json::Value, (String, Option<Reason>)> {
        let traits = self
            .soft_traits()
            .map_err(|e| (format!("Cannot read machine traits: {e}"), None))?;
        let now = self
            .platform
            .now_ms()
            .map_err(|e| (format!("Cannot read the machine clock: {e}"), None))?;
        let durable = {
            let mut state = self.lock();
            let mut licences = self.lock_licences();
            // Verify on a copy so a refused file cannot touch the live table.
            let mut trial = state.table.clone();
            let installed = licences
                .verify_and_register(source_name, bytes, &traits, &mut trial, now)
                .map_err(|e| {
                    tracing::warn!(error = %e, "Licence refused");
                    (e.to_string(), e.reason())
                })?;
            state.table = trial;
            let mut changes = vec![Change::PutLicence(installed.id.clone(), bytes.to_vec())];
            for view in state.table.items() {
                if view.entry.container == installed.container
                    && let Some(units) = view.entry.units_left
                {
                    changes.push(crate::licences::units_change(
                        &view.entry.container,
                        view.entry.product,
                        units,
                    ));
                }
            }
            let document = serde_json::json!({
                "installed": true, "licence": installed.id, "firm": installed.firm,
                "container": installed.container.to_string(), "state": installed.state,
                "reason": installed.reason.map(|r| r.code()),
            });
            (self.store.submit(changes), document)
        };
        store::wait(durable.0)
            .await
            .map_err(|e| (format!("Licence not saved: {e}"), None))?;
        tracing::info!(source = source_name, "Licence installed");
        // Metered state, expiry and rollback locks of the new items.
        self.refresh_licences().await;
        self.pin_witnesses().await;
        Ok(durable.1)
    }

    /// The machine's identity and traits (`MachineInfo`).
    pub fn machine_info_json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::json!({
            "name": self.platform.machine_name()?,
            "kind": self.platform.kind()?,
            "role": self.role_judge.role(&*self.platform, None)?,
            "traits": self.platform.traits()?,
            "vmgenid": self.platform.vmgenid()?,
            "runtime_id": self.runtime_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote_record(runtime: &str) -> GrantRecord {
        GrantRecord {
            product: ProductKey {
                firm: 10,
                code: 1001,
            },
            station: StationId::machine("vm1"),
            session: WireSession::Console,
            role: MachineRole::Workstation,
            guest: false,
            holder: Holder::Remote {
                runtime: runtime.into(),
                client_handle: 1,
                peer: "127.0.0.1:1".into(),
            },
            via: Via::Table {
                container: String::new(),
            },
            granted_at: 0,
            table_handle: None,
        }
    }

    #[test]
    fn a_client_runtimes_grants_are_found_by_their_runtime_whatever_replaces_them() {
        let mut state = State::default();
        state.insert_grant(1, remote_record("a"));
        state.insert_grant(2, remote_record("a"));
        state.insert_grant(3, remote_record("b"));
        assert_eq!(state.grants_of_runtime("a"), vec![1, 2]);
        // A grant recorded again (a re-claim) for another runtime moves with it.
        state.insert_grant(2, remote_record("b"));
        assert_eq!(state.grants_of_runtime("a"), vec![1]);
        assert_eq!(state.grants_of_runtime("b"), vec![2, 3]);
        // Recorded again for the same runtime, it is still there once.
        state.insert_grant(1, remote_record("a"));
        assert_eq!(state.grants_of_runtime("a"), vec![1]);
        let mut changes = Vec::new();
        state.remove_grant(1, &mut changes);
        assert!(state.grants_of_runtime("a").is_empty());
        assert!(
            !state.remote_handles.contains_key("a"),
            "no empty entry is kept"
        );
        assert_eq!(state.remote_grants_of("b", remote_record("b").product), 2);
    }

    #[test]
    fn handles_are_recorded_a_block_ahead_and_never_reused_after_a_restart() {
        let mut state = State {
            next_handle: 1,
            ..State::default()
        };
        let mut recorded = 0;
        let mut writes = 0;
        for expected in 1..=3000u64 {
            let mut changes = Vec::new();
            let handle = state.allocate_handle(&mut changes);
            assert_eq!(handle, expected);
            for change in changes {
                let Change::PutMeta(key, value) = change else {
                    panic!("{change:?}")
                };
                assert_eq!(key, "next-handle");
                recorded = u64::from_le_bytes(value.try_into().unwrap());
                writes += 1;
            }
            // What a restart would start from is past this handle, by half a block at least.
            assert!(
                recorded > handle + HANDLE_BLOCK / 2,
                "{handle} vs {recorded}"
            );
        }
        // One write per half block, not one per handle.
        assert_eq!(writes, 6);
    }
}
