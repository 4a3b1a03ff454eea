//! What the composite backend asks of one kind of machine: the sim driver's simulated machines,
//! the qemu driver's QEMU guests. A driver knows its own machines only; everything that spans
//! machines (network links, dongle moves, the world clock, placement on hosts) is the
//! composite's.

use std::any::Any;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::types::{
    AppStatus, BackendError, Caller, CloneIdentity, CommandOutput, CpuProfile, HardwareIdentity,
    Power, Role, ServerInfo, ServerSettings, SessionSpec,
};

/// A machine as the composite hands it to a driver.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// Scenario name (already checked to be a safe file name).
    pub name: String,
    /// Whether it is a virtual machine.
    pub guest: bool,
    /// Workstation or terminal server.
    pub role: Role,
    /// Its hardware identity.
    pub identity: HardwareIdentity,
    /// The CPU it sees at first (its host's for a guest).
    pub cpu: CpuProfile,
    /// Its own address on the world's network.
    pub ip: Ipv4Addr,
    /// A guest whose CPUID hypervisor bit is switched off.
    pub hide_hypervisor: bool,
    /// The host it is placed on (a host is on itself).
    pub host: String,
}

/// A network server a machine's runtime is pointed at: the harness-side address of the link
/// that reaches it (the driver says it the way its machine sees the harness) and its pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLink {
    /// Where the server answers on the harness machine, with its certificate's pin: one
    /// address, or a triad's three members in the triad's order.
    pub endpoints: Vec<(SocketAddr, String)>,
}

impl ServerLink {
    /// A link to one server.
    pub fn single(via: SocketAddr, pin: String) -> ServerLink {
        ServerLink {
            endpoints: vec![(via, pin)],
        }
    }

    /// The server's address as `meter servers add` takes it (a triad's separated by commas),
    /// each address as the machine reaches it (`reach`).
    pub fn address(&self, reach: impl Fn(SocketAddr) -> SocketAddr) -> String {
        let addresses: Vec<String> = self
            .endpoints
            .iter()
            .map(|(via, _)| reach(*via).to_string())
            .collect();
        addresses.join(",")
    }

    /// The pins as `meter servers add --pin` takes them.
    pub fn pins(&self) -> String {
        let pins: Vec<&str> = self.endpoints.iter().map(|(_, pin)| pin.as_str()).collect();
        pins.join(",")
    }

    /// Makes `known` the `wanted` links; returns those it did not have before and those a new
    /// one replaces (servers that became members of a triad). A server that is simply gone
    /// stays configured on the machine, unreachable, as it would for a real client.
    pub fn adopt(
        known: &mut Vec<ServerLink>,
        wanted: &[ServerLink],
    ) -> (Vec<ServerLink>, Vec<ServerLink>) {
        let new = wanted
            .iter()
            .filter(|link| !known.contains(link))
            .cloned()
            .collect();
        let gone = known
            .iter()
            .filter(|link| !wanted.contains(link))
            .filter(|link| {
                wanted.iter().any(|w| {
                    w.endpoints
                        .iter()
                        .any(|(via, _)| link.endpoints.iter().any(|(v, _)| v == via))
                })
            })
            .cloned()
            .collect();
        *known = wanted.to_vec();
        (new, gone)
    }
}

/// How a dongle reaches a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DongleLink {
    /// Plugged in (passed through by the hypervisor, exclusively or shared).
    Usb,
    /// Imported over USB/IP.
    Usbip,
}

/// How a dongle leaves a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplug {
    /// Cleanly: unplugged, or detached by the importer.
    Clean,
    /// Abruptly: the USB/IP connection breaks (a network fault).
    Cut,
}

