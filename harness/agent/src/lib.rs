//! The in-guest agent of the Vigil harness and the protocol the harness speaks to it.
//!
//! The agent runs inside a QEMU guest and serves newline-delimited JSON requests on a
//! virtio-serial port: run commands, open and close login sessions, start and kill apps inside a
//! session, set the clock, read and write files, and report readiness. The harness side lives in
//! the `vigil` crate (`backend::guest::agent`).

pub mod accounts;
pub mod leader;
pub mod protocol;
pub mod sessions;
pub mod usbip;
pub mod vmgenid;
