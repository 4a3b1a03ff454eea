//! What the machines of a world share, whichever driver runs them: the dongle rack, the network
//! links between them, the world clock and one address allocator.

pub mod addresses;
pub mod clock;
pub mod dongles;
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
}

impl Fabric {
    /// A fresh fabric for a world seeded `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            addresses: addresses::Addresses::new(seed),
            clock: clock::WorldClock::default(),
            dongles: dongles::DongleRack::default(),
        }
    }
}
