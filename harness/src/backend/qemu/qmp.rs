//! The QEMU monitor: the few QMP commands the backend needs, behind a trait of our own, spoken
//! through the `qapi` crate.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use qapi::qmp;

use crate::backend::guest::usb_plug::UsbRedirPlug;

/// Errors from the QEMU monitor.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The monitor socket did not answer.
    #[error("Cannot reach the QEMU monitor at {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A command failed or the connection broke.
    #[error("QMP `{command}` failed: {message}")]
    Command { command: String, message: String },
}

/// Where a live migration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationProgress {
    /// QEMU's status word (`active`, `completed`, `failed`, …).
    pub status: String,
    /// Total time so far, milliseconds.
    pub total_ms: Option<i64>,
    /// Time the guest was stopped, milliseconds.
    pub downtime_ms: Option<i64>,
}

/// The monitor operations the backend uses.
pub trait Monitor: Send {
    /// Freezes the guest's CPUs.
    fn stop(&mut self) -> Result<(), QmpError>;
    /// Lets the guest's CPUs run again.
    fn cont(&mut self) -> Result<(), QmpError>;
    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, …).
    fn run_state(&mut self) -> Result<String, QmpError>;
    /// Runs a human monitor command (`savevm`, `delvm`, `info snapshots`); returns its text.
    fn hmp(&mut self, line: &str) -> Result<String, QmpError>;
    /// Starts a live migration to a URI (`unix:/path`).
    fn migrate(&mut self, uri: &str) -> Result<(), QmpError>;
    /// Where the outgoing migration stands.
    fn migration(&mut self) -> Result<MigrationProgress, QmpError>;
    /// Asks QEMU to exit at once.
    fn quit(&mut self) -> Result<(), QmpError>;
    /// The ids of the character devices QEMU has now.
    fn chardevs(&mut self) -> Result<Vec<String>, QmpError>;
    /// Hot-plugs a usbredir device: its chardev connects to the server, then the device appears.
    fn usb_plug(&mut self, plug: &UsbRedirPlug) -> Result<(), QmpError> {
        self.hmp(&format!("chardev-add {}", plug.chardev()))?;
        if let Err(e) = self.hmp(&format!("device_add {}", plug.device())) {
            let _ = self.hmp(&format!("chardev-remove {}", plug.id));
            return Err(e);
        }
        Ok(())
    }
    /// Unplugs a usbredir device; its chardev goes with it (QEMU deletes it once the device is
    /// gone, or it is removed here).
    fn usb_unplug(&mut self, id: &str) -> Result<(), QmpError> {
        self.hmp(&format!("device_del {id}"))?;
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            // Gone already: the device took it along.
            if !self.chardevs()?.iter().any(|label| label == id) {
                return Ok(());
            }
            match self.hmp(&format!("chardev-remove {id}")) {
                Ok(_) => return Ok(()),
                // Still held by the dying device: it deletes the chardev itself (plugs never
                // reuse an id, so a late one is harmless).
                Err(e) if Instant::now() > deadline => {
                    tracing::debug!(%e, "usbredir chardev left to its device");
                    return Ok(());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

/// A QMP connection over a Unix socket.
pub struct QmpMonitor {
    qmp: qapi::Qmp<Stream>,
}

impl QmpMonitor {
    /// Connects (retrying until `wait` has passed: QEMU creates the socket as it starts) and
    /// negotiates capabilities.
    pub fn connect(path: &Path, wait: Duration) -> Result<QmpMonitor, QmpError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() > deadline => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source: e,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let connect_error = |source| QmpError::Connect {
            path: path.display().to_string(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(connect_error)?;
        let reader = stream.try_clone().map_err(connect_error)?;
        let mut qmp = qapi::Qmp::new(qapi::Stream::new(BufReader::new(reader), stream));
        qmp.handshake().map_err(|e| QmpError::Command {
            command: "qmp_capabilities".into(),
            message: e.to_string(),
        })?;
        Ok(QmpMonitor { qmp })
    }

    fn run<C: qapi::Command>(&mut self, command: &C) -> Result<C::Ok, QmpError> {
        let result = self.qmp.execute(command).map_err(|e| QmpError::Command {
            command: C::NAME.into(),
            message: e.to_string(),
        });
        // Events (STOP, RESUME, MIGRATION…) are not used; drop them so they do not pile up.
        self.qmp.events().for_each(drop);
        result
    }
}

impl Monitor for QmpMonitor {
    fn stop(&mut self) -> Result<(), QmpError> {
        self.run(&qmp::stop {}).map(drop)
    }

    fn cont(&mut self) -> Result<(), QmpError> {
        self.run(&qmp::cont {}).map(drop)
    }

    fn run_state(&mut self) -> Result<String, QmpError> {
        let info = self.run(&qmp::query_status {})?;
        Ok(serde_json::to_value(info.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default())
    }

    fn hmp(&mut self, line: &str) -> Result<String, QmpError> {
        let text = self.run(&qmp::human_monitor_command {
            command_line: line.to_string(),
            cpu_index: None,
        })?;
        // HMP reports failures as text, not as QMP errors.
        let lowered = text.to_ascii_lowercase();
        if lowered.contains("error") || lowered.contains("could not") {
            return Err(QmpError::Command {
                command: line.to_string(),
                message: text.trim().to_string(),
            });
        }
        Ok(text)
    }

    fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.run(&qmp::migrate {
            uri: Some(uri.to_string()),
            channels: None,
            detach: None,
            resume: None,
        })
        .map(drop)
    }

    fn migration(&mut self) -> Result<MigrationProgress, QmpError> {
        let info = self.run(&qmp::query_migrate {})?;
        Ok(MigrationProgress {
            status: info
                .status
                .and_then(|s| serde_json::to_value(s).ok())
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "none".into()),
            total_ms: info.total_time,
            downtime_ms: info.downtime,
        })
    }

    fn chardevs(&mut self) -> Result<Vec<String>, QmpError> {
        let devices = self.run(&qmp::query_chardev {})?;
        Ok(devices.into_iter().map(|d| d.label).collect())
    }

    fn quit(&mut self) -> Result<(), QmpError> {
        self.run(&qmp::quit {}).map(drop)
    }
}
