//! What the guest driver asks of the hypervisor under it: QEMU processes the harness starts
//! itself, or domains of libvirt daemons. Everything inside a guest (sessions, apps, files,
//! USB/IP) goes through the agent and is the driver's; starting, stopping, snapshots, copies
//! and moves of whole guests are the hypervisor's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::agent::AgentClient;
use super::usb_plug::UsbRedirPlug;
use crate::backend::types::{BackendError, BackendKind, CpuProfile, HardwareIdentity};

/// What one start of a guest is made of.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Guest name (the runtime's machine name).
    pub name: String,
    /// Firmware and device identity.
    pub identity: HardwareIdentity,
    /// CPU model the guest sees.
    pub cpu: CpuProfile,
    /// VM generation id (32 hex digits).
    pub vmgenid: String,
    /// The qcow2 data disk.
    pub disk: PathBuf,
    /// Folder for this start's sockets.
    pub run_dir: PathBuf,
    /// Folder for the serial console, the hypervisor's logs and command lines.
    pub log_dir: PathBuf,
    /// Start from this internal snapshot (its running state) instead of booting.
    pub loadvm: Option<String>,
    /// usbredir devices plugged in from the start (a revert must match the saved device set).
    pub usb: Vec<UsbRedirPlug>,
    /// A read-only disk with the runtime under test, when it is not the image's own.
    pub runtime_disk: Option<PathBuf>,
    /// The CPUID hypervisor bit is switched off (an attack by the VM's owner).
    pub hide_hypervisor: bool,
    /// The world's root key (hex) the guest's runtime trusts firm certificates from.
    pub harness_root: Option<String>,
}

impl LaunchSpec {
    /// The guest's serial console log (appended across starts).
    pub fn serial_log(&self) -> PathBuf {
        self.log_dir.join("serial.log")
    }

    /// The agent's Unix socket for this start.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
}

/// A guest moved live: its new running instance and the downtime the hypervisor reported.
pub struct Migrated<V> {
    /// The guest on its new host.
    pub vm: V,
    /// Milliseconds the guest stood still, when the hypervisor says.
    pub downtime_ms: Option<f64>,
}

/// A guest that runs (or is paused) under a hypervisor.
pub trait RunningGuest {
    /// The connection to its agent.
    fn agent(&mut self) -> &mut AgentClient;
    /// An error naming the guest with what explains a failure (console, logs, command line).
    fn failure(&self, message: &str) -> BackendError;
    /// Freezes its CPUs.
    fn pause(&mut self) -> Result<(), BackendError>;
    /// Lets its CPUs run again.
    fn resume(&mut self) -> Result<(), BackendError>;
    /// Hot-plugs a usbredir device into its xhci controller.
    fn usb_plug(&mut self, plug: &UsbRedirPlug) -> Result<(), BackendError>;
    /// Unplugs a usbredir device.
    fn usb_unplug(&mut self, plug: &UsbRedirPlug) -> Result<(), BackendError>;
    /// Forwards connections to `host`, an address of the harness machine, to the guest's
    /// `guest_port` (a network server in the guest), in place of any forward from `host`.
    fn forward_port(&mut self, host: SocketAddr, guest_port: u16) -> Result<(), BackendError> {
        let _ = guest_port;
        Err(self.failure(&format!(
            "this hypervisor forwards no port into a guest (asked for {host})"
        )))
    }
    /// Waits for a guest that powers itself off; pulls its plug after `wait`.
    fn wait_off(self, wait: Duration);
    /// Pulls its plug at once (the disk keeps what was written).
    fn kill(self);
    /// The generation id it runs with (32 hex digits) when the hypervisor chose it (libvirt
    /// makes a new one at a revert); none: the one it was started with.
    fn generation_id(&self) -> Option<String> {
        None
    }
}

/// A way of running guests.
pub trait Hypervisor: 'static {
    /// A running guest.
    type Vm: RunningGuest;
    /// The backend it makes of the guest driver.
    fn kind(&self) -> BackendKind;
    /// `kvm` or `tcg`.
    fn accelerator(&self) -> &'static str;
    /// The guest image folder.
    fn image_dir(&self) -> &Path;
    /// What it adds to the backend's description (versions, accelerator).
    fn describe(&self) -> serde_json::Value;
    /// Registers a new guest placed on `host` (nothing runs yet).
    fn add_guest(&mut self, guest: &str, host: &str) -> Result<(), BackendError>;
    /// Starts a guest (from the snapshot `spec.loadvm` when set) and connects to its agent.
    fn launch(&mut self, spec: LaunchSpec) -> Result<Self::Vm, BackendError>;
    /// Takes an internal snapshot `name` of a guest's disk, and of its running state when it
    /// runs (`vm`).
    fn snapshot(
        &mut self,
        spec: &LaunchSpec,
        vm: Option<&mut Self::Vm>,
        name: &str,
    ) -> Result<(), BackendError>;
    /// Puts a stopped guest's disk back to the snapshot `name`; it stays stopped.
    fn revert_stopped(&mut self, spec: &LaunchSpec, name: &str) -> Result<(), BackendError>;
    /// Copies a guest's disk to `target`, crash-consistent when it runs (frozen meanwhile);
    /// the copy has no snapshot the hypervisor made for the purpose.
    fn copy_disk(
        &mut self,
        spec: &LaunchSpec,
        vm: Option<&mut Self::Vm>,
        target: &Path,
    ) -> Result<(), BackendError>;
    /// Moves a running guest live to `host`, started on `destination` there.
    fn migrate(
        &mut self,
        vm: &mut Self::Vm,
        destination: LaunchSpec,
        host: &str,
    ) -> Result<Migrated<Self::Vm>, BackendError>;
    /// Moves a stopped guest to `host` (its disk and snapshots go with it).
    fn move_guest(&mut self, guest: &str, host: &str) -> Result<(), BackendError>;
    /// Stops whatever the hypervisor itself runs (daemons), after every guest stopped.
    fn teardown(&mut self) {}
    /// After [`Hypervisor::teardown`]: how long the hypervisor's own steps took in this run,
    /// in milliseconds by step name (libvirt's, read from its daemons' logs; none for QEMU run
    /// directly).
    fn own_steps_ms(&self) -> BTreeMap<&'static str, Vec<f64>> {
        BTreeMap::new()
    }
}

/// Copies a stopped (or frozen and flushed) guest's disk to `target`.
pub fn copy_disk_file(spec: &LaunchSpec, target: &Path) -> Result<(), BackendError> {
    std::fs::copy(&spec.disk, target)
        .map(drop)
        .map_err(BackendError::io(format!("copy {}", spec.disk.display())))
}

/// Runs `qemu-img <args> <disk>` on a disk no guest runs from.
pub fn run_qemu_img(args: &[&str], disk: &Path) -> Result<(), BackendError> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .arg(disk)
        .output()
        .map_err(BackendError::io("run qemu-img"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BackendError::Runtime {
            machine: disk.display().to_string(),
            message: format!(
                "`qemu-img {} {}` failed: {}",
                args.join(" "),
                disk.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}
