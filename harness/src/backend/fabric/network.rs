//! Network links: a TCP relay per (client machine, server) pair, for every driver.
//!
//! Each client runtime talks to a server through its own relay. The relay connects to the server
//! from the client machine's loopback address, so the server sees a distinct peer per machine.
//! It models two faults faithfully:
//! - a **cut** (partition) stops delivery and loses nothing: bytes read while cut wait in the relay
//!   (and, once its buffer is full, in the kernel's, so senders block as over a dead route), a
//!   connection attempt waits as a retransmitted SYN would, and nothing is closed; when the cut
//!   heals every byte is delivered in order, so a connection that outlived the outage carries on;
//! - a **reset** ends every connection at once (as a NAT timeout or a rebooted switch would).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use crate::backend::types::BackendError;

/// Whether a link delivers: every relay thread waits at the gate while the link is cut.
#[derive(Default)]
struct Gate {
    cut: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    fn set(&self, cut: bool) {
        *self.cut.lock().unwrap_or_else(|e| e.into_inner()) = cut;
        self.changed.notify_all();
    }

    /// Returns once the link delivers (or `stop` is set).
    fn wait_open(&self, stop: &AtomicBool) {
        let mut state = self.cut.lock().unwrap_or_else(|e| e.into_inner());
        while *state && !stop.load(Ordering::SeqCst) {
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What the relay shares with its threads.
struct Shared {
    gate: Gate,
    stop: AtomicBool,
    /// Every socket the relay holds (both ends of each connection), to reset or stop them.
    connections: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn track(&self, stream: &TcpStream) {
        if let Ok(clone) = stream.try_clone() {
            let mut list = self.connections.lock().unwrap_or_else(|e| e.into_inner());
            // Forget sockets that already ended (no peer address any more).
            list.retain(|s| s.peer_addr().is_ok());
            list.push(clone);
        }
    }

    /// Ends every connection with a reset (RST, not FIN): no byte in flight is delivered.
    fn reset_all(&self) {
        let mut list = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        for stream in list.drain(..) {
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// A relay from one client machine to one server.
pub struct Relay {
    /// Address clients connect to.
    pub local: SocketAddr,
    /// Client machine name.
    pub client: String,
    /// Server machine name.
    pub server: String,
    /// True for a link between two members of a server triad (not a client's link).
    pub member: bool,
    shared: Arc<Shared>,
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
        let shared = Arc::new(Shared {
            gate: Gate::default(),
            stop: AtomicBool::new(false),
            connections: Mutex::default(),
        });
        {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                for incoming in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(inbound) = incoming else { continue };
                    shared.track(&inbound);
                    let shared = Arc::clone(&shared);
                    // The onward connection is made once the link delivers: an attempt during a
                    // cut is late, not refused.
                    std::thread::spawn(move || {
                        shared.gate.wait_open(&shared.stop);
                        // Stopped, or reset (or given up by the client) while it waited.
                        if shared.stop.load(Ordering::SeqCst) || inbound.peer_addr().is_err() {
                            return;
                        }
                        match connect_from(source_ip, target) {
                            Ok(outbound) => pipe(inbound, outbound, &shared),
                            Err(e) => {
                                tracing::debug!(%target, error = %e, "Relay cannot reach the server");
                                let _ = inbound.shutdown(Shutdown::Both);
                            }
                        }
                    });
                }
            });
        }
        Ok(Relay {
            local,
            client: client.to_string(),
            server: server.to_string(),
            member: false,
            shared,
        })
    }

    /// Cuts or restores the link; nothing is lost or closed either way.
    pub fn set_cut(&self, cut: bool) {
        self.shared.gate.set(cut);
    }

    /// Resets every connection on the link (the link itself stays as it is).
    pub fn reset(&self) {
        self.shared.reset_all();
    }

    /// Stops the relay and closes its connections.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.gate.set(false);
        self.shared.reset_all();
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
            .any(|r| r.client == client && r.server == server && !r.member)
        {
            return Ok(false);
        }
        self.0
            .push(Relay::start(client, server, source_ip, target)?);
        Ok(true)
    }

    /// The relay from triad member `from` (at `source_ip`) to member `to`'s triad port at
    /// `target`, started unless there is one; where `from` reaches `to`.
    pub fn connect_member(
        &mut self,
        from: &str,
        to: &str,
        source_ip: Ipv4Addr,
        target: SocketAddr,
    ) -> Result<SocketAddr, BackendError> {
        if let Some(relay) = self
            .0
            .iter()
            .find(|r| r.client == from && r.server == to && r.member)
        {
            return Ok(relay.local);
        }
        let mut relay = Relay::start(from, to, source_ip, target)?;
        relay.member = true;
        let local = relay.local;
        self.0.push(relay);
        Ok(local)
    }

    /// The relays a client machine reaches servers through.
    pub fn of_client<'a>(&'a self, client: &'a str) -> impl Iterator<Item = &'a Relay> + 'a {
        self.0
            .iter()
            .filter(move |r| r.client == client && !r.member)
    }

    /// Stops every client's relay to `server` (links between triad members stay: a member
    /// whose server starts again listens where it did).
    pub fn drop_to(&mut self, server: &str) {
        let relays = std::mem::take(&mut self.0);
        let (gone, kept): (Vec<Relay>, Vec<Relay>) = relays
            .into_iter()
            .partition(|r| r.server == server && !r.member);
        self.0 = kept;
        for relay in gone {
            relay.stop();
        }
    }

