//! What the machines of a world share, whichever driver runs them: the dongle rack, the network
//! links between them, the world clock, one address allocator and numbered machine folders.

pub mod addresses;
pub mod clock;
pub mod dongles;
pub mod folders;
pub mod network;

/// Handles to a world's shared parts; clones share them.
#[derive(Debug, Clone)]
pub struct Fabric {
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
    /// A fresh fabric for a world seeded `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            addresses: addresses::Addresses::new(seed),
            clock: clock::WorldClock::default(),
            dongles: dongles::DongleRack::default(),
            folders: folders::MachineFolders::default(),
        }
    }
}
