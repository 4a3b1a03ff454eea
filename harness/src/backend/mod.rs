//! Backends run the world: machines, sessions, apps, clocks, networks and dongles.
//!
//! The engine only speaks to the [`Backend`] trait; it never knows which hypervisor (if any) is
//! behind it.

pub mod qemu;
pub mod sim;

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

/// Where a runtime's network server can be reached and how to trust it.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    /// Address the server listens on.
    pub listen: String,
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
    /// A network server on a guest (`server-start` naming a guest).
    ServerInGuest,
}

/// Whether a backend of `kind` can do `op`; else why not.
pub fn supports(kind: BackendKind, op: Operation) -> Result<(), String> {
    match (kind, op) {
        (BackendKind::Sim, _) | (BackendKind::Qemu, Operation::Run) => Ok(()),
        (BackendKind::Qemu, Operation::ServerInGuest) => {
            Err("a network server inside a guest is not supported yet".into())
        }
        (other, _) => Err(format!(
            "the {other} backend is not built yet; use --backend sim (see `vigil doctor`)"
        )),
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

/// The non-empty complete lines of an app's output so far (the app may be mid-write, so a last
/// line without its newline does not count yet).
pub(crate) fn complete_lines(text: &str) -> Vec<String> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// Puts a child in its own process group and kills it when the harness dies.
pub(crate) fn detach_into_own_group(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setpgid and prctl are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The last lines of a log file, for diagnostics.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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
}

/// Creates a backend of the given kind for one world.
pub fn create(kind: BackendKind, config: WorldConfig) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Sim => Ok(Box::new(sim::SimBackend::new(config)?)),
        BackendKind::Qemu => Ok(Box::new(qemu::QemuBackend::new(config)?)),
        other => Err(BackendError::Unsupported {
            backend: other,
            operation: "run scenarios",
            why: supports(other, Operation::Run)
                .err()
                .unwrap_or_else(|| "it has no driver".into()),
        }),
    }
}

