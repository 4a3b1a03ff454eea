//! Messages inside frames: the hello exchange and the commands of an open session.

use serde::{Deserialize, Serialize};

use crate::certificate::DeviceCertificate;
use crate::flash::{Lockout, ProductItem, RuntimeId, WitnessHead};

/// A command a runtime sends in an open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// List the programmed items and the dongle time.
    ListItems,
    /// Open an access to an item (checks expiry and units; quantity is counted by the runtime).
    Access {
        /// Firm code.
        firm: u32,
        /// Product code.
        code: u32,
    },
    /// Close an access opened in this session.
    Release {
        /// Handle from [`Response::Granted`].
        handle: u32,
    },
    /// Spend pay-per-use units; all or nothing.
    DecrementUnits {
        /// Firm code.
        firm: u32,
        /// Product code.
        code: u32,
        /// Units to spend.
        units: u64,
    },
    /// Read the dongle clock (also serves as keep-alive).
    ReadClock,
    /// Move the dongle clock forward to a unix time in milliseconds.
    SetClock {
        /// The new time.
        unix_ms: u64,
    },
    /// Store this runtime's receipt-chain head.
    WitnessStore {
        /// The head; its sequence must not go backwards.
        head: WitnessHead,
    },
    /// Read the receipt-chain head stored for a runtime.
    WitnessGet {
        /// Whose head.
        runtime: RuntimeId,
    },
    /// End the session: the binding stays, but the runtime is no longer active.
    Close,
}

/// The dongle's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The items and the dongle time.
    Items {
        /// Dongle clock, unix milliseconds.
        now_ms: u64,
        /// Programmed items.
        items: Vec<ProductItem>,
    },
    /// Access opened.
    Granted {
        /// Handle to release it with.
        handle: u32,
        /// The item as it stands.
        item: ProductItem,
    },
    /// Access closed.
    Released,
    /// Units spent.
    Units {
        /// Units left after spending.
        remaining: u64,
    },
    /// The dongle clock, unix milliseconds.
    Clock {
        /// Dongle time.
        now_ms: u64,
    },
    /// The witness head was stored.
    WitnessStored,
    /// The stored witness head, if any.
    Witness(Option<WitnessHead>),
    /// The session is closed.
    Closed,
    /// The command was refused.
    Denied(Denial),
}

/// Why the dongle refused one command (the session stays open).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Denial {
    /// No such item.
    #[error("Unknown item")]
    UnknownItem,
    /// The item's expiry time has passed on the dongle clock.
    #[error("Item expired")]
    Expired,
    /// Not enough units left.
    #[error("Units exhausted: {remaining} left")]
    UnitsExhausted {
        /// Units left (unchanged).
        remaining: u64,
    },
    /// The item has no unit counter.
    #[error("Item is not pay-per-use")]
    NotMetered,
    /// No such access handle in this session.
    #[error("Unknown handle")]
    UnknownHandle,
    /// The requested time is before the dongle clock.
    #[error("Clock cannot go backwards from {now_ms}")]
    ClockBackwards {
        /// Dongle time (unchanged).
        now_ms: u64,
    },
    /// The head conflicts with the stored one (older sequence, or same sequence and other hash).
    #[error("Witness head conflicts with stored sequence {}", stored.sequence)]
    WitnessConflict {
        /// What the dongle holds.
        stored: WitnessHead,
    },
}

impl Denial {
    /// The runtime contract's reason code, where one applies.
    pub fn reason_code(&self) -> Option<&'static str> {
        match self {
            Self::UnknownItem => Some("unknown-product"),
            Self::Expired => Some("licence-expired"),
            Self::UnitsExhausted { .. } => Some("units-exhausted"),
            Self::WitnessConflict { .. } => Some("rollback-detected"),
            Self::NotMetered | Self::UnknownHandle | Self::ClockBackwards { .. } => None,
        }
    }
}

/// Body of a hello frame (plaintext).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HelloBody {
    pub runtime: RuntimeId,
    #[serde(with = "crate::byte_array")]
    pub ephemeral: [u8; 32],
    /// The runtime's public key: the dongle tells runtimes apart by id and key together.
    #[serde(with = "crate::byte_array")]
    pub runtime_key: [u8; 32],
    /// The runtime key's signature over the rest of the hello ([`crate::handshake::hello_proof`]).
    #[serde(with = "crate::byte_array")]
    pub proof: [u8; 64],
}

/// Body of a hello-accept frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AcceptBody {
    #[serde(with = "crate::byte_array")]
    pub ephemeral: [u8; 32],
    pub certificate: DeviceCertificate,
    #[serde(with = "crate::byte_array")]
    pub signature: [u8; 64],
}

/// Body of a hello-refused frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RefusedBody {
    pub lockout: Lockout,
    pub certificate: DeviceCertificate,
    #[serde(with = "crate::byte_array")]
    pub signature: [u8; 64],
}

/// Plaintext of a response frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DeviceReply {
    Answer(Response),
    BindingBroken,
    Locked(Lockout),
}
