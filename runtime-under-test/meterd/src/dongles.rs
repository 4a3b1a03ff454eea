//! The dongle manager: finds the dongles attached to the machine, opens a session with each,
//! offers their items through the allocation table, keeps the sessions alive, and takes every
//! licence back when a dongle is removed, rebound elsewhere, locked out or stops answering.
//!
//! Quantity is counted by the allocation table like any other container; each grant is also
//! opened inside the dongle (`Access`, or `DecrementUnits` for pay-per-use items, so units spent
//! live in the dongle's flash and a snapshot revert of this machine cannot give them back).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dongle::{
    DongleIdentity, ItemCounting, LockoutReason, ProductItem, Report, ReportAssembler, Request,
    Response, RuntimeId, Session, SessionError, SigningKey, VerifyingKey, encode_reports,
};
use meter_core::allocation::{AllocationTable, ContainerClass, ContainerId, ItemEntry, ProductKey};
use meter_core::policy::{Allowance, Counting, ItemRules};
use meter_core::reason::Reason;
use tokio::sync::{Notify, mpsc};

use crate::platform::{Platform, UsbEndpoint};
use crate::status_view::{ContainerState, ContainerStatus, DongleDetails, ProductStatus};
use crate::transport::{self, DongleTransport, TransportError};
use crate::weakened::{self, Defence};

/// How often the manager looks for attached and removed dongles. An access looks at once, and a
/// removal is seen at once anyway (the endpoint's connection closes); this bounds how long a
/// plugged dongle waits unseen when nobody asks. (No inotify watch of its own: a machine's
/// platform already holds one, and a user may only have 128.)
pub const SCAN_INTERVAL: Duration = Duration::from_millis(150);
/// How often an open session is kept alive (the dongle's active window is 10 s). This bounds
/// how long a rebind elsewhere goes unnoticed, so it sets the rebind → release delay.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(50);
/// How often a locked-out dongle is asked again whether its lockout is over.
pub const LOCKED_RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// How often a dongle that could not be used (certificate refused, a fault ended its session)
/// is asked again: a vendor trusted since, or a fault that was passing, does not need a re-plug.
pub const REFUSED_RETRY_INTERVAL: Duration = Duration::from_secs(10);
/// A fresh session serves its first grant only this long after the bind, so that another host
/// enumerating the same shared device meanwhile trips the shared-use lockout before any grant.
pub const SHARED_USE_SETTLE: Duration = Duration::from_millis(250);
/// How long the dongle may take to answer one frame.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// A dongle link that failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The transport failed or closed.
    #[error("Dongle transport failed")]
    Transport(#[from] TransportError),
    /// The dongle is gone (unplugged or connection closed).
    #[error("Dongle gone")]
    Gone,
    /// The dongle did not answer in time.
    #[error("Dongle did not answer within {0:?}")]
    Timeout(Duration),
    /// The session protocol failed.
    #[error("Dongle session failed")]
    Session(#[from] SessionError),
}

/// Where one dongle stands, as this runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DongleState {
    /// Connected, handshake not done yet.
    Connecting,
    /// Session open; its items are offered.
    Open,
    /// The dongle refuses this runtime until `until_ms` (dongle time).
    Locked {
        /// `dongle-shared` or `dongle-locked-out`.
        reason: Reason,
        /// End of the lockout, dongle oscillator milliseconds.
        until_ms: u64,
    },
    /// Another runtime bound the dongle.
    BindingBroken,
    /// The dongle is attached but stopped answering; asked again every retry interval.
    Unresponsive,
    /// The dongle could not be used (certificate refused, protocol failure).
    Refused {
        /// The reason code, when one applies.
        reason: Option<Reason>,
        /// What happened.
        message: String,
    },
}

/// The I/O side of one connection to a dongle.
struct LinkIo {
    writer: Box<dyn DongleTransport>,
    reports: mpsc::UnboundedReceiver<Report>,
    assembler: ReportAssembler,
    session: Option<Session>,
    /// The session ended because the dongle left a request unanswered: later calls say so too
    /// (not just "no session"), whoever finds out first.
    timed_out: bool,
}

fn send_frame(writer: &mut Box<dyn DongleTransport>, frame: &[u8]) -> Result<(), LinkError> {
    let reports = encode_reports(frame).map_err(|_| LinkError::Session(SessionError::TooLarge))?;
    for report in &reports {
        writer.send(report)?;
    }
    Ok(())
}

async fn next_frame(
    reports: &mut mpsc::UnboundedReceiver<Report>,
    assembler: &mut ReportAssembler,
) -> Result<Vec<u8>, LinkError> {
    loop {
        let report = tokio::time::timeout(REPLY_TIMEOUT, reports.recv())
            .await
            .map_err(|_| LinkError::Timeout(REPLY_TIMEOUT))?
            .ok_or(LinkError::Gone)?;
        match assembler.push(&report) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "Dropped a bad report from the dongle");
                *assembler = ReportAssembler::new();
            }
        }
    }
}

/// One connection to a dongle: a reader thread feeding reports, and the session on top.
pub struct Link {
    io: tokio::sync::Mutex<LinkIo>,
    closer: Box<dyn DongleTransport>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("transport", &self.closer)
            .finish()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closer.close();
    }
}

