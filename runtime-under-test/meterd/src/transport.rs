//! Transports to licence dongles: byte pipes carrying 64-byte HID reports.
//!
//! The simulator's virtual USB bus gives each attached dongle a Unix socket ([`SimTransport`]);
//! a real dongle in a Linux machine is a hidraw device node ([`HidrawTransport`]). Both carry
//! exactly the same reports ([`dongle::encode_reports`] chunks a frame,
//! [`dongle::ReportAssembler`] rebuilds it), so the dongle manager never knows which one it talks
//! to. [`open`] picks the transport from the endpoint's file type: a socket or a character device.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dongle::{REPORT_LEN, Report};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::platform::UsbEndpoint;

/// A transport that failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The endpoint could not be opened.
    #[error("Cannot open dongle endpoint {path}")]
    Open {
        /// The endpoint.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The endpoint is neither a socket nor a character device.
    #[error("Dongle endpoint {0} is neither a socket nor a character device")]
    Unsupported(PathBuf),
    /// Reading or writing failed.
    #[error("Dongle transport failed")]
    Io(#[from] io::Error),
}

/// Which kind of pipe a transport is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// A Unix socket of the simulator's virtual USB bus.
    Socket,
    /// A Linux hidraw device node.
    Hidraw,
}

impl TransportKind {
    /// The kind's name in command output (`socket`, `hidraw`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Hidraw => "hidraw",
        }
    }
}

/// A byte pipe to one dongle carrying whole 64-byte HID reports, in both directions.
pub trait DongleTransport: Send + Sync + std::fmt::Debug {
    /// Which kind of pipe this is.
    fn kind(&self) -> TransportKind;
    /// Sends one report.
    fn send(&mut self, report: &Report) -> Result<(), TransportError>;
    /// Waits for the next report; `None` once the dongle is gone (unplugged, connection closed).
    fn receive(&mut self) -> Result<Option<Report>, TransportError>;
    /// A second handle on the same pipe (one reads while the other writes).
    fn try_clone(&self) -> Result<Box<dyn DongleTransport>, TransportError>;
    /// Ends the pipe; a blocked [`DongleTransport::receive`] on any handle returns `None`.
    fn close(&self);
}

/// Opens the transport for an endpoint the platform listed.
pub fn open(endpoint: &UsbEndpoint) -> Result<Box<dyn DongleTransport>, TransportError> {
    let metadata = std::fs::metadata(&endpoint.path).map_err(|source| TransportError::Open {
        path: endpoint.path.clone(),
        source,
    })?;
    let file_type = metadata.file_type();
    if file_type.is_socket() {
        return Ok(Box::new(SimTransport::connect(&endpoint.path)?));
    }
    if file_type.is_char_device() {
        return Ok(Box::new(HidrawTransport::open(&endpoint.path)?));
    }
    Err(TransportError::Unsupported(endpoint.path.clone()))
}

/// The simulator's transport: a Unix socket served by the harness's virtual USB bus.
#[derive(Debug)]
pub struct SimTransport {
    stream: UnixStream,
}

impl SimTransport {
    /// Connects to `<sim dir>/usb/<serial>.sock`.
    pub fn connect(path: &Path) -> Result<Self, TransportError> {
        let stream = UnixStream::connect(path).map_err(|source| TransportError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { stream })
    }

    /// Wraps a connected stream (tests, socket pairs).
    pub fn from_stream(stream: UnixStream) -> Self {
        Self { stream }
    }
}

