//! Caps on the network server's connections, overall and per peer address, so a flood of
//! connections is refused before it costs the daemon its descriptors.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Most connections the server holds at once by default (each costs a descriptor; the rest of
/// the descriptor budget is kept for local apps, dongles and the store).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most connections one peer address may hold at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 256;

/// Caps on the connections the server holds, overall and per peer address.
pub struct ConnectionLimits {
    enforced: bool,
    overall: Arc<tokio::sync::Semaphore>,
    per_peer: PeerCounts,
    refused: std::sync::atomic::AtomicU64,
}

/// Open connections per peer address.
type PeerCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection's place under the caps, given back when it closes.
pub struct Admitted {
    _overall: Option<tokio::sync::OwnedSemaphorePermit>,
    peer: Option<(IpAddr, PeerCounts)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((ip, per_peer)) = &self.peer {
            let mut counts = per_peer.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = counts.get_mut(ip) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(ip);
                }
            }
        }
    }
}

impl ConnectionLimits {
    /// The caps, `max` connections in all; `enforced: false` (a weakened build) admits
    /// everything.
    pub fn new(enforced: bool, max: usize) -> Self {
        ConnectionLimits {
            enforced,
            overall: Arc::new(tokio::sync::Semaphore::new(max)),
            per_peer: Arc::default(),
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A place for a new connection from `ip`, or `None` when a cap is reached.
    pub fn admit(&self, ip: IpAddr) -> Option<Admitted> {
        if !self.enforced {
            return Some(Admitted {
                _overall: None,
                peer: None,
            });
        }
        let permit = Arc::clone(&self.overall).try_acquire_owned().ok()?;
        let mut counts = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(Admitted {
            _overall: Some(permit),
            peer: Some((ip, Arc::clone(&self.per_peer))),
        })
    }

    /// Logs a refused connection (the first, then every 1000th, so a flood cannot flood the log).
    pub fn note_refusal(&self, peer: SocketAddr) {
        let n = self
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(1000) {
            tracing::warn!(%peer, refused = n + 1, "Connection refused: too many connections");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_is_capped_and_a_closed_connection_gives_its_place_back() {
        let limits = ConnectionLimits::new(true, MAX_CONNECTIONS);
        let ip: IpAddr = "127.0.9.1".parse().unwrap();
        let held: Vec<Admitted> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| limits.admit(ip).unwrap())
            .collect();
        assert!(limits.admit(ip).is_none());
        assert!(limits.admit("127.0.9.2".parse().unwrap()).is_some());
        drop(held);
        assert!(limits.admit(ip).is_some());
        let open = ConnectionLimits::new(false, MAX_CONNECTIONS);
        assert!((0..2 * MAX_CONNECTIONS).all(|_| open.admit(ip).is_some()));
    }
}
