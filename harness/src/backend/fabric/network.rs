//! Network links: a TCP relay per (client machine, server) pair, for every driver.
//!
//! Each client runtime talks to a server through its own relay. The relay connects to the server
//! from the client machine's loopback address, so the server sees a distinct peer per machine,
//! and it can cut the link (partition) by dropping traffic while keeping connections open, which
//! is what a broken network looks like to keepalives.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

use crate::backend::types::BackendError;

/// A relay from one client machine to one server.
pub struct Relay {
    /// Address clients connect to.
    pub local: SocketAddr,
    /// Client machine name.
    pub client: String,
    /// Server machine name.
    pub server: String,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    /// Starts a relay that reaches `target` from `source_ip`.
    pub fn start(
        client: &str,
        server: &str,
        source_ip: Ipv4Addr,
        target: SocketAddr,
    ) -> Result<Relay, BackendError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(BackendError::io("bind a relay"))?;
        let local = listener
            .local_addr()
            .map_err(BackendError::io("relay address"))?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        {
            let cut = Arc::clone(&cut);
            let stop = Arc::clone(&stop);
            let connections = Arc::clone(&connections);
            std::thread::spawn(move || {
                for incoming in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(inbound) = incoming else { continue };
                    if cut.load(Ordering::SeqCst) {
                        // A cut link: the connection attempt goes nowhere.
                        hold_silently(inbound, &connections);
                        continue;
                    }
                    match connect_from(source_ip, target) {
                        Ok(outbound) => pipe(inbound, outbound, &cut, &connections),
                        Err(e) => {
                            tracing::debug!("relay cannot reach {target}: {e}");
                            let _ = inbound.shutdown(Shutdown::Both);
                        }
                    }
                }
            });
        }
        Ok(Relay {
            local,
            client: client.to_string(),
            server: server.to_string(),
            cut,
            stop,
            connections,
        })
    }

    /// Cuts or restores the link. Restoring closes the connections that lived through the cut,
    /// so both ends reconnect instead of reading a broken stream.
    pub fn set_cut(&self, cut: bool) {
        let was = self.cut.swap(cut, Ordering::SeqCst);
        if was && !cut {
            self.close_all();
        }
    }

    fn close_all(&self) {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        for stream in connections.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Stops the relay and closes its connections.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.close_all();
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(100));
    }
}

/// The world's relays, one per (client machine, server) pair.
#[derive(Default)]
pub struct Links(Vec<Relay>);

impl Links {
    /// Starts the relay from `client` (at `source_ip`) to `server` at `target` unless there is
    /// one; true when it is new.
    pub fn connect(
        &mut self,
        client: &str,
        server: &str,
        source_ip: Ipv4Addr,
        target: SocketAddr,
    ) -> Result<bool, BackendError> {
        if self
            .0
            .iter()
            .any(|r| r.client == client && r.server == server)
        {
            return Ok(false);
        }
        self.0
            .push(Relay::start(client, server, source_ip, target)?);
        Ok(true)
    }

    /// The relays a client machine reaches servers through.
    pub fn of_client<'a>(&'a self, client: &'a str) -> impl Iterator<Item = &'a Relay> + 'a {
        self.0.iter().filter(move |r| r.client == client)
    }

    /// Stops every relay to `server`.
    pub fn drop_to(&mut self, server: &str) {
        let relays = std::mem::take(&mut self.0);
        let (gone, kept): (Vec<Relay>, Vec<Relay>) =
            relays.into_iter().partition(|r| r.server == server);
        self.0 = kept;
        for relay in gone {
            relay.stop();
        }
    }

    /// Cuts every link between a machine of `a` and one of `b`.
    pub fn partition(&self, a: &[String], b: &[String]) {
        for relay in &self.0 {
            let crosses = (a.contains(&relay.client) && b.contains(&relay.server))
                || (b.contains(&relay.client) && a.contains(&relay.server));
            if crosses {
                relay.set_cut(true);
            }
        }
    }

    /// Restores the cut links touching `machines` (every link when empty).
    pub fn heal(&self, machines: &[String]) {
        for relay in &self.0 {
            let touches = machines.is_empty()
                || machines.contains(&relay.client)
                || machines.contains(&relay.server);
            if touches {
                relay.set_cut(false);
            }
        }
    }

    /// Stops every relay.
    pub fn stop_all(&mut self) {
        for relay in self.0.drain(..) {
            relay.stop();
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn connect_from(source_ip: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source_ip, 0)).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(2))?;
    Ok(socket.into())
}

fn hold_silently(inbound: TcpStream, connections: &Mutex<Vec<TcpStream>>) {
    if let Ok(clone) = inbound.try_clone() {
        connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(clone);
    }
    std::thread::spawn(move || {
        let mut sink = inbound;
        let mut buf = [0u8; 4096];
        while matches!(sink.read(&mut buf), Ok(n) if n > 0) {}
    });
}

fn pipe(
    inbound: TcpStream,
    outbound: TcpStream,
    cut: &Arc<AtomicBool>,
    connections: &Mutex<Vec<TcpStream>>,
) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    {
        let mut list = connections.lock().unwrap_or_else(|e| e.into_inner());
        for stream in [&inbound, &outbound] {
            if let Ok(clone) = stream.try_clone() {
                list.push(clone);
            }
        }
    }
    for (from, to) in [
        (inbound.try_clone(), outbound.try_clone()),
        (outbound.try_clone(), inbound.try_clone()),
    ] {
        let (Ok(mut from), Ok(mut to)) = (from, to) else {
            continue;
        };
        let cut = Arc::clone(cut);
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if cut.load(Ordering::SeqCst) {
                            continue; // dropped on the floor, as a dead link would
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}
