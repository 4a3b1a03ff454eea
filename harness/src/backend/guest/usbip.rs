//! A dongle a guest imported over USB/IP: the harness exports it with a [`UsbipServer`] and the
//! guest's agent hands the imported connection to its kernel's vhci_hcd.

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
