//! Client side of the network protocol: links to the servers this runtime forwards accesses to.
//!
//! A grant from a server is a lease. The client renews it with keepalives the server answers;
//! each answer extends the lease to the keepalive's *send* time plus the window less a margin
//! ([`lease_margin`]). The server's own deadline is the *receipt* of the client's last frame plus
//! the window, so the client's lease always ends first: a client cut off revokes what it holds
//! (`server-unreachable`) before the server can give the seats to anyone else.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meter_core::reason::Reason;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::frame;
use crate::platform::Platform;
use crate::protocol::{Claim, FromServer, ToServer};
use crate::tls::{self, Identity};

/// How long a forwarded request may take before the server counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting, TLS and the welcome may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How much earlier than the server's deadline a client's lease ends: a tenth of the window,
/// between 50 ms and 1 s. Both ends time the window on their own monotonic clocks, whose rates
/// differ by well under 0.1 % (a few ms over any window this side of a minute), and the client
/// starts timing before the server does (at send, not at receipt), so the margin covers drift
/// with room to spare.
pub fn lease_margin(window: Duration) -> Duration {
    (window / 10).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// A grant obtained from a network server.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The server, `addr:port`.
    pub server: String,
    /// The server's handle.
    pub server_handle: u64,
    /// The server's container, prefixed `remote:` by nothing: as the server names it.
    pub container: String,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<FromServer>>>>;

#[derive(Debug)]
struct Link {
    outbound: mpsc::UnboundedSender<ToServer>,
    pending: Pending,
}

/// One address a server answers at (a triad has three).
#[derive(Debug)]
struct Endpoint {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    pin: [u8; 32],
}

/// A network server: one, or a triad of three members of which the leader serves. Grants,
/// claims and the lease belong to the server as a whole, so they survive a change of leader.
#[derive(Debug)]
struct RemoteServer {
    /// Its name: its address, or its members' separated by commas.
    addr: String,
    endpoints: Vec<Endpoint>,
    /// The endpoint linked to or tried next.
    current: std::sync::atomic::AtomicUsize,
    link: Mutex<Option<Link>>,
    connected: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Cuts a reconnect back-off short (an access is waiting for the link).
    wake: tokio::sync::Notify,
    /// When the lease on this server's grants ends unless renewed; `None` when there is none.
    lease: Mutex<Option<Instant>>,
    /// Why the server refused this runtime's hello last time, if it did.
    refused: Mutex<Option<Reason>>,
    next_request: AtomicU64,
}

impl RemoteServer {
    fn endpoint(&self) -> &Endpoint {
        &self.endpoints[self.current.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    /// Moves on to the next member of a triad (its leader may be another); false for a lone
    /// server.
    fn next_endpoint(&self) -> bool {
        if self.endpoints.len() < 2 {
            return false;
        }
        self.current.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn lease_end(&self) -> Option<Instant> {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Extends the lease to `until` (never shortens it).
    fn extend_lease(&self, until: Instant) {
        let mut lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        if lease.is_none_or(|end| end < until) {
            *lease = Some(until);
        }
    }

    fn refusal(&self) -> Option<Reason> {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_refusal(&self, reason: Option<Reason>) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }
}

/// What a server link needs from the runtime it forwards for.
pub trait LinkOwner: Send + Sync + 'static {
    /// The machine the runtime runs on (the address to connect from, the machine name).
    fn platform(&self) -> &dyn Platform;
    /// The runtime's id, sent in `Hello`.
    fn runtime_id(&self) -> String;
    /// The claims this runtime holds on `server` (sent on reconnect).
    fn claims_for(&self, server: &str) -> Vec<Claim>;
    /// After a reconnect: records the new server handles and revokes the lost grants.
    fn reconciled(
        self: &Arc<Self>,
        server: &str,
        restored: Vec<(u64, u64)>,
        lost: Vec<(u64, Reason)>,
    ) -> impl Future<Output = ()> + Send;
    /// Revokes a grant the server no longer honours.
    fn forwarded_lost(
        self: &Arc<Self>,
        server: &str,
        server_handle: u64,
        reason: Reason,
    ) -> impl Future<Output = ()> + Send;
    /// The lease on `server` ended: revokes every grant forwarded to it.
    fn lease_lapsed(self: &Arc<Self>, server: &str) -> impl Future<Output = ()> + Send;
}

/// The network servers this runtime forwards to.
#[derive(Debug)]
pub struct Remotes {
    servers: Mutex<Vec<Arc<RemoteServer>>>,
    identity: Identity,
}

impl Remotes {
    /// No servers yet; links authenticate as `identity`.
    pub fn new(identity: Identity) -> Self {
        Remotes {
            servers: Mutex::new(Vec::new()),
            identity,
        }
    }

    fn servers(&self) -> Vec<Arc<RemoteServer>> {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when no server is configured.
    pub fn is_empty(&self) -> bool {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Configured servers and whether each is connected.
    pub fn list(&self) -> Vec<(String, bool)> {
        self.servers()
            .iter()
            .map(|s| (s.addr.clone(), s.connected.load(Ordering::Relaxed)))
            .collect()
    }

    /// Configured servers with their pins (hex, comma-separated for a triad), for persisting.
    pub fn config(&self) -> Vec<(String, String)> {
        self.servers()
            .iter()
            .map(|s| {
                let pins: Vec<String> = s.endpoints.iter().map(|e| hex::encode(e.pin)).collect();
                (s.addr.clone(), pins.join(","))
            })
            .collect()
    }

    /// Adds a server (replacing one with the same address) and starts linking to it: `addr`
    /// is one `addr:port`, or a triad's three separated by commas with a pin for each.
    pub fn add<R: LinkOwner>(
        &self,
        runtime: &Arc<R>,
        addr: String,
        pins: Vec<[u8; 32]>,
    ) -> Result<(), RemotesError> {
        let addrs: Vec<&str> = addr.split(',').map(str::trim).collect();
        if addrs.len() != pins.len() {
            return Err(RemotesError::PinCount {
                addrs: addrs.len(),
                pins: pins.len(),
            });
        }
        if addrs.len() != 1 && addrs.len() != 3 {
            return Err(RemotesError::Members(addrs.len()));
        }
        let endpoints = addrs
            .iter()
            .zip(pins)
            .map(|(addr, pin)| {
                Ok(Endpoint {
                    addr: (*addr).to_owned(),
                    tls: tls::client_config(pin, &self.identity)?,
                    pin,
                })
            })
            .collect::<Result<Vec<_>, tls::TlsError>>()
            .map_err(RemotesError::Tls)?;
        self.remove(&addr);
        let server = Arc::new(RemoteServer {
            addr,
            endpoints,
            current: std::sync::atomic::AtomicUsize::new(0),
            link: Mutex::new(None),
            connected: AtomicBool::new(false),
            task: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            lease: Mutex::new(None),
            refused: Mutex::new(None),
            next_request: AtomicU64::new(1),
        });
        let task = tokio::spawn(keep_linked(Arc::downgrade(runtime), Arc::clone(&server)));
        *server.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(server);
        Ok(())
    }

    /// Removes a server; returns false if it was not configured.
    pub fn remove(&self, addr: &str) -> bool {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let before = servers.len();
        servers.retain(|s| {
            if s.addr == addr {
                if let Some(task) = s.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    task.abort();
                }
                false
            } else {
                true
            }
        });
        servers.len() != before
    }

    async fn request(
        &self,
        server: &RemoteServer,
        make: impl FnOnce(u64) -> ToServer,
    ) -> Option<FromServer> {
        let request = server.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let pending = {
            let link = server.link.lock().unwrap_or_else(|e| e.into_inner());
            let link = link.as_ref()?;
            link.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(request, tx);
            link.outbound.send(make(request)).ok()?;
            Arc::clone(&link.pending)
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, rx).await;
        // A request that timed out leaves nothing behind (a late grant is given back when it
        // arrives: see `run_link`).
        pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request);
        answer.ok()?.ok()
    }

    /// Asks each server in turn; the first grant wins, else the most telling denial.
    pub async fn access(&self, claim: Claim) -> Result<Forwarded, Reason> {
        let mut denial = Reason::ServerUnreachable;
        for server in self.servers() {
            wait_for_link(&server).await;
            if !server.connected.load(Ordering::Relaxed)
                && let Some(refusal) = server.refusal()
                && denial == Reason::ServerUnreachable
            {
                denial = refusal;
                continue;
            }
            let answer = self
                .request(&server, |request| ToServer::Access {
                    request,
                    claim: claim.clone(),
                })
                .await;
            match answer {
                Some(FromServer::Granted {
                    handle, container, ..
                }) => {
                    return Ok(Forwarded {
                        server: server.addr.clone(),
                        server_handle: handle,
                        container,
                    });
                }
                Some(FromServer::Denied { reason, .. })
                    if denial == Reason::ServerUnreachable || denial == Reason::UnknownProduct =>
                {
                    denial = reason;
                }
                _ => {}
            }
        }
        Err(denial)
    }

    /// The servers linked now, with the certificate pin (hex) of the member linked to.
    pub fn connected_pins(&self) -> Vec<(String, String)> {
        self.servers()
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .map(|s| (s.addr.clone(), hex::encode(s.endpoint().pin)))
            .collect()
    }

    /// The addresses of the servers linked now.
    pub fn connected(&self) -> Vec<String> {
        self.servers()
            .iter()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .map(|s| s.addr.clone())
            .collect()
    }

    /// Sends one request to one server; its answer, `None` when it cannot be asked or is silent.
    pub(crate) async fn ask(
        &self,
        server: &str,
        make: impl FnOnce(u64) -> ToServer,
    ) -> Option<FromServer> {
        let remote = self.servers().into_iter().find(|s| s.addr == server)?;
        self.request(&remote, make).await
    }

    /// Sends one request to every connected server; the answers, by server address.
    pub(crate) async fn ask_all(
        &self,
        make: impl Fn(u64) -> ToServer,
    ) -> Vec<(String, FromServer)> {
        let mut answers = Vec::new();
        for server in self.servers() {
            if let Some(answer) = self.request(&server, &make).await {
                answers.push((server.addr.clone(), answer));
            }
        }
        answers
    }

    /// Releases a grant on its server (best effort: a lost link releases it anyway).
    pub async fn release(&self, server: &str, server_handle: u64) {
        let Some(remote) = self.servers().into_iter().find(|s| s.addr == server) else {
            return;
        };
        if !remote.connected.load(Ordering::Relaxed) {
            // The next hello does not claim it, so the server releases it then (or its lease
            // runs out first).
            tracing::debug!(server, server_handle, "Released while the link is down");
            return;
        }
        if self
            .request(&remote, |request| ToServer::Release {
                request,
                handle: server_handle,
            })
            .await
            .is_none()
        {
            tracing::warn!(server, server_handle, "Release not confirmed by server");
        }
    }
}

/// Why a server cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum RemotesError {
    /// Not one pin per address.
    #[error("{addrs} addresses but {pins} pins: give one pin per address")]
    PinCount {
        /// Addresses given.
        addrs: usize,
        /// Pins given.
        pins: usize,
    },
    /// A server is one address, or a triad's three.
    #[error("A server is one address or a triad of three, not {0}")]
    Members(usize),
    /// A pin cannot make a TLS configuration.
    #[error("Cannot set up TLS for the server")]
    Tls(#[source] tls::TlsError),
}

/// Reads pins (hex SHA-256) separated by commas.
pub fn parse_pins(text: &str) -> Result<Vec<[u8; 32]>, tls::TlsError> {
    text.split(',')
        .map(|pin| tls::parse_pin(pin.trim()))
        .collect()
}

/// How long an access waits for a link that is down to come back before the server counts as
/// unreachable.
const LINK_WAIT: Duration = Duration::from_millis(1500);

/// Waits briefly for a server's link when it is down, retrying at once rather than after the
/// back-off (the network may just have come back).
async fn wait_for_link(server: &RemoteServer) {
    if server.connected.load(Ordering::Relaxed) {
        return;
    }
    server.wake.notify_one();
    let deadline = tokio::time::Instant::now() + LINK_WAIT;
    while !server.connected.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects to a server over TLS with its pinned certificate, from `local` if given,
/// authenticating as `identity`.
pub async fn connect(
    addr: &str,
    pin: [u8; 32],
    identity: &Identity,
    local: Option<IpAddr>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = connect_tcp(addr, local).await?;
    secure(tcp, pin, identity).await
}

async fn connect_tcp(addr: &str, local: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let target: SocketAddr = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("No address for {addr}"))?;
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(local) = local
        && local.is_ipv4() == target.is_ipv4()
        && let Err(e) = socket.bind(SocketAddr::new(local, 0))
    {
        tracing::debug!(%local, error = %e, "Cannot bind the machine address, using any");
    }
    let tcp = socket.connect(target).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Opens TLS on a connected stream to a server, checking its pinned certificate and
/// authenticating as `identity`.
pub async fn secure(
    tcp: TcpStream,
    pin: [u8; 32],
    identity: &Identity,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = TlsConnector::from(tls::client_config(pin, identity)?);
    Ok(connector.connect(tls::server_name(), tcp).await?)
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
enum LinkEnd {
    /// The lease ran out before the server renewed it.
    #[error("Lease on the server's grants ran out")]
    LeaseLapsed,
    /// The server refused this runtime.
    #[error("Server refused this runtime ({0})")]
    Refused(Reason),
    /// Anything else: the connection failed or closed.
    #[error(transparent)]
    Broken(#[from] anyhow::Error),
}

impl From<frame::FrameError> for LinkEnd {
    fn from(e: frame::FrameError) -> Self {
        LinkEnd::Broken(e.into())
    }
}

impl From<std::io::Error> for LinkEnd {
    fn from(e: std::io::Error) -> Self {
        LinkEnd::Broken(e.into())
    }
}

/// Sleeps until `deadline`, or for ever when there is none.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn keep_linked<R: LinkOwner>(runtime: Weak<R>, server: Arc<RemoteServer>) {
    let mut backoff = Duration::from_millis(100);
    // A triad's back-off after a whole round of its members, doubling to 400 ms.
    let mut round_backoff = Duration::from_millis(20);
    loop {
        let Some(rt) = runtime.upgrade() else { return };
        let ended = run_link(&rt, &server).await;
        server.connected.store(false, Ordering::Relaxed);
        match ended {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                round_backoff = Duration::from_millis(20);
            }
            // A triad member that does not lead (or is down): try the next one at once, and
            // back off only after a round of all three.
            Err(e) if server.next_endpoint() => {
                tracing::debug!(server = %server.addr, error = %e, "Triad member not serving; trying the next");
                // A refusal of this runtime itself (not "ask the leader") is kept for accesses.
                if let LinkEnd::Refused(reason) = &e
                    && *reason != Reason::ServerUnreachable
                {
                    server.set_refusal(Some(*reason));
                }
                let round = server
                    .current
                    .load(Ordering::Relaxed)
                    .is_multiple_of(server.endpoints.len());
                backoff = if round {
                    round_backoff = (round_backoff * 2).min(Duration::from_millis(400));
                    round_backoff
                } else {
                    Duration::from_millis(20)
                };
            }
            Err(LinkEnd::Refused(reason)) => {
                tracing::warn!(server = %server.addr, %reason, "Server refused this runtime");
                server.set_refusal(Some(reason));
            }
            Err(e) => tracing::debug!(server = %server.addr, error = %e, "Server link down"),
        }
        // While the link is down the lease still runs out on time.
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = server.wake.notified() => {}
            () = until(server.lease_end()) => {}
        }
        if server.lease_end().is_some_and(|end| end <= Instant::now()) {
            *server.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
            rt.lease_lapsed(&server.addr).await;
        }
        drop(rt);
        if server.endpoints.len() == 1 {
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

async fn run_link<R: LinkOwner>(
    runtime: &Arc<R>,
    server: &Arc<RemoteServer>,
) -> Result<(), LinkEnd> {
    let local = runtime.platform().address().ok().flatten();
    // Connecting may not outlast the lease: a lapsed lease is acted on at once.
    let deadline = match server.lease_end() {
        Some(end) => end.min(Instant::now() + CONNECT_TIMEOUT),
        None => Instant::now() + CONNECT_TIMEOUT,
    };
    let hello_sent = Instant::now();
    let welcome = tokio::time::timeout_at(deadline, async {
        let endpoint = server.endpoint();
        let tcp = connect_tcp(&endpoint.addr, local).await?;
        let connector = TlsConnector::from(Arc::clone(&endpoint.tls));
        let stream = connector.connect(tls::server_name(), tcp).await?;
        let mut framed = frame::framed(stream);
        let machine = runtime.platform().machine_name()?;
        let claims = runtime.claims_for(&server.addr);
        frame::send(
            &mut framed,
            &ToServer::Hello {
                runtime: runtime.runtime_id(),
                machine,
                claims,
            },
        )
        .await?;
        let welcome: FromServer = frame::recv(&mut framed).await?;
        Ok::<_, anyhow::Error>((framed, welcome))
    })
    .await;
    let (framed, welcome) = match welcome {
        Ok(result) => result?,
        Err(_) if server.lease_end().is_some_and(|end| end <= Instant::now()) => {
            return Err(LinkEnd::LeaseLapsed);
        }
        Err(_) => return Err(anyhow::anyhow!("Server did not welcome us in time").into()),
    };
    let (restored, lost, window) = match welcome {
        FromServer::Welcome {
            restored,
            lost,
            keepalive_ms,
        } => (restored, lost, Duration::from_millis(keepalive_ms.max(1))),
        FromServer::Refused { reason } => return Err(LinkEnd::Refused(reason)),
        _ => return Err(anyhow::anyhow!("Server did not welcome us").into()),
    };
    server.set_refusal(None);
    let margin = lease_margin(window);
    server.extend_lease(hello_sent + window.saturating_sub(margin));
    runtime.reconciled(&server.addr, restored, lost).await;
    tracing::info!(server = %server.addr, "Linked to server");
    let (outbound, mut outbound_rx) = mpsc::unbounded_channel();
    let pending: Pending = Arc::default();
    *server.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(Link {
        outbound: outbound.clone(),
        pending: Arc::clone(&pending),
    });
    server.connected.store(true, Ordering::Relaxed);
    let (mut sink, mut stream) = framed.split();
    let interval = (window / 3).max(Duration::from_millis(20));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A triad member that leaves a keepalive unanswered this long is left for the next one
    // (it may be cut off from the others, or gone): well before the lease ends, so the runtime
    // re-claims its grants from the new leader in time.
    let triad = server.endpoints.len() > 1;
    let stall = window / 4;
    let mut stall_check = tokio::time::interval((window / 10).max(Duration::from_millis(10)));
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Keepalives not yet answered: (sequence number, send time).
    let mut unanswered: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut seq = 0u64;
    let result: Result<(), LinkEnd> = async {
        loop {
            tokio::select! {
                out = outbound_rx.recv() => {
                    let Some(out) = out else { return Ok(()) };
                    sink.feed(frame::encode(&out)?).await?;
                    while let Ok(more) = outbound_rx.try_recv() {
                        sink.feed(frame::encode(&more)?).await?;
                    }
                    sink.flush().await?;
                }
                _ = ticker.tick() => {
                    seq += 1;
                    unanswered.push_back((seq, Instant::now()));
                    if unanswered.len() > 64 {
                        unanswered.pop_front();
                    }
                    frame::send(&mut sink, &ToServer::Keepalive { seq }).await?;
                }
                () = until(server.lease_end()) => {
                    if server.lease_end().is_some_and(|end| end <= Instant::now()) {
                        return Err(LinkEnd::LeaseLapsed);
                    }
                }
                _ = stall_check.tick(), if triad => {
                    if unanswered.front().is_some_and(|(_, sent)| sent.elapsed() > stall) {
                        return Err(anyhow::anyhow!("Triad member stopped answering keepalives").into());
                    }
                }
                incoming = stream.next() => {
                    let Some(incoming) = incoming else {
                        return Err(anyhow::anyhow!("Server closed the link").into());
                    };
                    let message: FromServer = frame::decode(&incoming?)?;
                    match message {
                        FromServer::KeepaliveAck { seq: answered } => {
                            while let Some((s, sent)) = unanswered.front().copied() {
                                if s > answered {
                                    break;
                                }
                                unanswered.pop_front();
                                if s == answered {
                                    server.extend_lease(sent + window.saturating_sub(margin));
                                }
                            }
                        }
                        FromServer::Granted { request, handle, .. } => {
                            let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&request);
                            match waiter {
                                Some(waiter) => {
                                    if let Err(FromServer::Granted { handle, .. }) = waiter.send(message) {
                                        give_back(server, &outbound, handle);
                                    }
                                }
                                // Nobody waits any more (the request timed out): give it back.
                                None => give_back(server, &outbound, handle),
                            }
                        }
                        FromServer::Denied { request, .. }
                        | FromServer::Released { request }
                        | FromServer::Witnessed { request, .. }
                        | FromServer::WitnessChain { request, .. } => {
                            let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&request);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(message);
                            }
                        }
                        FromServer::Revoked { handle, reason } => {
                            // In a task of its own: giving the grant back asks the server
                            // through this very link.
                            let runtime = Arc::clone(runtime);
                            let addr = server.addr.clone();
                            tokio::spawn(async move {
                                runtime.forwarded_lost(&addr, handle, reason).await;
                            });
                        }
                        // A triad member that stopped leading sends its stations to the leader.
                        FromServer::Refused { reason } => return Err(LinkEnd::Refused(reason)),
                        FromServer::Welcome { .. } => {}
                    }
                }
            }
        }
    }
    .await;
    *server.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    result
}

/// Releases a grant the server made for a request nobody waits for any more.
fn give_back(server: &RemoteServer, outbound: &mpsc::UnboundedSender<ToServer>, handle: u64) {
    tracing::info!(server = %server.addr, handle, "Late grant given back");
    let request = server.next_request.fetch_add(1, Ordering::Relaxed);
    let _ = outbound.send(ToServer::Release { request, handle });
}
