//! The qemu backend's hypervisor: each start of a guest is a QEMU process of the harness's own
//! (hosts run on the sim driver), driven over QMP ([`qmp`]).
//!
//! A guest boots on q35 with its identity, its host's CPU profile (vendor, model name, family,
//! model, stepping, microcode) and a vmgenid ([`vm`]). Snapshots are internal qcow2 snapshots
//! (`savevm`); a revert starts a new QEMU process with `-loadvm` and a new vmgenid, as libvirt
//! does; a migration moves the running guest live into a second QEMU with the same CPU model.

pub mod qmp;
pub mod vm;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use self::vm::{Environment, Vm};
use super::fabric::Fabric;
use super::guest::GuestDriver;
use super::guest::agent::AgentClient;
use super::guest::hypervisor::{
    Hypervisor, LaunchSpec, Migrated, RunningGuest, copy_disk_file, run_qemu_img,
};
use super::guest::image;
use super::guest::usb_plug::UsbRedirPlug;
use super::types::{BackendError, BackendKind, WorldConfig};

/// The qemu driver: guests as QEMU processes of the harness's own.
pub type QemuDriver = GuestDriver<QemuHypervisor>;

impl QemuDriver {
    /// A driver with no guests yet, over the world's `fabric`; fails when QEMU or the guest
    /// image is missing.
    pub fn start(config: WorldConfig, fabric: Fabric) -> Result<QemuDriver, BackendError> {
        GuestDriver::new(config, fabric, QemuHypervisor::detect()?)
    }
}

/// QEMU processes started by the harness.
pub struct QemuHypervisor {
    env: Environment,
}

impl QemuHypervisor {
    /// Checks QEMU and the image; picks KVM when it can run a guest, TCG otherwise.
    pub fn detect() -> Result<QemuHypervisor, BackendError> {
        Ok(QemuHypervisor {
            env: Environment::detect()?,
        })
    }
}

impl RunningGuest for Vm {
    fn agent(&mut self) -> &mut AgentClient {
        &mut self.agent
    }

    fn failure(&self, message: &str) -> BackendError {
        Vm::failure(self, message)
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        self.monitor
            .stop()
            .map_err(|e| Vm::failure(self, &e.to_string()))
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        self.monitor
            .cont()
            .map_err(|e| Vm::failure(self, &e.to_string()))
    }

    fn usb_plug(&mut self, plug: &UsbRedirPlug) -> Result<(), BackendError> {
        self.monitor
            .usb_plug(plug)
            .map_err(|e| Vm::failure(self, &format!("cannot plug {}: {e}", plug.id)))
    }

    fn usb_unplug(&mut self, plug: &UsbRedirPlug) -> Result<(), BackendError> {
        self.monitor
            .usb_unplug(&plug.id)
            .map_err(|e| Vm::failure(self, &format!("cannot unplug {}: {e}", plug.id)))
    }

    fn forward_port(&mut self, host: SocketAddr, guest_port: u16) -> Result<(), BackendError> {
        // User networking's own forwarding: QEMU listens on `host` and connects to the guest.
        let rule = format!("tcp:{host}-:{guest_port}");
        // A rule from an earlier server on the address goes first (its answer says whether
        // there was one).
        let _ = self.monitor.hmp(&format!("hostfwd_remove n0 tcp:{host}"));
        let answer = self
            .monitor
            .hmp(&format!("hostfwd_add n0 {rule}"))
            .map_err(|e| Vm::failure(self, &format!("cannot forward {rule}: {e}")))?;
        // HMP answers nothing on success, a sentence on failure.
        if !answer.trim().is_empty() {
            return Err(Vm::failure(
                self,
                &format!("cannot forward {rule}: {}", answer.trim()),
            ));
        }
        Ok(())
    }

    fn wait_off(self, wait: Duration) {
        // QEMU exits when the guest powers off (-no-reboot).
        self.wait_exit(wait);
    }

    fn kill(self) {
        self.stop();
    }
}

