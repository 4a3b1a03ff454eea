//! The dongle as a USB HID device: descriptors, standard and HID class control requests, and one
//! interrupt endpoint in each direction carrying the dongle's 64-byte reports unchanged.
//!
//! Sans-IO: a USB path (usbredir, USB/IP) hands it setup packets and OUT reports and collects the
//! IN reports it queues. The runtime finds the device by [`VENDOR_ID`]/[`PRODUCT_ID`] and reads
//! the dongle's serial from the iSerialNumber string.

use std::collections::VecDeque;
use std::sync::Arc;

use dongle::{DevicePort, REPORT_LEN, Report};

use super::DongleCore;

/// USB vendor id of the emulated dongle.
pub const VENDOR_ID: u16 = dongle::USB_VENDOR_ID;
/// USB product id of the emulated dongle.
pub const PRODUCT_ID: u16 = dongle::USB_PRODUCT_ID;
/// Device release number (bcdDevice).
pub const DEVICE_VERSION_BCD: u16 = 0x0100;
/// Interrupt IN endpoint address (device to host reports).
pub const IN_ENDPOINT: u8 = 0x81;
/// Interrupt OUT endpoint address (host to device reports).
pub const OUT_ENDPOINT: u8 = 0x01;
/// Polling interval of both interrupt endpoints: 1 microframe (125 µs) at high speed, 1 ms at
/// full speed.
pub const INTERVAL: u8 = 1;
/// Size of the control endpoint's packets.
pub const EP0_MAX_PACKET: u8 = 64;
/// The only configuration.
pub const CONFIGURATION_VALUE: u8 = 1;
/// HID interface class.
pub const HID_CLASS: u8 = 0x03;

const MANUFACTURER: &str = "Vigil test devices";
const PRODUCT: &str = "meter licence dongle";

/// A vendor-defined HID report descriptor: one 64-byte input and one 64-byte output report.
pub const REPORT_DESCRIPTOR: [u8; 34] = [
    0x06, 0x00, 0xff, // Usage Page (vendor defined 0xff00)
    0x09, 0x01, // Usage (1)
    0xa1, 0x01, // Collection (Application)
    0x09, 0x02, //   Usage (2)
    0x15, 0x00, //   Logical Minimum (0)
    0x26, 0xff, 0x00, //   Logical Maximum (255)
    0x75, 0x08, //   Report Size (8 bits)
    0x95, 0x40, //   Report Count (64)
    0x81, 0x02, //   Input (Data, Variable, Absolute)
    0x09, 0x03, //   Usage (3)
    0x15, 0x00, //   Logical Minimum (0)
    0x26, 0xff, 0x00, //   Logical Maximum (255)
    0x75, 0x08, //   Report Size (8 bits)
    0x95, 0x40, //   Report Count (64)
    0x91, 0x02, //   Output (Data, Variable, Absolute)
    0xc0, // End Collection
];

/// A USB setup packet (the 8 bytes that start every control transfer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupPacket {
    /// bmRequestType: direction, type and recipient.
    pub request_type: u8,
    /// bRequest.
    pub request: u8,
    /// wValue.
    pub value: u16,
    /// wIndex.
    pub index: u16,
    /// wLength: the most bytes the host accepts (IN) or sends (OUT).
    pub length: u16,
}

impl SetupPacket {
    /// Parses the 8 bytes of a setup packet as they appear on the wire.
    pub fn from_bytes(bytes: [u8; 8]) -> Self {
        SetupPacket {
            request_type: bytes[0],
            request: bytes[1],
            value: u16::from_le_bytes([bytes[2], bytes[3]]),
            index: u16::from_le_bytes([bytes[4], bytes[5]]),
            length: u16::from_le_bytes([bytes[6], bytes[7]]),
        }
    }

    /// True for a device-to-host transfer.
    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }
}