impl Link {
    /// Connects a transport; `gone` runs (once) when the dongle disappears.
    pub fn start(
        transport: Box<dyn DongleTransport>,
        gone: impl FnOnce() + Send + 'static,
    ) -> Result<Self, LinkError> {
        let mut reader = transport.try_clone()?;
        let closer = transport.try_clone()?;
        let (sender, reports) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("dongle-reader".into())
            .spawn(move || {
                loop {
                    match reader.receive() {
                        Ok(Some(report)) => {
                            if sender.send(report).is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::debug!(%error, "Dongle transport read failed");
                            break;
                        }
                    }
                }
                drop(sender);
                gone();
            })
            .map_err(|e| LinkError::Transport(TransportError::Io(e)))?;
        Ok(Self {
            io: tokio::sync::Mutex::new(LinkIo {
                writer: transport,
                reports,
                assembler: ReportAssembler::new(),
                session: None,
                timed_out: false,
            }),
            closer,
        })
    }

    /// Opens (or re-opens) a session: the dongle binds to `runtime`, which proves `key`.
    pub async fn hello(
        &self,
        runtime: RuntimeId,
        key: &SigningKey,
        trusted_vendors: Vec<VerifyingKey>,
    ) -> Result<DongleIdentity, LinkError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| {
            LinkError::Transport(TransportError::Io(std::io::Error::other(e.to_string())))
        })?;
        let mut io = self.io.lock().await;
        let LinkIo {
            writer,
            reports,
            assembler,
            session,
            timed_out,
        } = &mut *io;
        *session = None;
        *timed_out = false;
        // Whatever is still in flight belongs to an older session.
        while reports.try_recv().is_ok() {}
        *assembler = ReportAssembler::new();
        let (mut opening, hello) = Session::start(runtime, key, secret, trusted_vendors);
        send_frame(writer, &hello)?;
        let frame = next_frame(reports, assembler).await.inspect_err(|error| {
            *timed_out = matches!(error, LinkError::Timeout(_));
        })?;
        let identity = opening.accept(&frame)?;
        *session = Some(opening);
        Ok(identity)
    }

    /// Opens a session (binding the dongle to `runtime`) and reads the dongle's items: what the
    /// manager does with every dongle it finds.
    pub async fn open(
        &self,
        runtime: RuntimeId,
        key: &SigningKey,
        trusted_vendors: Vec<VerifyingKey>,
    ) -> Result<(DongleIdentity, Vec<ProductItem>), LinkError> {
        let identity = self.hello(runtime, key, trusted_vendors).await?;
        match self.call(&Request::ListItems).await? {
            Response::Items { items, .. } => Ok((identity, items)),
            other => {
                tracing::warn!(serial = %identity.serial, ?other, "Unexpected answer to ListItems");
                Err(LinkError::Session(SessionError::Malformed))
            }
        }
    }

    /// Sends one request in the open session and returns the dongle's answer.
    pub async fn call(&self, request: &Request) -> Result<Response, LinkError> {
        let mut io = self.io.lock().await;
        let LinkIo {
            writer,
            reports,
            assembler,
            session,
            timed_out,
        } = &mut *io;
        let Some(open) = session.as_mut() else {
            if *timed_out {
                return Err(LinkError::Timeout(REPLY_TIMEOUT));
            }
            return Err(LinkError::Session(SessionError::NotOpen));
        };
        let frame = open.request(request)?;
        let outcome = async {
            send_frame(writer, &frame)?;
            loop {
                let reply = next_frame(reports, assembler).await?;
                match open.receive(&reply) {
                    Ok(response) => return Ok(response),
                    Err(error) if !error.is_fatal() => {
                        tracing::debug!(%error, "Ignored a frame from the dongle");
                    }
                    Err(error) => return Err(LinkError::Session(error)),
                }
            }
        }
        .await;
        if let Err(error) = &outcome {
            *session = None;
            *timed_out = matches!(error, LinkError::Timeout(_));
        }
        outcome
    }
}

/// What a dongle that is due for service gets.
enum Retry {
    /// A keepalive in its open session.
    KeepAlive,
    /// A new hello (locked out: is the lockout over?).
    Hello,
    /// A new hello in a task of its own (unresponsive: it may not answer at all).
    HelloAside,
}

/// One dongle attached to this machine.
#[derive(Debug)]
struct Attached {
    endpoint: UsbEndpoint,
    file_id: (u64, u64),
    generation: u64,
    link: Arc<Link>,
    state: DongleState,
    container: ContainerId,
    last_frame: Instant,
    last_hello: Instant,
    opened_at: Instant,
    /// The dongle has answered a hello on this connection (whatever it said).
    answered: bool,
    /// A hello to an unresponsive dongle is under way in a task of its own.
    hello_in_flight: bool,
}

/// The manager's bookkeeping, behind one lock (taken after the runtime's state lock, never before).
#[derive(Debug, Default)]
struct Board {
    attached: BTreeMap<String, Attached>,
    /// Items last read from each dongle (to explain denials while it is locked).
    known_items: HashMap<String, Vec<ProductItem>>,
    /// Lockouts seen per serial: end time and the connection that saw it first.
    seen_lockouts: HashMap<String, (u64, u64)>,
    /// Daemon grant handle → (serial, connection generation, dongle access handle).
    accesses: HashMap<u64, (String, u64, Option<u32>)>,
    next_generation: u64,
}

