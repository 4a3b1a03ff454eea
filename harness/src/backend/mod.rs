//! Backends run the world: machines, sessions, apps, clocks, networks and dongles.
//!
//! The engine only speaks to the [`Backend`] trait; it never knows which hypervisor (if any) is
//! behind it.

mod fabric;
mod process;
pub mod qemu;
mod runner;
pub mod sim;
pub mod types;

pub use process::log_tail;
pub use runner::Backend;
pub use types::*;

/// Creates a backend of the given kind for one world.
pub fn create(kind: BackendKind, config: WorldConfig) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Sim => Ok(Box::new(sim::SimBackend::new(config)?)),
        BackendKind::Qemu => Ok(Box::new(qemu::QemuBackend::new(config)?)),
        other => Err(BackendError::Unsupported {
            backend: other,
            operation: "run scenarios",
            why: supports(other, Operation::Run)
                .err()
                .unwrap_or_else(|| "it has no driver".into()),
        }),
    }
}
