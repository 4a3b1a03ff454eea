//! A network server inside a guest: the guest's runtime restarted as a server listening on
//! every guest address, reached from the harness machine through ports the hypervisor forwards
//! from the guest's own loopback address (the server's port, and the next one for a triad's
//! members). Its settings live on the guest's data disk (`/disk/server.args`), read at every
//! start of the runtime, so a crash, a clone or a revert to a snapshot taken while it served
//! starts it as a server again, as a real server's configuration would; a shutdown removes
//! them first (an off machine serves nobody: the world forgets its server).
//!
//! The forwarded connections reach the server from the guest network's gateway: a server in a
//! guest sees every peer at one address (user networking), where a server on a host sees one
//! per machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::hypervisor::{Hypervisor, RunningGuest};
use super::{GUEST_STATE, GuestDriver};
use crate::backend::driver::MachineDriver;
use crate::backend::types::{BackendError, Power, ServerInfo, ServerSettings};

/// The runtime's options that make it the network server `settings` asks for.
fn server_args(settings: &ServerSettings) -> Vec<String> {
    let mut args = vec![
        "--server".to_string(),
        "--listen".to_string(),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, settings.port)).to_string(),
        "--keepalive".to_string(),
        format!("{}", settings.keepalive.as_secs_f64()),
    ];
    if !settings.usage_log {
        args.push("--no-usage-log".into());
    }
    args
}

/// The guest ports a server forwards: its own and, for a triad's members, the next one.
fn forwarded_ports(settings: &ServerSettings) -> impl Iterator<Item = u16> {
    std::iter::once(settings.port).chain(settings.port.checked_add(1))
}

impl<H: Hypervisor> GuestDriver<H> {
    /// Restarts a running guest's runtime as the server `settings` asks for; where it answers.
    pub(super) fn start_guest_server(
        &mut self,
        machine: &str,
        settings: ServerSettings,
    ) -> Result<ServerInfo, BackendError> {
        let args = server_args(&settings).join(" ");
        self.restart_runtime(
            machine,
            libc::SIGTERM,
            r#"printf '%s\n' "$1" >/disk/server.args.new && mv /disk/server.args.new /disk/server.args || { echo "cannot write /disk/server.args" >&2; rc=1; }
shift"#,
            &[&args],
            "cannot restart the runtime as a network server",
        )?;
        self.guest_mut(machine)?.server = Some(settings);
        self.forward_server_ports(machine)?;
        let pin_file = format!("{GUEST_STATE}/server.pin");
        let pin = String::from_utf8_lossy(&MachineDriver::get_file(self, machine, &pin_file)?)
            .trim()
            .to_string();
        let ip = self.guest(machine)?.ip;
        Ok(ServerInfo {
            listen: SocketAddr::from((ip, settings.port)).to_string(),
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, settings.port)),
            pin,
        })
    }

    /// Restarts a running guest's runtime without its server (and removes the server's
    /// settings from its disk, which only the running guest can do).
    pub(super) fn stop_guest_server(&mut self, machine: &str) -> Result<(), BackendError> {
        let power = self.guest(machine)?.power;
        if power != Power::Running {
            return Err(BackendError::WrongState {
                machine: machine.to_string(),
                state: power.name(),
                operation: "server-stop",
                needed: "running",
            });
        }
        self.guest_mut(machine)?.server = None;
        self.restart_runtime(
            machine,
            libc::SIGTERM,
            r#"rm -f /disk/server.args || { echo "cannot remove /disk/server.args" >&2; rc=1; }"#,
            &[],
            "cannot restart the runtime without its server",
        )
    }

    /// Removes a running guest's server settings before it powers off (its server ends with
    /// it); nothing for a guest that serves nothing.
    pub(super) fn forget_guest_server(&mut self, machine: &str) -> Result<(), BackendError> {
        if self.guest_mut(machine)?.server.take().is_none() {
            return Ok(());
        }
        self.guest_exec_ok(
            machine,
            &["rm", "-f", "/disk/server.args"],
            Duration::from_secs(10),
            "cannot remove /disk/server.args",
        )
    }

    /// Kills a guest's serving runtime (SIGKILL) and starts it again as the server.
    pub(super) fn crash_guest_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.restart_runtime(
            machine,
            libc::SIGKILL,
            "",
            &[],
            "cannot start the runtime again after killing it",
        )
    }

    /// Sends a guest's runtime `signal` (SIGSTOP or SIGCONT); after a SIGSTOP, returns once it
    /// stands still.
    pub(super) fn signal_guest_runtime(
        &mut self,
        machine: &str,
        signal: i32,
    ) -> Result<(), BackendError> {
        let script = r#"pid=$(cat /disk/meter/meterd.ready 2>/dev/null)
[ -n "$pid" ] || { echo "the runtime is not running" >&2; exit 1; }
kill "-$1" "$pid" || exit 1
[ "$1" = STOP ] || exit 0
i=0
while ! grep -q '^State:[[:space:]]*T' "/proc/$pid/status" 2>/dev/null; do
  i=$((i+1)); [ $i -lt 200 ] || { echo "the runtime did not stop" >&2; exit 1; }
  sleep 0.05
done"#;
        let name = if signal == libc::SIGSTOP {
            "STOP"
        } else {
            "CONT"
        };
        self.guest_exec_ok(
            machine,
            &["sh", "-c", script, "signal-runtime", name],
            Duration::from_secs(20),
            &format!("cannot send the runtime SIG{name}"),
        )
    }

    /// Has the hypervisor forward a serving guest's ports from its own loopback address
    /// (after every start of its hypervisor process: a boot, a revert, a migration).
    pub(super) fn forward_server_ports(&mut self, machine: &str) -> Result<(), BackendError> {
        let g = self.guest_mut(machine)?;
        let (Some(settings), Some(vm)) = (g.server, g.vm.as_mut()) else {
            return Ok(());
        };
        for port in forwarded_ports(&settings) {
            vm.forward_port(SocketAddr::from((g.ip, port)), port)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_listens_everywhere_in_its_guest() {
        let settings = ServerSettings {
            port: 7000,
            keepalive: Duration::from_millis(2500),
            usage_log: false,
        };
        assert_eq!(
            server_args(&settings).join(" "),
            "--server --listen 0.0.0.0:7000 --keepalive 2.5 --no-usage-log"
        );
        assert_eq!(forwarded_ports(&settings).collect::<Vec<_>>(), [7000, 7001]);
        let last = ServerSettings {
            port: u16::MAX,
            ..settings
        };
        assert_eq!(forwarded_ports(&last).collect::<Vec<_>>(), [u16::MAX]);
    }
}
