//! What backends and the engine exchange: machine specs, power, world settings and errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Which backend runs a world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Simulated machines: folders plus real runtime processes (no hypervisor needed).
    Sim,
    /// Real QEMU guests driven over QMP.
    Qemu,
    /// Real guests through libvirt.
    Libvirt,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Sim => "sim",
            BackendKind::Qemu => "qemu",
            BackendKind::Libvirt => "libvirt",
        })
    }
}

/// Errors a backend reports.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A machine, session, app or dongle name the backend does not know.
    #[error("Unknown {kind} `{name}`")]
    Unknown { kind: &'static str, name: String },
    /// An operation that needs the machine in another state.
    #[error("Machine `{machine}` is {state}; {operation} needs it {needed}")]
    WrongState {
        machine: String,
        state: &'static str,
        operation: &'static str,
        needed: &'static str,
    },
    /// Something did not happen in time.
    #[error("Timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// The runtime under test could not be started or reached.
    #[error("Runtime on `{machine}`: {message}")]
    Runtime { machine: String, message: String },
    /// A file or process operation failed.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A name that cannot become a file name.
    #[error("Cannot use `{name}` as a {kind} name")]
    BadName {
        kind: &'static str,
        name: String,
        #[source]
        source: crate::name::NameError,
    },
    /// A user that cannot be an account.
    #[error("Cannot make `{name}` a user account: {why}")]
    BadAccount { name: String, why: String },
    /// This backend cannot do that (yet).
    #[error("The {backend} backend cannot {operation}: {why}")]
    Unsupported {
        backend: BackendKind,
        operation: &'static str,
        why: String,
    },
}

impl BackendError {
    /// Checks that `name`, naming a `kind` of thing, may become a file or folder name.
    pub fn check_name(kind: &'static str, name: &str) -> Result<(), BackendError> {
        crate::name::check(name).map_err(|source| BackendError::BadName {
            kind,
            name: name.to_owned(),
            source,
        })
    }

    /// Wraps an IO error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
        let context = context.into();
        move |source| BackendError::Io { context, source }
    }
}

/// A CPU as a host exposes it to its guests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuProfile {
    /// Vendor id string, e.g. `GenuineIntel`.
    pub vendor: String,
    /// Model name string.
    pub model_name: String,
    /// CPUID family.
    pub family: u32,
    /// CPUID model.
    pub model: u32,
    /// CPUID stepping.
    pub stepping: u32,
    /// Microcode revision.
    pub microcode: String,
    /// Digest of the CPU flag set.
    pub flags: String,
}

/// The identity a machine's firmware and devices report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HardwareIdentity {
    /// SMBIOS system UUID.
    pub product_uuid: String,
    /// SMBIOS system serial.
    pub product_serial: String,
    /// SMBIOS baseboard serial.
    pub board_serial: String,
    /// Disk serial numbers.
    pub disk_serials: Vec<String>,
    /// NIC MAC addresses.
    pub macs: Vec<String>,
}

/// Whether a machine serves one interactive user or many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// One interactive session; an RDP login is remote desktop onto the console station.
    Workstation,
    /// Many simultaneous sessions, each its own station.
    TerminalServer,
}

impl Role {
    /// Whether the console where apps started outside any session run is a login of its own:
    /// only on a terminal server (a workstation's console is unattended until someone logs in).
    pub fn console_is_a_login(self) -> bool {
        self == Role::TerminalServer
    }
}

/// A physical machine of the world.
#[derive(Debug, Clone, Serialize)]
pub struct HostSpec {
    /// Name used by scenarios.
    pub name: String,
    /// The CPU.
    pub cpu: CpuProfile,
    /// Firmware and device identity.
    pub identity: HardwareIdentity,
    /// Workstation or terminal server.
    pub role: Role,
}

/// A virtual machine of the world.
#[derive(Debug, Clone, Serialize)]
pub struct GuestSpec {
    /// Name used by scenarios.
    pub name: String,
    /// The host it runs on.
    pub host: String,
    /// Virtual firmware and device identity.
    pub identity: HardwareIdentity,
    /// Workstation or terminal server.
    pub role: Role,
    /// The CPUID hypervisor bit is switched off (an attack by the VM's owner).
    pub hide_hypervisor: bool,
}

