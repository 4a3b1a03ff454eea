//! One QEMU process: its command line (identity, CPU, disk, agent port), its sockets and logs,
//! and the process group that dies with the harness.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::qmp::{Monitor, QmpMonitor};
use crate::backend::guest::agent::AgentClient;
use crate::backend::guest::hypervisor::LaunchSpec;
use crate::backend::guest::image::{self, Accelerator, MEMORY_MIB, guid, tail};
use crate::backend::types::BackendError;

pub use crate::backend::guest::image::QEMU;

/// Where the guest image lives and how QEMU runs on this machine.
#[derive(Debug, Clone)]
pub struct Environment {
    /// `vmlinux`, `initramfs.cpio` and `data.qcow2`.
    pub image_dir: PathBuf,
    /// KVM or TCG, and why.
    pub accelerator: Accelerator,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu_version: String,
}

/// Why the qemu backend cannot run here, if it cannot.
pub fn missing_prerequisite(image_dir: &Path) -> Option<String> {
    image::missing_qemu_or_image(image_dir)
}

impl Environment {
    /// Checks QEMU and the image; picks KVM when it can run a guest, TCG otherwise.
    pub fn detect() -> Result<Environment, BackendError> {
        let image_dir = image::image_dir();
        if let Some(why) = missing_prerequisite(&image_dir) {
            return Err(BackendError::Unsupported {
                backend: crate::backend::types::BackendKind::Qemu,
                operation: "start",
                why,
            });
        }
        Ok(Environment {
            image_dir,
            accelerator: Accelerator::detect(),
            qemu_version: crate::capabilities::version_of(QEMU).unwrap_or_default(),
        })
    }
}

/// Escapes a value for QEMU's `key=value,…` option syntax.
fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// QEMU's arguments for a start of `spec` (waiting for a migration on `incoming` when given).
pub fn command_args(spec: &LaunchSpec, incoming: Option<&Path>, env: &Environment) -> Vec<String> {
    {
        let id = &spec.identity;
        let cpu = &spec.cpu;
        let mut cpu_opt = format!(
            "qemu64,vendor={},model-id={},family={},model={},stepping={}",
            opt(&cpu.vendor),
            opt(&cpu.model_name),
            cpu.family,
            cpu.model,
            cpu.stepping
        );
        if let Some(rev) = parse_microcode(&cpu.microcode) {
            cpu_opt.push_str(&format!(",ucode-rev={rev}"));
        }
        if spec.hide_hypervisor {
            cpu_opt.push_str(",-hypervisor");
        }
        let mut disk_device = "virtio-blk-pci,drive=d0,id=vblk0".to_string();
        if let Some(serial) = id.disk_serials.first() {
            // virtio-blk serials are at most 20 characters.
            let serial: String = serial.chars().take(20).collect();
            disk_device.push_str(&format!(",serial={}", opt(&serial)));
        }
        // No network boot ROM: the firmware's loading and starting it cost ~0.5 s of each boot
        // under TCG, and a guest boots from -kernel.
        let mut nic = "virtio-net-pci,netdev=n0,id=nic0,romfile=".to_string();
        if let Some(mac) = id.macs.first() {
            nic.push_str(&format!(",mac={mac}"));
        }
        let mut args: Vec<String> = [
            "-accel",
            env.accelerator.name,
            "-machine",
            "q35",
            "-m",
            &MEMORY_MIB.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let kernel = image::guest_kernel(&env.image_dir).1;
        let initrd = image::image_file(&env.image_dir, "initramfs.cpio");
        args.extend([
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            image::kernel_cmdline(spec),
            "-smbios".into(),
            format!(
                "type=1,uuid={},serial={},manufacturer=QEMU,product=Standard PC",
                id.product_uuid,
                opt(&id.product_serial)
            ),
            "-smbios".into(),
            format!("type=2,serial={}", opt(&id.board_serial)),
            "-cpu".into(),
            cpu_opt,
            "-netdev".into(),
            "user,id=n0".into(),
            "-device".into(),
            nic,
            "-blockdev".into(),
            // The guest's flushes reach QEMU's qcow2 layer (its metadata is written out, so a
            // killed QEMU loses nothing) but not the host's disk: a test guest needs no
            // durability against a host crash, and each fsync cost tens of milliseconds.
            format!(
                "driver=file,filename={},node-name=f0,cache.no-flush=on",
                opt(&spec.disk.display().to_string())
            ),
            "-blockdev".into(),
            "driver=qcow2,file=f0,node-name=d0".into(),
            "-device".into(),
            disk_device,
            "-device".into(),
            format!("vmgenid,id=vmgen0,guid={}", guid(&spec.vmgenid)),
            // An entropy source: without one (no RDRAND under TCG) the guest's getrandom blocks
            // for seconds at boot, and the runtime's first key waits for it.
            "-device".into(),
            "virtio-rng-pci".into(),
            // USB: dongles are plugged into this controller over usbredir.
            "-device".into(),
            "qemu-xhci,id=xhci".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent0,path={},server=on,wait=off",
                opt(&spec.agent_socket().display().to_string())
            ),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-device".into(),
            "virtserialport,chardev=agent0,name=vigil".into(),
            "-chardev".into(),
            format!(
                "file,id=console0,path={},append=on",
                opt(&spec.serial_log().display().to_string())
            ),
            "-serial".into(),
            "chardev:console0".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                opt(&spec.run_dir.join("qmp.sock").display().to_string())
            ),
        ]);
        if let Some(disk) = &spec.runtime_disk {
            args.extend([
                "-blockdev".into(),
                format!(
                    "driver=file,filename={},node-name=rtf,read-only=on",
                    opt(&disk.display().to_string())
                ),
                "-blockdev".into(),
                "driver=raw,file=rtf,node-name=rt,read-only=on".into(),
                "-device".into(),
                format!(
                    "virtio-blk-pci,drive=rt,id=vblk-rt,serial={}",
                    vigil_agent::protocol::RUNTIME_DISK_SERIAL
                ),
            ]);
        }
        for plug in &spec.usb {
            args.extend([
                "-chardev".into(),
                plug.chardev_at_start(),
                "-device".into(),
                plug.device(),
            ]);
        }
        if let Some(tag) = &spec.loadvm {
            args.extend(["-loadvm".into(), tag.clone()]);
        }
        if let Some(socket) = incoming {
            args.extend(["-incoming".into(), format!("unix:{}", socket.display())]);
        }
        args
    }
}

