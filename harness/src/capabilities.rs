//! What this machine can run: installed programs' versions and whether KVM can run a guest.

use std::process::Command;

/// The first line a command prints for `--version`, if it runs.
pub fn version_of(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

/// Whether KVM can run a guest here: opening /dev/kvm is not enough, so try to create a VM.
pub fn kvm_usable() -> (bool, String) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    else {
        return (false, "/dev/kvm cannot be opened: QEMU will use TCG".into());
    };
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    // SAFETY: ioctls on a KVM fd with integer arguments.
    let api = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if api != 12 {
        return (
            false,
            format!("/dev/kvm answers API version {api}: QEMU will use TCG"),
        );
    }
    // SAFETY: as above.
    let vm = unsafe { libc::ioctl(file.as_raw_fd(), KVM_CREATE_VM, 0) };
    if vm < 0 {
        return (false, "KVM_CREATE_VM fails: QEMU will use TCG".into());
    }
    // SAFETY: closing the VM fd we created.
    unsafe { libc::close(vm) };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.contains(" vmx") || cpuinfo.contains(" svm");
    if hw {
        (true, "KVM creates VMs and the CPU has vmx/svm".into())
    } else {
        (
            false,
            "/dev/kvm exists but the CPU shows no vmx/svm (a paravirtual KVM that cannot boot a normal guest): QEMU will use TCG".into(),
        )
    }
}
