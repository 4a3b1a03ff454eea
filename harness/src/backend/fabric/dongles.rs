//! The dongle rack: the world's emulated dongles, shared by every driver, and the simulation's
//! USB bus, on which a simulated machine's runtime reaches a dongle through
//! `platform/usb/<serial>.sock`.
//!
//! A socket carries the dongle's 64-byte HID reports unchanged, exactly as a USB HID transport
//! would. Every machine a dongle is attached to gets its own socket (its own USB host); several at
//! once is the hypervisor's shared mode. The first plug and the last unplug, over any path, reset the
//! dongle's bus, as real hardware does ([`DongleCore::plugged`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dongle::{DevicePort, REPORT_LEN};

use crate::backend::types::BackendError;
use crate::usb::DongleCore;

/// One emulated dongle and its attachments.
pub struct VirtualDongle {
    /// Serial number as a string (the socket's file stem).
    pub serial: String,
    core: Arc<DongleCore>,
    attachments: BTreeMap<String, Attachment>,
}

struct Attachment {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<UnixStream>>>,
}

impl Attachment {
    fn end(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.socket);
        for stream in self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop so it sees the stop flag.
        let _ = UnixStream::connect(&self.socket);
    }
}

impl VirtualDongle {
    /// Powers on a dongle from its flash file; the flash is written back whenever it changes.
    pub fn power_on(
        flash_path: &Path,
        clock: Arc<AtomicI64>,
    ) -> Result<VirtualDongle, BackendError> {
        let core = DongleCore::power_on(flash_path, clock)?;
        Ok(VirtualDongle {
            serial: core.serial().to_string(),
            core,
            attachments: BTreeMap::new(),
        })
    }

    /// The dongle itself, for USB paths other than the sim socket.
    pub fn core(&self) -> Arc<DongleCore> {
        Arc::clone(&self.core)
    }

    /// Plugs the dongle into a machine's USB (its `usb/` folder).
    pub fn attach(&mut self, machine: &str, usb_dir: &Path) -> Result<(), BackendError> {
        if self.attachments.contains_key(machine) {
            return Ok(());
        }
        let socket = usb_dir.join(format!("{}.sock", self.serial));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(BackendError::io(format!("bind {}", socket.display())))?;
        self.core.plugged();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        {
            let stop = Arc::clone(&stop);
            let streams = Arc::clone(&streams);
            let core = Arc::clone(&self.core);
            std::thread::spawn(move || {
                for incoming in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = incoming else { continue };
                    if let Ok(clone) = stream.try_clone() {
                        streams
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(clone);
                    }
                    let core = Arc::clone(&core);
                    let stop = Arc::clone(&stop);
                    std::thread::spawn(move || serve(stream, &core, &stop));
                }
            });
        }
        self.attachments.insert(
            machine.to_string(),
            Attachment {
                socket,
                stop,
                streams,
            },
        );
        Ok(())
    }

    /// Unplugs the dongle from one machine (or every machine when `None`).
    pub fn detach(&mut self, machine: Option<&str>) {
        let names: Vec<String> = match machine {
            Some(m) => vec![m.to_string()],
            None => self.attachments.keys().cloned().collect(),
        };
        for name in names {
            if let Some(attachment) = self.attachments.remove(&name) {
                attachment.end();
                self.core.unplugged();
            }
        }
    }

    /// The dongle's own view of itself.
    pub fn status(&self) -> serde_json::Value {
        self.core.status()
    }
}

impl Drop for VirtualDongle {
    fn drop(&mut self) {
        self.detach(None);
    }
}

/// The world's dongles by name; clones share them.
#[derive(Clone, Default)]
pub struct DongleRack(Arc<Mutex<BTreeMap<String, VirtualDongle>>>);

impl DongleRack {
    /// Powers on a dongle from its flash file and puts it in the rack, unplugged.
    pub fn add(&self, name: &str, flash: &Path, clock: Arc<AtomicI64>) -> Result<(), BackendError> {
        let dongle = VirtualDongle::power_on(flash, clock)?;
        self.lock().insert(name.to_owned(), dongle);
        Ok(())
    }

    /// Runs `f` on the named dongle.
    pub fn with<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut VirtualDongle) -> R,
    ) -> Result<R, BackendError> {
        let mut rack = self.lock();
        let dongle = rack.get_mut(name).ok_or_else(|| BackendError::Unknown {
            kind: "dongle",
            name: name.into(),
        })?;
        Ok(f(dongle))
    }

    /// The emulated dongle itself, for USB paths into guests (usbredir, USB/IP).
    pub fn core(&self, name: &str) -> Result<Arc<DongleCore>, BackendError> {
        self.with(name, |d| d.core())
    }

    /// Hangs a dongle's firmware (every path to it reaches the same firmware).
    pub fn hang(&self, name: &str) -> Result<(), BackendError> {
        self.with(name, |d| d.core().hang())
    }

    /// The dongle's own view of itself.
    pub fn status(&self, name: &str) -> Result<serde_json::Value, BackendError> {
        self.with(name, |d| d.status())
    }

    /// Unplugs and powers off every dongle.
    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.lock());
        drop(all);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, VirtualDongle>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for DongleRack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.lock().keys()).finish()
    }
}

fn serve(mut stream: UnixStream, core: &DongleCore, stop: &AtomicBool) {
    let mut port = DevicePort::new();
    let mut report = [0u8; REPORT_LEN];
    let mut filled = 0;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match stream.read(&mut report[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => break,
        }
        if filled < REPORT_LEN {
            continue;
        }
        filled = 0;
        let replies = core.exchange(&mut port, &report);
        for reply in replies {
            if stream.write_all(&reply).is_err() {
                return;
            }
        }
    }
}