fn parse_microcode(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// A running QEMU process with its monitor and agent connections.
pub struct Vm {
    /// What it was started with.
    pub spec: LaunchSpec,
    /// The command line, for diagnostics.
    pub command_line: String,
    child: Child,
    /// The monitor.
    pub monitor: Box<dyn Monitor>,
    /// The agent (connected once the port socket exists).
    pub agent: AgentClient,
}

impl Vm {
    /// Starts QEMU in its own process group (killed with the harness) and connects to its
    /// monitor and agent sockets.
    /// With `incoming`, QEMU waits for a live migration on that Unix socket.
    pub fn launch(
        spec: LaunchSpec,
        incoming: Option<&Path>,
        env: &Environment,
    ) -> Result<Vm, BackendError> {
        std::fs::create_dir_all(&spec.run_dir).map_err(BackendError::io(format!(
            "create {}",
            spec.run_dir.display()
        )))?;
        std::fs::create_dir_all(&spec.log_dir).map_err(BackendError::io(format!(
            "create {}",
            spec.log_dir.display()
        )))?;
        for socket in ["agent.sock", "qmp.sock"] {
            let _ = std::fs::remove_file(spec.run_dir.join(socket));
        }
        let args = command_args(&spec, incoming, env);
        let command_line = format!("{QEMU} {}", shell_words(&args));
        let mut commands = OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log_dir.join("qemu-commands.txt"))
            .map_err(BackendError::io("open the QEMU command log"))?;
        use std::io::Write;
        let _ = writeln!(commands, "{command_line}");
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log_dir.join("qemu.log"))
            .map_err(BackendError::io("open the QEMU log"))?;
        let mut command = Command::new(QEMU);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(
                stderr
                    .try_clone()
                    .map_err(BackendError::io("clone the QEMU log"))?,
            )
            .stderr(stderr);
        crate::backend::process::detach_into_own_group(&mut command);
        let mut child = command
            .spawn()
            .map_err(BackendError::io(format!("start {QEMU} for {}", spec.name)))?;
        let monitor =
            match QmpMonitor::connect(&spec.run_dir.join("qmp.sock"), Duration::from_secs(20)) {
                Ok(m) => m,
                Err(e) => {
                    kill_group(&mut child);
                    return Err(boot_failure(&spec, &command_line, &e.to_string()));
                }
            };
        let agent = match AgentClient::connect(&spec.agent_socket(), Duration::from_secs(10)) {
            Ok(a) => a,
            Err(e) => {
                kill_group(&mut child);
                return Err(boot_failure(&spec, &command_line, &e.to_string()));
            }
        };
        Ok(Vm {
            spec,
            command_line,
            child,
            monitor: Box::new(monitor),
            agent,
        })
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `wait` for QEMU to exit by itself; kills its group otherwise.
    pub fn wait_exit(mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        kill_group(&mut self.child);
    }

    /// Asks QEMU to quit, then makes sure its process group is gone.
    pub fn stop(mut self) {
        let _ = self.monitor.quit();
        self.wait_exit(Duration::from_secs(3));
    }

    /// An error naming the guest, its last serial lines and the QEMU command line.
    pub fn failure(&self, message: &str) -> BackendError {
        boot_failure(&self.spec, &self.command_line, message)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.exited() {
            kill_group(&mut self.child);
        }
    }
}

