//! Vigil: a test harness that proves how a licence runtime behaves in virtual machines and on
//! terminal servers.
//!
//! Shape follows the data: [`scenario`] (parse, validate) → [`engine`] (steps on a world, virtual
//! clock, assertions) → [`backend`] (sim, qemu, libvirt behind one trait) → [`runtime`] (drives
//! the runtime under test through its contract) → [`report`] (JSON, JUnit, Markdown).

pub mod audit;
pub mod backend;
pub mod bench;
pub mod capabilities;
pub mod doctor;
pub mod engine;
pub mod identity;
pub mod name;
pub mod report;
pub mod runtime;
pub mod scenario;
pub mod session_leader;
pub mod usb;
pub mod verify;
