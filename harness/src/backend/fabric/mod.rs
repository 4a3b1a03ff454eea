//! What the machines of a world share, whichever driver runs them: the dongle rack, the network
//! links between them, the world clock, one address allocator, one user directory and numbered
//! machine folders.

pub mod accounts;
pub mod addresses;
pub mod clock;
pub mod dongles;
pub mod folders;
pub mod network;

use crate::backend::types::BackendError;

/// Handles to a world's shared parts; clones share them.
#[derive(Debug, Clone)]
pub struct Fabric {
    /// User accounts.
    pub accounts: accounts::Accounts,
    /// Machine addresses.
    pub addresses: addresses::Addresses,
    /// The world clock.
    pub clock: clock::WorldClock,
    /// The dongles.
    pub dongles: dongles::DongleRack,
    /// Machine folders.
    pub folders: folders::MachineFolders,
}

impl Fabric {
    /// Powers on a dongle from its flash file, on the world clock, and puts it in the rack.
    pub fn add_dongle(&self, name: &str, flash: &std::path::Path) -> Result<(), BackendError> {
        BackendError::check_name("dongle", name)?;
        self.dongles.add(name, flash, self.clock.cell())
    }

    /// A fresh fabric for a world seeded `seed`; fails when no loopback block is free.
    pub fn new(seed: u64) -> Result<Self, BackendError> {
        Ok(Self {
            accounts: accounts::Accounts::default(),
            addresses: addresses::Addresses::new(seed)?,
            clock: clock::WorldClock::default(),
            dongles: dongles::DongleRack::default(),
            folders: folders::MachineFolders::default(),
        })
    }
}
