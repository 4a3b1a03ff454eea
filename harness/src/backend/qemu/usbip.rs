//! Dongles imported by guests over USB/IP: the harness exports the dongle with a
//! [`UsbipServer`] and the guest's agent hands the imported connection to its kernel's vhci_hcd.

use std::time::{Duration, Instant};

use super::agent::{Op, Outcome};
use super::{HOST_FROM_GUEST, QemuBackend};
use crate::backend::{Backend, BackendError, Power};
use crate::usb::usbip::UsbipServer;

/// A dongle exported over USB/IP and imported by a guest.
pub(super) struct UsbipImport {
    /// The guest that imported it.
    pub(super) machine: String,
    /// The export.
    pub(super) server: UsbipServer,
    /// The guest's vhci_hcd port the device is on.
    pub(super) vhci_port: u32,
}

impl QemuBackend {
    /// Exports a dongle over USB/IP and has a running guest's kernel import it; ends every other
    /// attachment of the dongle first (a USB/IP export has one importer).
    pub(super) fn usbip_attach_guest(
        &mut self,
        dongle: &str,
        machine: &str,
    ) -> Result<(), BackendError> {
        self.require(machine, "usbip-attach", &[Power::Running], "running")?;
        if let Some(import) = self.usbip.get(dongle)
            && import.machine == machine
            && import.server.is_imported()
        {
            return Ok(());
        }
        self.end_usbip(dongle)?;
        for guest in self.guests_with_dongle(dongle) {
            self.unplug_from_guest(dongle, &guest)?;
        }
        if !self.sim.dongle_attached_to(dongle)?.is_empty() {
            self.sim.usb_detach(dongle)?;
        }
        let started = Instant::now();
        let server = UsbipServer::start(self.sim.dongle_core(dongle)?).map_err(|e| {
            BackendError::Runtime {
                machine: dongle.to_string(),
                message: format!("cannot export the dongle over USB/IP: {e}"),
            }
        })?;
        let outcome = self.call(
            machine,
            Op::UsbipAttach {
                host: HOST_FROM_GUEST.to_string(),
                port: server.port(),
                busid: UsbipServer::BUS_ID.to_string(),
            },
            Duration::from_secs(20),
        )?;
        let Outcome::UsbipAttached { vhci_port } = outcome else {
            return Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("the agent answered usbip-attach with {outcome:?}"),
            });
        };
        self.usbip.insert(
            dongle.to_string(),
            UsbipImport {
                machine: machine.to_string(),
                server,
                vhci_port,
            },
        );
        self.wait_for_guest_dongle(machine, dongle, true)?;
        tracing::info!(
            guest = machine,
            dongle,
            vhci_port,
            ms = started.elapsed().as_millis() as u64,
            "dongle attached over USB/IP"
        );
        Ok(())
    }

    /// Detaches a dongle a guest imported over USB/IP (as `usbip detach` in the guest) and ends
    /// its export; false when no guest had it.
    pub(super) fn end_usbip(&mut self, dongle: &str) -> Result<bool, BackendError> {
        let Some(import) = self.usbip.remove(dongle) else {
            return Ok(false);
        };
        let running = self
            .guests
            .get(&import.machine)
            .is_some_and(|g| g.power == Power::Running);
        // A guest that stopped or restarted since has no such device any more.
        if running && import.server.is_imported() {
            self.call(
                &import.machine,
                Op::UsbipDetach {
                    vhci_port: import.vhci_port,
                },
                Duration::from_secs(10),
            )?;
            self.wait_for_guest_dongle(&import.machine, dongle, false)?;
        }
        drop(import.server);
        Ok(true)
    }

    /// Cuts the USB/IP connection of a dongle a guest imported (a network fault) and waits until
    /// the guest's kernel has dropped the device; false when no guest had it.
    pub(super) fn usbip_cut(&mut self, dongle: &str) -> Result<bool, BackendError> {
        let Some(import) = self.usbip.remove(dongle) else {
            return Ok(false);
        };
        import.server.disconnect();
        drop(import.server);
        let running = self
            .guests
            .get(&import.machine)
            .is_some_and(|g| g.power == Power::Running);
        if running {
            self.wait_for_guest_dongle(&import.machine, dongle, false)?;
        }
        Ok(true)
    }
}