/// The runtime's dongles.
#[derive(Debug)]
pub struct Dongles {
    board: Mutex<Board>,
    scanning: tokio::sync::Mutex<()>,
    wake: Arc<Notify>,
    gone: mpsc::UnboundedSender<(String, u64)>,
    gone_events: Mutex<Option<mpsc::UnboundedReceiver<(String, u64)>>>,
}

impl Default for Dongles {
    fn default() -> Self {
        Self::new()
    }
}

/// The id this runtime binds dongles under (and dongles keep its witness head under).
pub(crate) fn bind_id<R: DongleOwner>(runtime: &R) -> Option<RuntimeId> {
    let bind_as = if weakened::is(Defence::DongleBinding) {
        // Weakened: every runtime binds under the same id, so the dongle cannot tell them apart.
        "meter-runtime".to_owned()
    } else {
        runtime.runtime_id()
    };
    match RuntimeId::new(bind_as) {
        Ok(id) => Some(id),
        Err(error) => {
            tracing::error!(%error, "This runtime's id cannot bind dongles");
            None
        }
    }
}

/// The key the runtime proves to dongles with its [`bind_id`].
pub(crate) fn bind_key<R: DongleOwner>(runtime: &R) -> SigningKey {
    if weakened::is(Defence::DongleBinding) {
        // Weakened: one key for the one shared id, so the dongle cannot tell runtimes apart.
        return crate::runtime_identity::dongle_key(&[0; 32], "meter-runtime");
    }
    runtime.dongle_key().clone()
}

fn file_id(endpoint: &UsbEndpoint) -> Option<(u64, u64)> {
    std::fs::metadata(&endpoint.path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn container_of(serial: &str) -> ContainerId {
    ContainerId::new(ContainerClass::Dongle, serial)
}

fn item_rules(item: &ProductItem) -> ItemRules {
    ItemRules {
        quantity: item.quantity,
        counting: match item.counting {
            ItemCounting::UserLimit => Counting::UserLimit,
            ItemCounting::StationShare => Counting::StationShare,
            ItemCounting::NoCount => Counting::NoCount,
        },
        virtual_machines: allowance(item.deny_virtual_machines),
        terminal_server: allowance(item.deny_terminal_server),
        expires_at: item.expires_at,
    }
}

/// A vendor switch as the dongle item stores it.
fn allowance(denied: bool) -> Allowance {
    if denied {
        Allowance::Deny
    } else {
        Allowance::Allow
    }
}

/// The vendor keys trusted on this machine (`<state>/trust/<firm>.cert`), by firm.
fn trusted_vendors<R: DongleOwner>(runtime: &R) -> BTreeMap<u32, VerifyingKey> {
    trusted_vendor_keys(runtime.state_dir())
}

/// The vendor keys a meterd state folder trusts: its firm certificates (`trust/<firm>.cert`)
/// that a root this process carries signed, by firm.
pub fn trusted_vendor_keys(state_dir: &Path) -> BTreeMap<u32, VerifyingKey> {
    let trust_dir = state_dir.join("trust");
    let Ok(entries) = std::fs::read_dir(&trust_dir) else {
        return BTreeMap::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            if path.extension()? != "cert" {
                return None;
            }
            let firm: u32 = path.file_stem()?.to_str()?.parse().ok()?;
            match crate::licences::trusted_vendor(&trust_dir, firm) {
                Ok(Some(vendor)) => Some((firm, vendor.signing_key())),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(firm, error = %e, "firm certificate not trusted");
                    None
                }
            }
        })
        .collect()
}

