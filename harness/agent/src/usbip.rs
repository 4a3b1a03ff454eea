//! The guest's USB/IP client: imports a device from a USB/IP server and hands the connection to
//! the kernel's `vhci_hcd`, as `usbip attach` does.
//!
//! The import is the `OP_REQ_IMPORT` handshake of the kernel's USB/IP protocol
//! (Documentation/usb/usbip_protocol.rst); the attach writes `<port> <sockfd> <devid> <speed>`
//! to the controller's `attach` file, after which the kernel owns the socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The sysfs folder of the first virtual host controller.
pub const VHCI_DIR: &str = "/sys/devices/platform/vhci_hcd.0";

const USBIP_VERSION: u16 = 0x0111;
const OP_REQ_IMPORT: u16 = 0x8003;
const OP_REP_IMPORT: u16 = 0x0003;
const DEVICE_RECORD_LEN: usize = 312;
/// `VDEV_ST_NULL`: a port with nothing attached.
const PORT_FREE: u32 = 4;
/// `USB_SPEED_SUPER`: such devices need a SuperSpeed port.
const SPEED_SUPER: u32 = 5;

/// Errors attaching or detaching a USB/IP device.
#[derive(Debug, thiserror::Error)]
pub enum UsbipError {
    /// The kernel has no virtual host controller.
    #[error("No USB/IP host controller at {path} (is vhci_hcd loaded?)")]
    NoController { path: String },
    /// The server could not be reached or the connection broke.
    #[error("USB/IP server {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// The server refused the import.
    #[error("USB/IP server {address} refused to export `{busid}` (status {status})")]
    Refused {
        address: String,
        busid: String,
        status: u32,
    },
    /// The server answered something other than an import reply.
    #[error("USB/IP server {address} sent a malformed import reply")]
    BadReply { address: String },
    /// Every port of the right speed is in use.
    #[error("No free USB/IP port for a speed-{speed} device in {path}")]
    NoFreePort { path: String, speed: u32 },
    /// A sysfs file of the controller could not be read or written.
    #[error("USB/IP controller file {path}")]
    Sysfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the server says about the device it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportedDevice {
    /// Bus number on the server.
    pub busnum: u32,
    /// Device number on the server.
    pub devnum: u32,
    /// USB speed code (`enum usb_device_speed`).
    pub speed: u32,
}

impl ImportedDevice {
    /// The device id the kernel's attach file takes (`busnum << 16 | devnum`).
    pub fn devid(&self) -> u32 {
        (self.busnum << 16) | self.devnum
    }
}

/// One port line of a controller's `status` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStatus {
    /// `hs` (USB 2) or `ss` (USB 3) root hub.
    pub hub: String,
    /// Port number, as attach and detach take it.
    pub port: u32,
    /// Port state (`VDEV_ST_*`); 4 is free.
    pub state: u32,
}

/// Parses a controller's `status` file (`hub port sta spd dev sockfd local_busid` lines).
pub fn parse_status(text: &str) -> Vec<PortStatus> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let hub = fields.next()?;
            if hub != "hs" && hub != "ss" {
                return None;
            }
            let port = fields.next()?.parse().ok()?;
            let state = fields.next()?.parse().ok()?;
            Some(PortStatus {
                hub: hub.to_string(),
                port,
                state,
            })
        })
        .collect()
}

/// The first free port that takes a device of `speed`.
pub fn free_port(ports: &[PortStatus], speed: u32) -> Option<u32> {
    let hub = if speed == SPEED_SUPER { "ss" } else { "hs" };
    ports
        .iter()
        .find(|p| p.hub == hub && p.state == PORT_FREE)
        .map(|p| p.port)
}

/// The bytes of an `OP_REQ_IMPORT` for `busid`.
pub fn import_request(busid: &str) -> Vec<u8> {
    let mut request = Vec::with_capacity(40);
    request.extend_from_slice(&USBIP_VERSION.to_be_bytes());
    request.extend_from_slice(&OP_REQ_IMPORT.to_be_bytes());
    request.extend_from_slice(&0u32.to_be_bytes());
    let mut field = [0u8; 32];
    let n = busid.len().min(31);
    field[..n].copy_from_slice(&busid.as_bytes()[..n]);
    request.extend_from_slice(&field);
    request
}