/// One kind of machine the composite runs; every method names machines by scenario name.
pub trait MachineDriver: Any {
    /// What the driver adds to the backend's description (versions, accelerator).
    fn describe(&self) -> serde_json::Value;
    /// A machine's power state now.
    fn power(&self, machine: &str) -> Result<Power, BackendError>;
    /// Adds a machine, powered off.
    fn add_machine(&mut self, spec: &MachineSpec) -> Result<(), BackendError>;
    /// Powers a machine on with `cpu` (its host's); returns when its runtime is ready.
    fn boot(&mut self, machine: &str, cpu: &CpuProfile) -> Result<(), BackendError>;
    /// Powers a running or paused machine off cleanly.
    fn shutdown(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Freezes a running machine.
    fn pause(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Thaws a paused machine.
    fn resume(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Takes a named snapshot (disk and running state).
    fn snapshot(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// The dongles a snapshot had plugged in, which a revert takes back from wherever they are.
    fn snapshot_dongles(&self, machine: &str, name: &str) -> Result<Vec<String>, BackendError> {
        let _ = (machine, name);
        Ok(Vec::new())
    }
    /// Reverts to a snapshot with a new generation id, in the power state the snapshot was
    /// taken in; running, the guest tells the CPU it had booted with before the snapshot.
    fn revert(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// Clones machine `from` into the new machine `to` (powered off); `to.identity` is used when
    /// `identity` asks for a new one.
    fn clone_machine(
        &mut self,
        from: &str,
        to: &MachineSpec,
        identity: CloneIdentity,
    ) -> Result<(), BackendError>;
    /// Moves a running guest live to `host` (it keeps its CPU and identity).
    fn migrate(&mut self, machine: &str, host: &str) -> Result<(), BackendError>;
    /// Places a stopped guest on `host`; it boots there with that host's CPU.
    fn move_machine(&mut self, machine: &str, host: &str) -> Result<(), BackendError> {
        let _ = (machine, host);
        Ok(())
    }
    /// Gives a machine's first NIC a new MAC.
    fn replace_nic(&mut self, machine: &str, mac: String) -> Result<(), BackendError>;
    /// Opens a login session on a running machine.
    fn open_session(
        &mut self,
        machine: &str,
        session: &str,
        spec: &SessionSpec,
    ) -> Result<(), BackendError>;
    /// Closes a login session, ending its processes.
    fn close_session(&mut self, machine: &str, session: &str) -> Result<(), BackendError>;
    /// Deletes the runtime's session table on a running machine and writes it no more until
    /// the machine stops (its login sessions stay open).
    fn drop_session_table(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Runs `meter <args>` as `caller` and waits for it.
    fn run_meter(
        &mut self,
        machine: &str,
        caller: Caller<'_>,
        args: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError>;
    /// Restarts the machine's runtime presenting `name` (and `runtime_id`, when given) as its
    /// identity, until the machine shuts down.
    fn impersonate(
        &mut self,
        machine: &str,
        name: &str,
        runtime_id: Option<&str>,
    ) -> Result<(), BackendError>;
    /// Stops the machine's runtime, copies its state folder aside as `name`, starts it again.
    fn save_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// Stops the machine's runtime, puts the copy `name` back as its state folder, starts it.
    fn restore_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError>;
    /// Starts `meter <args>` as a long-lived app in a session; with `leaves_session` it calls
    /// `setsid` as it starts and must stay in the session's login session.
    fn start_app(
        &mut self,
        machine: &str,
        session: &str,
        app: &str,
        args: &[String],
        leaves_session: bool,
    ) -> Result<(), BackendError>;
    /// Complete lines the app printed so far.
    fn app_output(&mut self, machine: &str, app: &str) -> Result<Vec<String>, BackendError>;
    /// Whether the app still runs.
    fn app_status(&mut self, machine: &str, app: &str) -> Result<AppStatus, BackendError>;
    /// Sends the app a signal (SIGTERM, SIGKILL).
    fn signal_app(&mut self, machine: &str, app: &str, signal: i32) -> Result<(), BackendError>;
    /// Sets how far the machine's clock runs past real time (world offset plus its skew).
    fn set_clock(&mut self, machine: &str, offset_ms: i64) -> Result<(), BackendError>;
    /// The servers the machine's runtime should know: new ones are added to a running runtime,
    /// all are given at its next start.
    fn set_servers(&mut self, machine: &str, servers: &[ServerLink]) -> Result<(), BackendError>;
    /// How `machine` reaches `via`, an address on the harness machine (a relay's).
    fn reach(&self, machine: &str, via: SocketAddr) -> SocketAddr {
        let _ = machine;
        via
    }
    /// Restarts a running machine's runtime as a network server on its own address.
    fn start_server(
        &mut self,
        machine: &str,
        settings: ServerSettings,
    ) -> Result<ServerInfo, BackendError>;
    /// Restarts the machine's runtime without its server.
    fn stop_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Kills the machine's runtime (SIGKILL) while it serves, and starts it again as the server.
    fn crash_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Freezes the machine's runtime (SIGSTOP) while it serves; returns once it stands still.
    fn pause_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Lets the machine's frozen runtime run on (SIGCONT).
    fn resume_server(&mut self, machine: &str) -> Result<(), BackendError>;
    /// Plugs a dongle into a machine (nothing when it is plugged in there already).
    fn plug_dongle(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError>;
    /// Has a machine import a dongle over USB/IP (nothing when it holds a live import already).
    fn import_dongle(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError>;
    /// Takes a dongle away from a machine, however it reached it.
    fn unplug_dongle(
        &mut self,
        dongle: &str,
        machine: &str,
        how: Unplug,
    ) -> Result<(), BackendError>;
    /// The driver's machines that hold the dongle now, and how.
    fn dongle_holders(&self, dongle: &str) -> Vec<(String, DongleLink)>;
    /// Writes a file into the machine's home folder; returns its path as the machine sees it.
    fn put_file(
        &mut self,
        machine: &str,
        name: &str,
        contents: &[u8],
    ) -> Result<String, BackendError>;
    /// Reads a file from the machine by the path the machine sees.
    fn get_file(&mut self, machine: &str, path: &str) -> Result<Vec<u8>, BackendError>;
    /// Stops every machine and gathers their logs into the report folder.
    fn teardown(&mut self) -> Result<(), BackendError>;
    /// The driver itself, for tests and benchmarks that reach past the [`super::Backend`] trait.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}