/// How the device answers a control transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlOutcome {
    /// Success; the bytes are the data stage of an IN transfer (empty for OUT transfers).
    Done(Vec<u8>),
    /// The request is not supported: the endpoint stalls.
    Stall,
}

/// One USB host's view of the dongle: its device state and its own connection to the firmware.
#[derive(Debug)]
pub struct HidDongle {
    core: Arc<DongleCore>,
    port: DevicePort,
    configuration: u8,
    pending_in: VecDeque<Report>,
}

impl HidDongle {
    /// A freshly plugged device (unconfigured) on its own connection to the dongle.
    pub fn new(core: Arc<DongleCore>) -> Self {
        HidDongle {
            core,
            port: DevicePort::new(),
            configuration: 0,
            pending_in: VecDeque::new(),
        }
    }

    /// The dongle's serial number (the iSerialNumber string).
    pub fn serial(&self) -> &str {
        self.core.serial()
    }

    /// The 18-byte device descriptor.
    pub fn device_descriptor() -> [u8; 18] {
        let [vid_lo, vid_hi] = VENDOR_ID.to_le_bytes();
        let [pid_lo, pid_hi] = PRODUCT_ID.to_le_bytes();
        let [ver_lo, ver_hi] = DEVICE_VERSION_BCD.to_le_bytes();
        [
            18,
            0x01,
            0x00,
            0x02, // USB 2.0
            0x00,
            0x00,
            0x00, // class per interface
            EP0_MAX_PACKET,
            vid_lo,
            vid_hi,
            pid_lo,
            pid_hi,
            ver_lo,
            ver_hi,
            1,
            2,
            3, // strings
            1, // one configuration
        ]
    }

    /// The configuration descriptor with its interface, HID and endpoint descriptors.
    pub fn configuration_descriptor() -> Vec<u8> {
        let [rd_lo, rd_hi] = (REPORT_DESCRIPTOR.len() as u16).to_le_bytes();
        let [mp_lo, mp_hi] = (REPORT_LEN as u16).to_le_bytes();
        let mut body = vec![
            // Interface 0: HID, no boot protocol, two endpoints.
            9,
            0x04,
            0,
            0,
            2,
            HID_CLASS,
            0,
            0,
            0, // HID descriptor: HID 1.11, one report descriptor.
            9,
            0x21,
            0x11,
            0x01,
            0,
            1,
            0x22,
            rd_lo,
            rd_hi,
            // Interrupt IN and OUT, 64-byte packets.
            7,
            0x05,
            IN_ENDPOINT,
            0x03,
            mp_lo,
            mp_hi,
            INTERVAL,
            7,
            0x05,
            OUT_ENDPOINT,
            0x03,
            mp_lo,
            mp_hi,
            INTERVAL,
        ];
        let total = (9 + body.len()) as u16;
        let [t_lo, t_hi] = total.to_le_bytes();
        let mut descriptor = vec![
            9,
            0x02,
            t_lo,
            t_hi,
            1,
            CONFIGURATION_VALUE,
            0,
            0x80, // bus powered
            50,   // 100 mA
        ];
        descriptor.append(&mut body);
        descriptor
    }

    /// String descriptor `index` (0 is the language list).
    pub fn string_descriptor(&self, index: u8) -> Option<Vec<u8>> {
        let text = match index {
            0 => return Some(vec![4, 0x03, 0x09, 0x04]), // en-US
            1 => MANUFACTURER,
            2 => PRODUCT,
            3 => self.core.serial(),
            _ => return None,
        };
        let units: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut descriptor = vec![(2 + units.len()) as u8, 0x03];
        descriptor.extend(units);
        Some(descriptor)
    }

    /// The configuration the host selected (0 while unconfigured).
    pub fn configuration(&self) -> u8 {
        self.configuration
    }

    /// Selects a configuration; false when the value is not 0 or 1.
    pub fn set_configuration(&mut self, value: u8) -> bool {
        if value > CONFIGURATION_VALUE {
            return false;
        }
        self.configuration = value;
        true
    }

