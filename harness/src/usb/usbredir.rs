//! The device side of the usbredir protocol: shows the emulated dongle to a QEMU guest as a real
//! USB device (`-device usb-redir` with a socket chardev that connects here).
//!
//! Every packet starts with a little-endian header (type, length, id); ids are 32 bits until both
//! sides' hellos announce 64-bit ids, then 64 bits. After the hellos the device side describes the
//! device (interface info, endpoint info, device connect); QEMU then forwards the guest's control
//! transfers, interrupt OUT packets and a request to start interrupt receiving, after which the
//! device side sends IN reports as they become ready. One connection is one USB host: two QEMUs
//! connected to the same dongle at once are the hypervisor's shared mode.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::DongleCore;
use super::hid_dongle::{
    ControlOutcome, DEVICE_VERSION_BCD, EP0_MAX_PACKET, HID_CLASS, HidDongle, IN_ENDPOINT,
    INTERVAL, OUT_ENDPOINT, PRODUCT_ID, SetupPacket, VENDOR_ID,
};

/// What went wrong starting a usbredir server.
#[derive(Debug, thiserror::Error)]
pub enum UsbredirError {
    /// The listening socket could not be set up.
    #[error("Cannot listen for usbredir connections")]
    Listen(#[source] std::io::Error),
}

/// Packet types (usbredirproto.h).
mod packet {
    pub const HELLO: u32 = 0;
    pub const DEVICE_CONNECT: u32 = 1;
    pub const RESET: u32 = 3;
    pub const INTERFACE_INFO: u32 = 4;
    pub const EP_INFO: u32 = 5;
    pub const SET_CONFIGURATION: u32 = 6;
    pub const GET_CONFIGURATION: u32 = 7;
    pub const CONFIGURATION_STATUS: u32 = 8;
    pub const SET_ALT_SETTING: u32 = 9;
    pub const GET_ALT_SETTING: u32 = 10;
    pub const ALT_SETTING_STATUS: u32 = 11;
    pub const START_INTERRUPT_RECEIVING: u32 = 15;
    pub const STOP_INTERRUPT_RECEIVING: u32 = 16;
    pub const INTERRUPT_RECEIVING_STATUS: u32 = 17;
    pub const CANCEL_DATA_PACKET: u32 = 21;
    pub const CONTROL_PACKET: u32 = 100;
    pub const BULK_PACKET: u32 = 101;
    pub const ISO_PACKET: u32 = 102;
    pub const INTERRUPT_PACKET: u32 = 103;
}

/// Transfer status codes.
mod status {
    pub const SUCCESS: u8 = 0;
    pub const INVALID: u8 = 2;
    pub const STALL: u8 = 4;
}

/// Capability bits this side announces.
const CAP_CONNECT_DEVICE_VERSION: u32 = 1 << 1;
const CAP_EP_INFO_MAX_PACKET_SIZE: u32 = 1 << 4;
const CAP_64BITS_IDS: u32 = 1 << 5;
const CAP_32BITS_BULK_LENGTH: u32 = 1 << 6;
/// Announced capabilities; xhci root ports need the max packet sizes, 64-bit ids and 32-bit
/// bulk lengths.
const CAPABILITIES: u32 = CAP_CONNECT_DEVICE_VERSION
    | CAP_EP_INFO_MAX_PACKET_SIZE
    | CAP_64BITS_IDS
    | CAP_32BITS_BULK_LENGTH;

/// High speed (480 Mbit/s): interrupt endpoints are serviced every 125 µs microframe, not every
/// 1 ms frame, which halves a report round trip.
const SPEED_HIGH: u8 = 2;
const TYPE_CONTROL: u8 = 0;
const TYPE_INTERRUPT: u8 = 3;
const TYPE_INVALID: u8 = 255;
/// Largest packet body accepted (a control transfer carries at most 64 KiB).
const MAX_BODY: u32 = 70_000;

/// A usbredir server exporting one dongle: every QEMU that connects sees it plugged in.
#[derive(Debug)]
pub struct UsbredirServer {
    address: SocketAddr,
    /// Shared with the accept loop, so Drop can wake it through the socket itself.
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    /// Open connections by number (each removes itself when it ends).
    connections: Arc<Mutex<BTreeMap<u64, TcpStream>>>,
    counters: Arc<Counters>,
}

/// What the server has carried, over every connection.
#[derive(Debug, Default)]
struct Counters {
    reports: AtomicU64,
    configured: AtomicU64,
}

impl UsbredirServer {
    /// Listens on 127.0.0.1 (a free port) and serves `core` to every connection.
    pub fn start(core: Arc<DongleCore>) -> Result<UsbredirServer, UsbredirError> {
        let listener =
            Arc::new(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(UsbredirError::Listen)?);
        let address = listener.local_addr().map_err(UsbredirError::Listen)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<BTreeMap<u64, TcpStream>>> = Arc::default();
        let counters = Arc::new(Counters::default());
        {
            let stop = Arc::clone(&stop);
            let connections = Arc::clone(&connections);
            let counters = Arc::clone(&counters);
            let listener = Arc::clone(&listener);
            std::thread::Builder::new()
                .name(format!("usbredir-{}", core.serial()))
                .spawn(move || {
                    for (number, incoming) in (0u64..).zip(listener.incoming()) {
                        let Ok(stream) = incoming else {
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                            continue;
                        };
                        let Ok(clone) = stream.try_clone() else {
                            continue;
                        };
                        lock(&connections).insert(number, clone);
                        // Checked after registering: a stop that drained the list before the
                        // insert is seen here.
                        if stop.load(Ordering::SeqCst) {
                            lock(&connections).remove(&number);
                            break;
                        }
                        let _ = stream.set_nodelay(true);
                        let core = Arc::clone(&core);
                        let counters = Arc::clone(&counters);
                        let connections = Arc::clone(&connections);
                        std::thread::spawn(move || {
                            let serial = core.serial().to_string();
                            match Connection::new(stream, core, counters)
                                .and_then(Connection::serve)
                            {
                                Ok(()) => tracing::debug!(%serial, "usbredir peer closed"),
                                Err(error) => {
                                    tracing::debug!(%serial, %error, "usbredir connection ended")
                                }
                            }
                            lock(&connections).remove(&number);
                        });
                    }
                })
                .map_err(UsbredirError::Listen)?;
        }
        tracing::debug!(%address, "usbredir server listening");
        Ok(UsbredirServer {
            address,
            listener,
            stop,
            connections,
            counters,
        })
    }

