//! One address allocator per world: every machine, whichever driver runs it, gets its own
//! loopback address (`127.<block>.x.y`), so servers see a distinct peer per machine.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use crate::backend::types::BackendError;

/// Hands out the world's machine addresses; clones share one sequence.
#[derive(Debug, Clone)]
pub struct Addresses {
    block: u8,
    next: Arc<Mutex<u32>>,
}

/// Addresses per `/24`: `.2` to `.251`.
const PER_NET: u32 = 250;

impl Addresses {
    /// The allocator of a world seeded `seed` (the block is derived from it).
    pub fn new(seed: u64) -> Self {
        let block = u8::try_from(seed % 250).unwrap_or(0) + 2;
        Self {
            block,
            next: Arc::default(),
        }
    }

    /// The world's `/16`, for reports.
    pub fn network(&self) -> String {
        format!("127.{}.0.0/16", self.block)
    }

    /// The next free address; an error once the `/16` is used up.
    pub fn allocate(&self) -> Result<Ipv4Addr, BackendError> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let n = *next;
        let third = u8::try_from(n / PER_NET).map_err(|_| BackendError::Unsupported {
            backend: crate::backend::types::BackendKind::Sim,
            operation: "give a machine an address",
            why: format!("the world's {} is used up", self.network()),
        })?;
        *next += 1;
        let fourth = u8::try_from(n % PER_NET + 2).expect("below 252");
        Ok(Ipv4Addr::new(127, self.block, third, fourth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_sequence_and_the_block_runs_out_cleanly() {
        let a = Addresses::new(7);
        let b = a.clone();
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(127, 9, 0, 2));
        assert_eq!(b.allocate().unwrap(), Ipv4Addr::new(127, 9, 0, 3));
        *a.next.lock().unwrap() = PER_NET * 256 - 1;
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(127, 9, 255, 251));
        assert!(b.allocate().is_err());
    }
}
