//! Transports to licence dongles: byte pipes carrying 64-byte HID reports.
//!
//! The simulator's virtual USB bus gives each attached dongle a Unix socket; a real dongle is a
//! hidraw device node. Both carry exactly the same reports ([`dongle::encode_reports`] chunks a
//! frame, [`dongle::ReportAssembler`] rebuilds it), so the dongle manager never knows which one
//! it talks to.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use dongle::{REPORT_LEN, Report};

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
    /// The endpoint is neither a socket nor a device this runtime can drive.
    #[error("Dongle endpoint {0} is not a socket")]
    Unsupported(PathBuf),
    /// Reading or writing failed.
    #[error("Dongle transport failed")]
    Io(#[from] io::Error),
}

/// A byte pipe to one dongle carrying whole 64-byte HID reports, in both directions.
pub trait DongleTransport: Send + Sync + std::fmt::Debug {
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
    if metadata.file_type().is_socket() {
        return Ok(Box::new(SimTransport::connect(&endpoint.path)?));
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