/// Reads an `OP_REP_IMPORT` from the server.
fn read_import_reply(
    stream: &mut impl Read,
    address: &str,
    busid: &str,
) -> Result<ImportedDevice, UsbipError> {
    let io = |source| UsbipError::Connect {
        address: address.to_string(),
        source,
    };
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).map_err(io)?;
    if u16::from_be_bytes([header[2], header[3]]) != OP_REP_IMPORT {
        return Err(UsbipError::BadReply {
            address: address.to_string(),
        });
    }
    let status = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if status != 0 {
        return Err(UsbipError::Refused {
            address: address.to_string(),
            busid: busid.to_string(),
            status,
        });
    }
    let mut record = [0u8; DEVICE_RECORD_LEN];
    stream.read_exact(&mut record).map_err(io)?;
    let word =
        |i: usize| u32::from_be_bytes([record[i], record[i + 1], record[i + 2], record[i + 3]]);
    let end = record[256..288].iter().position(|&b| b == 0).unwrap_or(32);
    if &record[256..256 + end] != busid.as_bytes() {
        return Err(UsbipError::BadReply {
            address: address.to_string(),
        });
    }
    Ok(ImportedDevice {
        busnum: word(288),
        devnum: word(292),
        speed: word(296),
    })
}

/// Waits for the controller's sysfs folder (its module may still be loading at boot).
fn controller(vhci_dir: &Path, deadline: Instant) -> Result<PathBuf, UsbipError> {
    loop {
        if vhci_dir.join("attach").exists() {
            return Ok(vhci_dir.to_path_buf());
        }
        if Instant::now() >= deadline {
            return Err(UsbipError::NoController {
                path: vhci_dir.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sysfs(path: &Path) -> impl FnOnce(std::io::Error) -> UsbipError + '_ {
    move |source| UsbipError::Sysfs {
        path: path.display().to_string(),
        source,
    }
}

/// Imports `busid` from the server at `host:port` and attaches it to a free port of the
/// controller in `vhci_dir`; returns that port.
pub fn attach(
    vhci_dir: &Path,
    host: &str,
    port: u16,
    busid: &str,
    deadline: Instant,
) -> Result<u32, UsbipError> {
    let dir = controller(vhci_dir, deadline)?;
    let address = format!("{host}:{port}");
    let io = |source| UsbipError::Connect {
        address: address.clone(),
        source,
    };
    let mut stream = TcpStream::connect((host, port)).map_err(io)?;
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    stream.set_read_timeout(Some(wait)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream.write_all(&import_request(busid)).map_err(io)?;
    let device = read_import_reply(&mut stream, &address, busid)?;
    // The kernel reads the socket itself from now on, without a timeout.
    stream.set_read_timeout(None).map_err(io)?;
    let status_path = dir.join("status");
    let status = std::fs::read_to_string(&status_path).map_err(sysfs(&status_path))?;
    let vhci_port =
        free_port(&parse_status(&status), device.speed).ok_or_else(|| UsbipError::NoFreePort {
            path: status_path.display().to_string(),
            speed: device.speed,
        })?;
    let attach_path = dir.join("attach");
    let line = format!(
        "{vhci_port} {} {} {}",
        stream.as_raw_fd(),
        device.devid(),
        device.speed
    );
    std::fs::write(&attach_path, line).map_err(sysfs(&attach_path))?;
    // The kernel holds its own reference to the socket; this descriptor can close.
    drop(stream);
    Ok(vhci_port)
}

/// Detaches the device on `vhci_port` of the controller in `vhci_dir`.
pub fn detach(vhci_dir: &Path, vhci_port: u32) -> Result<(), UsbipError> {
    if !vhci_dir.join("detach").exists() {
        return Err(UsbipError::NoController {
            path: vhci_dir.display().to_string(),
        });
    }
    let path = vhci_dir.join("detach");
    std::fs::write(&path, vhci_port.to_string()).map_err(sysfs(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "hub port sta spd dev      sockfd local_busid\n\
        hs  0000 006 002 00010002 000005 1-1\n\
        hs  0001 004 000 00000000 000000 0-0\n\
        ss  0008 004 000 00000000 000000 0-0\n";

    #[test]
    fn the_status_file_gives_the_first_free_port_of_each_speed() {
        let ports = parse_status(STATUS);
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[0].state, 6);
        assert_eq!(
            free_port(&ports, 2),
            Some(1),
            "full speed goes to a USB 2 port"
        );
        assert_eq!(free_port(&ports, SPEED_SUPER), Some(8));
        assert_eq!(free_port(&ports[..1], 2), None);
    }

    fn reply(status: u32, busid: &str) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&USBIP_VERSION.to_be_bytes());
        bytes.extend_from_slice(&OP_REP_IMPORT.to_be_bytes());
        bytes.extend_from_slice(&status.to_be_bytes());
        if status == 0 {
            let mut record = vec![0u8; DEVICE_RECORD_LEN];
            record[256..256 + busid.len()].copy_from_slice(busid.as_bytes());
            record[288..292].copy_from_slice(&3u32.to_be_bytes());
            record[292..296].copy_from_slice(&7u32.to_be_bytes());
            record[296..300].copy_from_slice(&2u32.to_be_bytes());
            bytes.extend(record);
        }
        bytes
    }

    #[test]
    fn an_import_reply_gives_devid_and_speed() {
        let device = read_import_reply(&mut &reply(0, "1-1")[..], "h:1", "1-1").unwrap();
        assert_eq!(device.speed, 2);
        assert_eq!(device.devid(), (3 << 16) | 7);
        let request = import_request("1-1");
        assert_eq!(request.len(), 40);
        assert_eq!(&request[..4], &[0x01, 0x11, 0x80, 0x03]);
    }

    #[test]
    fn a_refused_or_foreign_import_is_an_error() {
        let err = read_import_reply(&mut &reply(2, "")[..], "h:1", "1-1").unwrap_err();
        assert!(
            matches!(err, UsbipError::Refused { status: 2, .. }),
            "{err}"
        );
        let err = read_import_reply(&mut &reply(0, "2-2")[..], "h:1", "1-1").unwrap_err();
        assert!(matches!(err, UsbipError::BadReply { .. }), "{err}");
        let err = read_import_reply(&mut &reply(0, "1-1")[..20], "h:1", "1-1").unwrap_err();
        assert!(matches!(err, UsbipError::Connect { .. }), "{err}");
    }

    #[test]
    fn attach_imports_and_writes_port_socket_devid_and_speed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status"), STATUS).unwrap();
        std::fs::write(dir.path().join("attach"), "").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 40];
            stream.read_exact(&mut request).unwrap();
            stream.write_all(&reply(0, "1-1")).unwrap();
            request
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let vhci_port = attach(dir.path(), "127.0.0.1", port, "1-1", deadline).unwrap();
        assert_eq!(vhci_port, 1);
        assert_eq!(server.join().unwrap().to_vec(), import_request("1-1"));
        let line = std::fs::read_to_string(dir.path().join("attach")).unwrap();
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 4, "{line}");
        assert_eq!(fields[0], "1");
        assert!(
            fields[1].parse::<i32>().unwrap() > 2,
            "a socket descriptor: {line}"
        );
        assert_eq!(fields[2], ((3 << 16) | 7).to_string());
        assert_eq!(fields[3], "2");
    }

    #[test]
    fn a_missing_controller_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("vhci_hcd.0");
        let err = attach(&missing, "127.0.0.1", 1, "1-1", Instant::now()).unwrap_err();
        assert!(err.to_string().contains("vhci_hcd"), "{err}");
        assert!(matches!(
            detach(&missing, 0),
            Err(UsbipError::NoController { .. })
        ));
    }
}
