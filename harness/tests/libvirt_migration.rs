//! A live migration between two hosts' private libvirt daemons on one machine: libvirt accepts
//! it (their host UUIDs differ), the guest's runtime answers on the destination with the same
//! generation id (a migration is not a revert), and the source runs it no more.
#![cfg(feature = "libvirt")]

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use vigil::backend::libvirt::daemon::{self, HostDaemon};
use vigil::backend::libvirt::domain_xml::DomainSpec;
use vigil::backend::qemu::agent::AgentClient;
use vigil::backend::qemu::vm;

fn required() -> bool {
    std::env::var_os("VIGIL_REQUIRE_LIBVIRT").is_some_and(|v| v == "1")
}

const READY_FILE: &str = "/disk/meter/meterd.ready";
const GENID: &str = "0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a";

fn spec(images: &Path, guest: &Path, side: &str) -> DomainSpec {
    DomainSpec {
        name: "vm1".into(),
        uuid: "5e0b6a52-4c3d-4c43-9a52-2b6c1f0d9e02".into(),
        system_serial: "VM1-SERIAL".into(),
        board_serial: "VM1-BOARD".into(),
        mac: Some("52:54:00:12:34:57".into()),
        disk_serial: Some("VM1-DISK".into()),
        genid: Some(GENID.into()),
        memory_mib: 384,
        domain_type: "qemu",
        hide_hypervisor: false,
        kernel: images.join("vmlinux").canonicalize().unwrap(),
        initrd: images.join("initramfs.cpio").canonicalize().unwrap(),
        cmdline: "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests vigil.name=vm1"
            .into(),
        disk: guest.join("disk.qcow2"),
        // Each end has its own agent socket: the source holds its own until the move is done.
        agent_socket: guest.join(format!("run/agent-{side}.sock")),
        serial_log: guest.join(format!("serial-{side}.log")),
    }
}

#[test]
fn a_running_guest_moves_live_between_two_hosts_daemons() {
    let images = vm::image_dir();
    let missing = if !daemon::installed() || !nix::unistd::Uid::effective().is_root() {
        Some("libvirtd (make deps) and root".to_string())
    } else {
        vm::missing_prerequisite(&images)
    };
    if let Some(why) = missing {
        assert!(!required(), "VIGIL_REQUIRE_LIBVIRT=1 but missing: {why}");
        eprintln!("skipped: needs {why}");
        return;
    }
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
    let guest = dir.path().join("vm1");
    std::fs::create_dir_all(guest.join("run")).unwrap();
    std::fs::copy(images.join("data.qcow2"), guest.join("disk.qcow2")).unwrap();
    let source = spec(&images, &guest, "a");
    let destination = spec(&images, &guest, "b");

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