    /// Answers a control transfer; `data_out` is the data stage of an OUT transfer.
    pub fn control(&mut self, setup: &SetupPacket, data_out: &[u8]) -> ControlOutcome {
        let reply = match (setup.request_type, setup.request) {
            // GET_STATUS (device, interface, endpoint).
            (0x80..=0x82, 0x00) => Some(vec![0, 0]),
            // GET_DESCRIPTOR, standard (device) or to the interface (HID class descriptors).
            (0x80 | 0x81, 0x06) => self.descriptor(setup.value),
            // GET_CONFIGURATION.
            (0x80, 0x08) => Some(vec![self.configuration]),
            // GET_INTERFACE: only alternate setting 0.
            (0x81, 0x0a) => Some(vec![0]),
            // SET_CONFIGURATION.
            (0x00, 0x09) => self.set_configuration(setup.value as u8).then(Vec::new),
            // SET_ADDRESS, CLEAR_FEATURE / SET_FEATURE, SET_INTERFACE alt 0: accepted.
            (0x00, 0x05) | (0x00..=0x02, 0x01 | 0x03) => Some(Vec::new()),
            (0x01, 0x0b) => (setup.value == 0).then(Vec::new),
            // HID SET_IDLE, SET_PROTOCOL: accepted.
            (0x21, 0x0a | 0x0b) => Some(Vec::new()),
            // HID SET_REPORT (output report through the control pipe).
            (0x21, 0x09) => {
                self.interrupt_out(data_out);
                Some(Vec::new())
            }
            // HID GET_IDLE, GET_PROTOCOL.
            (0xa1, 0x02) => Some(vec![0]),
            (0xa1, 0x03) => Some(vec![1]),
            _ => None,
        };
        match reply {
            Some(mut data) => {
                data.truncate(setup.length as usize);
                ControlOutcome::Done(data)
            }
            None => {
                tracing::debug!(?setup, "unsupported control request, stalled");
                ControlOutcome::Stall
            }
        }
    }

    fn descriptor(&self, value: u16) -> Option<Vec<u8>> {
        let [index, kind] = value.to_le_bytes();
        match kind {
            0x01 => Some(Self::device_descriptor().to_vec()),
            // Device qualifier: what the device would be at the other speed (same shape).
            0x06 => {
                let device = Self::device_descriptor();
                Some(vec![
                    10, 0x06, device[2], device[3], device[4], device[5], device[6], device[7], 1,
                    0,
                ])
            }
            0x02 if index == 0 => Some(Self::configuration_descriptor()),
            0x03 => self.string_descriptor(index),
            // HID descriptor alone, and the report descriptor.
            0x21 => Some(Self::configuration_descriptor()[18..27].to_vec()),
            0x22 => Some(REPORT_DESCRIPTOR.to_vec()),
            _ => None,
        }
    }

    /// Takes an OUT report (64 bytes from the interrupt OUT endpoint) and queues the replies.
    pub fn interrupt_out(&mut self, data: &[u8]) {
        // A host may send a short packet; the report is zero-padded as HID does.
        let mut report = [0u8; REPORT_LEN];
        let n = data.len().min(REPORT_LEN);
        report[..n].copy_from_slice(&data[..n]);
        let replies = self.core.exchange(&mut self.port, &report);
        self.pending_in.extend(replies);
    }

    /// The next IN report waiting for the host, if any.
    pub fn take_in_report(&mut self) -> Option<Report> {
        self.pending_in.pop_front()
    }

    /// True when an IN report is waiting.
    pub fn has_in_report(&self) -> bool {
        !self.pending_in.is_empty()
    }

