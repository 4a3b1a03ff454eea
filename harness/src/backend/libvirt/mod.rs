//! The libvirt backend: guests are domains of real libvirt daemons, one private daemon per
//! simulated host ([`daemon`]), defined from the world ([`domain_xml`], [`cpu_model`]) and
//! driven through libvirt's API ([`hypervisor`], [`running`]); everything inside a guest goes
//! through the agent, as on the qemu backend (the shared guest driver).
//!
//! Each host gets its own `libvirtd` with its own host UUID, run, state, cache, log and config
//! folders. libvirt's privileged daemon keeps those at fixed paths, so each runs in a private
//! mount namespace where the host's folders are bind-mounted over them; its socket stays
//! reachable from outside at `<host folder>/run/libvirt-sock`. Two daemons on one machine with
//! different host UUIDs are what a migration between two hosts needs. A run killed outright
//! leaves its daemons and guests running; the next run stops them ([`leftovers`]).

pub mod cpu_model;
pub mod daemon;
pub mod domain_xml;
pub mod hypervisor;
pub mod leftovers;
pub mod running;
pub mod start_steps;

use super::fabric::Fabric;
use super::guest::GuestDriver;
use super::types::{BackendError, WorldConfig};
use hypervisor::LibvirtHypervisor;

/// The libvirt driver: guests as libvirt domains.
pub type LibvirtDriver = GuestDriver<LibvirtHypervisor>;

impl LibvirtDriver {
    /// A driver with no guests yet, over the world's `fabric`; fails when libvirtd, root,
    /// QEMU or the guest image is missing.
    pub fn start(config: WorldConfig, fabric: Fabric) -> Result<LibvirtDriver, BackendError> {
        let hv = LibvirtHypervisor::detect(&config)?;
        GuestDriver::new(config, fabric, hv)
    }
}
