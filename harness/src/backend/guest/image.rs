//! The guest image both hypervisors boot (kernel, initramfs, data disk template), where it
//! lives, which accelerator guests run with, and the kernel command line that carries the
//! guest's name and the harness's settings into its init.

use std::path::{Path, PathBuf};

use super::hypervisor::LaunchSpec;

/// The QEMU program guests run in, whichever hypervisor starts it.
pub const QEMU: &str = "qemu-system-x86_64";

/// Why guests cannot run here, if they cannot: QEMU or a file of the image is missing.
pub fn missing_qemu_or_image(image_dir: &Path) -> Option<String> {
    if crate::capabilities::version_of(QEMU).is_none() {
        return Some(format!(
            "{QEMU} is not installed (`make deps` installs QEMU 10)"
        ));
    }
    missing_image(image_dir)
}

/// The files of a complete guest image.
pub const IMAGE_FILES: [&str; 3] = ["vmlinux", "initramfs.cpio", "data.qcow2"];

/// Guest memory, MiB (small: snapshots and migrations copy it).
pub const MEMORY_MIB: u32 = 384;

/// The folder holding the guest image: `VIGIL_IMAGE_DIR`, else `images/out` of this checkout.
pub fn image_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VIGIL_IMAGE_DIR") {
        return PathBuf::from(dir);
    }
    let here = PathBuf::from("images/out");
    if here.join("vmlinux").exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/out")
}

/// The first file of the image that is missing, said the way a user fixes it.
pub fn missing_image(image_dir: &Path) -> Option<String> {
    IMAGE_FILES
        .iter()
        .map(|file| image_dir.join(file))
        .find(|path| !path.exists())
        .map(|path| {
            format!(
                "{} is missing (`make images` builds the guest image)",
                path.display()
            )
        })
}

/// An image file's absolute path (the image folder may be given relative).
pub fn image_file(image_dir: &Path, file: &str) -> PathBuf {
    let path = image_dir.join(file);
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// How guests run on this machine: KVM when it can run a guest, TCG otherwise.
#[derive(Debug, Clone)]
pub struct Accelerator {
    /// `kvm` or `tcg`.
    pub name: &'static str,
    /// Why that one.
    pub reason: String,
}

impl Accelerator {
    /// KVM when `/dev/kvm` can run a guest, TCG otherwise; `VIGIL_ACCEL` forces one.
    pub fn detect() -> Accelerator {
        let (kvm, reason) = crate::capabilities::kvm_usable();
        let forced = std::env::var("VIGIL_ACCEL").ok();
        let name = match forced.as_deref() {
            Some("kvm") => "kvm",
            Some("tcg") => "tcg",
            _ if kvm => "kvm",
            _ => "tcg",
        };
        Accelerator {
            name,
            reason: match forced {
                Some(f) => format!("VIGIL_ACCEL={f}"),
                None => reason,
            },
        }
    }
}

/// Chooses the guest kernel: `fast` (images/out/vmlinux-fast, built by scripts/build-kernel.sh)
/// or `debian` (images/out/vmlinux, Debian's); unset, the fast one where it was built.
pub const KERNEL_VARIABLE: &str = "VIGIL_GUEST_KERNEL";

/// The fast kernel's file in the image folder.
pub const FAST_KERNEL: &str = "vmlinux-fast";

/// Which guest kernel guests boot, and its file: `("fast", …)` or `("debian", …)`.
pub fn guest_kernel(image_dir: &Path) -> (&'static str, PathBuf) {
    let fast = image_dir.join(FAST_KERNEL);
    let choice = std::env::var(KERNEL_VARIABLE).unwrap_or_default();
    if choice != "debian" && fast.is_file() {
        ("fast", image_file(image_dir, FAST_KERNEL))
    } else {
        ("debian", image_file(image_dir, "vmlinux"))
    }
}

/// The guest kernel's command line: the guest's name and what its init hands the runtime.
pub fn kernel_cmdline(spec: &LaunchSpec) -> String {
    // Under TCG the kernel's crypto self-tests, the KDF self-test, the kprobe tracer and
    // parsing the module-signing certificates took ~2 s of every boot; a test guest needs
    // none of them (its modules still load, unverified).
    let mut line = format!(
        "console=ttyS0 quiet panic=-1 mitigations=off i8042.noaux=1 i8042.nokbd=1 \
         8250.nr_uarts=1 random.trust_cpu=on cryptomgr.notests \
         initcall_blacklist=crypto_kdf108_init,init_kprobe_trace,load_system_certificate_list \
         vigil.name={}",
        spec.name
    );
    if spec.runtime_disk.is_some() {
        line.push_str(" vigil.runtime-disk=1");
    }
    // The guest runtime's log filter, for diagnosing a guest (`VIGIL_GUEST_LOG=debug`).
    if let Some(filter) = std::env::var("VIGIL_GUEST_LOG")
        .ok()
        .filter(|f| !f.is_empty() && !f.contains(char::is_whitespace))
    {
        line.push_str(&format!(" METER_LOG={filter}"));
    }
    // A weakened runtime's defence switch reaches the guest's runtime as it reaches a
    // simulated machine's (the image's own runtime refuses to run).
    let weaken = crate::runtime::weakening::WEAKEN_VARIABLE;
    if let Some(defence) = std::env::var(weaken)
        .ok()
        .filter(|d| crate::name::check(d).is_ok())
    {
        line.push_str(&format!(" {weaken}={defence}"));
    }
    // The world's root reaches the guest's runtime the same way (init's environment); hex
    // only, so it cannot add arguments of its own.
    if let Some(root) = spec
        .harness_root
        .as_deref()
        .filter(|r| r.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        line.push_str(&format!(
            " {}={root}",
            crate::runtime::world_root::HARNESS_ROOT_VARIABLE
        ));
    }
    line
}

/// A generation id (32 hex digits) as a GUID (`8-4-4-4-12`).
pub fn guid(hex32: &str) -> String {
    let h: String = hex32.chars().filter(char::is_ascii_hexdigit).collect();
    if h.len() != 32 {
        return hex32.to_string();
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The last lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_ids_become_guids() {
        assert_eq!(
            guid("00112233445566778899aabbccddeeff"),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        assert_eq!(guid("0011"), "0011");
    }
}
