//! Emulated licence dongles as USB devices.
//!
//! A [`DongleCore`] is one dongle: its firmware, its flash file and the world's clock. Every way a
//! machine reaches it (the sim's Unix socket, usbredir into a QEMU guest, USB/IP into a guest's
//! kernel) opens its own [`dongle::DevicePort`] on that core, so two hosts at once are the
//! hypervisor's shared mode. [`hid_dongle::HidDongle`] is the USB HID device those USB paths show.

pub mod hid_dongle;
pub mod usbip;
pub mod usbredir;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use dongle::{DevicePort, Firmware, Flash, Report};

use crate::backend::types::BackendError;

/// Milliseconds on the world's virtual clock.
pub fn world_now_ms(offset: &AtomicI64) -> u64 {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    (real + offset.load(Ordering::SeqCst)).max(0) as u64
}

/// One emulated dongle: firmware, flash file and the world's clock, shared by every connection.
#[derive(Debug)]
pub struct DongleCore {
    serial: String,
    firmware: Mutex<Firmware>,
    flash_path: PathBuf,
    clock: Arc<AtomicI64>,
    /// Hosts the dongle is plugged into, over any path.
    hosts: Mutex<usize>,
    /// Hung: reports are taken but never answered, until the dongle loses power.
    hung: AtomicBool,
}

impl DongleCore {
    /// Powers on a dongle from its flash file; the flash is written back whenever it changes.
    pub fn power_on(flash_path: &Path, clock: Arc<AtomicI64>) -> Result<Arc<Self>, BackendError> {
        let text = std::fs::read(flash_path).map_err(BackendError::io(format!(
            "read dongle flash {}",
            flash_path.display()
        )))?;
        let flash: Flash = serde_json::from_slice(&text).map_err(|e| BackendError::Runtime {
            machine: "dongle".into(),
            message: format!("bad dongle flash {}: {e}", flash_path.display()),
        })?;
        let serial = flash.serial().0.to_string();
        let mut firmware = Firmware::power_on(flash, world_now_ms(&clock));
        let mut entropy = [0u8; 32];
        match getrandom::fill(&mut entropy) {
            Ok(()) => firmware.mix_entropy(&entropy),
            Err(e) => tracing::warn!("no entropy for dongle {serial}: {e}"),
        }
        Ok(Arc::new(DongleCore {
            serial,
            firmware: Mutex::new(firmware),
            flash_path: flash_path.to_path_buf(),
            clock,
            hosts: Mutex::new(0),
            hung: AtomicBool::new(false),
        }))
    }

    /// The dongle's serial number as a string.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Gives one report from a connection to the firmware; returns the reply reports (none
    /// while the dongle hangs).
    pub fn exchange(&self, port: &mut DevicePort, report: &[u8]) -> Vec<Report> {
        if self.is_hung() {
            return Vec::new();
        }
        let mut fw = self.lock();
        let replies = port.receive_report(&mut fw, report, world_now_ms(&self.clock));
        persist(&mut fw, &self.flash_path);
        replies
    }

    /// A host plugs the dongle in (a sim socket, a usbredir passthrough, a USB/IP import). The
    /// first one powers it up: its bus resets, as real hardware's does.
    pub fn plugged(&self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        if *hosts == 0 {
            self.bus_reset();
        }
        *hosts += 1;
    }

    /// A host unplugs the dongle; the last one leaving resets its bus. Another host that merely
    /// shares the device keeps its sessions.
    pub fn unplugged(&self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        *hosts = hosts.saturating_sub(1);
        if *hosts == 0 {
            self.bus_reset();
        }
    }

