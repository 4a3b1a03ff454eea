//! What the machines of a world share, whichever driver runs them: the network links between
//! them, the world clock and one address allocator (the dongle rack joins them when the backend
//! becomes one composite of drivers).

pub mod addresses;
pub mod clock;
pub mod network;

/// Handles to a world's shared parts; clones share them.
#[derive(Debug, Clone)]
pub struct Fabric {
    /// Machine addresses.
    pub addresses: addresses::Addresses,
    /// The world clock.
    pub clock: clock::WorldClock,
}

impl Fabric {
    /// A fresh fabric for a world seeded `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            addresses: addresses::Addresses::new(seed),
            clock: clock::WorldClock::default(),
        }
    }
}
