//! What the libvirt tests share: their prerequisites and a guest's domain.
// Each test file uses the helpers it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use vigil::backend::guest::image;
use vigil::backend::libvirt::daemon;
use vigil::backend::libvirt::domain_xml::DomainSpec;
use vigil::backend::qemu::vm;

/// Where the guest's runtime says it is ready.
pub const READY_FILE: &str = "/disk/meter/meterd.ready";

/// The image folder, or none (the test is skipped) when libvirtd, root or the image is missing;
/// with `VIGIL_REQUIRE_LIBVIRT=1` (CI) a missing one fails the test instead.
pub fn image_dir_or_skip() -> Option<PathBuf> {
    let images = image::image_dir();
    let missing = if !daemon::installed() || !nix::unistd::Uid::effective().is_root() {
        Some("libvirtd (make deps) and root".to_string())
    } else {
        vm::missing_prerequisite(&images)
    };
    match missing {
        None => Some(images),
        Some(why) => {
            let required = std::env::var_os("VIGIL_REQUIRE_LIBVIRT").is_some_and(|v| v == "1");
            assert!(!required, "VIGIL_REQUIRE_LIBVIRT=1 but missing: {why}");
            eprintln!("skipped: needs {why}");
            None
        }
    }
}

/// The domain of guest `vm1` (folder `guest`, with `disk.qcow2` and `run/`), its agent socket
/// and console log named after `side` (each end of a migration has its own).
pub fn guest_spec(images: &Path, guest: &Path, uuid: &str, side: &str) -> DomainSpec {
    DomainSpec {
        name: "vm1".into(),
        uuid: uuid.into(),
        system_serial: "VM1-SERIAL".into(),
        board_serial: "VM1-BOARD".into(),
        mac: Some("52:54:00:12:34:56".into()),
        disk_serial: Some("VM1-DISK".into()),
        genid: None,
        memory_mib: 384,
        domain_type: "qemu",
        cpu_model: "qemu64".into(),
        cpu_vendor_id: None,
        hide_hypervisor: false,
        disabled_features: Vec::new(),
        kernel: images.join("vmlinux").canonicalize().unwrap(),
        initrd: images.join("initramfs.cpio").canonicalize().unwrap(),
        cmdline: "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests vigil.name=vm1"
            .into(),
        disk: guest.join("disk.qcow2"),
        agent_socket: guest.join(format!("run/agent-{side}.sock")),
        serial_log: guest.join(format!("serial-{side}.log")),
        runtime_disk: None,
        usb: Vec::new(),
    }
}

/// Makes a guest folder under `dir` with a fresh copy of the image's data disk.
pub fn guest_folder(images: &Path, dir: &Path) -> PathBuf {
    let guest = dir.join("vm1");
    std::fs::create_dir_all(guest.join("run")).unwrap();
    std::fs::copy(images.join("data.qcow2"), guest.join("disk.qcow2")).unwrap();
    guest
}