/// A world runner. Every method names machines, sessions and apps by their scenario names.
pub trait Backend {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Describes the execution environment (accelerator, versions) for the report.
    fn describe(&self) -> serde_json::Value;
    /// Whether this backend can do `op`; else why not.
    fn supports(&self, op: Operation) -> Result<(), String> {
        supports(self.kind(), op)
    }
    /// A machine's power state now.
    fn power(&self, machine: &str) -> Result<Power, BackendError>;
    /// The host a guest runs on now (a host is its own).
    fn host_of(&self, machine: &str) -> Result<String, BackendError>;
    /// Every machine, hosts and guests.
    fn machines(&self) -> Vec<String>;
    /// Adds a physical machine (powered off).
    fn add_host(&mut self, host: &HostSpec) -> Result<(), BackendError>;
    /// Defines a guest on its host (powered off).
    fn add_guest(&mut self, guest: &GuestSpec) -> Result<(), BackendError>;
    /// Powers a machine on; returns when its runtime is ready.
    fn boot(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Powers a machine off cleanly.
    fn shutdown(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Freezes a guest.
    fn pause(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Thaws a guest.
    fn resume(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Takes a named snapshot of a guest (disk and running state).
    fn snapshot(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// Reverts a guest to a snapshot; the guest gets a new generation id, as a hypervisor gives.
    fn revert(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// Clones a guest (powered off) onto a host.
    fn clone_guest(
        &mut self,
        from: &str,
        to: &str,
        host: &str,
        identity: CloneIdentity,
    ) -> Result<(), BackendError>;
    /// Migrates a running guest live to another host; its identity is kept.
    fn migrate(&mut self, machine: &str, host: &str) -> Result<(), BackendError>;
    /// Moves a guest cold to a host: it is powered off, moved, and stays off.
    fn move_guest(&mut self, machine: &str, host: &str) -> Result<(), BackendError>;
    /// Replaces a machine's NICs with new ones (new MACs).
    fn replace_nic(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Opens a login session.
    fn open_session(
        &mut self,
        machine: &str,
        session: &str,
        spec: &SessionSpec,
    ) -> Result<(), BackendError>;
    /// Closes a login session, ending its processes.
    fn close_session(&mut self, machine: &str, session: &str) -> Result<(), BackendError>;
    /// Runs the runtime's `meter` command in a session and waits for it.
    fn run_meter(
        &mut self,
        machine: &str,
        session: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError>;
    /// Starts a long-lived `meter` command (an app) in a session.
    fn start_app(
        &mut self,
        machine: &str,
        session: &str,
        app: &str,
        args: &[String],
    ) -> Result<(), BackendError>;
    /// Lines the app has printed so far.
    fn app_output(&mut self, app: &str) -> Result<Vec<String>, BackendError>;
    /// Whether the app is still running.
    fn app_status(&mut self, app: &str) -> Result<AppStatus, BackendError>;
    /// Asks an app to end normally (SIGTERM).
    fn terminate_app(&mut self, app: &str) -> Result<(), BackendError>;
    /// Kills an app with SIGKILL (a crash).
    fn kill_app(&mut self, app: &str) -> Result<(), BackendError>;
    /// Sets the virtual clock: the world offset from real time plus one machine's skew.
    fn set_clock(&mut self, world_offset: i64, skews: &[(String, i64)])
    -> Result<(), BackendError>;
    /// Starts the machine's runtime as a network server.
    fn start_server(
        &mut self,
        machine: &str,
        port: u16,
        keepalive: Duration,
    ) -> Result<ServerInfo, BackendError>;
    /// Stops the machine's network server.
    fn stop_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Cuts the network between two groups of machines.
    fn partition(&mut self, a: &[String], b: &[String]) -> Result<(), BackendError>;
    /// Restores the cuts touching these machines (all cuts when empty).
    fn heal(&mut self, machines: &[String]) -> Result<(), BackendError>;
    /// Adds a dongle (unplugged) whose flash the vendor programmed into `flash`.
    fn add_dongle(&mut self, name: &str, flash: &std::path::Path) -> Result<(), BackendError>;
    /// Plugs a dongle into machines: exclusive moves it to one machine (unplugging it elsewhere),
    /// shared adds machines that use it at the same time.
    fn usb_attach(
        &mut self,
        dongle: &str,
        machines: &[String],
        mode: UsbMode,
    ) -> Result<(), BackendError>;
    /// Unplugs a dongle from every machine.
    fn usb_detach(&mut self, dongle: &str) -> Result<(), BackendError>;
    /// Attaches a dongle to a machine over USB/IP (one importer at a time).
    fn usbip_attach(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError>;
    /// Detaches a dongle's USB/IP import cleanly.
    fn usbip_detach(&mut self, dongle: &str) -> Result<(), BackendError>;
    /// Breaks a dongle's USB/IP connection abruptly (a network fault).
    fn usbip_disconnect(&mut self, dongle: &str) -> Result<(), BackendError>;
    /// Hangs a dongle's firmware: it stays attached but answers nothing until it is unplugged
    /// from every machine.
    fn usb_hang(&mut self, dongle: &str) -> Result<(), BackendError>;
    /// The dongle's own view of itself (binding, lockout, clock), as its firmware reports it.
    fn dongle_status(&mut self, dongle: &str) -> Result<serde_json::Value, BackendError>;
    /// Writes a file onto a machine's disk; returns its path as the machine sees it.
    fn put_file(
        &mut self,
        machine: &str,
        name: &str,
        contents: &[u8],
    ) -> Result<String, BackendError>;
    /// Reads a file from a machine by the path the machine sees.
    fn get_file(&mut self, machine: &str, path: &str) -> Result<Vec<u8>, BackendError>;
    /// Copies logs into the report folder and stops everything.
    fn teardown(&mut self) -> Result<(), BackendError>;
    /// Folder where this backend keeps the run's logs.
    fn log_dir(&self) -> PathBuf;
}
