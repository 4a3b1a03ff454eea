//! Sans-IO model of the meter licence dongle: firmware state machine, persistent flash, the
//! session protocol between a runtime and the dongle, and 64-byte HID report framing.
//!
//! Nothing here reads a clock, a file or a socket: time (`now_ms`, the dongle's oscillator in
//! milliseconds) and randomness (ephemeral secrets, entropy seeds) are passed in, bytes go in and
//! bytes come out. The same report bytes travel over the simulator's Unix socket and over USB HID.
//!
//! Driving a dongle from a runtime:
//! 1. [`Session::start`] gives the hello frame; send it with [`encode_reports`], read reports back
//!    into a [`ReportAssembler`] until it yields a frame, give that to [`Session::accept`].
//! 2. For every command, [`Session::request`] gives a frame; the reply frame goes to
//!    [`Session::receive`], which returns a [`Response`] or a [`SessionError`]
//!    ([`SessionError::BindingBroken`], [`SessionError::Locked`], ...).
//!
//! Emulating a dongle: a [`Firmware`] (built from a [`Flash`]) and one [`DevicePort`] per
//! connection that can reach it.

mod byte_array;
mod certificate;
mod firmware;
mod flash;
mod handshake;
mod host;
mod protocol;
mod report;
mod serial;
mod wire;

pub use certificate::{CertificateError, DeviceCertificate};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use firmware::{ACTIVE_SESSIONS_KEPT, DevicePort, DongleStatus, Firmware};
pub use flash::{
    Binding, DongleClock, DonglePolicy, FLASH_FORMAT, Flash, InvalidRuntimeId, ItemCounting,
    Lockout, LockoutReason, MAX_ITEM_NAME, MAX_ITEMS, MAX_RUNTIME_ID, ProductItem, ProgramError,
    RuntimeId, WitnessHead,
};
pub use host::{DongleIdentity, Session, SessionError};
pub use protocol::{Denial, Request, Response};
pub use report::{REPORT_LEN, Report, ReportAssembler, ReportError, encode_reports};
pub use serial::Serial;
/// USB vendor id the dongle enumerates with (pid.codes, the open-source vendor id).
pub const USB_VENDOR_ID: u16 = 0x1209;
/// USB product id the dongle enumerates with; its USB serial string is the dongle's serial.
pub const USB_PRODUCT_ID: u16 = 0x4d54;

pub use wire::{
    FRAME_HEADER_LEN, FaultCode, Frame, FrameError, FrameKind, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
