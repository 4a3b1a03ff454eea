//! The libvirt driver's parts: one real libvirt daemon per simulated host ([`daemon`]).
//!
//! Each host gets its own `libvirtd` with its own host UUID, run, state, cache, log and config
//! folders. libvirt's privileged daemon keeps those at fixed paths, so each runs in a private
//! mount namespace where the host's folders are bind-mounted over them; its socket stays
//! reachable from outside at `<host folder>/run/libvirt-sock`. Two daemons on one machine with
//! different host UUIDs are what a migration between two hosts needs.

pub mod daemon;
pub mod domain_xml;
