//! A guest of the image boots through a private libvirt daemon, from the domain XML the libvirt
//! backend writes: its agent answers over the virtio-serial channel, its runtime comes up, and
//! it sees the generation id the XML gave it.
#![cfg(feature = "libvirt")]

use std::time::{Duration, Instant};

use vigil::backend::libvirt::daemon::{self, HostDaemon};
use vigil::backend::libvirt::domain_xml::DomainSpec;
use vigil::backend::qemu::agent::AgentClient;
use vigil::backend::qemu::vm;

fn required() -> bool {
    std::env::var_os("VIGIL_REQUIRE_LIBVIRT").is_some_and(|v| v == "1")
}

#[test]
fn a_guest_boots_to_a_ready_runtime_through_libvirt() {
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
        "6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0ea1",
    )
    .unwrap();
    let guest = dir.path().join("vm1");
    std::fs::create_dir_all(guest.join("run")).unwrap();
    let disk = guest.join("disk.qcow2");
    std::fs::copy(images.join("data.qcow2"), &disk).unwrap();
    let genid = "c5f2b3a1-0d4e-4f6a-8b7c-9d0e1f2a3b4c";
    let spec = DomainSpec {
        name: "vm1".into(),
        uuid: "5e0b6a52-4c3d-4c43-9a52-2b6c1f0d9e01".into(),
        system_serial: "VM1-SERIAL".into(),
        board_serial: "VM1-BOARD".into(),
        mac: Some("52:54:00:12:34:56".into()),
        disk_serial: Some("VM1-DISK".into()),
        genid: Some(genid.into()),
        memory_mib: 384,
        domain_type: "qemu",
        hide_hypervisor: false,
        kernel: images.join("vmlinux").canonicalize().unwrap(),
        initrd: images.join("initramfs.cpio").canonicalize().unwrap(),
        cmdline: "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests vigil.name=vm1"
            .into(),
        disk,
        agent_socket: guest.join("run/agent.sock"),
        serial_log: guest.join("serial.log"),
    };
    let connection = host.connect().unwrap();
    let domain = connection.define_domain_xml(&spec.xml()).unwrap();
    let started = Instant::now();
    domain.create().unwrap();
    let mut agent = AgentClient::connect(&spec.agent_socket, Duration::from_secs(30)).unwrap();
    let seen = agent
        .wait_ready("/disk/meter/meterd.ready", Duration::from_secs(120))
        .unwrap_or_else(|e| {
            let console = std::fs::read_to_string(&spec.serial_log).unwrap_or_default();
            panic!("not ready: {e}\n{console}")
        });
    eprintln!(
        "libvirt guest ready in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        seen.map(|g| g.to_ascii_lowercase().replace('-', "")),
        Some(genid.replace('-', "")),
        "the guest sees the generation id of its domain"
    );
    domain.destroy().unwrap();
    drop(agent);
    drop(host);
}
