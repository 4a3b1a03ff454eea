//! One address allocator per world: every machine, whichever driver runs it, gets its own
//! loopback address (`127.<block>.x.y`), so servers see a distinct peer per machine.
//!
//! Worlds running at once (parallel tests, two `vigil` processes) must never share a block:
//! a server of one would take the other's address and port. Each world therefore leases its
//! block with an exclusive `flock` on a file of the temp folder, held until the last clone of
//! its allocator is dropped (a crash releases it with the process).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};

use crate::backend::types::{BackendError, BackendKind};

/// Hands out the world's machine addresses; clones share one sequence and one block lease.
#[derive(Debug, Clone)]
pub struct Addresses {
    block: u8,
    next: Arc<Mutex<u32>>,
    _lease: Arc<Flock<File>>,
}

/// Addresses per `/24`: `.2` to `.251`.
const PER_NET: u32 = 250;
/// Blocks a world may use: `127.2.0.0/16` to `127.251.0.0/16`.
const BLOCKS: u64 = 250;
/// The lowest block (`127.0` and `127.1` stay for everything else).
const FIRST_BLOCK: u8 = 2;

impl Addresses {
    /// The allocator of a world seeded `seed`: the block derived from the seed, or the next
    /// one no other world holds.
    pub fn new(seed: u64) -> Result<Self, BackendError> {
        Self::in_folder(seed, &lease_folder())
    }

    fn in_folder(seed: u64, folder: &Path) -> Result<Self, BackendError> {
        std::fs::create_dir_all(folder).map_err(BackendError::io(format!(
            "Cannot create {}",
            folder.display()
        )))?;
        // Shared by every user of the machine, as the temp folder is (whoever made it).
        let _ = std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o1777));
        for step in 0..BLOCKS {
            let block =
                FIRST_BLOCK + u8::try_from((seed % BLOCKS + step) % BLOCKS).expect("below 250");
            let path = folder.join(format!("127.{block}.lease"));
            // A lease is only locked, never written: another user's file is opened to read.
            let file = match std::fs::File::open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path),
                opened => opened,
            }
            .map_err(BackendError::io(format!("Cannot open {}", path.display())))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lease) => {
                    tracing::debug!(block, "leased loopback block");
                    return Ok(Self {
                        block,
                        next: Arc::default(),
                        _lease: Arc::new(lease),
                    });
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => {
                    return Err(BackendError::Io {
                        context: format!("Cannot lock {}", path.display()),
                        source: e.into(),
                    });
                }
            }
        }
        Err(BackendError::Unsupported {
            backend: BackendKind::Sim,
            operation: "lease a loopback block for the world",
            why: format!(
                "all {BLOCKS} blocks are held by other worlds (leases in {})",
                folder.display()
            ),
        })
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
            backend: BackendKind::Sim,
            operation: "give a machine an address",
            why: format!("the world's {} is used up", self.network()),
        })?;
        *next += 1;
        let fourth = u8::try_from(n % PER_NET + 2).expect("below 252");
        Ok(Ipv4Addr::new(127, self.block, third, fourth))
    }
}

/// Where block leases live: shared by every harness process of the machine.
fn lease_folder() -> PathBuf {
    std::env::temp_dir().join("vigil-loopback-blocks")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_sequence_and_the_block_runs_out_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let a = Addresses::in_folder(7, dir.path()).unwrap();
        let b = a.clone();
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(127, 9, 0, 2));
        assert_eq!(b.allocate().unwrap(), Ipv4Addr::new(127, 9, 0, 3));
        *a.next.lock().unwrap() = PER_NET * 256 - 1;
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(127, 9, 255, 251));
        assert!(b.allocate().is_err());
    }

    #[test]
    fn worlds_alive_at_once_never_share_a_block_and_a_dropped_world_frees_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let first = Addresses::in_folder(7, dir.path()).unwrap();
        let same_seed = Addresses::in_folder(7, dir.path()).unwrap();
        let wrapped = Addresses::in_folder(249, dir.path()).unwrap();
        let wrapped_again = Addresses::in_folder(249, dir.path()).unwrap();
        assert_eq!(first.network(), "127.9.0.0/16");
        assert_eq!(same_seed.network(), "127.10.0.0/16");
        assert_eq!(wrapped.network(), "127.251.0.0/16");
        assert_eq!(wrapped_again.network(), "127.2.0.0/16");
        let kept = first.clone();
        drop(first);
        assert_eq!(
            Addresses::in_folder(7, dir.path()).unwrap().network(),
            "127.11.0.0/16"
        );
        drop(kept);
        assert_eq!(
            Addresses::in_folder(7, dir.path()).unwrap().network(),
            "127.9.0.0/16"
        );
        drop((same_seed, wrapped, wrapped_again));
    }
}
