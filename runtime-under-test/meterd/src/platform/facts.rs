//! What every platform answers: the `Platform` trait, its errors and the session table format.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use meter_core::station::{MachineRole, SessionKind};
use meter_core::traits::{MachineKind, MachineTraits};
use serde::Deserialize;

/// Failure to learn something about the machine.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A platform file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A platform file is not in the documented format.
    #[error("Malformed platform file {path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The `--platform` argument names no known platform.
    #[error("Unknown platform {0:?} (expected host or sim:<dir>)")]
    UnknownSpec(String),
    /// A simulated platform asked of a runtime built to run only on real machines.
    #[error(
        "This runtime runs only on the real machine (--platform host): `sim:` is for the test harness's builds"
    )]
    SimulatedRefused,
}

/// One login session as the platform's session table describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// What the session is (console, remote desktop, service).
    pub kind: SessionKind,
    /// The user logged in, if known.
    pub user: Option<String>,
}

/// A dongle attached to the machine, reachable at a local endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbEndpoint {
    /// The dongle's serial as the port names it.
    pub serial: String,
    /// The Unix socket (sim) or device node (host) to talk to it.
    pub path: PathBuf,
}

/// Everything the runtime learns about its machine.
pub trait Platform: Send + Sync + std::fmt::Debug {
    /// The machine's name, used as its station id.
    fn machine_name(&self) -> Result<String, PlatformError>;
    /// Physical hardware or a virtual machine (the hypervisor flag).
    fn kind(&self) -> Result<MachineKind, PlatformError>;
    /// Workstation or terminal server, as the session table says (more than one interactive
    /// session); the runtime also judges it from live login sessions (`machine_role`).
    fn role(&self) -> Result<MachineRole, PlatformError>;
    /// The login sessions alive on the machine now (audit session ids), as the kernel knows them.
    fn live_login_sessions(&self) -> Result<BTreeSet<u32>, PlatformError>;
    /// The machine's hardware traits.
    fn traits(&self) -> Result<MachineTraits, PlatformError>;
    /// The machine's address as other machines see it, if the platform knows it.
    fn address(&self) -> Result<Option<IpAddr>, PlatformError>;
    /// The virtual machine generation id (guests only).
    fn vmgenid(&self) -> Result<Option<String>, PlatformError>;
    /// Identifies the current boot: no process of another boot is alive.
    fn boot_id(&self) -> Result<Option<String>, PlatformError>;
    /// The machine's clock, unix milliseconds.
    fn now_ms(&self) -> Result<u64, PlatformError>;
    /// What the session with this id is, if the session table knows it.
    fn session(&self, session_id: u32) -> Result<Option<SessionInfo>, PlatformError>;
    /// The name of the user account `uid`, if the machine has one.
    fn user_name(&self, uid: u32) -> Result<Option<String>, PlatformError>;
    /// Dongles attached to the machine.
    fn usb_endpoints(&self) -> Result<Vec<UsbEndpoint>, PlatformError>;
    /// Where [`Platform::usb_endpoints`] looks, for messages.
    fn usb_scanned(&self) -> String;
    /// Human-readable description (`host` or `sim:<dir>`).
    fn describe(&self) -> String;
}

/// The name of `uid` in a passwd-format text (`name:x:uid:gid:…`).
pub(crate) fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, PlatformError> {
    fs::read_to_string(path).map_err(|source| PlatformError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, PlatformError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PlatformError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The role a session table shows: a terminal server when it lists more than one interactive
/// session.
pub(crate) fn role_from_table(table: &BTreeMap<u32, SessionInfo>) -> MachineRole {
    let interactive = table
        .values()
        .filter(|s| !matches!(s.kind, SessionKind::Service))
        .count();
    if interactive > 1 {
        MachineRole::TerminalServer
    } else {
        MachineRole::Workstation
    }
}

/// One entry of a session table file (`sessions.json`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) struct SessionEntry {
    kind: SessionEntryKind,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    client_name: String,
    #[serde(default)]
    client_ip: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SessionEntryKind {
    Console,
    Rdp,
    Service,
}

pub(crate) fn parse_session_table(
    path: &Path,
    text: &str,
) -> Result<BTreeMap<u32, SessionInfo>, PlatformError> {
    let raw: BTreeMap<String, SessionEntry> =
        serde_json::from_str(text).map_err(|e| PlatformError::Malformed {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    raw.into_iter()
        .map(|(id, entry)| {
            let id: u32 = id.parse().map_err(|_| PlatformError::Malformed {
                path: path.to_owned(),
                message: format!("session id {id:?} is not a number"),
            })?;
            let kind = match entry.kind {
                SessionEntryKind::Console => SessionKind::Console,
                SessionEntryKind::Service => SessionKind::Service,
                SessionEntryKind::Rdp => SessionKind::Rdp {
                    client_name: entry.client_name,
                    client_ip: entry.client_ip,
                },
            };
            Ok((
                id,
                SessionInfo {
                    kind,
                    user: entry.user,
                },
            ))
        })
        .collect()
}