    /// How many hosts have the dongle plugged in.
    pub fn hosts(&self) -> usize {
        *self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hangs the firmware: the dongle stays on its buses but answers nothing until it loses
    /// power (unplugged from every host).
    pub fn hang(&self) {
        tracing::info!(serial = self.serial, "dongle hung");
        self.hung.store(true, Ordering::SeqCst);
    }

    /// Whether the firmware hangs.
    pub fn is_hung(&self) -> bool {
        self.hung.load(Ordering::SeqCst)
    }

    fn bus_reset(&self) {
        self.hung.store(false, Ordering::SeqCst);
        let now = world_now_ms(&self.clock);
        let mut fw = self.lock();
        fw.bus_reset(now);
        persist(&mut fw, &self.flash_path);
    }

    /// The dongle's own view of itself.
    pub fn status(&self) -> serde_json::Value {
        let now = world_now_ms(&self.clock);
        let mut fw = self.lock();
        let mut status = serde_json::to_value(fw.status(now)).unwrap_or(serde_json::Value::Null);
        if let Some(fields) = status.as_object_mut() {
            fields.insert("hung".into(), self.is_hung().into());
        }
        status
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Firmware> {
        self.firmware.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A dongle for unit tests: `serial`, certified by the vendor key `[7; 32]`, flash in `dir`.
#[cfg(test)]
pub(crate) fn test_dongle(dir: &Path, serial: u64) -> Arc<DongleCore> {
    let vendor = dongle::SigningKey::from_bytes(&[7u8; 32]);
    let flash = Flash::manufacture(dongle::Serial(serial), [1; 32], [2; 32], &vendor);
    let path = dir.join("flash.json");
    std::fs::write(&path, serde_json::to_vec(&flash).unwrap()).unwrap();
    DongleCore::power_on(&path, Arc::new(AtomicI64::new(0))).unwrap()
}

fn persist(fw: &mut Firmware, flash_path: &Path) {
    if fw.take_flash_dirty() {
        match serde_json::to_vec_pretty(fw.flash()) {
            Ok(bytes) => {
                let tmp = flash_path.with_extension("tmp");
                if let Err(e) =
                    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, flash_path))
                {
                    tracing::warn!("cannot store dongle flash {}: {e}", flash_path.display());
                }
            }
            Err(e) => tracing::warn!("cannot store dongle flash: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a session from one host: the dongle binds to `runtime` and its session is active.
    fn bind(core: &DongleCore, runtime: &str) {
        let vendor = dongle::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        let (mut session, hello) = dongle::Session::start(
            dongle::RuntimeId::new(runtime).unwrap(),
            &dongle::SigningKey::from_bytes(&[8; 32]),
            [9; 32],
            vec![vendor],
        );
        let mut port = DevicePort::new();
        let mut assembler = dongle::ReportAssembler::new();
        let mut reply = None;
        for report in dongle::encode_reports(&hello).unwrap() {
            for answer in core.exchange(&mut port, &report) {
                reply = assembler.push(&answer).unwrap().or(reply);
            }
        }
        session
            .accept(&reply.expect("the dongle answers the hello"))
            .unwrap();
    }

    fn active(core: &DongleCore) -> bool {
        core.status()["bound-active"].as_bool().unwrap()
    }

    #[test]
    fn only_the_first_plug_and_the_last_unplug_reset_the_bus() {
        let dir = tempfile::tempdir().unwrap();
        let core = test_dongle(dir.path(), 42);
        core.plugged();
        bind(&core, "vm1");
        assert!(active(&core));
        // A second host sharing the device does not end the first one's session...
        core.plugged();
        assert!(active(&core));
        core.unplugged();
        assert!(active(&core), "one host is still plugged in");
        assert_eq!(core.hosts(), 1);
        // ...the last one leaving does.
        core.unplugged();
        assert!(!active(&core));
        assert_eq!(core.hosts(), 0);
    }

    /// Whether the dongle answers a hello from `runtime` at all.
    fn answers(core: &DongleCore, runtime: &str) -> bool {
        let (_, hello) = dongle::Session::start(
            dongle::RuntimeId::new(runtime).unwrap(),
            &dongle::SigningKey::from_bytes(&[8; 32]),
            [9; 32],
            vec![],
        );
        let mut port = DevicePort::new();
        dongle::encode_reports(&hello)
            .unwrap()
            .iter()
            .any(|report| !core.exchange(&mut port, report).is_empty())
    }

    #[test]
    fn a_hung_dongle_answers_nothing_until_it_loses_power() {
        let dir = tempfile::tempdir().unwrap();
        let core = test_dongle(dir.path(), 43);
        core.plugged();
        core.plugged();
        assert!(answers(&core, "vm1"));
        core.hang();
        assert!(core.is_hung());
        assert_eq!(core.status()["hung"], true);
        assert!(!answers(&core, "vm1"));
        // One host of two unplugging is no power cycle.
        core.unplugged();
        assert!(!answers(&core, "vm1"));
        core.unplugged();
        core.plugged();
        assert!(!core.is_hung());
        assert!(answers(&core, "vm1"));
    }
}