impl DongleTransport for SimTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Socket
    }

    fn send(&mut self, report: &Report) -> Result<(), TransportError> {
        self.stream.write_all(report)?;
        Ok(())
    }

    fn receive(&mut self) -> Result<Option<Report>, TransportError> {
        let mut report = [0u8; REPORT_LEN];
        let mut filled = 0;
        while filled < REPORT_LEN {
            match self.stream.read(&mut report[filled..]) {
                Ok(0) => return Ok(None),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(report))
    }

    fn try_clone(&self) -> Result<Box<dyn DongleTransport>, TransportError> {
        Ok(Box::new(Self {
            stream: self.stream.try_clone()?,
        }))
    }

    fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A real dongle's transport: a Linux hidraw device node.
///
/// The dongle has no report ids, so a write is report number 0 followed by the 64-byte output
/// report, and a read yields one 64-byte input report. Handles from [`DongleTransport::try_clone`]
/// share the node and a wake-up eventfd: [`DongleTransport::close`] signals the eventfd, and every
/// handle waiting in [`DongleTransport::receive`] (which polls the node and the eventfd) returns
/// `None` at once. An unplugged device (`ENODEV`, `EIO`, `ESHUTDOWN`, end of file, hang-up) is
/// also `None`.
#[derive(Debug, Clone)]
pub struct HidrawTransport {
    device: Arc<OwnedFd>,
    wake: Arc<EventFd>,
}

/// The report number a write to hidraw starts with when the device has no report ids.
const NO_REPORT_ID: u8 = 0;

fn is_unplugged(errno: Errno) -> bool {
    matches!(errno, Errno::ENODEV | Errno::EIO | Errno::ESHUTDOWN)
}

impl HidrawTransport {
    /// Opens a hidraw node (`/dev/hidrawN`) for reading and writing.
    pub fn open(path: &Path) -> Result<Self, TransportError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| TransportError::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::from_fd(OwnedFd::from(file))
    }

    /// Drives an open device node, or anything with hidraw's one-report-per-read semantics
    /// (a `SOCK_SEQPACKET` socket in tests). The descriptor is made non-blocking.
    pub fn from_fd(device: OwnedFd) -> Result<Self, TransportError> {
        let flags =
            OFlag::from_bits_retain(fcntl(&device, FcntlArg::F_GETFL).map_err(io::Error::from)?);
        fcntl(&device, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(io::Error::from)?;
        Ok(Self {
            device: Arc::new(device),
            wake: Arc::new(wake),
        })
    }

    /// Waits until the device is ready for `events` and returns its ready flags; `None` once
    /// the transport is closed.
    fn wait(&self, events: PollFlags) -> Result<Option<PollFlags>, TransportError> {
        loop {
            let mut fds = [
                PollFd::new(self.device.as_fd(), events),
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(io::Error::from(errno).into()),
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return Ok(None);
            }
            if let Some(ready) = fds[0].revents().filter(|r| !r.is_empty()) {
                return Ok(Some(ready));
            }
        }
    }
}

impl DongleTransport for HidrawTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Hidraw
    }

    fn send(&mut self, report: &Report) -> Result<(), TransportError> {
        let mut message = [0u8; REPORT_LEN + 1];
        message[0] = NO_REPORT_ID;
        message[1..].copy_from_slice(report);
        loop {
            match nix::unistd::write(self.device.as_fd(), &message) {
                Ok(n) if n == message.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("hidraw took {n} of {} bytes", message.len()),
                    )
                    .into());
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    if self.wait(PollFlags::POLLOUT)?.is_none() {
                        return Err(io::Error::from(io::ErrorKind::BrokenPipe).into());
                    }
                }
                Err(errno) => return Err(io::Error::from(errno).into()),
            }
        }
    }

    fn receive(&mut self) -> Result<Option<Report>, TransportError> {
        let mut report = [0u8; REPORT_LEN];
        loop {
            let Some(ready) = self.wait(PollFlags::POLLIN)? else {
                return Ok(None);
            };
            if !ready.contains(PollFlags::POLLIN) {
                // Hang-up or error without data: the device is gone.
                return Ok(None);
            }
            match nix::unistd::read(self.device.as_fd(), &mut report) {
                Ok(0) => return Ok(None),
                // A short report is padded with zeros, as the device's report size says.
                Ok(n) => {
                    report[n..].fill(0);
                    return Ok(Some(report));
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(errno) if is_unplugged(errno) => return Ok(None),
                Err(errno) => return Err(io::Error::from(errno).into()),
            }
        }
    }

    fn try_clone(&self) -> Result<Box<dyn DongleTransport>, TransportError> {
        Ok(Box::new(self.clone()))
    }

    fn close(&self) {
        // The counter is never read back, so the eventfd stays readable for every handle.
        let _ = self.wake.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_cross_a_socket_pair_whole_and_eof_means_gone() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut near = SimTransport::from_stream(a);
        let mut far = SimTransport::from_stream(b);
        let mut report = [0u8; REPORT_LEN];
        report[0] = 0x80;
        report[63] = 7;
        near.send(&report).unwrap();
        assert_eq!(far.receive().unwrap(), Some(report));
        near.close();
        assert_eq!(far.receive().unwrap(), None);
    }

    /// A hidraw transport on one end of a packet socket pair; the other end plays the device.
    fn hidraw_pair() -> (HidrawTransport, OwnedFd) {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (near, device) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (HidrawTransport::from_fd(near).unwrap(), device)
    }

    fn numbered_report(seed: u8) -> Report {
        std::array::from_fn(|i| seed.wrapping_add(i as u8))
    }

    #[test]
    fn hidraw_writes_report_number_zero_then_the_report_and_reads_whole_reports() {
        let (mut transport, device) = hidraw_pair();
        let outgoing = numbered_report(0x80);
        transport.send(&outgoing).unwrap();
        let mut written = [0xffu8; 2 * REPORT_LEN];
        let n = nix::unistd::read(&device, &mut written).unwrap();
        assert_eq!(n, REPORT_LEN + 1);
        assert_eq!(written[0], 0);
        assert_eq!(&written[1..=REPORT_LEN], &outgoing[..]);

        let first = numbered_report(1);
        let second = numbered_report(2);
        nix::unistd::write(&device, &first).unwrap();
        nix::unistd::write(&device, &second).unwrap();
        assert_eq!(transport.receive().unwrap(), Some(first));
        assert_eq!(transport.receive().unwrap(), Some(second));
        // A short input report is padded to the report size.
        nix::unistd::write(&device, &[9u8, 8, 7]).unwrap();
        let mut padded = [0u8; REPORT_LEN];
        padded[..3].copy_from_slice(&[9, 8, 7]);
        assert_eq!(transport.receive().unwrap(), Some(padded));
        assert_eq!(transport.kind(), TransportKind::Hidraw);
    }

    #[test]
    fn hidraw_close_wakes_a_receive_blocked_in_another_handle_at_once() {
        let (transport, _device) = hidraw_pair();
        let mut reader = transport.try_clone().unwrap();
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(reader.receive().map_err(|e| e.to_string()));
        });
        // The reader is blocked: nothing arrives while the device is silent.
        assert!(
            outcome
                .recv_timeout(std::time::Duration::from_millis(100))
                .is_err()
        );
        let closed_at = std::time::Instant::now();
        transport.close();
        let result = outcome
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("receive did not return after close");
        assert_eq!(result, Ok(None));
        assert!(
            closed_at.elapsed() < std::time::Duration::from_millis(500),
            "{:?}",
            closed_at.elapsed()
        );
        // Every handle, including new clones, sees the close.
        assert_eq!(transport.try_clone().unwrap().receive().unwrap(), None);
    }

    #[test]
    fn hidraw_device_gone_means_none_after_the_reports_already_sent() {
        let (mut transport, device) = hidraw_pair();
        let last = numbered_report(42);
        nix::unistd::write(&device, &last).unwrap();
        drop(device);
        assert_eq!(transport.receive().unwrap(), Some(last));
        assert_eq!(transport.receive().unwrap(), None);
        assert!(transport.send(&last).is_err());
    }

    #[test]
    fn hidraw_end_of_file_on_a_pipe_means_gone() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let mut transport = HidrawTransport::from_fd(read_end).unwrap();
        nix::unistd::write(&write_end, &numbered_report(3)).unwrap();
        drop(write_end);
        assert_eq!(transport.receive().unwrap(), Some(numbered_report(3)));
        assert_eq!(transport.receive().unwrap(), None);
    }

    #[test]
    fn a_character_device_endpoint_opens_as_hidraw() {
        let endpoint = UsbEndpoint {
            serial: "null".into(),
            path: "/dev/null".into(),
        };
        let mut transport = open(&endpoint).unwrap();
        assert_eq!(transport.kind(), TransportKind::Hidraw);
        transport.send(&numbered_report(0)).unwrap();
        // /dev/null reads as end of file: like an unplugged device.
        assert_eq!(transport.receive().unwrap(), None);
    }

    #[test]
    fn a_socket_endpoint_opens_as_the_sim_transport() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("5.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let transport = open(&UsbEndpoint {
            serial: "5".into(),
            path,
        })
        .unwrap();
        assert_eq!(transport.kind(), TransportKind::Socket);
    }

    #[test]
    fn an_endpoint_that_is_a_plain_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.sock");
        std::fs::write(&path, "").unwrap();
        let endpoint = UsbEndpoint {
            serial: "1".into(),
            path,
        };
        assert!(matches!(
            open(&endpoint),
            Err(TransportError::Unsupported(_))
        ));
    }
}
