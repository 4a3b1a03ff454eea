//! A usbredir device plugged into a guest: its QEMU ids, server port and xhci port.

/// A usbredir device on the guest's xhci controller, fed by a server on 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbRedirPlug {
    /// QEMU id of both the chardev and the device.
    pub id: String,
    /// TCP port of the usbredir server.
    pub port: u16,
    /// xhci root port (1–4 are the USB 2 ports, where a high-speed device belongs).
    pub xhci_port: u8,
}

/// Root ports of the xhci controller a USB 2 device can use.
pub const XHCI_USB2_PORTS: std::ops::RangeInclusive<u8> = 1..=4;

impl UsbRedirPlug {
    /// The `chardev-add` option: a socket that connects to the server.
    pub fn chardev(&self) -> String {
        format!("socket,id={},host=127.0.0.1,port={}", self.id, self.port)
    }

    /// The `-chardev` option of a QEMU that restores a saved state: it connects in the
    /// background, so the restored device finds its connection broken, reports an unplug and
    /// plugs in afresh once connected (an open connection at load time would be taken for the
    /// saved stream's continuation).
    pub fn chardev_at_start(&self) -> String {
        format!("{},reconnect-ms=250", self.chardev())
    }

    /// The `-device` / `device_add` option.
    pub fn device(&self) -> String {
        format!(
            "usb-redir,id={},chardev={},bus=xhci.0,port={}",
            self.id, self.id, self.xhci_port
        )
    }
}