fn kill_group(child: &mut Child) {
    // SAFETY: the child leads its own process group (setpgid at spawn).
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.kill();
    let _ = child.wait();
}

/// A failure of a guest with what is needed to understand it.
pub fn boot_failure(spec: &LaunchSpec, command_line: &str, message: &str) -> BackendError {
    let serial = tail(&spec.serial_log(), 15);
    let stderr = tail(&spec.log_dir.join("qemu.log"), 5);
    BackendError::Runtime {
        machine: spec.name.clone(),
        message: format!(
            "{message}\nlast serial console lines ({}):\n{serial}\nQEMU stderr:\n{stderr}\nQEMU command line:\n{command_line}",
            spec.serial_log().display()
        ),
    }
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=,.:/@+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::types::HardwareIdentity;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            name: "vm1".into(),
            identity: HardwareIdentity {
                product_uuid: "11111111-2222-3333-4444-555555555555".into(),
                product_serial: "VM-1,2".into(),
                board_serial: "VB-1".into(),
                disk_serials: vec!["QM-0123456789abcdefghijkl".into()],
                macs: vec!["52:54:00:aa:bb:cc".into()],
            },
            cpu: crate::identity::cpu_profile("GenuineIntel", "Xeon Gold 6248"),
            vmgenid: "00112233445566778899aabbccddeeff".into(),
            disk: "/tmp/d.qcow2".into(),
            run_dir: "/tmp/run".into(),
            log_dir: "/tmp/log".into(),
            loadvm: Some("fresh".into()),
            usb: Vec::new(),
            runtime_disk: None,
            hide_hypervisor: false,
            harness_root: Some("ab".repeat(32)),
        }
    }

    #[test]
    fn command_line_carries_identity_cpu_and_generation() {
        let env = Environment {
            image_dir: "/img".into(),
            accelerator: Accelerator {
                name: "tcg",
                reason: String::new(),
            },
            qemu_version: String::new(),
        };
        let args = command_args(&spec(), None, &env).join(" ");
        assert!(args.contains("-accel tcg"));
        assert!(args.contains("type=1,uuid=11111111-2222-3333-4444-555555555555,serial=VM-1,,2"));
        assert!(args.contains("type=2,serial=VB-1"));
        assert!(args.contains("mac=52:54:00:aa:bb:cc"));
        assert!(args.contains("serial=QM-0123456789abcdefg"), "{args}");
        assert!(
            !args.contains("abcdefgh"),
            "disk serials are cut to 20 characters"
        );
        assert!(args.contains("vendor=GenuineIntel"));
        assert!(args.contains("guid=00112233-4455-6677-8899-aabbccddeeff"));
        assert!(args.contains("-loadvm fresh"));
        assert!(!args.contains("-incoming"));
    }

    #[test]
    fn microcode_parses() {
        assert_eq!(parse_microcode("0x5003604"), Some(0x5003604));
        assert_eq!(parse_microcode("17"), Some(17));
        assert_eq!(parse_microcode("n/a"), None);
    }
}
