//! A guest running as a libvirt domain: its agent connection and the domain calls the guest
//! driver makes of a running guest (pause, resume, dongles, power off).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virt::domain::Domain;

use super::domain_xml::{genid_of, redirdev_xml};
use crate::backend::guest::agent::AgentClient;
use crate::backend::guest::hypervisor::{LaunchSpec, RunningGuest};
use crate::backend::guest::image::tail;
use crate::backend::guest::usb_plug::UsbRedirPlug;
use crate::backend::types::BackendError;

/// A running (or paused) domain.
pub struct DomainVm {
    /// The domain on its host's daemon.
    pub domain: Domain,
    /// The guest's agent.
    pub agent: AgentClient,
    /// What it was started with.
    pub spec: LaunchSpec,
    /// The QEMU log libvirt keeps for the domain.
    pub qemu_log: PathBuf,
    /// The domain XML it was defined from.
    pub xml_file: PathBuf,
}

impl DomainVm {
    /// An error naming the guest, its last console lines and libvirt's QEMU log.
    pub fn failure_of(
        spec: &LaunchSpec,
        qemu_log: &std::path::Path,
        xml_file: &std::path::Path,
        message: &str,
    ) -> BackendError {
        BackendError::Runtime {
            machine: spec.name.clone(),
            message: format!(
                "{message}\nlast serial console lines ({}):\n{}\nlibvirt's QEMU log ({}):\n{}\ndomain XML: {}",
                spec.serial_log().display(),
                tail(&spec.serial_log(), 15),
                qemu_log.display(),
                tail(qemu_log, 5),
                xml_file.display()
            ),
        }
    }

    fn refused(&self, what: &str, e: virt::error::Error) -> BackendError {
        self.failure(&format!("libvirt refused to {what}: {e}"))
    }
}

impl RunningGuest for DomainVm {
    fn agent(&mut self) -> &mut AgentClient {
        &mut self.agent
    }

    fn failure(&self, message: &str) -> BackendError {
        DomainVm::failure_of(&self.spec, &self.qemu_log, &self.xml_file, message)
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        self.domain
            .suspend()
            .map_err(|e| self.refused("suspend the domain", e))
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        self.domain
            .resume()
            .map_err(|e| self.refused("resume the domain", e))
    }

    fn usb_plug(&mut self, plug: &UsbRedirPlug) -> Result<(), BackendError> {
        self.domain
            .attach_device_flags(&redirdev_xml(plug), virt::sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| self.refused(&format!("attach usbredir device {}", plug.id), e))
    }

    fn usb_unplug(&mut self, plug: &UsbRedirPlug) -> Result<(), BackendError> {
        self.domain
            .detach_device_flags(&redirdev_xml(plug), virt::sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| self.refused(&format!("detach usbredir device {}", plug.id), e))
    }

    fn forward_port(&mut self, host: SocketAddr, guest_port: u16) -> Result<(), BackendError> {
        // libvirt's user networking (slirp) has no port forwarding of its own (only its passt
        // backend has): QEMU's monitor command on the interface's netdev, `hostnet0`.
        let rule = format!("tcp:{host}-:{guest_port}");
        // A rule from an earlier server on the address goes first (its answer says whether
        // there was one).
        let _ = self.domain.qemu_monitor_command(
            &format!("hostfwd_remove hostnet0 tcp:{host}"),
            virt::sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        );
        let answer = self
            .domain
            .qemu_monitor_command(
                &format!("hostfwd_add hostnet0 {rule}"),
                virt::sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
            )
            .map_err(|e| self.refused(&format!("forward {rule}"), e))?;
        // HMP answers nothing on success, a sentence on failure.
        if !answer.trim().is_empty() {
            return Err(self.failure(&format!("cannot forward {rule}: {}", answer.trim())));
        }
        Ok(())
    }

    fn wait_off(self, wait: Duration) {
        // The domain ends when the guest powers off (on_poweroff destroy).
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if !self.domain.is_active().unwrap_or(false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    fn generation_id(&self) -> Option<String> {
        genid_of(&self.domain.xml_desc(0).ok()?)
    }

    fn kill(self) {
        let started = Instant::now();
        if self.domain.is_active().unwrap_or(false)
            && let Err(e) = self.domain.destroy()
        {
            tracing::warn!(guest = %self.spec.name, error = %e, "libvirt did not destroy the domain");
        }
        tracing::debug!(
            guest = %self.spec.name,
            ms = started.elapsed().as_millis() as u64,
            "domain destroyed"
        );
    }
}
