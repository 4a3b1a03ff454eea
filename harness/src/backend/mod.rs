//! Backends run the world: machines, sessions, apps, clocks, networks and dongles.
//!
//! The engine only speaks to the [`Backend`] trait; it never knows which hypervisor (if any) is
//! behind it.

mod composite;
pub mod driver;
mod fabric;
pub mod guest;
#[cfg(feature = "libvirt")]
pub mod libvirt;
mod process;
pub mod qemu;
mod runner;
pub mod sim;
pub mod types;

pub use composite::World;
pub use process::log_tail;
pub use runner::Backend;
pub use types::*;

/// Creates a backend of the given kind for one world.
pub fn create(kind: BackendKind, config: WorldConfig) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(assemble(kind, config)?))
}

/// The composite of drivers a backend kind is: `sim` runs every machine on the sim driver;
/// `qemu` runs hosts on the sim driver and guests on the qemu driver, over one fabric.
pub fn assemble(kind: BackendKind, config: WorldConfig) -> Result<World, BackendError> {
    let fabric = fabric::Fabric::new(config.seed)?;
    match kind {
        BackendKind::Sim => {
            let sim = sim::SimDriver::new(config.clone(), fabric.clone())?;
            Ok(World::new(kind, config, fabric, vec![Box::new(sim)], 0))
        }
        BackendKind::Qemu => {
            let guests = qemu::QemuDriver::start(config.clone(), fabric.clone())?;
            guests_on_sim_hosts(kind, config, fabric, Box::new(guests))
        }
        #[cfg(feature = "libvirt")]
        BackendKind::Libvirt => {
            let guests = libvirt::LibvirtDriver::start(config.clone(), fabric.clone())?;
            guests_on_sim_hosts(kind, config, fabric, Box::new(guests))
        }
        #[cfg(not(feature = "libvirt"))]
        other => Err(BackendError::Unsupported {
            backend: other,
            operation: "run scenarios",
            why: supports(other, Operation::Run)
                .err()
                .unwrap_or_else(|| "it has no driver".into()),
        }),
    }
}

/// A composite whose hosts run on the sim driver and whose guests run on `guests`.
fn guests_on_sim_hosts(
    kind: BackendKind,
    config: WorldConfig,
    fabric: fabric::Fabric,
    guests: Box<dyn driver::MachineDriver>,
) -> Result<World, BackendError> {
    let mut hosts_config = config.clone();
    hosts_config.work_dir = config.work_dir.join("hosts");
    let hosts = sim::SimDriver::new(hosts_config, fabric.clone())?;
    Ok(World::new(
        kind,
        config,
        fabric,
        vec![Box::new(hosts), guests],
        1,
    ))
}