    /// Cuts every link between a machine of `a` and one of `b`; with `reset`, its connections
    /// are also reset.
    pub fn partition(&self, a: &[String], b: &[String], reset: bool) {
        for relay in &self.0 {
            let crosses = (a.contains(&relay.client) && b.contains(&relay.server))
                || (b.contains(&relay.client) && a.contains(&relay.server));
            if crosses {
                relay.set_cut(true);
                if reset {
                    relay.reset();
                }
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

/// Idle TCP connections an attacker holds open against a server.
#[derive(Default)]
pub struct Floods(Vec<TcpStream>);

impl Floods {
    /// Opens up to `count` connections from `source_ip` to `target` that send nothing; stops
    /// early when the server no longer completes handshakes (its backlog is full). How many
    /// are open.
    pub fn open(
        &mut self,
        source_ip: Ipv4Addr,
        target: SocketAddr,
        count: u32,
    ) -> Result<usize, BackendError> {
        raise_descriptor_limit(count)?;
        let mut opened = 0;
        let mut failures_in_a_row = 0;
        for _ in 0..count {
            let attempt = (|| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                socket.bind(&SocketAddr::from((source_ip, 0)).into())?;
                socket.connect_timeout(&target.into(), Duration::from_millis(200))?;
                Ok::<_, std::io::Error>(TcpStream::from(socket))
            })();
            match attempt {
                Ok(stream) => {
                    self.0.push(stream);
                    opened += 1;
                    failures_in_a_row = 0;
                }
                Err(e) => {
                    failures_in_a_row += 1;
                    if failures_in_a_row >= 20 {
                        tracing::info!(opened, error = %e, "Flood stopped: the server takes no more");
                        break;
                    }
                }
            }
        }
        Ok(opened)
    }

    /// Closes every flood connection.
    pub fn close_all(&mut self) {
        self.0.clear();
    }
}

/// Makes room for `extra` more descriptors in this process (up to the hard limit).
fn raise_descriptor_limit(extra: u32) -> Result<(), BackendError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit we own.
    let (soft, hard) = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(BackendError::io("read the descriptor limit")(
                std::io::Error::last_os_error(),
            ));
        }
        (limit.rlim_cur, limit.rlim_max)
    };
    let wanted = soft.saturating_add(u64::from(extra)).min(hard);
    if wanted > soft {
        limit.rlim_cur = wanted;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(BackendError::io("raise the descriptor limit")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

fn connect_from(source_ip: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source_ip, 0)).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(2))?;
    Ok(socket.into())
}

/// Copies bytes both ways; each chunk waits at the gate while the link is cut, so a cut delays
/// delivery (in order) and never drops it. An end of stream is passed on the same way.
fn pipe(inbound: TcpStream, outbound: TcpStream, shared: &Arc<Shared>) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    shared.track(&outbound);
    for (from, to) in [
        (inbound.try_clone(), outbound.try_clone()),
        (outbound.try_clone(), inbound.try_clone()),
    ] {
        let (Ok(mut from), Ok(mut to)) = (from, to) else {
            continue;
        };
        let shared = Arc::clone(shared);
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            let ended_cleanly = loop {
                match from.read(&mut buf) {
                    Ok(0) => break true,
                    Err(_) => break false,
                    Ok(n) => {
                        shared.gate.wait_open(&shared.stop);
                        if to.write_all(&buf[..n]).is_err() {
                            break false;
                        }
                    }
                }
            };
            shared.gate.wait_open(&shared.stop);
            if ended_cleanly {
                let _ = to.shutdown(Shutdown::Write);
            } else {
                // A reset on one side is a reset on the other.
                let _ = SockRef::from(&to).set_linger(Some(Duration::ZERO));
                let _ = to.shutdown(Shutdown::Both);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = stream;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = reader.read(&mut buf) {
                        if n == 0 || writer.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn read_exactly(stream: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
        let mut out = vec![0u8; n];
        stream.read_exact(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_cut_delays_bytes_and_a_heal_delivers_them_in_order() {
        let relay = Relay::start("vm1", "srv", Ipv4Addr::LOCALHOST, echo_server()).unwrap();
        let mut client = TcpStream::connect(relay.local).unwrap();
        client.write_all(b"before").unwrap();
        assert_eq!(read_exactly(&mut client, 6).unwrap(), b"before");
        relay.set_cut(true);
        client.write_all(b"during-").unwrap();
        client.write_all(b"the-cut").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        let silent = client.read(&mut byte);
        assert!(silent.is_err(), "nothing arrives while cut: {silent:?}");
        relay.set_cut(false);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(read_exactly(&mut client, 14).unwrap(), b"during-the-cut");
    }

    #[test]
    fn a_connection_opened_during_a_cut_goes_through_after_the_heal() {
        let relay = Relay::start("vm1", "srv", Ipv4Addr::LOCALHOST, echo_server()).unwrap();
        relay.set_cut(true);
        let mut client = TcpStream::connect(relay.local).unwrap();
        client.write_all(b"late").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        relay.set_cut(false);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(read_exactly(&mut client, 4).unwrap(), b"late");
    }

    #[test]
    fn a_reset_ends_the_connection() {
        let relay = Relay::start("vm1", "srv", Ipv4Addr::LOCALHOST, echo_server()).unwrap();
        let mut client = TcpStream::connect(relay.local).unwrap();
        client.write_all(b"x").unwrap();
        assert_eq!(read_exactly(&mut client, 1).unwrap(), b"x");
        relay.reset();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert!(matches!(client.read(&mut byte), Ok(0) | Err(_)));
        // The link itself still works for a new connection.
        let mut again = TcpStream::connect(relay.local).unwrap();
        again.write_all(b"y").unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(read_exactly(&mut again, 1).unwrap(), b"y");
    }
}
