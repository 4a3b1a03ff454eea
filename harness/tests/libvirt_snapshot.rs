//! An internal snapshot of a running guest and a revert to it, through a private libvirt
//! daemon: the guest runs again from the snapshot and sees a new generation id, which libvirt
//! makes at every revert (what the runtime's rollback defence watches for).
#![cfg(feature = "libvirt")]

use std::time::{Duration, Instant};

use vigil::backend::libvirt::daemon::{self, HostDaemon};
use vigil::backend::libvirt::domain_xml::DomainSpec;
use vigil::backend::qemu::agent::AgentClient;
use vigil::backend::qemu::vm;

fn required() -> bool {
    std::env::var_os("VIGIL_REQUIRE_LIBVIRT").is_some_and(|v| v == "1")
}

const READY_FILE: &str = "/disk/meter/meterd.ready";

#[test]
fn a_revert_runs_the_snapshot_with_a_new_generation_id() {
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
    let host = HostDaemon::start(
        &dir.path().join("host-a"),
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0ec1",
    )
    .unwrap();
    let guest = dir.path().join("vm1");
    std::fs::create_dir_all(guest.join("run")).unwrap();
    std::fs::copy(images.join("data.qcow2"), guest.join("disk.qcow2")).unwrap();
    let spec = DomainSpec {
        name: "vm1".into(),
        uuid: "5e0b6a52-4c3d-4c43-9a52-2b6c1f0d9e03".into(),
        system_serial: "VM1-SERIAL".into(),
        board_serial: "VM1-BOARD".into(),
        mac: Some("52:54:00:12:34:58".into()),
        disk_serial: Some("VM1-DISK".into()),
        genid: None,
        memory_mib: 384,
        domain_type: "qemu",
        hide_hypervisor: false,
        kernel: images.join("vmlinux").canonicalize().unwrap(),
        initrd: images.join("initramfs.cpio").canonicalize().unwrap(),
        cmdline: "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests vigil.name=vm1"
            .into(),
        disk: guest.join("disk.qcow2"),
        agent_socket: guest.join("run/agent.sock"),
        serial_log: guest.join("serial.log"),
    };
    let connection = host.connect().unwrap();
    let domain = connection.define_domain_xml(&spec.xml()).unwrap();
    domain.create().unwrap();
    let mut agent = AgentClient::connect(&spec.agent_socket, Duration::from_secs(30)).unwrap();
    let before = agent
        .wait_ready(READY_FILE, Duration::from_secs(120))
        .unwrap()
        .expect("the guest has a generation id");
    drop(agent);

    let started = Instant::now();
    let snapshot = domain
        .create_snapshot_xml("<domainsnapshot><name>s0</name></domainsnapshot>", 0)
        .unwrap_or_else(|e| panic!("libvirt refused the snapshot: {e}"));
    eprintln!("snapshot took {:.2} s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    snapshot
        .revert(0)
        .unwrap_or_else(|e| panic!("libvirt refused the revert: {e}"));
    let mut agent = AgentClient::connect(&spec.agent_socket, Duration::from_secs(30)).unwrap();
    let after = agent
        .wait_ready(READY_FILE, Duration::from_secs(60))
        .unwrap()
        .expect("the guest has a generation id");
    eprintln!(
        "revert to a ready runtime took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        domain.is_active().unwrap(),
        "the snapshot was taken running"
    );
    assert_ne!(
        before, after,
        "a revert gives the guest a new generation id"
    );
    domain.destroy().unwrap();
}