    /// A USB port reset: unconfigured again, half-received frames and unread replies dropped.
    pub fn port_reset(&mut self) {
        self.configuration = 0;
        self.port = DevicePort::new();
        self.pending_in.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (tempfile::TempDir, HidDongle) {
        let dir = tempfile::tempdir().unwrap();
        let core = crate::usb::test_dongle(dir.path(), 3_471_100);
        (dir, HidDongle::new(core))
    }

    fn get(
        device: &mut HidDongle,
        request_type: u8,
        request: u8,
        value: u16,
        length: u16,
    ) -> ControlOutcome {
        let setup = SetupPacket {
            request_type,
            request,
            value,
            index: 0,
            length,
        };
        device.control(&setup, &[])
    }

    #[test]
    fn descriptors_describe_a_hid_device_with_two_interrupt_endpoints() {
        let (_dir, mut device) = device();
        let ControlOutcome::Done(dev) = get(&mut device, 0x80, 6, 0x0100, 64) else {
            panic!("device descriptor stalled")
        };
        assert_eq!(dev.len(), 18);
        assert_eq!(u16::from_le_bytes([dev[8], dev[9]]), VENDOR_ID);
        assert_eq!(u16::from_le_bytes([dev[10], dev[11]]), PRODUCT_ID);
        // A short read of the configuration gives its header with the full length.
        let ControlOutcome::Done(head) = get(&mut device, 0x80, 6, 0x0200, 9) else {
            panic!()
        };
        let total = u16::from_le_bytes([head[2], head[3]]) as usize;
        let ControlOutcome::Done(config) = get(&mut device, 0x80, 6, 0x0200, 255) else {
            panic!()
        };
        assert_eq!(config.len(), total);
        assert_eq!(config[9 + 5], HID_CLASS);
        let endpoints: Vec<u8> = config
            .windows(3)
            .filter(|w| w[0] == 7 && w[1] == 5)
            .map(|w| w[2])
            .collect();
        assert_eq!(endpoints, vec![IN_ENDPOINT, OUT_ENDPOINT]);
        let ControlOutcome::Done(report) = get(&mut device, 0x81, 6, 0x2200, 255) else {
            panic!()
        };
        assert_eq!(report, REPORT_DESCRIPTOR);
        assert_eq!(config[18 + 7] as usize, REPORT_DESCRIPTOR.len());
    }

    #[test]
    fn serial_string_is_the_dongle_serial() {
        let (_dir, mut device) = device();
        let ControlOutcome::Done(bytes) = get(&mut device, 0x80, 6, 0x0303, 255) else {
            panic!()
        };
        let units: Vec<u16> = bytes[2..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&units).unwrap(), device.serial());
        assert_eq!(
            get(&mut device, 0x80, 6, 0x0309, 255),
            ControlOutcome::Stall
        );
    }

    #[test]
    fn configuration_is_kept_and_bad_values_stall() {
        let (_dir, mut device) = device();
        assert_eq!(
            get(&mut device, 0x00, 9, 1, 0),
            ControlOutcome::Done(vec![])
        );
        assert_eq!(
            get(&mut device, 0x80, 8, 0, 1),
            ControlOutcome::Done(vec![1])
        );
        assert_eq!(get(&mut device, 0x00, 9, 2, 0), ControlOutcome::Stall);
        device.port_reset();
        assert_eq!(device.configuration(), 0);
    }

    #[test]
    fn an_out_report_hello_gets_an_in_report_reply() {
        let (_dir, mut device) = device();
        let (_session, hello) = dongle::Session::start(
            dongle::RuntimeId::new("vm1").unwrap(),
            &dongle::SigningKey::from_bytes(&[8; 32]),
            [9; 32],
            vec![],
        );
        for report in dongle::encode_reports(&hello).unwrap() {
            device.interrupt_out(&report);
        }
        assert!(device.has_in_report());
        let mut assembler = dongle::ReportAssembler::new();
        let mut frame = None;
        while let Some(report) = device.take_in_report() {
            frame = assembler.push(&report).unwrap().or(frame);
        }
        assert!(
            frame.is_some(),
            "the dongle answered the hello with a frame"
        );
    }
}
