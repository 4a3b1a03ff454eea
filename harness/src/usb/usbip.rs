//! A USB/IP server exporting one emulated dongle, so a guest kernel's `vhci_hcd` can import it.
//!
//! The wire protocol is the Linux kernel's (Documentation/usb/usbip_protocol.rst), big-endian:
//! `OP_REQ_DEVLIST`/`OP_REP_DEVLIST` and `OP_REQ_IMPORT`/`OP_REP_IMPORT` on a fresh TCP
//! connection, then, on the imported connection, `USBIP_CMD_SUBMIT`/`USBIP_RET_SUBMIT` and
//! `USBIP_CMD_UNLINK`/`USBIP_RET_UNLINK` carrying the device's URBs. One importer at a time; each
//! import is a fresh plug of a [`HidDongle`] on the shared [`DongleCore`] (a host plugging in and
//! unplugging, [`DongleCore::plugged`]). Interrupt IN URBs wait until the device has a report.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use dongle::REPORT_LEN;

use super::DongleCore;
use super::hid_dongle::{self, ControlOutcome, HidDongle, SetupPacket};

/// Version of the USB/IP protocol spoken (1.1.1).
pub const USBIP_VERSION: u16 = 0x0111;
/// Request for the list of exported devices.
pub const OP_REQ_DEVLIST: u16 = 0x8005;
/// Reply with the list of exported devices.
pub const OP_REP_DEVLIST: u16 = 0x0005;
/// Request to import a device.
pub const OP_REQ_IMPORT: u16 = 0x8003;
/// Reply to an import request.
pub const OP_REP_IMPORT: u16 = 0x0003;
/// Submits an URB.
pub const USBIP_CMD_SUBMIT: u32 = 0x0001;
/// Unlinks a submitted URB.
pub const USBIP_CMD_UNLINK: u32 = 0x0002;
/// Result of a submitted URB.
pub const USBIP_RET_SUBMIT: u32 = 0x0003;
/// Result of an unlink.
pub const USBIP_RET_UNLINK: u32 = 0x0004;
/// Direction field of an URB header: host to device.
pub const DIR_OUT: u32 = 0;
/// Direction field of an URB header: device to host.
pub const DIR_IN: u32 = 1;
/// Import status: the device is exported but someone else has imported it.
pub const ST_DEV_BUSY: u32 = 2;
/// Import status: no exported device has that bus id.
pub const ST_NODEV: u32 = 4;
/// The USB speed code of a high-speed device (`enum usb_device_speed`), as the dongle enumerates.
pub const SPEED_HIGH: u32 = 3;
/// Bus number of the exported device.
pub const BUS_NUM: u32 = 1;
/// Device number of the exported device.
pub const DEV_NUM: u32 = 2;
/// Size of an URB header (`struct usbip_header`).
pub const URB_HEADER_LEN: usize = 48;
/// Size of the device record of a devlist or import reply (`struct usbip_usb_device`).
pub const DEVICE_RECORD_LEN: usize = 312;

const ECONNRESET: i32 = 104;
const EPIPE: i32 = 32;
/// Largest transfer the server accepts in one URB (a sanity bound on a hostile length).
const MAX_TRANSFER: usize = 64 * 1024;

