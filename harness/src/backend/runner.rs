//! The one interface the engine runs a world through.

use std::path::PathBuf;
use std::time::Duration;

use super::types::{
    AppStatus, BackendError, BackendKind, Caller, CloneIdentity, CommandOutput, GuestSpec,
    HostSpec, Operation, Power, ServerInfo, ServerSettings, SessionSpec, UsbMode, supports,
};

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
    /// Runs the runtime's `meter` command as `caller` and waits for it.
    fn run_meter(
        &mut self,
        machine: &str,
        caller: Caller<'_>,
        args: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError>;
    /// Starts a long-lived `meter` command (an app) in a session; with `leaves_session` the app
    /// calls `setsid` as it starts (it stays in the session's login session).
    fn start_app(
        &mut self,
        machine: &str,
        session: &str,
        app: &str,
        args: &[String],
        leaves_session: bool,
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
        settings: ServerSettings,
    ) -> Result<ServerInfo, BackendError>;
    /// Stops the machine's network server.
    fn stop_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Kills the machine's network server (SIGKILL) and starts it again with its state.
    fn crash_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Freezes the machine's network server (SIGSTOP); returns once it stands still.
    fn pause_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Lets a frozen network server run on (SIGCONT).
    fn resume_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Makes the network servers of three machines one triad (2-of-3); returns once the first
    /// leads, every other machine's runtime pointed at the triad.
    fn form_triad(&mut self, members: &[String]) -> Result<(), BackendError>;
    /// A triad member's view: its number, the leader, and the seat events its ledger applied.
    fn triad_history(&mut self, member: &str) -> Result<serde_json::Value, BackendError>;
    /// Cuts the network between two groups of machines (nothing lost: delivery resumes on heal);
    /// with `reset`, the connections between them are also reset.
    fn partition(&mut self, a: &[String], b: &[String], reset: bool) -> Result<(), BackendError>;
    /// Restores the cuts touching these machines (all cuts when empty).
    fn heal(&mut self, machines: &[String]) -> Result<(), BackendError>;
    /// Restarts a machine's runtime presenting `name` as its machine name and, when given,
    /// `runtime_id` as its runtime id (until the machine shuts down).
    fn impersonate(
        &mut self,
        machine: &str,
        name: &str,
        runtime_id: Option<&str>,
    ) -> Result<(), BackendError>;
    /// Deletes the runtime's session table on a running machine, as its root can, and keeps it
    /// deleted until the machine stops.
    fn drop_session_table(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Stops a machine's runtime, copies its state folder aside as `name`, and starts it again.
    fn save_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// Stops a machine's runtime, puts the state folder copy `name` back, and starts it again
    /// (a file copy: no snapshot, no new vmgenid).
    fn restore_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// Opens up to `connections` idle TCP connections from `from`'s address to `to`'s server,
    /// held until teardown; how many opened.
    fn flood(&mut self, from: &str, to: &str, connections: u32) -> Result<usize, BackendError>;
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
    /// The machines a dongle is attached to now (by USB or USB/IP).
    fn dongle_machines(&self, dongle: &str) -> Vec<String>;
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
