//! What the machines of a world share, whichever driver runs them: the network links between
//! them (and, as the backend is split further, the dongle rack, the world clock and the address
//! allocator).

pub mod network;