    /// The TCP port QEMU's chardev connects to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Reports carried so far, both directions, over every connection.
    pub fn reports(&self) -> u64 {
        self.counters.reports.load(Ordering::Relaxed)
    }

    /// Connections whose host has configured the device so far (each enumeration counts).
    pub fn configured(&self) -> u64 {
        self.counters.configured.load(Ordering::SeqCst)
    }

    /// Cuts every connection: each connected guest sees the device vanish.
    pub fn disconnect_all(&self) {
        for (_, stream) in std::mem::take(&mut *lock(&self.connections)) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for UsbredirServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.disconnect_all();
        // Wake the accept loop so it sees the stop flag: a shut-down listening socket fails a
        // blocked accept at once.
        // SAFETY: the descriptor stays open while `self.listener` holds the socket.
        unsafe {
            libc::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*self.listener),
                libc::SHUT_RD,
            )
        };
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One QEMU connected to the dongle.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    device: HidDongle,
    /// The peer's capabilities (from its hello).
    peer_capabilities: u32,
    wide_ids: bool,
    receiving_in: bool,
    next_in_id: u64,
    counters: Arc<Counters>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        core: Arc<DongleCore>,
        counters: Arc<Counters>,
    ) -> std::io::Result<Connection> {
        Ok(Connection {
            writer: BufWriter::new(stream.try_clone()?),
            reader: BufReader::new(stream),
            device: HidDongle::new(core),
            peer_capabilities: 0,
            wide_ids: false,
            receiving_in: false,
            next_in_id: 0,
            counters,
        })
    }

    fn serve(mut self) -> std::io::Result<()> {
        let mut hello = [0u8; 64];
        let version = b"vigil-usbredir 1";
        hello[..version.len()].copy_from_slice(version);
        let mut body = hello.to_vec();
        body.extend(CAPABILITIES.to_le_bytes());
        self.send(packet::HELLO, 0, &body)?;
        self.writer.flush()?;
        loop {
            let (kind, id, body) = self.receive()?;
            self.handle(kind, id, &body)?;
            self.flush_in_reports()?;
            self.writer.flush()?;
        }
    }

    fn receive(&mut self) -> std::io::Result<(u32, u64, Vec<u8>)> {
        let mut head = [0u8; 16];
        let len = if self.wide_ids { 16 } else { 12 };
        self.reader.read_exact(&mut head[..len])?;
        let kind = u32::from_le_bytes(head[0..4].try_into().unwrap_or_default());
        let length = u32::from_le_bytes(head[4..8].try_into().unwrap_or_default());
        let id = if self.wide_ids {
            u64::from_le_bytes(head[8..16].try_into().unwrap_or_default())
        } else {
            u64::from(u32::from_le_bytes(
                head[8..12].try_into().unwrap_or_default(),
            ))
        };
        if length > MAX_BODY {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("usbredir packet of {length} bytes"),
            ));
        }
        let mut body = vec![0u8; length as usize];
        self.reader.read_exact(&mut body)?;
        Ok((kind, id, body))
    }

    fn send(&mut self, kind: u32, id: u64, body: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(&kind.to_le_bytes())?;
        self.writer.write_all(&(body.len() as u32).to_le_bytes())?;
        if self.wide_ids {
            self.writer.write_all(&id.to_le_bytes())?;
        } else {
            self.writer.write_all(&(id as u32).to_le_bytes())?;
        }
        self.writer.write_all(body)
    }

    fn handle(&mut self, kind: u32, id: u64, body: &[u8]) -> std::io::Result<()> {
        match kind {
            packet::HELLO => {
                let peer = body
                    .get(64..68)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
                    .unwrap_or(0);
                tracing::debug!(
                    peer = %String::from_utf8_lossy(&body[..body.len().min(64)]).trim_end_matches('\0'),
                    capabilities = format_args!("{peer:#x}"),
                    "usbredir hello"
                );
                self.peer_capabilities = peer;
                self.wide_ids = peer & CAP_64BITS_IDS != 0;
                self.describe_device()?;
            }
            packet::RESET => self.device.port_reset(),
            packet::SET_CONFIGURATION => {
                let value = body.first().copied().unwrap_or(0);
                let ok = self.device.set_configuration(value);
                if ok && value != 0 {
                    self.counters.configured.fetch_add(1, Ordering::SeqCst);
                }
                let code = if ok { status::SUCCESS } else { status::STALL };
                let configuration = self.device.configuration();
                self.send(packet::CONFIGURATION_STATUS, id, &[code, configuration])?;
            }
            packet::GET_CONFIGURATION => {
                let configuration = self.device.configuration();
                self.send(
                    packet::CONFIGURATION_STATUS,
                    id,
                    &[status::SUCCESS, configuration],
                )?;
            }
            packet::SET_ALT_SETTING => {
                let interface = body.first().copied().unwrap_or(0);
                let alt = body.get(1).copied().unwrap_or(0);
                let code = if interface == 0 && alt == 0 {
                    status::SUCCESS
                } else {
                    status::INVALID
                };
                self.send(packet::ALT_SETTING_STATUS, id, &[code, interface, 0])?;
            }
            packet::GET_ALT_SETTING => {
                let interface = body.first().copied().unwrap_or(0);
                self.send(
                    packet::ALT_SETTING_STATUS,
                    id,
                    &[status::SUCCESS, interface, 0],
                )?;
            }
            packet::START_INTERRUPT_RECEIVING | packet::STOP_INTERRUPT_RECEIVING => {
                let endpoint = body.first().copied().unwrap_or(0);
                let ok = endpoint == IN_ENDPOINT;
                if ok {
                    self.receiving_in = kind == packet::START_INTERRUPT_RECEIVING;
                }
                let code = if ok { status::SUCCESS } else { status::INVALID };
                self.send(packet::INTERRUPT_RECEIVING_STATUS, id, &[code, endpoint])?;
            }
            packet::CONTROL_PACKET => self.control(id, body)?,
            packet::INTERRUPT_PACKET => self.interrupt_out(id, body)?,
            packet::BULK_PACKET | packet::ISO_PACKET => {
                tracing::debug!(kind, "usbredir transfer type the dongle does not have");
            }
            // Every transfer is answered at once: nothing is left to cancel.
            packet::CANCEL_DATA_PACKET => {}
            other => tracing::debug!(kind = other, "usbredir packet ignored"),
        }
        Ok(())
    }

    /// Interface info, endpoint info, then device connect: the device appears on the guest's bus.
    fn describe_device(&mut self) -> std::io::Result<()> {
        let mut interfaces = Vec::with_capacity(4 + 4 * 32);
        interfaces.extend(1u32.to_le_bytes());
        let mut column = [0u8; 32];
        interfaces.extend(column); // interface numbers: 0
        column[0] = HID_CLASS;
        interfaces.extend(column);
        interfaces.extend([0u8; 32]); // subclass
        interfaces.extend([0u8; 32]); // protocol
        self.send(packet::INTERFACE_INFO, 0, &interfaces)?;

        // Endpoint tables are indexed by ((address & 0x80) >> 3) | (address & 0x0f).
        let index = |address: u8| (((address & 0x80) >> 3) | (address & 0x0f)) as usize;
        let mut types = [TYPE_INVALID; 32];
        let mut intervals = [0u8; 32];
        let mut max_packet = [0u16; 32];
        for ep0 in [0x00, 0x80] {
            types[index(ep0)] = TYPE_CONTROL;
            max_packet[index(ep0)] = u16::from(EP0_MAX_PACKET);
        }
        for ep in [IN_ENDPOINT, OUT_ENDPOINT] {
            types[index(ep)] = TYPE_INTERRUPT;
            intervals[index(ep)] = INTERVAL;
            max_packet[index(ep)] = dongle::REPORT_LEN as u16;
        }
        let mut endpoints = Vec::with_capacity(32 * 5);
        endpoints.extend(types);
        endpoints.extend(intervals);
        endpoints.extend([0u8; 32]); // every endpoint belongs to interface 0
        // Fields a peer without the matching capability does not expect are left out.
        let both = CAPABILITIES & self.peer_capabilities;
        if both & CAP_EP_INFO_MAX_PACKET_SIZE != 0 {
            for size in max_packet {
                endpoints.extend(size.to_le_bytes());
            }
        }
        self.send(packet::EP_INFO, 0, &endpoints)?;

        let mut connect = vec![SPEED_HIGH, 0, 0, 0];
        connect.extend(VENDOR_ID.to_le_bytes());
        connect.extend(PRODUCT_ID.to_le_bytes());
        if both & CAP_CONNECT_DEVICE_VERSION != 0 {
            connect.extend(DEVICE_VERSION_BCD.to_le_bytes());
        }
        self.send(packet::DEVICE_CONNECT, 0, &connect)
    }

    fn control(&mut self, id: u64, body: &[u8]) -> std::io::Result<()> {
        // endpoint, request, requesttype, status, value, index, length
        if body.len() < 10 {
            return self.send(packet::CONTROL_PACKET, id, &[0; 10]);
        }
        let setup = SetupPacket {
            request_type: body[2],
            request: body[1],
            value: u16::from_le_bytes([body[4], body[5]]),
            index: u16::from_le_bytes([body[6], body[7]]),
            length: u16::from_le_bytes([body[8], body[9]]),
        };
        let data_out = if setup.is_in() { &[][..] } else { &body[10..] };
        let (code, data) = match self.device.control(&setup, data_out) {
            ControlOutcome::Done(data) => (status::SUCCESS, data),
            ControlOutcome::Stall => (status::STALL, Vec::new()),
        };
        if !setup.is_in() && setup.request_type == 0x21 && setup.request == 0x09 {
            self.counters.reports.fetch_add(1, Ordering::Relaxed);
        }
        let mut reply = body[..10].to_vec();
        reply[3] = code;
        // An OUT transfer's reply repeats the length it consumed and carries no data.
        let length = if setup.is_in() {
            data.len() as u16
        } else {
            data_out.len() as u16
        };
        reply[8..10].copy_from_slice(&length.to_le_bytes());
        reply.extend(data);
        self.send(packet::CONTROL_PACKET, id, &reply)
    }

    fn interrupt_out(&mut self, id: u64, body: &[u8]) -> std::io::Result<()> {
        // endpoint, status, length
        let endpoint = body.first().copied().unwrap_or(0);
        let data = body.get(4..).unwrap_or(&[]);
        let code = if endpoint == OUT_ENDPOINT {
            self.counters.reports.fetch_add(1, Ordering::Relaxed);
            self.device.interrupt_out(data);
            status::SUCCESS
        } else {
            status::INVALID
        };
        let mut reply = vec![endpoint, code];
        reply.extend((data.len() as u16).to_le_bytes());
        self.send(packet::INTERRUPT_PACKET, id, &reply)
    }

    /// Sends the device's waiting IN reports once QEMU has asked to receive them.
    fn flush_in_reports(&mut self) -> std::io::Result<()> {
        if !self.receiving_in {
            return Ok(());
        }
        while let Some(report) = self.device.take_in_report() {
            let mut body = vec![IN_ENDPOINT, status::SUCCESS];
            body.extend((report.len() as u16).to_le_bytes());
            body.extend(report);
            let id = self.next_in_id;
            self.next_in_id += 1;
            self.counters.reports.fetch_add(1, Ordering::Relaxed);
            self.send(packet::INTERRUPT_PACKET, id, &body)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The QEMU side of the protocol, as far as a test needs it.
    struct Host {
        stream: TcpStream,
        wide: bool,
    }

    impl Host {
        fn send(&mut self, kind: u32, id: u64, body: &[u8]) {
            let mut bytes = kind.to_le_bytes().to_vec();
            bytes.extend((body.len() as u32).to_le_bytes());
            if self.wide {
                bytes.extend(id.to_le_bytes());
            } else {
                bytes.extend((id as u32).to_le_bytes());
            }
            bytes.extend(body);
            self.stream.write_all(&bytes).unwrap();
        }

        fn receive(&mut self) -> (u32, u64, Vec<u8>) {
            let mut head = vec![0u8; if self.wide { 16 } else { 12 }];
            self.stream.read_exact(&mut head).unwrap();
            let kind = u32::from_le_bytes(head[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(head[4..8].try_into().unwrap());
            let id = if self.wide {
                u64::from_le_bytes(head[8..16].try_into().unwrap())
            } else {
                u32::from_le_bytes(head[8..12].try_into().unwrap()).into()
            };
            let mut body = vec![0u8; len as usize];
            self.stream.read_exact(&mut body).unwrap();
            (kind, id, body)
        }

        fn control_in(&mut self, id: u64, request_type: u8, request: u8, value: u16) -> Vec<u8> {
            let mut body = vec![0x80, request, request_type, 0];
            body.extend(value.to_le_bytes());
            body.extend(0u16.to_le_bytes());
            body.extend(255u16.to_le_bytes());
            self.send(packet::CONTROL_PACKET, id, &body);
            let (kind, got, reply) = self.receive();
            assert_eq!((kind, got), (packet::CONTROL_PACKET, id));
            assert_eq!(reply[3], status::SUCCESS, "control {request:#x} {value:#x}");
            reply[10..].to_vec()
        }
    }

    fn server() -> (tempfile::TempDir, UsbredirServer) {
        let dir = tempfile::tempdir().unwrap();
        let core = crate::usb::test_dongle(dir.path(), 4711);
        (dir, UsbredirServer::start(core).unwrap())
    }

    fn connect(server: &UsbredirServer, peer_caps: u32) -> Host {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port())).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut host = Host {
            stream,
            wide: false,
        };
        let (kind, _, hello) = host.receive();
        assert_eq!(kind, packet::HELLO);
        let caps = u32::from_le_bytes(hello[64..68].try_into().unwrap());
        assert_ne!(caps & CAP_EP_INFO_MAX_PACKET_SIZE, 0);
        let mut body = b"test-host".to_vec();
        body.resize(64, 0);
        body.extend(peer_caps.to_le_bytes());
        host.send(packet::HELLO, 0, &body);
        host.wide = peer_caps & CAP_64BITS_IDS != 0;
        host
    }

    #[test]
    fn a_host_sees_a_high_speed_hid_device_and_its_descriptors() {
        let (_dir, server) = server();
        let mut host = connect(&server, CAPABILITIES);
        let (kind, _, interfaces) = host.receive();
        assert_eq!(kind, packet::INTERFACE_INFO);
        assert_eq!(interfaces[0], 1);
        assert_eq!(interfaces[4 + 32], HID_CLASS);
        let (kind, _, endpoints) = host.receive();
        assert_eq!(kind, packet::EP_INFO);
        assert_eq!(endpoints[1], TYPE_INTERRUPT, "OUT 1");
        assert_eq!(endpoints[17], TYPE_INTERRUPT, "IN 1");
        assert_eq!(endpoints[2], TYPE_INVALID);
        let sizes = &endpoints[96..];
        assert_eq!(u16::from_le_bytes([sizes[34], sizes[35]]), 64, "IN 1 size");
        let (kind, _, connect) = host.receive();
        assert_eq!(kind, packet::DEVICE_CONNECT);
        assert_eq!(connect[0], SPEED_HIGH);
        assert_eq!(u16::from_le_bytes([connect[4], connect[5]]), VENDOR_ID);
        assert_eq!(u16::from_le_bytes([connect[6], connect[7]]), PRODUCT_ID);

        // 64-bit ids after the hellos.
        let id = (1u64 << 40) + 5;
        let device = host.control_in(id, 0x80, 6, 0x0100);
        assert_eq!(device, HidDongle::device_descriptor());
        let serial = host.control_in(id + 1, 0x80, 6, 0x0303);
        assert_eq!(serial.len(), 2 + 2 * "4711".len());

        host.send(packet::SET_CONFIGURATION, 9, &[1]);
        assert_eq!(
            host.receive(),
            (packet::CONFIGURATION_STATUS, 9, vec![status::SUCCESS, 1])
        );
    }

    #[test]
    fn an_out_report_is_answered_with_in_reports_once_receiving() {
        let (_dir, server) = server();
        // A peer without 64-bit ids keeps 32-bit headers.
        let mut host = connect(&server, CAP_EP_INFO_MAX_PACKET_SIZE);
        for _ in 0..3 {
            host.receive();
        }
        let (_session, hello) = dongle::Session::start(
            dongle::RuntimeId::new("vm1").unwrap(),
            &dongle::SigningKey::from_bytes(&[8; 32]),
            [9; 32],
            vec![],
        );
        let reports = dongle::encode_reports(&hello).unwrap();
        for (n, report) in reports.iter().enumerate() {
            let mut body = vec![OUT_ENDPOINT, 0];
            body.extend(64u16.to_le_bytes());
            body.extend(report);
            host.send(packet::INTERRUPT_PACKET, 100 + n as u64, &body);
            let (kind, id, ack) = host.receive();
            assert_eq!((kind, id), (packet::INTERRUPT_PACKET, 100 + n as u64));
            assert_eq!(ack, vec![OUT_ENDPOINT, status::SUCCESS, 64, 0]);
        }
        // Replies wait until QEMU starts interrupt receiving, then flow.
        host.send(packet::START_INTERRUPT_RECEIVING, 7, &[IN_ENDPOINT]);
        assert_eq!(
            host.receive(),
            (
                packet::INTERRUPT_RECEIVING_STATUS,
                7,
                vec![status::SUCCESS, IN_ENDPOINT]
            )
        );
        let mut assembler = dongle::ReportAssembler::new();
        let frame = loop {
            let (kind, _, body) = host.receive();
            assert_eq!(kind, packet::INTERRUPT_PACKET);
            assert_eq!(body[0], IN_ENDPOINT);
            if let Some(frame) = assembler.push(&body[4..]).unwrap() {
                break frame;
            }
        };
        assert!(!frame.is_empty());
        assert!(
            server.reports() > reports.len() as u64,
            "OUT reports and an IN reply counted"
        );
    }

    #[test]
    fn dropping_the_server_cuts_its_connections() {
        let (_dir, server) = server();
        let mut host = connect(&server, CAPABILITIES);
        for _ in 0..3 {
            host.receive();
        }
        let port = server.port();
        drop(server);
        let mut byte = [0u8; 1];
        assert_eq!(host.stream.read(&mut byte).unwrap_or(0), 0);
        // The accept loop ends too: the port stops listening.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "still listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