/// How a clone gets its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneIdentity {
    /// New UUID, serials and MACs, as a hypervisor's clone wizard gives.
    New,
    /// A perfect copy: same UUID, serials and MACs.
    Perfect,
}

/// The kind of a login session, in the session table's format (shared with the guest agent).
pub use vigil_agent::protocol::SessionKind as SessionSpec;

/// Who runs a `meter` command on a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// The machine's administrator (root), outside every login session, as a service runs.
    Admin,
    /// A process of the named login session, run as that session's user.
    Session(&'a str),
}

/// What a finished command printed and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct CommandOutput {
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// How an app is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum AppStatus {
    /// Still running.
    Running,
    /// Exited with a code or was killed by a signal.
    Exited {
        /// Exit code.
        code: Option<i32>,
        /// Terminating signal.
        signal: Option<i32>,
    },
}

/// How a machine's runtime serves as a network server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSettings {
    /// TCP port.
    pub port: u16,
    /// Keepalive window of its stations.
    pub keepalive: Duration,
    /// Whether it keeps its usage log (off: its seats are never written to disk).
    pub usage_log: bool,
}

/// Where a runtime's network server can be reached and how to trust it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    /// Address the server listens on, as the harness machine reaches it.
    pub listen: String,
    /// Address it binds on its own machine (a guest's is not where the harness reaches it).
    #[serde(skip)]
    pub bind: SocketAddr,
    /// SHA-256 of its certificate.
    pub pin: String,
}

/// How a dongle is attached over USB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UsbMode {
    /// Passed through to one machine.
    Exclusive,
    /// Shared by several machines at once.
    Shared,
}

/// A machine's power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// Off (hosts never are).
    Off,
    /// Running: its runtime may answer.
    Running,
    /// Frozen: it answers nothing until resumed.
    Paused,
}

/// Something a scenario may ask that a backend may not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Running scenarios at all.
    Run,
}

/// Whether a backend of `kind` can do `op`; else why not.
pub fn supports(kind: BackendKind, op: Operation) -> Result<(), String> {
    match (kind, op) {
        (BackendKind::Sim, _) | (BackendKind::Qemu, _) => Ok(()),
        (BackendKind::Libvirt, Operation::Run) if cfg!(feature = "libvirt") => Ok(()),
        (BackendKind::Libvirt, _) => Err(
            "this vigil was built without the cargo feature `libvirt` (`cargo run --features \
             libvirt`, after `make deps` installs libvirt-dev)"
                .into(),
        ),
    }
}

impl Power {
    /// The state in words, for diagnostics.
    pub fn name(self) -> &'static str {
        match self {
            Power::Off => "powered off",
            Power::Running => "running",
            Power::Paused => "paused",
        }
    }

    /// Ok when `operation` may run in this state; else the error naming what it `needed`.
    pub(crate) fn require(
        self,
        machine: &str,
        operation: &'static str,
        allowed: &[Power],
        needed: &'static str,
    ) -> Result<(), BackendError> {
        if allowed.contains(&self) {
            Ok(())
        } else {
            Err(BackendError::WrongState {
                machine: machine.to_string(),
                state: self.name(),
                operation,
                needed,
            })
        }
    }
}

/// What every backend needs to set up a world.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// Folder with the runtime's `meter` and `meterd`.
    pub runtime_bin: PathBuf,
    /// Whether that is the built-in reference runtime (guest images carry their own copy);
    /// otherwise backends carry `runtime_bin` into their guests.
    pub builtin_runtime: bool,
    /// The harness executable (session leaders, agents).
    pub harness_exe: PathBuf,
    /// Scratch folder for machines (removed after the run unless kept).
    pub work_dir: PathBuf,
    /// Folder for logs (kept in the report).
    pub log_dir: PathBuf,
    /// Seed for identities and addresses.
    pub seed: u64,
    /// The world's root key (hex) runtimes are started with (`METER_HARNESS_ROOT`): harness
    /// builds of the reference runtime trust vendors it certifies.
    pub harness_root: Option<String>,
}
