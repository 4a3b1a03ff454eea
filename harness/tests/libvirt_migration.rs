//! A live migration between two hosts' private libvirt daemons on one machine: libvirt accepts
//! it (their host UUIDs differ), the guest's runtime answers on the destination with the same
//! generation id (a migration is not a revert), and the source runs it no more.
#![cfg(feature = "libvirt")]

mod libvirt_common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use libvirt_common::{READY_FILE, guest_folder, guest_spec, image_dir_or_skip};
use vigil::backend::guest::agent::AgentClient;
use vigil::backend::libvirt::daemon::HostDaemon;
use vigil::backend::libvirt::domain_xml::DomainSpec;

const GENID: &str = "0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a";
const UUID: &str = "5e0b6a52-4c3d-4c43-9a52-2b6c1f0d9e02";

#[test]
fn a_running_guest_moves_live_between_two_hosts_daemons() {
    let Some(images) = image_dir_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = HostDaemon::start(
        &dir.path().join("host-a"),
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0eb1",
    )
    .unwrap();
    let b = HostDaemon::start(
        &dir.path().join("host-b"),
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0eb2",
    )
    .unwrap();
    let guest = guest_folder(&images, dir.path());
    // Each end has its own agent socket: the source holds its own until the move is done.
    // A model listing arch-capabilities features, which TCG lacks: unnamed, libvirt's check of
    // the guest CPU on the destination refused the migration.
    let side = |side: &str| DomainSpec {
        genid: Some(GENID.into()),
        cpu_model: "SapphireRapids".into(),
        cpu_vendor_id: Some("GenuineIntel".into()),
        disabled_features: vigil::backend::libvirt::cpu_model::tcg_disabled_features(),
        ..guest_spec(&images, &guest, UUID, side)
    };
    let source = side("a");
    let destination = side("b");
    let conn_a = a.connect().unwrap();
    let conn_b = b.connect().unwrap();
    let domain = conn_a.define_domain_xml(&source.xml()).unwrap();
    domain.create().unwrap();
    let mut agent = AgentClient::connect(&source.agent_socket, Duration::from_secs(30)).unwrap();
    agent
        .wait_ready(READY_FILE, Duration::from_secs(120))
        .unwrap();
    drop(agent);

    // The migration stream goes over loopback to a port the destination's QEMU listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let flags = virt::sys::VIR_MIGRATE_LIVE | virt::sys::VIR_MIGRATE_UNSAFE;
    let started = Instant::now();
    let moved = domain
        .migrate2(
            &conn_b,
            Some(&destination.xml()),
            flags,
            None,
            Some(&format!("tcp:127.0.0.1:{port}")),
            0,
        )
        .unwrap_or_else(|e| panic!("libvirt refused the migration: {e}"));
    eprintln!(
        "live migration through libvirt took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(moved.is_active().unwrap());
    let active = conn_a
        .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .unwrap();
    assert!(active.is_empty(), "the source runs it no more");
    let mut agent =
        AgentClient::connect(&destination.agent_socket, Duration::from_secs(10)).unwrap();
    let seen = agent
        .wait_ready(READY_FILE, Duration::from_secs(30))
        .unwrap();
    assert_eq!(
        seen.map(|g| g.to_ascii_lowercase().replace('-', "")),
        Some(GENID.replace('-', "")),
        "a live migration keeps the generation id"
    );
    moved.destroy().unwrap();
}
