//! `vigil doctor`: which backends this machine can run, and why not.

use std::path::Path;

use serde::Serialize;

use crate::capabilities::{kvm_usable, version_of};

/// One finding about this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: String,
    /// Whether it is usable.
    pub ok: bool,
    /// What was found, or why not.
    pub detail: String,
}

/// Everything `vigil doctor` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// Individual checks.
    pub findings: Vec<Finding>,
    /// Backends that can run here.
    pub usable_backends: Vec<String>,
}

/// Whether a child process may open a login session of its own, as the sim backend's session
/// leaders do (the child gets a fresh audit session id; this process keeps its own).
fn login_sessions_open() -> bool {
    std::process::Command::new("sh")
        .args([
            "-c",
            "echo \"$(id -u)\" > /proc/self/loginuid && test \"$(cat /proc/self/sessionid)\" != 4294967295",
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn finding(check: &str, ok: bool, detail: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        ok,
        detail: detail.into(),
    }
}

/// Runs every check.
pub fn diagnose(runtime_bin: &Path) -> DoctorReport {
    let mut findings = Vec::new();
    let mut usable = Vec::new();

    let meterd = runtime_bin.join("meterd");
    let meter = runtime_bin.join("meter");
    let runtime_ok = meterd.exists() && meter.exists();
    findings.push(finding(
        "runtime under test",
        runtime_ok,
        if runtime_ok {
            format!("meter and meterd in {}", runtime_bin.display())
        } else {
            format!("meter/meterd not found in {}", runtime_bin.display())
        },
    ));
    let pidfd = pidfd_works();
    findings.push(finding(
        "pidfd_open",
        pidfd,
        if pidfd {
            "the kernel supports pidfd (crash release)"
        } else {
            "pidfd_open failed: the runtime cannot watch processes"
        },
    ));
    let loopback = std::net::TcpListener::bind(("127.9.9.9", 0)).is_ok();
    findings.push(finding(
        "loopback addresses",
        loopback,
        if loopback {
            "127.0.0.0/8 addresses can be bound (one per simulated machine)"
        } else {
            "cannot bind 127.9.9.9: simulated machines need distinct loopback addresses"
        },
    ));
    if runtime_ok && pidfd && loopback {
        usable.push("sim".to_string());
    }
    let login = login_sessions_open();
    findings.push(finding(
        "login sessions",
        login,
        if login {
            "a session leader can open its own login session (audit session id): sim terminal-server sessions are told apart as on a real machine"
        } else {
            "writing /proc/self/loginuid was refused (needs root and a kernel with audit): on sim, a scenario with two sessions on one machine or an app that leaves its session cannot run"
        },
    ));

    let qemu = version_of("qemu-system-x86_64");
    findings.push(finding(
        "qemu-system-x86_64",
        qemu.is_some(),
        qemu.clone()
            .unwrap_or_else(|| "not installed (`make deps` installs QEMU 10)".into()),
    ));
    let kvm = kvm_usable();
    findings.push(finding("KVM", kvm.0, kvm.1));
    let images = Path::new("images/out");
    let image_ok = images.join("vmlinux").exists() && images.join("initramfs.cpio").exists();
    findings.push(finding(
        "guest image",
        image_ok,
        if image_ok {
            let (kernel, _) = crate::backend::guest::image::guest_kernel(images);
            let why = if kernel == "fast" {
                "the fast kernel (images/out/vmlinux-fast; VIGIL_GUEST_KERNEL=debian boots Debian's)"
            } else {
                "Debian's kernel (`make images` builds the fast one; VIGIL_GUEST_KERNEL chooses)"
            };
            format!("images/out has a kernel and an initramfs; guests boot {why}")
        } else {
            "images/out is empty (`make images` builds it)".to_string()
        },
    ));
    let qemu_missing =
        crate::backend::qemu::vm::missing_prerequisite(&crate::backend::guest::image::image_dir());
    let accelerator = if kvm.0 { "kvm" } else { "tcg" };
    findings.push(finding(
        "qemu backend",
        qemu_missing.is_none(),
        match &qemu_missing {
            None => format!("usable; guests run with -accel {accelerator}"),
            Some(why) => why.clone(),
        },
    ));
    if qemu_missing.is_none() {
        usable.push("qemu".to_string());
    }
    findings.push(libvirt_daemon_finding());
    let libvirt = libvirt_backend_finding(accelerator);
    if libvirt.ok {
        usable.push("libvirt".to_string());
    }
    findings.push(libvirt);
    DoctorReport {
        findings,
        usable_backends: usable,
    }
}

/// Whether this build can start a libvirt daemon per host, and which libvirt it would run.
fn libvirt_daemon_finding() -> Finding {
    #[cfg(feature = "libvirt")]
    {
        if !crate::backend::libvirt::daemon::installed() {
            return finding(
                "libvirt daemon",
                false,
                "libvirtd is not installed (make deps installs libvirt 11 from bookworm-backports)",
            );
        }
        let version = std::process::Command::new(crate::backend::libvirt::daemon::LIBVIRTD)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let reaper = if crate::backend::libvirt::daemon::reaper_installed() {
            "under tini, which reaps its guests' processes at once"
        } else {
            "tini is missing (make deps): each guest's end waits for init to reap its QEMU"
        };
        finding(
            "libvirt daemon",
            true,
            format!(
                "{version}; one private daemon per host (qemu:///system?socket=<host>/run/libvirt-sock), {reaper}"
            ),
        )
    }
    #[cfg(not(feature = "libvirt"))]
    {
        finding(
            "libvirt daemon",
            false,
            "this vigil was built without the cargo feature `libvirt`",
        )
    }
}

/// Whether guests can run through libvirt here, and with which accelerator.
fn libvirt_backend_finding(accelerator: &str) -> Finding {
    #[cfg(feature = "libvirt")]
    {
        let missing = crate::backend::libvirt::hypervisor::missing_prerequisite(
            &crate::backend::guest::image::image_dir(),
        );
        let domain_type = if accelerator == "kvm" {
            "kvm"
        } else {
            "qemu (TCG)"
        };
        finding(
            "libvirt backend",
            missing.is_none(),
            missing.unwrap_or_else(|| format!("usable; domains of type {domain_type}")),
        )
    }
    #[cfg(not(feature = "libvirt"))]
    {
        let _ = accelerator;
        finding(
            "libvirt backend",
            false,
            "this vigil was built without the cargo feature `libvirt` (`cargo run --features \
             libvirt -- …`)",
        )
    }
}

fn pidfd_works() -> bool {
    // SAFETY: pidfd_open on our own pid; the fd is closed right away.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: closing the fd we just opened.
    unsafe { libc::close(fd as i32) };
    true
}