/// Errors of the USB/IP server.
#[derive(Debug, thiserror::Error)]
pub enum UsbipError {
    /// The listening socket could not be opened.
    #[error("Cannot listen for USB/IP on 127.0.0.1")]
    Listen(#[source] std::io::Error),
    /// A server thread could not be started.
    #[error("Cannot start the USB/IP server thread")]
    Thread(#[source] std::io::Error),
}

/// A USB/IP server on 127.0.0.1 exporting one dongle as bus id [`UsbipServer::BUS_ID`].
pub struct UsbipServer {
    address: SocketAddr,
    /// Shared with the accept loop, so Drop can wake it through the socket itself.
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// The current import: its connection and generation.
struct Import {
    generation: u64,
    stream: TcpStream,
}

struct Shared {
    core: Arc<DongleCore>,
    stop: AtomicBool,
    next_connection: AtomicU64,
    import: Mutex<Option<Import>>,
    /// Every open connection (for shutdown) and its thread.
    connections: Mutex<BTreeMap<u64, Connection>>,
}

/// An open connection: a handle on its socket and its thread.
type Connection = (TcpStream, Option<JoinHandle<()>>);

impl Shared {
    fn import(&self) -> MutexGuard<'_, Option<Import>> {
        self.import.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connections(&self) -> MutexGuard<'_, BTreeMap<u64, Connection>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl UsbipServer {
    /// The bus id the dongle is exported under.
    pub const BUS_ID: &'static str = "1-1";

    /// Starts serving the dongle on an ephemeral port of 127.0.0.1.
    pub fn start(core: Arc<DongleCore>) -> Result<UsbipServer, UsbipError> {
        let listener = Arc::new(TcpListener::bind(("127.0.0.1", 0)).map_err(UsbipError::Listen)?);
        let address = listener.local_addr().map_err(UsbipError::Listen)?;
        let shared = Arc::new(Shared {
            core,
            stop: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
            import: Mutex::new(None),
            connections: Mutex::new(BTreeMap::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            let listener = Arc::clone(&listener);
            std::thread::Builder::new()
                .name("usbip-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(UsbipError::Thread)?
        };
        tracing::debug!(%address, serial = shared.core.serial(), "USB/IP server listening");
        Ok(UsbipServer {
            address,
            listener,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Abruptly closes the current import's connection (a network fault); the export is free
    /// again, and the dongle is unplugged from the importer at once (not when its connection's
    /// thread notices, which could come after the next import).
    pub fn disconnect(&self) {
        let mut import = self.shared.import();
        if let Some(cut) = import.take() {
            tracing::info!(serial = self.shared.core.serial(), "USB/IP connection cut");
            let _ = cut.stream.shutdown(Shutdown::Both);
            self.shared.core.unplugged();
        }
    }

    /// True while a client has the dongle imported.
    pub fn is_imported(&self) -> bool {
        self.shared.import().is_some()
    }
}

impl Drop for UsbipServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the stop flag: shutting the listening socket down
        // makes a blocked accept fail at once (no connection needed, so no file descriptor).
        // SAFETY: the descriptor stays open while `self.listener` holds the socket.
        unsafe {
            libc::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*self.listener),
                libc::SHUT_RD,
            )
        };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.disconnect();
        let connections = std::mem::take(&mut *self.shared.connections());
        for (_, (stream, handle)) in connections {
            let _ = stream.shutdown(Shutdown::Both);
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("USB/IP accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
        let mut connections = shared.connections();
        // Connections that ended are forgotten here (their threads have finished or are finishing).
        connections.retain(|_, (_, handle)| !handle.as_ref().is_some_and(JoinHandle::is_finished));
        let thread_shared = Arc::clone(shared);
        let handle = std::thread::Builder::new()
            .name("usbip-conn".into())
            .spawn(move || {
                if let Err(e) = serve_connection(stream, id, &thread_shared) {
                    tracing::debug!("USB/IP connection {id} ended: {e}");
                }
                thread_shared.connections().remove(&id);
            });
        match handle {
            Ok(handle) => {
                connections.insert(id, (clone, Some(handle)));
            }
            Err(e) => tracing::warn!("cannot start a USB/IP connection thread: {e}"),
        }
    }
}

/// The device record of devlist and import replies (`struct usbip_usb_device`).
fn device_record(configuration: u8) -> Vec<u8> {
    let descriptor = HidDongle::device_descriptor();
    let mut record = Vec::with_capacity(DEVICE_RECORD_LEN);
    let mut path = [0u8; 256];
    let text = b"/sys/devices/platform/vigil-usb/usb1/1-1";
    path[..text.len()].copy_from_slice(text);
    record.extend_from_slice(&path);
    let mut busid = [0u8; 32];
    busid[..UsbipServer::BUS_ID.len()].copy_from_slice(UsbipServer::BUS_ID.as_bytes());
    record.extend_from_slice(&busid);
    record.extend_from_slice(&BUS_NUM.to_be_bytes());
    record.extend_from_slice(&DEV_NUM.to_be_bytes());
    record.extend_from_slice(&SPEED_HIGH.to_be_bytes());
    record.extend_from_slice(&hid_dongle::VENDOR_ID.to_be_bytes());
    record.extend_from_slice(&hid_dongle::PRODUCT_ID.to_be_bytes());
    record.extend_from_slice(&hid_dongle::DEVICE_VERSION_BCD.to_be_bytes());
    // Class, subclass and protocol of the device descriptor; configuration; counts.
    record.extend_from_slice(&[descriptor[4], descriptor[5], descriptor[6]]);
    record.push(configuration);
    record.push(descriptor[17]);
    record.push(1);
    debug_assert_eq!(record.len(), DEVICE_RECORD_LEN);
    record
}

fn op_header(code: u16, status: u32) -> [u8; 8] {
    let mut header = [0u8; 8];
    header[..2].copy_from_slice(&USBIP_VERSION.to_be_bytes());
    header[2..4].copy_from_slice(&code.to_be_bytes());
    header[4..].copy_from_slice(&status.to_be_bytes());
    header
}

/// Serves one TCP connection: an operation request, then URBs if it imported the device.
fn serve_connection(mut stream: TcpStream, id: u64, shared: &Shared) -> std::io::Result<()> {
    let mut header = [0u8; 8];
    stream.read_exact(&mut header)?;
    let code = u16::from_be_bytes([header[2], header[3]]);
    match code {
        OP_REQ_DEVLIST => {
            let mut reply = op_header(OP_REP_DEVLIST, 0).to_vec();
            reply.extend_from_slice(&1u32.to_be_bytes());
            reply.extend(device_record(0));
            // The one interface: class, subclass, protocol, padding.
            reply.extend_from_slice(&[hid_dongle::HID_CLASS, 0, 0, 0]);
            stream.write_all(&reply)
        }
        OP_REQ_IMPORT => {
            let mut busid = [0u8; 32];
            stream.read_exact(&mut busid)?;
            let end = busid.iter().position(|&b| b == 0).unwrap_or(busid.len());
            if &busid[..end] != UsbipServer::BUS_ID.as_bytes() {
                tracing::info!(
                    busid = %String::from_utf8_lossy(&busid[..end]),
                    "USB/IP import of an unknown bus id refused"
                );
                return stream.write_all(&op_header(OP_REP_IMPORT, ST_NODEV));
            }
            {
                let mut import = shared.import();
                if import.is_some() || shared.stop.load(Ordering::SeqCst) {
                    tracing::info!("USB/IP import refused: the dongle is already imported");
                    return stream.write_all(&op_header(OP_REP_IMPORT, ST_DEV_BUSY));
                }
                *import = Some(Import {
                    generation: id,
                    stream: stream.try_clone()?,
                });
            }
            shared.core.plugged();
            tracing::info!(serial = shared.core.serial(), "USB/IP import");
            let mut reply = op_header(OP_REP_IMPORT, 0).to_vec();
            reply.extend(device_record(0));
            let served = stream
                .write_all(&reply)
                .and_then(|()| serve_urbs(&mut stream, HidDongle::new(Arc::clone(&shared.core))));
            // The import ends with its connection, unless a disconnect already ended it (and
            // unplugged the dongle then).
            let mut import = shared.import();
            if import.as_ref().is_some_and(|i| i.generation == id) {
                *import = None;
                shared.core.unplugged();
            }
            drop(import);
            let _ = stream.shutdown(Shutdown::Both);
            served
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown USB/IP operation {other:#06x}"),
        )),
    }
}

/// The fields of a `USBIP_CMD_SUBMIT` or `USBIP_CMD_UNLINK` the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UrbCommand {
    command: u32,
    seqnum: u32,
    direction: u32,
    endpoint: u32,
    /// `transfer_buffer_length` of a submit.
    length: u32,
    /// `unlink_seqnum` of an unlink.
    unlink_seqnum: u32,
    setup: [u8; 8],
}

impl UrbCommand {
    fn parse(bytes: &[u8; URB_HEADER_LEN]) -> UrbCommand {
        let word =
            |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut setup = [0u8; 8];
        setup.copy_from_slice(&bytes[40..48]);
        UrbCommand {
            command: word(0),
            seqnum: word(4),
            direction: word(12),
            endpoint: word(16),
            unlink_seqnum: word(20),
            length: word(24),
            setup,
        }
    }
}

/// A `USBIP_RET_SUBMIT` of an IN transfer, followed by its data.
fn ret_submit_in(seqnum: u32, status: i32, data: &[u8]) -> Vec<u8> {
    let mut out = ret_submit(seqnum, status, data.len());
    out.extend_from_slice(data);
    out
}

/// A `USBIP_RET_SUBMIT` header; `actual_length` of an OUT transfer is the bytes it delivered.
fn ret_submit(seqnum: u32, status: i32, actual_length: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(URB_HEADER_LEN + REPORT_LEN);
    out.extend_from_slice(&USBIP_RET_SUBMIT.to_be_bytes());
    out.extend_from_slice(&seqnum.to_be_bytes());
    out.extend_from_slice(&[0u8; 12]); // devid, direction, ep: zero in replies
    out.extend_from_slice(&status.to_be_bytes());
    out.extend_from_slice(&(actual_length as u32).to_be_bytes());
    out.extend_from_slice(&[0u8; 20]); // start_frame, number_of_packets, error_count, padding
    out
}

/// A `USBIP_RET_UNLINK`.
fn ret_unlink(seqnum: u32, status: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(URB_HEADER_LEN);
    out.extend_from_slice(&USBIP_RET_UNLINK.to_be_bytes());
    out.extend_from_slice(&seqnum.to_be_bytes());
    out.extend_from_slice(&[0u8; 12]);
    out.extend_from_slice(&status.to_be_bytes());
    out.extend_from_slice(&[0u8; 24]);
    out
}

/// An interrupt IN URB waiting for a report.
struct PendingIn {
    seqnum: u32,
    length: usize,
}

/// Serves the URBs of an imported connection until it closes.
fn serve_urbs(stream: &mut TcpStream, mut device: HidDongle) -> std::io::Result<()> {
    let mut pending: VecDeque<PendingIn> = VecDeque::new();
    let mut header = [0u8; URB_HEADER_LEN];
    loop {
        stream.read_exact(&mut header)?;
        let urb = UrbCommand::parse(&header);
        let mut reply = Vec::new();
        match urb.command {
            USBIP_CMD_SUBMIT => {
                let length = urb.length as usize;
                if length > MAX_TRANSFER {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("URB of {length} bytes"),
                    ));
                }
                let mut data_out = vec![0u8; if urb.direction == DIR_OUT { length } else { 0 }];
                stream.read_exact(&mut data_out)?;
                match (urb.endpoint, urb.direction) {
                    (0, _) => {
                        let setup = SetupPacket::from_bytes(urb.setup);
                        let outcome = control(&mut device, &setup, &data_out);
                        reply = match outcome {
                            ControlOutcome::Done(_) if urb.direction == DIR_OUT => {
                                ret_submit(urb.seqnum, 0, data_out.len())
                            }
                            ControlOutcome::Done(mut data) => {
                                data.truncate(length);
                                ret_submit_in(urb.seqnum, 0, &data)
                            }
                            ControlOutcome::Stall => ret_submit(urb.seqnum, -EPIPE, 0),
                        };
                    }
                    (ep, DIR_OUT) if ep == u32::from(hid_dongle::OUT_ENDPOINT) => {
                        device.interrupt_out(&data_out);
                        reply = ret_submit(urb.seqnum, 0, data_out.len());
                    }
                    (ep, DIR_IN) if ep == u32::from(hid_dongle::IN_ENDPOINT & 0x0f) => {
                        pending.push_back(PendingIn {
                            seqnum: urb.seqnum,
                            length,
                        });
                    }
                    (ep, direction) => {
                        tracing::debug!(ep, direction, "URB to an unknown endpoint stalled");
                        reply = ret_submit(urb.seqnum, -EPIPE, 0);
                    }
                }
            }
            USBIP_CMD_UNLINK => {
                let target = urb.unlink_seqnum;
                let status = match pending.iter().position(|p| p.seqnum == target) {
                    Some(i) => {
                        pending.remove(i);
                        -ECONNRESET
                    }
                    // Already answered: nothing left to unlink.
                    None => 0,
                };
                reply = ret_unlink(urb.seqnum, status);
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown URB command {other:#x}"),
                ));
            }
        }
        // Waiting IN URBs take the reports the device has queued, oldest first.
        while !pending.is_empty() && device.has_in_report() {
            let waiting = pending.pop_front().expect("not empty");
            let report = device.take_in_report().expect("has a report");
            let n = report.len().min(waiting.length);
            reply.extend(ret_submit_in(waiting.seqnum, 0, &report[..n]));
        }
        if !reply.is_empty() {
            stream.write_all(&reply)?;
        }
    }
}

/// A control transfer; a hub-style port reset resets the device, the rest goes to the device.
fn control(device: &mut HidDongle, setup: &SetupPacket, data_out: &[u8]) -> ControlOutcome {
    // SET_FEATURE(PORT_RESET) to the port: the importer resets the device.
    if setup.request_type == 0x23 && setup.request == 0x03 && setup.value == 4 {
        device.port_reset();
        return ControlOutcome::Done(Vec::new());
    }
    device.control(setup, data_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn server() -> (tempfile::TempDir, Arc<DongleCore>, UsbipServer) {
        let dir = tempfile::tempdir().unwrap();
        let core = crate::usb::test_dongle(dir.path(), 3_471_200);
        let server = UsbipServer::start(Arc::clone(&core)).unwrap();
        (dir, core, server)
    }

    /// The importing side of the protocol, as a kernel's vhci_hcd speaks it.
    struct Client {
        stream: TcpStream,
        next_seqnum: u32,
        /// Submitted IN URBs: their answers carry data.
        in_seqnums: std::collections::BTreeSet<u32>,
    }

    /// A `USBIP_RET_*` as the client reads it.
    #[derive(Debug)]
    struct Ret {
        command: u32,
        seqnum: u32,
        status: i32,
        actual_length: usize,
        data: Vec<u8>,
    }

    fn connect(server: &UsbipServer) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    fn busid_field(busid: &str) -> [u8; 32] {
        let mut field = [0u8; 32];
        field[..busid.len()].copy_from_slice(busid.as_bytes());
        field
    }

    /// Sends OP_REQ_IMPORT; returns the status and, on success, the device record.
    fn import(server: &UsbipServer, busid: &str) -> (TcpStream, u32, Option<Vec<u8>>) {
        let mut stream = connect(server);
        let mut request = op_header(OP_REQ_IMPORT, 0).to_vec();
        request.extend_from_slice(&busid_field(busid));
        stream.write_all(&request).unwrap();
        let mut header = [0u8; 8];
        stream.read_exact(&mut header).unwrap();
        assert_eq!(u16::from_be_bytes([header[0], header[1]]), USBIP_VERSION);
        assert_eq!(u16::from_be_bytes([header[2], header[3]]), OP_REP_IMPORT);
        let status = u32::from_be_bytes(header[4..].try_into().unwrap());
        if status != 0 {
            return (stream, status, None);
        }
        let mut record = vec![0u8; DEVICE_RECORD_LEN];
        stream.read_exact(&mut record).unwrap();
        (stream, status, Some(record))
    }

    impl Client {
        fn import(server: &UsbipServer) -> Client {
            let (stream, status, record) = import(server, UsbipServer::BUS_ID);
            assert_eq!(status, 0);
            let record = record.unwrap();
            let word = |i: usize| u32::from_be_bytes(record[i..i + 4].try_into().unwrap());
            assert_eq!(
                (word(288), word(292), word(296)),
                (BUS_NUM, DEV_NUM, SPEED_HIGH)
            );
            Client {
                stream,
                next_seqnum: 1,
                in_seqnums: std::collections::BTreeSet::new(),
            }
        }

        /// Sends a CMD_SUBMIT; returns its seqnum.
        fn submit(
            &mut self,
            endpoint: u32,
            direction: u32,
            length: u32,
            setup: [u8; 8],
            data: &[u8],
        ) -> u32 {
            let seqnum = self.next_seqnum;
            self.next_seqnum += 1;
            if direction == DIR_IN {
                self.in_seqnums.insert(seqnum);
            }
            let devid = (BUS_NUM << 16) | DEV_NUM;
            let mut out = Vec::new();
            for word in [
                USBIP_CMD_SUBMIT,
                seqnum,
                devid,
                direction,
                endpoint,
                0,
                length,
                0,
                0,
                0,
            ] {
                out.extend_from_slice(&word.to_be_bytes());
            }
            out.extend_from_slice(&setup);
            out.extend_from_slice(data);
            self.stream.write_all(&out).unwrap();
            seqnum
        }

        fn unlink(&mut self, target: u32) -> u32 {
            let seqnum = self.next_seqnum;
            self.next_seqnum += 1;
            let mut out = Vec::new();
            for word in [
                USBIP_CMD_UNLINK,
                seqnum,
                (BUS_NUM << 16) | DEV_NUM,
                0,
                0,
                target,
            ] {
                out.extend_from_slice(&word.to_be_bytes());
            }
            out.extend_from_slice(&[0u8; 24]);
            self.stream.write_all(&out).unwrap();
            seqnum
        }

        fn read_ret(&mut self) -> std::io::Result<Ret> {
            let mut header = [0u8; URB_HEADER_LEN];
            self.stream.read_exact(&mut header)?;
            let word = |i: usize| u32::from_be_bytes(header[i..i + 4].try_into().unwrap());
            let command = word(0);
            let status = word(20) as i32;
            let seqnum = word(4);
            let actual_length = word(24) as usize;
            let mut data = Vec::new();
            if command == USBIP_RET_SUBMIT && self.in_seqnums.remove(&seqnum) {
                data = vec![0u8; actual_length];
                self.stream.read_exact(&mut data)?;
            }
            Ok(Ret {
                command,
                seqnum,
                status,
                actual_length,
                data,
            })
        }

        fn control_in(&mut self, request_type: u8, request: u8, value: u16, length: u16) -> Ret {
            let [v0, v1] = value.to_le_bytes();
            let [l0, l1] = length.to_le_bytes();
            let seqnum = self.submit(
                0,
                DIR_IN,
                u32::from(length),
                [request_type, request, v0, v1, 0, 0, l0, l1],
                &[],
            );
            let ret = self.read_ret().unwrap();
            assert_eq!((ret.command, ret.seqnum), (USBIP_RET_SUBMIT, seqnum));
            ret
        }

        fn no_more_data(&mut self) -> bool {
            self.stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut byte = [0u8; 1];
            let quiet = matches!(
                self.stream.read(&mut byte),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
            );
            self.stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            quiet
        }
    }

    fn hello_reports() -> Vec<dongle::Report> {
        let (_session, hello) = dongle::Session::start(
            dongle::RuntimeId::new("vm1").unwrap(),
            &dongle::SigningKey::from_bytes(&[8; 32]),
            [9; 32],
            vec![],
        );
        dongle::encode_reports(&hello).unwrap()
    }

    #[test]
    fn devlist_lists_the_dongle_under_its_bus_id() {
        let (_dir, _core, server) = server();
        let mut stream = connect(&server);
        stream.write_all(&op_header(OP_REQ_DEVLIST, 0)).unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        assert_eq!(reply.len(), 8 + 4 + DEVICE_RECORD_LEN + 4);
        assert_eq!(&reply[..8], &op_header(OP_REP_DEVLIST, 0));
        assert_eq!(u32::from_be_bytes(reply[8..12].try_into().unwrap()), 1);
        let record = &reply[12..12 + DEVICE_RECORD_LEN];
        assert_eq!(&record[256..288], &busid_field(UsbipServer::BUS_ID));
        assert_eq!(
            u16::from_be_bytes([record[300], record[301]]),
            hid_dongle::VENDOR_ID
        );
        assert_eq!(
            u16::from_be_bytes([record[302], record[303]]),
            hid_dongle::PRODUCT_ID
        );
        assert_eq!(record[311], 1, "one interface");
        assert_eq!(reply[12 + DEVICE_RECORD_LEN], hid_dongle::HID_CLASS);
        assert!(!server.is_imported(), "a devlist does not import");
    }

    #[test]
    fn an_imported_dongle_answers_descriptor_requests_on_ep0() {
        let (_dir, core, server) = server();
        let mut client = Client::import(&server);
        assert!(server.is_imported());
        let ret = client.control_in(0x80, 6, 0x0100, 18);
        assert_eq!(ret.status, 0);
        assert_eq!(ret.data, HidDongle::device_descriptor());
        // A short read gives the first bytes only, as the kernel's first 8-byte read expects.
        let ret = client.control_in(0x80, 6, 0x0100, 8);
        assert_eq!(ret.data, HidDongle::device_descriptor()[..8]);
        let ret = client.control_in(0x80, 6, 0x0303, 255);
        let units: Vec<u16> = ret.data[2..]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&units).unwrap(), core.serial());
        // An unknown request stalls.
        assert_eq!(client.control_in(0x80, 6, 0x0309, 255).status, -EPIPE);
        // SET_CONFIGURATION (an OUT control transfer without data).
        let seqnum = client.submit(0, DIR_OUT, 0, [0x00, 9, 1, 0, 0, 0, 0, 0], &[]);
        let ret = client.read_ret().unwrap();
        assert_eq!((ret.seqnum, ret.status, ret.actual_length), (seqnum, 0, 0));
        assert_eq!(client.control_in(0x80, 8, 0, 1).data, vec![1]);
        // HID SET_REPORT: an OUT control transfer with a data stage reports what it delivered.
        let report = hello_reports()[0];
        let seqnum = client.submit(0, DIR_OUT, 64, [0x21, 9, 0, 2, 0, 0, 64, 0], &report);
        let ret = client.read_ret().unwrap();
        assert_eq!((ret.seqnum, ret.status, ret.actual_length), (seqnum, 0, 64));
    }

    #[test]
    fn an_out_report_hello_is_answered_on_a_waiting_in_urb() {
        let (_dir, _core, server) = server();
        let mut client = Client::import(&server);
        // The IN URB waits: no zero-length answer while the device has nothing to say.
        let in_seqnum = client.submit(1, DIR_IN, 64, [0; 8], &[]);
        assert!(client.no_more_data(), "an IN URB without a report pends");
        let mut out_seqnums = Vec::new();
        for report in hello_reports() {
            out_seqnums.push(client.submit(1, DIR_OUT, 64, [0; 8], &report));
        }
        let mut assembler = dongle::ReportAssembler::new();
        let mut frame = None;
        let mut answered_out = Vec::new();
        let mut in_answered = false;
        while answered_out.len() < out_seqnums.len() || !in_answered {
            let ret = client.read_ret().unwrap();
            assert_eq!((ret.command, ret.status), (USBIP_RET_SUBMIT, 0));
            if ret.seqnum == in_seqnum {
                assert_eq!(ret.data.len(), 64);
                frame = assembler.push(&ret.data).unwrap().or(frame);
                in_answered = true;
            } else {
                assert_eq!(ret.actual_length, 64, "an OUT URB delivered its report");
                answered_out.push(ret.seqnum);
            }
        }
        assert_eq!(answered_out, out_seqnums);
        // Further IN URBs take the rest of the reply at once.
        while frame.is_none() {
            let seqnum = client.submit(1, DIR_IN, 64, [0; 8], &[]);
            let ret = client.read_ret().unwrap();
            assert_eq!((ret.seqnum, ret.status), (seqnum, 0));
            frame = assembler.push(&ret.data).unwrap();
        }
    }

    #[test]
    fn unlinking_a_waiting_in_urb_answers_connreset_and_never_submits_it() {
        let (_dir, _core, server) = server();
        let mut client = Client::import(&server);
        let in_seqnum = client.submit(1, DIR_IN, 64, [0; 8], &[]);
        let unlink_seqnum = client.unlink(in_seqnum);
        let ret = client.read_ret().unwrap();
        assert_eq!(
            (ret.command, ret.seqnum, ret.status),
            (USBIP_RET_UNLINK, unlink_seqnum, -ECONNRESET)
        );
        // A report now has no IN URB to go to: only the OUT URBs are answered.
        let reports = hello_reports();
        for report in &reports {
            client.submit(1, DIR_OUT, 64, [0; 8], report);
        }
        for _ in &reports {
            let ret = client.read_ret().unwrap();
            assert_ne!(ret.seqnum, in_seqnum);
            assert_eq!((ret.status, ret.actual_length), (0, 64));
        }
        assert!(client.no_more_data());
        // Unlinking an URB that is not waiting answers status 0.
        let unlink_seqnum = client.unlink(in_seqnum);
        let ret = client.read_ret().unwrap();
        assert_eq!(
            (ret.command, ret.seqnum, ret.status),
            (USBIP_RET_UNLINK, unlink_seqnum, 0)
        );
    }

    #[test]
    fn a_second_importer_is_refused_and_unknown_bus_ids_are_not_found() {
        let (_dir, _core, server) = server();
        let _first = Client::import(&server);
        let (_stream, status, record) = import(&server, UsbipServer::BUS_ID);
        assert_eq!((status, record), (ST_DEV_BUSY, None));
        let (_stream, status, _) = import(&server, "9-9");
        assert_eq!(status, ST_NODEV);
        assert!(server.is_imported());
    }

    #[test]
    fn disconnect_closes_the_import_and_frees_the_export() {
        let (_dir, _core, server) = server();
        let mut first = Client::import(&server);
        let pending = first.submit(1, DIR_IN, 64, [0; 8], &[]);
        server.disconnect();
        assert!(!server.is_imported());
        let mut byte = [0u8; 1];
        let end = first.stream.read(&mut byte);
        assert!(
            matches!(end, Ok(0)) || end.is_err(),
            "the client sees its connection end, not an answer to URB {pending}: {end:?}"
        );
        let mut second = Client::import(&server);
        assert_eq!(second.control_in(0x80, 6, 0x0100, 18).status, 0);
        // A client closing its side also frees the export.
        drop(second);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while server.is_imported() {
            assert!(
                std::time::Instant::now() < deadline,
                "the import outlived its connection"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let _third = Client::import(&server);
    }

    #[test]
    fn dropping_the_server_ends_connections_and_stops_listening() {
        let (_dir, _core, server) = server();
        let port = server.port();
        let mut client = Client::import(&server);
        let started = std::time::Instant::now();
        drop(server);
        assert!(started.elapsed() < Duration::from_secs(2), "drop is prompt");
        let mut byte = [0u8; 1];
        assert!(matches!(client.stream.read(&mut byte), Ok(0) | Err(_)));
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
