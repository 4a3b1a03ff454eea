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
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use dongle::{DevicePort, Firmware, Flash, Report};

use crate::backend::BackendError;

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
        let _ = getrandom::fill(&mut entropy);
        firmware.mix_entropy(&entropy);
        Ok(Arc::new(DongleCore {
            serial,
            firmware: Mutex::new(firmware),
            flash_path: flash_path.to_path_buf(),
            clock,
        }))
    }

    /// The dongle's serial number as a string.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Gives one report from a connection to the firmware; returns the reply reports.
    pub fn exchange(&self, port: &mut DevicePort, report: &[u8]) -> Vec<Report> {
        let mut fw = self.lock();
        let replies = port.receive_report(&mut fw, report, world_now_ms(&self.clock));
        persist(&mut fw, &self.flash_path);
        replies
    }

    /// Resets the dongle's bus (a plug or unplug with no other host attached).
    pub fn bus_reset(&self) {
        let now = world_now_ms(&self.clock);
        let mut fw = self.lock();
        fw.bus_reset(now);
        persist(&mut fw, &self.flash_path);
    }

    /// The dongle's own view of itself.
    pub fn status(&self) -> serde_json::Value {
        let now = world_now_ms(&self.clock);
        let mut fw = self.lock();
        serde_json::to_value(fw.status(now)).unwrap_or(serde_json::Value::Null)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Firmware> {
        self.firmware.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn persist(fw: &mut Firmware, flash_path: &Path) {
    if fw.take_flash_dirty() {
        match serde_json::to_vec_pretty(fw.flash()) {
            Ok(bytes) => {
                let tmp = flash_path.with_extension("tmp");
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, flash_path);
                }
            }
            Err(e) => tracing::warn!("cannot store dongle flash: {e}"),
        }
    }
}