impl Dongles {
    /// A manager with no dongles yet; [`spawn`] starts watching.
    pub fn new() -> Self {
        let (gone, gone_events) = mpsc::unbounded_channel();
        Self {
            board: Mutex::new(Board::default()),
            scanning: tokio::sync::Mutex::new(()),
            wake: Arc::new(Notify::new()),
            gone,
            gone_events: Mutex::new(Some(gone_events)),
        }
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_open_sessions(&self) -> bool {
        self.board()
            .attached
            .values()
            .any(|a| a.state == DongleState::Open)
    }

    /// The links of the dongles whose session is open, by serial.
    pub(crate) fn open_links(&self) -> Vec<(String, Arc<Link>)> {
        self.board()
            .attached
            .iter()
            .filter(|(_, a)| a.state == DongleState::Open)
            .map(|(serial, a)| (serial.clone(), Arc::clone(&a.link)))
            .collect()
    }

    /// The state of one attached dongle, by serial.
    pub fn state(&self, serial: &str) -> Option<DongleState> {
        self.board().attached.get(serial).map(|a| a.state.clone())
    }

    /// Brings the manager up to date before an access: new dongles are opened, removed ones
    /// released, and locked-out ones asked again. A dongle bound by another runtime is not
    /// taken back while it stays attached (that would be shared use); a re-plug opens it again.
    pub async fn before_access<R: DongleOwner>(&self, runtime: &Arc<R>) {
        self.scan(runtime, true).await;
    }

    /// One pass: removals, new endpoints, retries and keepalives.
    async fn scan<R: DongleOwner>(&self, runtime: &Arc<R>, on_demand: bool) {
        let _scanning = self.scanning.lock().await;
        let endpoints = match runtime.platform().usb_endpoints() {
            Ok(endpoints) => endpoints,
            Err(error) => {
                tracing::warn!(%error, "Cannot list USB endpoints");
                return;
            }
        };
        // Removed, or replaced by a new attachment (a re-plug is a new device).
        let removed: Vec<String> = {
            let board = self.board();
            board
                .attached
                .iter()
                .filter(|(serial, attached)| {
                    !endpoints
                        .iter()
                        .any(|e| &e.serial == *serial && file_id(e) == Some(attached.file_id))
                })
                .map(|(serial, _)| serial.clone())
                .collect()
        };
        for serial in removed {
            self.detach(runtime, &serial, None, Reason::DongleRemoved)
                .await;
        }
        for endpoint in endpoints {
            let known = self.board().attached.contains_key(&endpoint.serial);
            if !known {
                self.attach(runtime, endpoint).await;
            }
        }
        self.service(runtime, on_demand).await;
    }

    /// Keeps open sessions alive and asks locked-out and unresponsive dongles again when their
    /// retry is due (an unresponsive one in a task of its own). The caller holds the scanning lock.
    async fn service<R: DongleOwner>(&self, runtime: &Arc<R>, on_demand: bool) {
        // Ticks and frames drift by a little; a session a quarter interval early is due too.
        let keepalive_due = KEEPALIVE_INTERVAL - KEEPALIVE_INTERVAL / 4;
        let now = Instant::now();
        let due: Vec<(String, u64, Retry)> = {
            let board = self.board();
            board
                .attached
                .iter()
                .filter_map(|(serial, a)| match a.state {
                    DongleState::Open if now - a.last_frame >= keepalive_due => {
                        Some((serial.clone(), a.generation, Retry::KeepAlive))
                    }
                    DongleState::Locked { .. }
                        if on_demand || now - a.last_hello >= LOCKED_RETRY_INTERVAL =>
                    {
                        Some((serial.clone(), a.generation, Retry::Hello))
                    }
                    DongleState::Unresponsive
                        if !a.hello_in_flight && now - a.last_hello >= LOCKED_RETRY_INTERVAL =>
                    {
                        Some((serial.clone(), a.generation, Retry::HelloAside))
                    }
                    DongleState::Refused { .. }
                        if !a.hello_in_flight && now - a.last_hello >= REFUSED_RETRY_INTERVAL =>
                    {
                        Some((serial.clone(), a.generation, Retry::HelloAside))
                    }
                    _ => None,
                })
                .collect()
        };
        for (serial, generation, retry) in due {
            match retry {
                Retry::KeepAlive => self.keep_alive(runtime, &serial).await,
                Retry::Hello => self.open_session(runtime, &serial, generation).await,
                Retry::HelloAside => {
                    // The try may wait a whole reply timeout: scans and accesses go on meanwhile.
                    if let Some(attached) = self.board().attached.get_mut(&serial) {
                        attached.hello_in_flight = true;
                    }
                    let runtime = Arc::clone(runtime);
                    tokio::spawn(async move {
                        let dongles = &runtime.dongles();
                        dongles.open_session(&runtime, &serial, generation).await;
                        if let Some(attached) = dongles.board().attached.get_mut(&serial)
                            && attached.generation == generation
                        {
                            attached.hello_in_flight = false;
                        }
                    });
                }
            }
        }
    }

    async fn attach<R: DongleOwner>(&self, runtime: &Arc<R>, endpoint: UsbEndpoint) {
        let Some(id) = file_id(&endpoint) else {
            return;
        };
        let transport = match transport::open(&endpoint) {
            Ok(transport) => transport,
            Err(error) => {
                tracing::debug!(serial = %endpoint.serial, error = %crate::licences::error_chain(&error), "Dongle endpoint not usable");
                return;
            }
        };
        let generation = {
            let mut board = self.board();
            board.next_generation += 1;
            board.next_generation
        };
        let serial = endpoint.serial.clone();
        let gone = self.gone.clone();
        let wake = Arc::clone(&self.wake);
        let gone_serial = serial.clone();
        let link = match Link::start(transport, move || {
            let _ = gone.send((gone_serial, generation));
            wake.notify_one();
        }) {
            Ok(link) => Arc::new(link),
            Err(error) => {
                tracing::warn!(%serial, %error, "Cannot start the dongle link");
                return;
            }
        };
        tracing::info!(%serial, path = %endpoint.path.display(), "Dongle attached");
        let now = Instant::now();
        self.board().attached.insert(
            serial.clone(),
            Attached {
                container: container_of(&serial),
                endpoint,
                file_id: id,
                generation,
                link,
                state: DongleState::Connecting,
                last_frame: now,
                last_hello: now,
                opened_at: now,
                answered: false,
                hello_in_flight: false,
            },
        );
        self.open_session(runtime, &serial, generation).await;
    }

    /// Says hello on connection `generation` and, once bound, offers the dongle's items.
    async fn open_session<R: DongleOwner>(&self, runtime: &Arc<R>, serial: &str, generation: u64) {
        let Some((link, current)) = self.link(serial) else {
            return;
        };
        if current != generation {
            // Re-plugged meanwhile: the new connection says its own hello.
            return;
        }
        let vendors = trusted_vendors(runtime.as_ref());
        let Some(runtime_id) = bind_id(runtime.as_ref()) else {
            return;
        };
        if let Some(attached) = self.board().attached.get_mut(serial) {
            attached.last_hello = Instant::now();
        }
        let started = Instant::now();
        let keys: Vec<VerifyingKey> = vendors.values().copied().collect();
        let opened = link
            .open(runtime_id, &bind_key(runtime.as_ref()), keys)
            .await;
        if matches!(opened, Ok(_) | Err(LinkError::Session(_)))
            && let Some(attached) = self.board().attached.get_mut(serial)
            && attached.generation == generation
        {
            attached.answered = true;
        }
        match opened {
            Ok((identity, items)) => {
                // Only items of firms whose trusted key certified this dongle are offered.
                let items: Vec<ProductItem> = items
                    .into_iter()
                    .filter(|item| vendors.get(&item.firm) == Some(&identity.vendor_key))
                    .collect();
                tracing::info!(
                    serial,
                    items = items.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "Dongle session open"
                );
                self.offer(runtime, serial, generation, items);
            }
            Err(error) => self.failed(runtime, serial, generation, error).await,
        }
    }

    fn link(&self, serial: &str) -> Option<(Arc<Link>, u64)> {
        self.board()
            .attached
            .get(serial)
            .map(|a| (Arc::clone(&a.link), a.generation))
    }

    /// Registers the items of an open dongle in the allocation table.
    fn offer<R: DongleOwner>(
        &self,
        runtime: &Arc<R>,
        serial: &str,
        generation: u64,
        items: Vec<ProductItem>,
    ) {
        let container = container_of(serial);
        runtime.with_table(|table| self.offer_into(table, serial, generation, items, &container));
    }

    /// [`Self::offer`] with the allocation table held.
    fn offer_into(
        &self,
        table: &mut AllocationTable,
        serial: &str,
        generation: u64,
        items: Vec<ProductItem>,
        container: &ContainerId,
    ) {
        let mut board = self.board();
        let Some(attached) = board.attached.get_mut(serial) else {
            return;
        };
        if attached.generation != generation {
            return;
        }
        attached.state = DongleState::Open;
        attached.last_frame = Instant::now();
        attached.opened_at = Instant::now();
        let _ = table.remove_container(container);
        for item in &items {
            table.upsert_item(ItemEntry {
                container: container.clone(),
                product: ProductKey {
                    firm: item.firm,
                    code: item.code,
                },
                name: item.name.clone(),
                rules: crate::weakened::rules(item_rules(item)),
                state: Default::default(),
                units_left: item.units,
            });
        }
        board.known_items.insert(serial.to_owned(), items);
    }

    async fn keep_alive<R: DongleOwner>(&self, runtime: &Arc<R>, serial: &str) {
        let Some((link, generation)) = self.link(serial) else {
            return;
        };
        match link.call(&Request::ReadClock).await {
            Ok(_) => {
                if let Some(attached) = self.board().attached.get_mut(serial) {
                    attached.last_frame = Instant::now();
                }
            }
            Err(error) => self.failed(runtime, serial, generation, error).await,
        }
    }

    /// A session failure: the dongle is gone, locked out, rebound or refused; its licences go.
    async fn failed<R: DongleOwner>(
        &self,
        runtime: &Arc<R>,
        serial: &str,
        generation: u64,
        error: LinkError,
    ) {
        if ignores_failure(&error) {
            tracing::warn!(serial, error = %crate::licences::error_chain(&error), "Weakened: dongle failure ignored");
            return;
        }
        if matches!(error, LinkError::Session(SessionError::NotOpen))
            && self.board().attached.get(serial).is_some_and(|a| {
                a.generation == generation
                    && !matches!(a.state, DongleState::Open | DongleState::Connecting)
            })
        {
            // A concurrent call (keepalive or access) already ended this session and recorded
            // why; "no session" is only the echo of that and must not overwrite the reason.
            return;
        }
        let state = match &error {
            LinkError::Gone | LinkError::Transport(_) => None,
            // An unplug the kernel was slow to report is still a removal.
            LinkError::Timeout(_) if !self.still_attached(runtime, serial, generation) => None,
            LinkError::Timeout(_) => Some(DongleState::Unresponsive),
            LinkError::Session(SessionError::Locked { reason, until_ms }) => {
                Some(DongleState::Locked {
                    reason: self.lockout_reason(serial, generation, *reason, *until_ms),
                    until_ms: *until_ms,
                })
            }
            LinkError::Session(SessionError::BindingBroken) => Some(DongleState::BindingBroken),
            LinkError::Session(session) => Some(DongleState::Refused {
                reason: session.reason_code().and_then(|c| Reason::from_str(c).ok()),
                message: crate::licences::error_chain(session),
            }),
        };
        match state {
            None => {
                tracing::info!(serial, error = %crate::licences::error_chain(&error), "Dongle lost");
                self.detach(runtime, serial, Some(generation), Reason::DongleRemoved)
                    .await;
            }
            Some(new_state) => {
                let reason = match &new_state {
                    DongleState::Locked { reason, .. } => *reason,
                    DongleState::BindingBroken => Reason::BindingBroken,
                    DongleState::Unresponsive => Reason::DongleUnresponsive,
                    DongleState::Refused { reason, .. } => reason.unwrap_or(Reason::DongleRemoved),
                    DongleState::Connecting | DongleState::Open => Reason::DongleRemoved,
                };
                {
                    let mut board = self.board();
                    match board.attached.get_mut(serial) {
                        Some(attached) if attached.generation == generation => {
                            if attached.state != new_state {
                                tracing::warn!(serial, state = ?new_state, "Dongle unusable");
                            }
                            attached.state = new_state;
                        }
                        _ => return,
                    }
                }
                if reason == Reason::DongleUnresponsive
                    && weakened::is(Defence::DongleRemovalRelease)
                {
                    // Weakened: the grants outlive the dongle until their holders end.
                    return;
                }
                self.take_back(runtime, serial, reason).await;
            }
        }
    }

    /// Whether connection `generation`'s endpoint is still among the machine's USB endpoints
    /// (when they cannot be listed, it is taken to be).
    fn still_attached<R: DongleOwner>(
        &self,
        runtime: &Arc<R>,
        serial: &str,
        generation: u64,
    ) -> bool {
        let Some(id) = self
            .board()
            .attached
            .get(serial)
            .filter(|a| a.generation == generation)
            .map(|a| a.file_id)
        else {
            return false;
        };
        match runtime.platform().usb_endpoints() {
            Ok(endpoints) => endpoints
                .iter()
                .any(|e| e.serial == serial && file_id(e) == Some(id)),
            Err(_) => true,
        }
    }

    /// `dongle-shared` when this runtime first meets a shared-use lockout; a lockout already seen
    /// on an earlier connection (the dongle was re-plugged) is just `dongle-locked-out`.
    fn lockout_reason(
        &self,
        serial: &str,
        generation: u64,
        reason: LockoutReason,
        until_ms: u64,
    ) -> Reason {
        let mut board = self.board();
        match board.seen_lockouts.get(serial) {
            Some((until, seen_on)) if *until == until_ms && *seen_on != generation => {
                Reason::DongleLockedOut
            }
            Some((until, _)) if *until == until_ms => {
                Reason::from_str(reason.reason_code()).unwrap_or(Reason::DongleLockedOut)
            }
            _ => {
                board
                    .seen_lockouts
                    .insert(serial.to_owned(), (until_ms, generation));
                Reason::from_str(reason.reason_code()).unwrap_or(Reason::DongleLockedOut)
            }
        }
    }

    /// The dongle went away: forget it and take back its licences.
    async fn detach<R: DongleOwner>(
        &self,
        runtime: &Arc<R>,
        serial: &str,
        generation: Option<u64>,
        reason: Reason,
    ) {
        let keep_grants =
            reason == Reason::DongleRemoved && weakened::is(Defence::DongleRemovalRelease);
        let removed = {
            let mut board = self.board();
            match board.attached.get(serial) {
                Some(a) if generation.is_none_or(|g| g == a.generation) => {
                    board.attached.remove(serial)
                }
                _ => None,
            }
        };
        if let Some(attached) = removed {
            tracing::info!(serial, path = %attached.endpoint.path.display(), %reason, "Dongle detached");
            drop(attached);
            if keep_grants {
                // Weakened: the grants outlive the dongle until their holders end.
                return;
            }
            self.take_back(runtime, serial, reason).await;
        }
    }

    /// Withdraws a dongle's items and revokes every grant taken from it.
    async fn take_back<R: DongleOwner>(&self, runtime: &Arc<R>, serial: &str, reason: Reason) {
        let container = container_of(serial);
        let handles = runtime.withdraw_container(&container);
        {
            let mut board = self.board();
            board.accesses.retain(|_, (s, _, _)| s != serial);
        }
        let started = Instant::now();
        for handle in &handles {
            runtime.revoke(*handle, reason).await;
        }
        if !handles.is_empty() {
            tracing::info!(
                serial,
                %reason,
                revoked = handles.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "Dongle licences taken back"
            );
        }
    }

    /// Opens a table grant inside its dongle (units are spent there); on refusal the grant is
    /// released without telling its holder and the reason returned.
    pub async fn confirm_grant<R: DongleOwner>(
        &self,
        runtime: &Arc<R>,
        handle: u64,
    ) -> Result<(), Reason> {
        let Some((product, container)) = runtime.table_grant(handle) else {
            return Err(Reason::NotHeld);
        };
        let Some(serial) = container.strip_prefix("dongle:").map(str::to_owned) else {
            return Ok(());
        };
        let usable = {
            let board = self.board();
            match board.attached.get(&serial) {
                None => Err(Reason::DongleRemoved),
                Some(attached) if attached.state != DongleState::Open => {
                    Err(state_reason(&attached.state))
                }
                Some(attached) => {
                    let metered = board
                        .known_items
                        .get(&serial)
                        .and_then(|items| {
                            items
                                .iter()
                                .find(|i| i.firm == product.firm && i.code == product.code)
                        })
                        .is_some_and(|item| item.units.is_some());
                    let settle = SHARED_USE_SETTLE.saturating_sub(attached.opened_at.elapsed());
                    Ok((
                        Arc::clone(&attached.link),
                        attached.generation,
                        metered,
                        settle,
                    ))
                }
            }
        };
        let (link, generation, metered, settle) = match usable {
            Ok(usable) => usable,
            Err(reason) => {
                // The table still offered the dongle's items (weakened, or a failure being
                // handled right now): the grant it gave goes back.
                let _ = runtime.release(handle).await;
                return Err(reason);
            }
        };
        if !settle.is_zero() {
            tokio::time::sleep(settle).await;
        }
        // Weakened: units are counted in the runtime's own (revertible) state, not in the dongle.
        let request = if metered && !weakened::is(Defence::DongleCounters) {
            Request::DecrementUnits {
                firm: product.firm,
                code: product.code,
                units: 1,
            }
        } else {
            Request::Access {
                firm: product.firm,
                code: product.code,
            }
        };
        let answer = link.call(&request).await;
        if let Some(attached) = self.board().attached.get_mut(&serial) {
            attached.last_frame = Instant::now();
        }
        match answer {
            Ok(Response::Granted { handle: access, .. }) => {
                self.board()
                    .accesses
                    .insert(handle, (serial, generation, Some(access)));
                Ok(())
            }
            Ok(Response::Units { remaining }) => {
                let container = container_of(&serial);
                let _ = runtime
                    .with_table(|table| table.set_units_left(&container, product, Some(remaining)));
                self.board()
                    .accesses
                    .insert(handle, (serial, generation, None));
                Ok(())
            }
            Ok(Response::Denied(denial)) => {
                if let dongle::Denial::UnitsExhausted { remaining } = denial {
                    let _ = runtime.with_table(|table| {
                        table.set_units_left(&container_of(&serial), product, Some(remaining))
                    });
                }
                let _ = runtime.release(handle).await;
                Err(denial
                    .reason_code()
                    .and_then(|c| Reason::from_str(c).ok())
                    .unwrap_or(Reason::UnknownProduct))
            }
            Ok(other) => {
                tracing::warn!(serial, ?other, "Unexpected answer to an access");
                let _ = runtime.release(handle).await;
                Err(Reason::DongleRemoved)
            }
            Err(error) if ignores_failure(&error) => {
                tracing::warn!(serial, error = %crate::licences::error_chain(&error), "Weakened: grant kept despite the dongle");
                Ok(())
            }
            Err(error) => {
                let _ = runtime.release(handle).await;
                self.failed(runtime, &serial, generation, error).await;
                Err(self
                    .state(&serial)
                    .map_or(Reason::DongleRemoved, |s| state_reason(&s)))
            }
        }
    }

    /// Closes the dongle side of a released grant (in the background).
    pub fn release_grant(&self, handle: u64) {
        let Some((serial, generation, Some(access))) = self.board().accesses.remove(&handle) else {
            return;
        };
        let Some((link, current)) = self.link(&serial) else {
            return;
        };
        if current != generation {
            return;
        }
        tokio::spawn(async move {
            if let Err(error) = link.call(&Request::Release { handle: access }).await {
                tracing::debug!(%serial, %error, "Dongle access not closed");
            }
        });
    }

    /// A better reason than `unknown-product` when the product lives on a dongle that is attached
    /// but unusable (locked out, rebound elsewhere).
    pub fn explain_denial(&self, product: ProductKey, denial: Reason) -> Reason {
        if denial != Reason::UnknownProduct {
            return denial;
        }
        let board = self.board();
        board
            .attached
            .iter()
            .filter(|(_, a)| !matches!(a.state, DongleState::Open | DongleState::Connecting))
            .find(|(serial, _)| {
                // A dongle this runtime never read may hold anything.
                board.known_items.get(*serial).is_none_or(|items| {
                    items
                        .iter()
                        .any(|i| i.firm == product.firm && i.code == product.code)
                })
            })
            .map_or(denial, |(_, a)| state_reason(&a.state))
    }

    /// The dongle containers of `meter status --json`.
    pub fn containers(&self, table: &AllocationTable) -> Vec<ContainerStatus> {
        let views = table.items();
        let board = self.board();
        board
            .attached
            .iter()
            .map(|(serial, a)| {
                let products: Vec<ProductStatus> = views
                    .iter()
                    .filter(|v| v.entry.container == a.container)
                    .map(ProductStatus::from)
                    .collect();
                let (state, reason) = match &a.state {
                    DongleState::Open => (ContainerState::Valid, None),
                    DongleState::Connecting => (ContainerState::Unreachable, None),
                    DongleState::Unresponsive => (
                        ContainerState::Unreachable,
                        Some(Reason::DongleUnresponsive),
                    ),
                    DongleState::Refused { reason, .. } => (ContainerState::Locked, *reason),
                    other => (ContainerState::Locked, Some(state_reason(other))),
                };
                let lockout_until = match a.state {
                    DongleState::Locked { until_ms, .. } => Some(until_ms),
                    _ => None,
                };
                ContainerStatus {
                    kind: "dongle".into(),
                    id: a.container.to_string(),
                    state,
                    reason: reason.map(|r| r.code()),
                    dongle: Some(DongleDetails {
                        serial: serial.clone(),
                        lockout_until,
                        answered: a.answered,
                        endpoint: a.endpoint.path.clone(),
                    }),
                    products,
                }
            })
            .collect()
    }

    /// Ends every session politely (the dongle then counts this runtime as inactive).
    pub async fn close_all(&self) {
        let links: Vec<Arc<Link>> = self
            .board()
            .attached
            .values()
            .filter(|a| a.state == DongleState::Open)
            .map(|a| Arc::clone(&a.link))
            .collect();
        for link in links {
            let _ = tokio::time::timeout(REPLY_TIMEOUT, link.call(&Request::Close)).await;
        }
    }

    /// Folders whose changes mean a dongle may have come or gone.
    fn take_gone_events(&self) -> Option<mpsc::UnboundedReceiver<(String, u64)>> {
        self.gone_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// True when a weakened build shrugs off this session failure (lockout or rebind elsewhere).
fn ignores_failure(error: &LinkError) -> bool {
    match error {
        LinkError::Session(SessionError::Locked {
            reason: LockoutReason::Shared,
            ..
        }) => weakened::is(Defence::DongleSharedDetection),
        LinkError::Session(SessionError::Locked {
            reason: LockoutReason::TooManyRebinds,
            ..
        }) => weakened::is(Defence::DongleRebindLockout),
        LinkError::Session(SessionError::BindingBroken) => {
            weakened::is(Defence::DongleRebindRelease)
        }
        _ => false,
    }
}

fn state_reason(state: &DongleState) -> Reason {
    match state {
        DongleState::Locked { reason, .. } => *reason,
        DongleState::BindingBroken => Reason::BindingBroken,
        DongleState::Unresponsive => Reason::DongleUnresponsive,
        DongleState::Refused { reason, .. } => reason.unwrap_or(Reason::DongleRemoved),
        DongleState::Connecting | DongleState::Open => Reason::DongleRemoved,
    }
}

/// What the dongle service needs from the runtime that owns it.
pub trait DongleOwner: Send + Sync + 'static {
    /// The dongle service itself.
    fn dongles(&self) -> &Dongles;
    /// The machine the runtime runs on (its USB endpoints).
    fn platform(&self) -> &dyn Platform;
    /// The runtime's state folder (trusted vendor keys).
    fn state_dir(&self) -> &Path;
    /// The id the runtime binds dongles under.
    fn runtime_id(&self) -> String;
    /// The key the runtime proves to dongles with that id.
    fn dongle_key(&self) -> &SigningKey;
    /// Runs `f` on the allocation table, under the runtime's lock.
    fn with_table<T>(&self, f: impl FnOnce(&mut AllocationTable) -> T) -> T;
    /// Removes a container's items from the table; the handles of the grants taken from it.
    fn withdraw_container(&self, container: &ContainerId) -> Vec<u64>;
    /// A table grant's product and container text (`None` for a forwarded or unknown one).
    fn table_grant(&self, handle: u64) -> Option<(ProductKey, String)>;
    /// Releases a grant without telling its holder.
    fn release(self: &Arc<Self>, handle: u64) -> impl Future<Output = Result<(), Reason>> + Send;
    /// Takes a grant back and tells its holder why.
    fn revoke(self: &Arc<Self>, handle: u64, reason: Reason) -> impl Future<Output = ()> + Send;
}

/// Opens the dongles attached now, then keeps watching the machine's USB endpoints.
pub async fn start<R: DongleOwner>(runtime: Arc<R>) {
    let Some(mut gone_events) = runtime.dongles().take_gone_events() else {
        return;
    };
    runtime.dongles().scan(&runtime, false).await;
    tokio::spawn(async move {
        let dongles = &runtime.dongles();
        let mut scan_tick = tokio::time::interval(SCAN_INTERVAL);
        let mut keepalive_tick = tokio::time::interval(KEEPALIVE_INTERVAL);
        scan_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = gone_events.recv() => {
                    let Some((serial, generation)) = event else { break };
                    dongles.detach(&runtime, &serial, Some(generation), Reason::DongleRemoved).await;
                }
                () = dongles.wake.notified() => dongles.scan(&runtime, false).await,
                _ = scan_tick.tick() => dongles.scan(&runtime, false).await,
                _ = keepalive_tick.tick() => {
                    if dongles.has_open_sessions() {
                        let _scanning = dongles.scanning.lock().await;
                        dongles.service(&runtime, false).await;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_use_lockout_is_dongle_shared_until_met_again_after_a_replug() {
        let dongles = Dongles::new();
        let shared =
            |generation| dongles.lockout_reason("7", generation, LockoutReason::Shared, 5_000);
        assert_eq!(shared(1), Reason::DongleShared);
        assert_eq!(shared(1), Reason::DongleShared);
        assert_eq!(shared(2), Reason::DongleLockedOut);
        // A later lockout (another end time) is news again.
        assert_eq!(
            dongles.lockout_reason("7", 3, LockoutReason::Shared, 9_000),
            Reason::DongleShared
        );
        assert_eq!(
            dongles.lockout_reason("8", 1, LockoutReason::TooManyRebinds, 5_000),
            Reason::DongleLockedOut
        );
    }

    #[test]
    fn denials_are_left_alone_without_an_unusable_dongle() {
        let dongles = Dongles::new();
        let product = ProductKey {
            firm: 10,
            code: 2001,
        };
        assert_eq!(
            dongles.explain_denial(product, Reason::UnknownProduct),
            Reason::UnknownProduct
        );
        assert_eq!(
            dongles.explain_denial(product, Reason::QuantityExhausted),
            Reason::QuantityExhausted
        );
    }
}
