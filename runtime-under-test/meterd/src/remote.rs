//! Client side of the network protocol: links to the servers this runtime forwards accesses to.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use meter_core::reason::Reason;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::frame;
use crate::platform::Platform;
use crate::protocol::{Claim, FromServer, ToServer};
use crate::tls;

/// How long a forwarded request may take before the server counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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

#[derive(Debug)]
struct RemoteServer {
    addr: String,
    pin: [u8; 32],
    link: Mutex<Option<Link>>,
    connected: AtomicBool,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Cuts a reconnect back-off short (an access is waiting for the link).
    wake: tokio::sync::Notify,
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
}

/// The network servers this runtime forwards to.
#[derive(Debug)]
pub struct Remotes {
    servers: Mutex<Vec<Arc<RemoteServer>>>,
    next_request: AtomicU64,
}

impl Remotes {
    /// No servers yet.
    pub fn new(_runtime_id: String) -> Self {
        Remotes {
            servers: Mutex::new(Vec::new()),
            next_request: AtomicU64::new(1),
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

    /// Configured servers with their pins (hex), for persisting.
    pub fn config(&self) -> Vec<(String, String)> {
        self.servers()
            .iter()
            .map(|s| (s.addr.clone(), hex::encode(s.pin)))
            .collect()
    }

    /// Adds a server (replacing one with the same address) and starts linking to it.
    pub fn add<R: LinkOwner>(&self, runtime: &Arc<R>, addr: String, pin: [u8; 32]) {
        self.remove(&addr);
        let server = Arc::new(RemoteServer {
            addr,
            pin,
            link: Mutex::new(None),
            connected: AtomicBool::new(false),
            task: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
        });
        let task = tokio::spawn(keep_linked(Arc::downgrade(runtime), Arc::clone(&server)));
        *server.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(server);
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
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let link = server.link.lock().unwrap_or_else(|e| e.into_inner());
            let link = link.as_ref()?;
            link.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(request, tx);
            link.outbound.send(make(request)).ok()?;
        }
        tokio::time::timeout(REQUEST_TIMEOUT, rx).await.ok()?.ok()
    }

    /// Asks each server in turn; the first grant wins, else the most telling denial.
    pub async fn access(&self, claim: Claim) -> Result<Forwarded, Reason> {
        let mut denial = Reason::ServerUnreachable;
        for server in self.servers() {
            wait_for_link(&server).await;
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

/// Connects to a server over TLS with its pinned certificate, from `local` if given.
pub async fn connect(
    addr: &str,
    pin: [u8; 32],
    local: Option<IpAddr>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
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
    secure(tcp, pin).await
}

/// Opens TLS on a connected stream to a server, checking its pinned certificate.
pub async fn secure(
    tcp: TcpStream,
    pin: [u8; 32],
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = TlsConnector::from(tls::client_config(pin)?);
    Ok(connector.connect(tls::server_name(), tcp).await?)
}

async fn keep_linked<R: LinkOwner>(runtime: Weak<R>, server: Arc<RemoteServer>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(rt) = runtime.upgrade() else { return };
        match run_link(&rt, &server).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::debug!(server = %server.addr, error = %e, "Server link down"),
        }
        server.connected.store(false, Ordering::Relaxed);
        drop(rt);
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = server.wake.notified() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn run_link<R: LinkOwner>(
    runtime: &Arc<R>,
    server: &Arc<RemoteServer>,
) -> anyhow::Result<()> {
    let local = runtime.platform().address().ok().flatten();
    let stream = connect(&server.addr, server.pin, local).await?;
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
    let welcome: FromServer =
        tokio::time::timeout(REQUEST_TIMEOUT, frame::recv(&mut framed)).await??;
    let FromServer::Welcome {
        restored,
        lost,
        keepalive_ms,
    } = welcome
    else {
        anyhow::bail!("Server did not welcome us");
    };
    runtime.reconciled(&server.addr, restored, lost).await;
    tracing::info!(server = %server.addr, "Linked to server");
    let (outbound, mut outbound_rx) = mpsc::unbounded_channel();
    let pending: Pending = Arc::default();
    *server.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(Link {
        outbound,
        pending: Arc::clone(&pending),
    });
    server.connected.store(true, Ordering::Relaxed);
    let (mut sink, mut stream) = framed.split();
    let interval = Duration::from_millis((keepalive_ms / 3).max(20));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: anyhow::Result<()> = async {
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
                    frame::send(&mut sink, &ToServer::Keepalive).await?;
                }
                incoming = stream.next() => {
                    let Some(incoming) = incoming else { anyhow::bail!("Server closed the link") };
                    let message: FromServer = frame::decode(&incoming?)?;
                    match message {
                        FromServer::Granted { request, .. }
                        | FromServer::Denied { request, .. }
                        | FromServer::Released { request }
                        | FromServer::Witnessed { request, .. }
                        | FromServer::WitnessChain { request, .. } => {
                            let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&request);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(message);
                            }
                        }
                        FromServer::Revoked { handle, reason } => {
                            runtime.forwarded_lost(&server.addr, handle, reason).await;
                        }
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