impl Hypervisor for QemuHypervisor {
    type Vm = Vm;

    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn accelerator(&self) -> &'static str {
        self.env.accelerator.name
    }

    fn image_dir(&self) -> &Path {
        &self.env.image_dir
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "accelerator": self.env.accelerator.name,
            "accelerator_reason": self.env.accelerator.reason,
            "guest_kernel": image::guest_kernel(&self.env.image_dir).0,
            "qemu": self.env.qemu_version,
        })
    }

    fn add_guest(&mut self, _guest: &str, _host: &str) -> Result<(), BackendError> {
        // Every host's guests are processes on this machine.
        Ok(())
    }

    fn launch(&mut self, spec: LaunchSpec) -> Result<Vm, BackendError> {
        Vm::launch(spec, None, &self.env)
    }

    fn snapshot(
        &mut self,
        spec: &LaunchSpec,
        vm: Option<&mut Vm>,
        name: &str,
    ) -> Result<(), BackendError> {
        match vm {
            Some(vm) => vm
                .monitor
                .hmp(&format!("savevm {name}"))
                .map(drop)
                .map_err(|e| vm.failure(&e.to_string())),
            None => run_qemu_img(&["snapshot", "-c", name], &spec.disk),
        }
    }

    fn revert_stopped(&mut self, spec: &LaunchSpec, name: &str) -> Result<(), BackendError> {
        run_qemu_img(&["snapshot", "-a", name], &spec.disk)
    }

    fn copy_disk(
        &mut self,
        spec: &LaunchSpec,
        vm: Option<&mut Vm>,
        target: &Path,
    ) -> Result<(), BackendError> {
        let copy = || copy_disk_file(spec, target);
        let Some(vm) = vm else {
            return copy();
        };
        // A temporary internal snapshot of the frozen guest flushes QEMU's caches to the file.
        let tag = format!("vigil-copy-{}", spec.name);
        let running = vm
            .monitor
            .run_state()
            .map_err(|e| vm.failure(&e.to_string()))?
            == "running";
        if running {
            vm.monitor.stop().map_err(|e| vm.failure(&e.to_string()))?;
        }
        let saved = vm.monitor.hmp(&format!("savevm {tag}"));
        let copied = saved
            .map_err(|e| vm.failure(&e.to_string()))
            .and_then(|_| copy());
        let _ = vm.monitor.hmp(&format!("delvm {tag}"));
        if running {
            vm.monitor.cont().map_err(|e| vm.failure(&e.to_string()))?;
        }
        copied?;
        run_qemu_img(&["snapshot", "-d", &tag], target)
    }

    fn migrate(
        &mut self,
        source: &mut Vm,
        destination: LaunchSpec,
        _host: &str,
    ) -> Result<Migrated<Vm>, BackendError> {
        let socket = destination.run_dir.join("migration.sock");
        let mut destination = Vm::launch(destination, Some(&socket), &self.env)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline || destination.exited() {
                return Err(destination.failure("the migration destination did not listen"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let uri = format!("unix:{}", socket.display());
        source
            .monitor
            .migrate(&uri)
            .map_err(|e| source.failure(&e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let progress = loop {
            let progress = source
                .monitor
                .migration()
                .map_err(|e| source.failure(&e.to_string()))?;
            match progress.status.as_str() {
                "completed" => break progress,
                "failed" | "cancelled" => {
                    return Err(source.failure(&format!(
                        "live migration {}: see {}",
                        progress.status,
                        source.spec.log_dir.join("qemu.log").display()
                    )));
                }
                _ if Instant::now() > deadline => {
                    return Err(source.failure("live migration did not complete in 120 s"));
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // The destination runs on its own once the migration completes.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = destination
                .monitor
                .run_state()
                .map_err(|e| destination.failure(&e.to_string()))?;
            if state == "running" {
                break;
            }
            if Instant::now() > deadline {
                return Err(
                    destination.failure(&format!("the migrated guest is `{state}`, not running"))
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Migrated {
            vm: destination,
            downtime_ms: Some(progress.downtime_ms.unwrap_or_default() as f64),
        })
    }

    fn move_guest(&mut self, _guest: &str, _host: &str) -> Result<(), BackendError> {
        // The next start takes the new host's CPU, which the driver passes to `launch`.
        Ok(())
    }
}
