//! The sim backend: machines as folders with a simulated OS view, real runtime processes.
//!
//! Each machine is `<run>/machines/<name>/` with `platform/` (what the runtime's `sim:` platform
//! reads: identity, vmgenid, clock, session table, USB), `disk/` (the runtime's durable state, the
//! part snapshots and clones copy) and `run/` (sockets). Its runtime is a real `meterd`; apps are
//! real processes inside real sessions (see [`crate::session_leader`]). Every process dies with
//! the harness (process groups plus a parent-death signal), Ctrl-C included.

pub mod session;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use self::session::LeaderHandle;
use super::fabric::Fabric;
use super::fabric::network::Relay;
use super::runner::Backend;
use super::types::{
    AppStatus, BackendError, BackendKind, CloneIdentity, CommandOutput, CpuProfile, GuestSpec,
    HardwareIdentity, HostSpec, Power, Role, ServerInfo, SessionSpec, UsbMode,
};
use crate::identity::IdentityMint;

/// Where the sim backend finds its programs and puts its files.
pub type SimConfig = super::types::WorldConfig;

struct ServerConf {
    port: u16,
    keepalive: Duration,
    info: Option<ServerInfo>,
}

struct Machine {
    name: String,
    guest: bool,
    host: Option<String>,
    role: Role,
    identity: HardwareIdentity,
    /// The CPU as this machine sees it now (a guest keeps its CPU through a live migration).
    cpu: CpuProfile,
    ip: Ipv4Addr,
    vmgenid: String,
    dir: PathBuf,
    power: Power,
    daemon: Option<Child>,
    sessions: BTreeMap<String, LeaderHandle>,
    session_table: vigil_agent::sessions::SessionTable,
    server: Option<ServerConf>,
    snapshots: BTreeMap<String, (PathBuf, bool)>,
    skew_ms: i64,
}

impl Machine {
    fn platform(&self) -> PathBuf {
        self.dir.join("platform")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("disk").join("meter")
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("run").join("meterd.sock")
    }
}

struct App {
    machine: String,
    session: String,
    pid: i32,
    stdout: PathBuf,
}

/// The simulation backend.
pub struct SimBackend {
    config: SimConfig,
    hosts: BTreeMap<String, HostSpec>,
    machines: BTreeMap<String, Machine>,
    apps: BTreeMap<String, App>,
    relays: Vec<Relay>,
    mint: IdentityMint,
    /// The world's shared clock and addresses (a dongle's clock moves with the world).
    fabric: Fabric,
    command_counter: u64,
    /// Whether the run's app and session logs were folded into the report already.
    logs_gathered: bool,
}

impl SimBackend {
    /// Creates an empty world with a fabric of its own.
    pub fn new(config: SimConfig) -> Result<SimBackend, BackendError> {
        let fabric = Fabric::new(config.seed);
        Self::with_fabric(config, fabric)
    }

    /// Creates an empty world whose machines share `fabric` with another driver's.
    pub fn with_fabric(config: SimConfig, fabric: Fabric) -> Result<SimBackend, BackendError> {
        for dir in [&config.work_dir, &config.log_dir] {
            std::fs::create_dir_all(dir)
                .map_err(BackendError::io(format!("create {}", dir.display())))?;
        }
        let mint = IdentityMint::new(config.seed);
        Ok(SimBackend {
            config,
            hosts: BTreeMap::new(),
            machines: BTreeMap::new(),
            apps: BTreeMap::new(),
            relays: Vec::new(),
            mint,
            fabric,
            command_counter: 0,
            logs_gathered: false,
        })
    }

    fn machine(&self, name: &str) -> Result<&Machine, BackendError> {
        self.machines
            .get(name)
            .ok_or_else(|| BackendError::Unknown {
                kind: "machine",
                name: name.to_string(),
            })
    }

    fn machine_mut(&mut self, name: &str) -> Result<&mut Machine, BackendError> {
        self.machines
            .get_mut(name)
            .ok_or_else(|| BackendError::Unknown {
                kind: "machine",
                name: name.to_string(),
            })
    }

    fn host(&self, name: &str) -> Result<&HostSpec, BackendError> {
        self.hosts.get(name).ok_or_else(|| BackendError::Unknown {
            kind: "host",
            name: name.to_string(),
        })
    }

    fn require(
        &self,
        machine: &str,
        operation: &'static str,
        allowed: &[Power],
        needed: &'static str,
    ) -> Result<(), BackendError> {
        self.machine(machine)?
            .power
            .require(machine, operation, allowed, needed)
    }

    /// Where a machine's app outputs and session logs are written while the world runs (the
    /// scratch folder, beside but outside the machine's disk, so clones do not copy them);
    /// [`Self::gather_logs`] folds them into the report.
    fn run_logs(&self, machine: &str) -> PathBuf {
        self.config.work_dir.join("logs").join(machine)
    }

    /// Folds each machine's app outputs into `<log_dir>/<machine>/apps.log` and its session
    /// leaders' logs into `sessions.log` (one file each instead of thousands of small ones).
    fn gather_logs(&mut self) {
        if std::mem::replace(&mut self.logs_gathered, true) {
            return;
        }
        for machine in self.machines.keys() {
            let run_logs = self.run_logs(machine);
            let target = self.config.log_dir.join(machine);
            fold_files(&run_logs.join("apps"), &target.join("apps.log"), |_| true);
            fold_files(&run_logs, &target.join("sessions.log"), |name| {
                name.starts_with("session-")
            });
        }
    }

    fn insert_machine(
        &mut self,
        name: &str,
        guest: bool,
        host: Option<String>,
        role: Role,
        identity: HardwareIdentity,
        cpu: CpuProfile,
    ) -> Result<(), BackendError> {
        BackendError::check_name("machine", name)?;
        let dir = self
            .fabric
            .folders
            .next_under(&self.config.work_dir.join("machines"));
        for sub in ["platform/usb", "disk/meter", "run"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(BackendError::io(format!("create {}", path.display())))?;
        }
        for path in [
            self.config.log_dir.join(name),
            self.run_logs(name).join("apps"),
        ] {
            std::fs::create_dir_all(&path)
                .map_err(BackendError::io(format!("create {}", path.display())))?;
        }
        let ip = self.fabric.addresses.allocate()?;
        let vmgenid = self.mint.generation_id();
        self.machines.insert(
            name.to_string(),
            Machine {
                name: name.to_string(),
                guest,
                host,
                role,
                identity,
                cpu,
                ip,
                vmgenid,
                dir,
                power: Power::Off,
                daemon: None,
                sessions: BTreeMap::new(),
                session_table: Default::default(),
                server: None,
                snapshots: BTreeMap::new(),
                skew_ms: 0,
            },
        );
        Ok(())
    }

    fn write_platform(&self, machine: &str) -> Result<(), BackendError> {
        let m = self.machine(machine)?;
        let cpu = &m.cpu;
        let description = json!({
            "kind": if m.guest { "guest" } else { "physical" },
            "role": match m.role { Role::Workstation => "workstation", Role::TerminalServer => "terminal-server" },
            "name": m.name,
            "address": m.ip.to_string(),
            "traits": {
                "cpu.vendor": cpu.vendor,
                "cpu.model-name": cpu.model_name,
                "cpu.family": cpu.family.to_string(),
                "cpu.model": cpu.model.to_string(),
                "cpu.stepping": cpu.stepping.to_string(),
                "cpu.microcode": cpu.microcode,
                "cpu.flags": cpu.flags,
                "board.serial": m.identity.board_serial,
                "product.uuid": m.identity.product_uuid,
                "product.serial": m.identity.product_serial,
                "disk.serial": m.identity.disk_serials,
                "nic.mac": m.identity.macs,
                "net.ip": m.ip.to_string(),
            }
        });
        let platform = m.platform();
        write_atomic(
            &platform.join("machine.json"),
            &serde_json::to_vec_pretty(&description).expect("json"),
        )?;
        if m.guest {
            write_atomic(&platform.join("vmgenid"), m.vmgenid.as_bytes())?;
        }
        write_atomic(
            &platform.join("clock"),
            (self.fabric.clock.offset_ms().saturating_add(m.skew_ms))
                .to_string()
                .as_bytes(),
        )?;
        self.write_sessions(machine)
    }

    fn write_sessions(&self, machine: &str) -> Result<(), BackendError> {
        let m = self.machine(machine)?;
        let path = m.platform().join("sessions.json");
        m.session_table
            .write(&path)
            .map_err(BackendError::io(format!("write {}", path.display())))
    }

    fn relay_args(&self, machine: &str) -> Vec<String> {
        let mut args = Vec::new();
        for relay in self.relays.iter().filter(|r| r.client == machine) {
            let pin = self
                .machines
                .get(&relay.server)
                .and_then(|s| s.server.as_ref())
                .and_then(|c| c.info.as_ref())
                .map(|i| i.pin.clone());
            if let Some(pin) = pin {
                args.extend([
                    "--remote".to_string(),
                    relay.local.to_string(),
                    "--pin".into(),
                    pin,
                ]);
            }
        }
        args
    }

    fn start_daemon(&mut self, machine: &str) -> Result<(), BackendError> {
        let remote_args = self.relay_args(machine);
        let m = self.machine(machine)?;
        let ready = m.state().join("meterd.ready");
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(m.socket());
        let log_path = self.config.log_dir.join(machine).join("meterd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(BackendError::io(format!("open {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(BackendError::io("clone log"))?;
        let mut command = Command::new(self.config.runtime_bin.join("meterd"));
        command
            .arg("--state")
            .arg(m.state())
            .arg("--socket")
            .arg(m.socket())
            .arg("--platform")
            .arg(format!("sim:{}", m.platform().display()));
        if let Some(server) = &m.server {
            command
                .arg("--server")
                .arg("--listen")
                .arg(format!("{}:{}", m.ip, server.port))
                .arg("--keepalive")
                .arg(format!("{}", server.keepalive.as_secs_f64()));
        }
        command
            .args(&remote_args)
            .env(
                "METER_LOG",
                std::env::var("VIGIL_RUNTIME_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        super::process::detach_into_own_group(&mut command);
        let mut child = command.spawn().map_err(|e| BackendError::Runtime {
            machine: machine.to_string(),
            message: format!(
                "cannot start {}: {e}",
                self.config.runtime_bin.join("meterd").display()
            ),
        })?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ready.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BackendError::Runtime {
                    machine: machine.to_string(),
                    message: format!(
                        "meterd exited during start ({status}); last log lines:\n{}",
                        super::process::log_tail(&log_path, 15)
                    ),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BackendError::Runtime {
                    machine: machine.to_string(),
                    message: format!(
                        "meterd not ready after 15 s; last log lines:\n{}",
                        super::process::log_tail(&log_path, 15)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.machine_mut(machine)?.daemon = Some(child);
        Ok(())
    }

    fn stop_daemon(&mut self, machine: &str, graceful: bool) -> Result<(), BackendError> {
        let m = self.machine_mut(machine)?;
        if let Some(mut child) = m.daemon.take() {
            let pid = child.id() as i32;
            if graceful {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    fn close_all_sessions(&mut self, machine: &str) -> Result<(), BackendError> {
        let m = self.machine_mut(machine)?;
        let sessions = std::mem::take(&mut m.sessions);
        m.session_table.clear();
        for (_, leader) in sessions {
            leader.close();
        }
        Ok(())
    }

    fn signal_machine(&mut self, machine: &str, signal: i32) -> Result<(), BackendError> {
        let m = self.machine(machine)?;
        if let Some(child) = &m.daemon {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
        for leader in m.sessions.values() {
            leader.signal_all(signal);
        }
        Ok(())
    }

    /// Stops a machine's processes hard (power cut), keeping its disk.
    fn power_cut(&mut self, machine: &str) -> Result<(), BackendError> {
        self.close_all_sessions(machine)?;
        self.stop_daemon(machine, false)?;
        let m = self.machine_mut(machine)?;
        m.power = Power::Off;
        Ok(())
    }

    fn boot_inner(&mut self, machine: &str) -> Result<(), BackendError> {
        // A guest boots on its host's CPU model.
        if let Some(host) = self.machine(machine)?.host.clone() {
            let cpu = self.host(&host)?.cpu.clone();
            self.machine_mut(machine)?.cpu = cpu;
        }
        self.write_platform(machine)?;
        // Every boot is a new boot: no process of an earlier one survives it.
        let boot_id = self.mint.generation_id();
        let platform = self.machine(machine)?.platform();
        write_atomic(&platform.join("boot_id"), boot_id.as_bytes())?;
        self.start_daemon(machine)?;
        self.machine_mut(machine)?.power = Power::Running;
        self.open_session(
            machine,
            "console",
            &SessionSpec::Console {
                user: "operator".into(),
            },
        )?;
        Ok(())
    }

    fn copy_disk(&mut self, machine: &str, to: &Path) -> Result<(), BackendError> {
        // Freeze the runtime so the copy is crash-consistent, as a hypervisor's snapshot is.
        let running = self.machine(machine)?.power == Power::Running;
        if running {
            self.signal_machine(machine, libc::SIGSTOP)?;
        }
        let from = self.machine(machine)?.dir.join("disk");
        let result = copy_tree(&from, to);
        if running {
            self.signal_machine(machine, libc::SIGCONT)?;
        }
        result
    }

    fn add_relays_for_server(&mut self, server: &str) -> Result<(), BackendError> {
        let info = self
            .machine(server)?
            .server
            .as_ref()
            .and_then(|c| c.info.clone())
            .ok_or_else(|| BackendError::Runtime {
                machine: server.into(),
                message: "server has no address".into(),
            })?;
        let target: SocketAddr = info.listen.parse().map_err(|_| BackendError::Runtime {
            machine: server.into(),
            message: format!("bad listen address {}", info.listen),
        })?;
        let clients: Vec<(String, Ipv4Addr, Power)> = self
            .machines
            .values()
            .filter(|m| m.name != server)
            .map(|m| (m.name.clone(), m.ip, m.power))
            .collect();
        for (client, ip, power) in clients {
            if self
                .relays
                .iter()
                .any(|r| r.client == client && r.server == server)
            {
                continue;
            }
            let relay = Relay::start(&client, server, ip, target)?;
            let local = relay.local.to_string();
            self.relays.push(relay);
            if power == Power::Running {
                self.run_meter_checked(
                    &client,
                    &[
                        "servers".into(),
                        "add".into(),
                        local,
                        "--pin".into(),
                        info.pin.clone(),
                    ],
                )?;
            }
        }
        Ok(())
    }

    fn run_meter_checked(&mut self, machine: &str, args: &[String]) -> Result<(), BackendError> {
        let out = self.run_meter(machine, "console", args, Duration::from_secs(10))?;
        if out.code == Some(0) {
            Ok(())
        } else {
            Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!(
                    "`meter {}` failed ({:?}): {}{}",
                    args.join(" "),
                    out.code,
                    out.stdout,
                    out.stderr
                ),
            })
        }
    }

    /// Starts `meter <args>` inside a machine's session; returns the session's leader and the pid.
    fn spawn_meter(
        &mut self,
        machine: &str,
        session: &str,
        args: &[String],
        stdout: &Path,
        stderr: &Path,
    ) -> Result<(&mut LeaderHandle, i32), BackendError> {
        let mut argv = vec![self.config.runtime_bin.join("meter").display().to_string()];
        argv.extend(args.iter().cloned());
        let m = self.machine_mut(machine)?;
        let env = vec![("METER_SOCKET".to_string(), m.socket().display().to_string())];
        let leader = m
            .sessions
            .get_mut(session)
            .ok_or_else(|| BackendError::Unknown {
                kind: "session",
                name: session.into(),
            })?;
        let pid = leader.spawn(&argv, &env, stdout, stderr)?;
        Ok((leader, pid))
    }

    fn drop_relays_to(&mut self, server: &str) {
        let relays = std::mem::take(&mut self.relays);
        let (gone, kept): (Vec<Relay>, Vec<Relay>) =
            relays.into_iter().partition(|r| r.server == server);
        self.relays = kept;
        for relay in gone {
            relay.stop();
        }
    }

    fn usb_dir(&self, machine: &str) -> Result<PathBuf, BackendError> {
        Ok(self.machine(machine)?.platform().join("usb"))
    }

    fn app(&self, app: &str) -> Result<&App, BackendError> {
        self.apps.get(app).ok_or_else(|| BackendError::Unknown {
            kind: "app",
            name: app.into(),
        })
    }
}

impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn power(&self, machine: &str) -> Result<Power, BackendError> {
        Ok(self.machine(machine)?.power)
    }

    fn host_of(&self, machine: &str) -> Result<String, BackendError> {
        let m = self.machine(machine)?;
        Ok(m.host.clone().unwrap_or_else(|| m.name.clone()))
    }

    fn machines(&self) -> Vec<String> {
        self.machines.keys().cloned().collect()
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "backend": "sim",
            "runtime": self.config.runtime_bin.display().to_string(),
            "addresses": self.fabric.addresses.network(),
        })
    }

    fn add_host(&mut self, host: &HostSpec) -> Result<(), BackendError> {
        self.hosts.insert(host.name.clone(), host.clone());
        self.insert_machine(
            &host.name,
            false,
            None,
            host.role,
            host.identity.clone(),
            host.cpu.clone(),
        )
    }

    fn add_guest(&mut self, guest: &GuestSpec) -> Result<(), BackendError> {
        let cpu = self.host(&guest.host)?.cpu.clone();
        self.insert_machine(
            &guest.name,
            true,
            Some(guest.host.clone()),
            guest.role,
            guest.identity.clone(),
            cpu,
        )
    }

    fn boot(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(machine, "boot", &[Power::Off], "powered off")?;
        self.boot_inner(machine)
    }

    fn shutdown(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(
            machine,
            "shutdown",
            &[Power::Running, Power::Paused],
            "running",
        )?;
        self.signal_machine(machine, libc::SIGCONT)?;
        self.close_all_sessions(machine)?;
        self.stop_daemon(machine, true)?;
        self.machine_mut(machine)?.power = Power::Off;
        // A machine that is off serves nobody: its server ends with it.
        self.machine_mut(machine)?.server = None;
        self.drop_relays_to(machine);
        Ok(())
    }

    fn pause(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(machine, "pause", &[Power::Running], "running")?;
        self.signal_machine(machine, libc::SIGSTOP)?;
        self.machine_mut(machine)?.power = Power::Paused;
        Ok(())
    }

    fn resume(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(machine, "resume", &[Power::Paused], "paused")?;
        self.signal_machine(machine, libc::SIGCONT)?;
        self.machine_mut(machine)?.power = Power::Running;
        Ok(())
    }

    fn snapshot(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        BackendError::check_name("snapshot", name)?;
        let dest = self.machine(machine)?.dir.join("snapshots").join(name);
        let _ = std::fs::remove_dir_all(&dest);
        self.copy_disk(machine, &dest)?;
        let running = self.machine(machine)?.power != Power::Off;
        self.machine_mut(machine)?
            .snapshots
            .insert(name.to_string(), (dest, running));
        Ok(())
    }

    fn revert(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        let (source, was_running) = self
            .machine(machine)?
            .snapshots
            .get(name)
            .cloned()
            .ok_or_else(|| BackendError::Unknown {
                kind: "snapshot",
                name: name.to_string(),
            })?;
        self.power_cut(machine)?;
        let disk = self.machine(machine)?.dir.join("disk");
        std::fs::remove_dir_all(&disk).map_err(BackendError::io("remove the disk"))?;
        copy_tree(&source, &disk)?;
        // A revert starts a new hypervisor process with a new generation id.
        let vmgenid = self.mint.generation_id();
        self.machine_mut(machine)?.vmgenid = vmgenid;
        // Apps that were running are gone: the sim cannot restore process memory.
        self.apps.retain(|_, app| app.machine != machine);
        // The guest comes back in the power state it had when the snapshot was taken.
        if was_running {
            self.boot_inner(machine)?;
        }
        Ok(())
    }

    fn clone_guest(
        &mut self,
        from: &str,
        to: &str,
        host: &str,
        identity: CloneIdentity,
    ) -> Result<(), BackendError> {
        let source = self.machine(from)?;
        let role = source.role;
        let new_identity = match identity {
            CloneIdentity::Perfect => source.identity.clone(),
            CloneIdentity::New => self.mint.guest_identity(to),
        };
        let cpu = self.host(host)?.cpu.clone();
        self.insert_machine(to, true, Some(host.to_string()), role, new_identity, cpu)?;
        let target_disk = self.machine(to)?.dir.join("disk");
        std::fs::remove_dir_all(&target_disk).map_err(BackendError::io("prepare the clone"))?;
        self.copy_disk(from, &target_disk)?;
        // Pidfiles and sockets of the source are not part of a clean clone.
        let _ = std::fs::remove_file(target_disk.join("meter").join("meterd.ready"));
        Ok(())
    }

    fn migrate(&mut self, machine: &str, host: &str) -> Result<(), BackendError> {
        self.require(machine, "migrate", &[Power::Running], "running")?;
        self.host(host)?;
        // Live migration keeps the guest running with the hardware it booted with.
        self.machine_mut(machine)?.host = Some(host.to_string());
        Ok(())
    }

    fn move_guest(&mut self, machine: &str, host: &str) -> Result<(), BackendError> {
        self.host(host)?;
        if self.machine(machine)?.power != Power::Off {
            self.shutdown(machine)?;
        }
        self.machine_mut(machine)?.host = Some(host.to_string());
        Ok(())
    }

    fn replace_nic(&mut self, machine: &str) -> Result<(), BackendError> {
        let mac = self.mint.mac(&format!("{machine}-replacement"));
        let m = self.machine_mut(machine)?;
        if let Some(first) = m.identity.macs.first_mut() {
            *first = mac;
        } else {
            m.identity.macs.push(mac);
        }
        if m.power != Power::Off {
            self.write_platform(machine)?;
        }
        Ok(())
    }

    fn open_session(
        &mut self,
        machine: &str,
        session: &str,
        spec: &SessionSpec,
    ) -> Result<(), BackendError> {
        self.require(machine, "session-open", &[Power::Running], "running")?;
        BackendError::check_name("session", session)?;
        let log = self
            .run_logs(machine)
            .join(format!("session-{session}.log"));
        let leader = LeaderHandle::start(&self.config.harness_exe, &log)?;
        let m = self.machine_mut(machine)?;
        m.session_table.insert(leader.sid, spec.clone());
        if let Some(old) = m.sessions.insert(session.to_string(), leader) {
            old.close();
        }
        self.write_sessions(machine)
    }

    fn close_session(&mut self, machine: &str, session: &str) -> Result<(), BackendError> {
        let m = self.machine_mut(machine)?;
        let leader = m
            .sessions
            .remove(session)
            .ok_or_else(|| BackendError::Unknown {
                kind: "session",
                name: session.into(),
            })?;
        m.session_table.remove(leader.sid);
        leader.close();
        self.write_sessions(machine)
    }

    fn run_meter(
        &mut self,
        machine: &str,
        session: &str,
        args: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        self.command_counter += 1;
        let n = self.command_counter;
        let run_dir = self.machine(machine)?.dir.join("run");
        let stdout = run_dir.join(format!("cmd-{n}.out"));
        let stderr = run_dir.join(format!("cmd-{n}.err"));
        let (leader, pid) = self.spawn_meter(machine, session, args, &stdout, &stderr)?;
        let Some(exit) = leader.wait_exit(pid, timeout) else {
            // SAFETY: killing our own descendant.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(BackendError::Timeout {
                what: format!("`meter {}` on {machine}", args.join(" ")),
                after: timeout,
            });
        };
        let output = CommandOutput {
            code: exit.code,
            stdout: std::fs::read_to_string(&stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&stderr).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(&stdout);
        let _ = std::fs::remove_file(&stderr);
        Ok(output)
    }

    fn start_app(
        &mut self,
        machine: &str,
        session: &str,
        app: &str,
        args: &[String],
    ) -> Result<(), BackendError> {
        BackendError::check_name("app", app)?;
        let apps_dir = self.run_logs(machine).join("apps");
        let stdout = apps_dir.join(format!("{app}.out"));
        let stderr = apps_dir.join(format!("{app}.err"));
        let (_, pid) = self.spawn_meter(machine, session, args, &stdout, &stderr)?;
        self.apps.insert(
            app.to_string(),
            App {
                machine: machine.to_string(),
                session: session.to_string(),
                pid,
                stdout,
            },
        );
        Ok(())
    }

    fn app_output(&mut self, app: &str) -> Result<Vec<String>, BackendError> {
        let app = self.app(app)?;
        let text = std::fs::read_to_string(&app.stdout).unwrap_or_default();
        Ok(super::process::complete_lines(&text))
    }

    fn app_status(&mut self, app: &str) -> Result<AppStatus, BackendError> {
        let (machine, session, pid) = {
            let a = self.app(app)?;
            (a.machine.clone(), a.session.clone(), a.pid)
        };
        let m = self.machine_mut(&machine)?;
        let Some(leader) = m.sessions.get_mut(&session) else {
            return Ok(AppStatus::Exited {
                code: None,
                signal: Some(libc::SIGKILL),
            });
        };
        Ok(match leader.exit_of(pid) {
            None => AppStatus::Running,
            Some(exit) => AppStatus::Exited {
                code: exit.code,
                signal: exit.signal,
            },
        })
    }

    fn terminate_app(&mut self, app: &str) -> Result<(), BackendError> {
        let pid = self.app(app)?.pid;
        // SAFETY: signalling a process of our own session.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        Ok(())
    }

    fn kill_app(&mut self, app: &str) -> Result<(), BackendError> {
        let pid = self.app(app)?.pid;
        // SAFETY: killing a process of our own session.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        Ok(())
    }

    fn set_clock(
        &mut self,
        world_offset: i64,
        skews: &[(String, i64)],
    ) -> Result<(), BackendError> {
        self.fabric.clock.set_offset_ms(world_offset);
        for (machine, skew) in skews {
            self.machine_mut(machine)?.skew_ms = *skew;
        }
        let names: Vec<String> = self.machines.keys().cloned().collect();
        for name in names {
            let m = self.machine(&name)?;
            write_atomic(
                &m.platform().join("clock"),
                (world_offset + m.skew_ms).to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    fn start_server(
        &mut self,
        machine: &str,
        port: u16,
        keepalive: Duration,
    ) -> Result<ServerInfo, BackendError> {
        self.require(machine, "server-start", &[Power::Running], "running")?;
        self.machine_mut(machine)?.server = Some(ServerConf {
            port,
            keepalive,
            info: None,
        });
        self.stop_daemon(machine, true)?;
        self.start_daemon(machine)?;
        let m = self.machine(machine)?;
        let pin_path = m.state().join("server.pin");
        let pin = std::fs::read_to_string(&pin_path)
            .map_err(BackendError::io(format!("read {}", pin_path.display())))?
            .trim()
            .to_string();
        let info = ServerInfo {
            listen: format!("{}:{port}", m.ip),
            pin,
        };
        if let Some(conf) = self.machine_mut(machine)?.server.as_mut() {
            conf.info = Some(info.clone());
        }
        self.add_relays_for_server(machine)?;
        Ok(info)
    }

    fn stop_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.machine_mut(machine)?.server = None;
        self.drop_relays_to(machine);
        if self.machine(machine)?.power == Power::Running {
            self.stop_daemon(machine, true)?;
            self.start_daemon(machine)?;
        }
        Ok(())
    }

    fn partition(&mut self, a: &[String], b: &[String]) -> Result<(), BackendError> {
        for relay in &self.relays {
            let crosses = (a.contains(&relay.client) && b.contains(&relay.server))
                || (b.contains(&relay.client) && a.contains(&relay.server));
            if crosses {
                relay.set_cut(true);
            }
        }
        Ok(())
    }

    fn heal(&mut self, machines: &[String]) -> Result<(), BackendError> {
        for relay in &self.relays {
            let touches = machines.is_empty()
                || machines.contains(&relay.client)
                || machines.contains(&relay.server);
            if touches {
                relay.set_cut(false);
            }
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), BackendError> {
        let names: Vec<String> = self.machines.keys().cloned().collect();
        for name in names {
            if self.machine(&name)?.power != Power::Off {
                self.signal_machine(&name, libc::SIGCONT)?;
                self.close_all_sessions(&name)?;
                self.stop_daemon(&name, true)?;
                self.machine_mut(&name)?.power = Power::Off;
            }
        }
        for relay in self.relays.drain(..) {
            relay.stop();
        }
        self.fabric.dongles.clear();
        self.gather_logs();
        Ok(())
    }

    fn add_dongle(&mut self, name: &str, flash: &Path) -> Result<(), BackendError> {
        self.fabric.add_dongle(name, flash)
    }

    fn usb_attach(
        &mut self,
        dongle: &str,
        machines: &[String],
        mode: UsbMode,
    ) -> Result<(), BackendError> {
        let dirs = machines
            .iter()
            .map(|m| Ok((m.clone(), self.usb_dir(m)?)))
            .collect::<Result<Vec<_>, BackendError>>()?;
        self.fabric.dongles.with(dongle, |device| {
            if mode == UsbMode::Exclusive {
                // Passing a device through exclusively takes it away from wherever it was.
                for other in device.attached_to() {
                    if !machines.contains(&other) {
                        device.detach(Some(&other));
                    }
                }
            }
            for (machine, dir) in dirs {
                device.attach(&machine, &dir)?;
            }
            Ok(())
        })?
    }

    fn usb_detach(&mut self, dongle: &str) -> Result<(), BackendError> {
        self.fabric
            .dongles
            .with(dongle, |device| device.detach(None))
    }

    fn usbip_attach(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        // A USB/IP server exports a device to one importer at a time.
        self.usb_attach(dongle, &[machine.to_string()], UsbMode::Exclusive)
    }

    fn usbip_detach(&mut self, dongle: &str) -> Result<(), BackendError> {
        self.usb_detach(dongle)
    }

    fn usbip_disconnect(&mut self, dongle: &str) -> Result<(), BackendError> {
        // The connection drops: the importer's device vanishes mid-use.
        self.usb_detach(dongle)
    }

    fn usb_hang(&mut self, dongle: &str) -> Result<(), BackendError> {
        self.fabric.dongles.hang(dongle)
    }

    fn dongle_status(&mut self, dongle: &str) -> Result<serde_json::Value, BackendError> {
        self.fabric.dongles.status(dongle)
    }

    fn put_file(
        &mut self,
        machine: &str,
        name: &str,
        contents: &[u8],
    ) -> Result<String, BackendError> {
        BackendError::check_name("file", name)?;
        let dir = self.machine(machine)?.dir.join("disk").join("home");
        std::fs::create_dir_all(&dir).map_err(BackendError::io("create the home folder"))?;
        let path = dir.join(name);
        write_atomic(&path, contents)?;
        Ok(path.display().to_string())
    }

    fn get_file(&mut self, machine: &str, path: &str) -> Result<Vec<u8>, BackendError> {
        self.machine(machine)?;
        std::fs::read(path).map_err(BackendError::io(format!("read {path} on {machine}")))
    }

    fn log_dir(&self) -> PathBuf {
        self.config.log_dir.clone()
    }
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        for m in self.machines.values_mut() {
            for (_, leader) in std::mem::take(&mut m.sessions) {
                leader.close();
            }
            if let Some(mut child) = m.daemon.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.gather_logs();
    }
}

/// Appends every non-empty file of `dir` whose name passes `wanted` to `target`, each under a
/// header naming it, in name order. Best effort: logs never fail a run.
fn fold_files(dir: &Path, target: &Path, wanted: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .filter(|(name, _)| wanted(name))
        .collect();
    files.sort();
    let mut folded = Vec::new();
    for (name, path) in files {
        let Ok(contents) = std::fs::read(&path) else {
            continue;
        };
        if contents.is_empty() {
            continue;
        }
        folded.extend_from_slice(format!("==> {name} <==\n").as_bytes());
        folded.extend_from_slice(&contents);
        if !contents.ends_with(b"\n") {
            folded.push(b'\n');
        }
    }
    if !folded.is_empty() {
        let _ = std::fs::write(target, folded);
    }
}

/// Replaces a file atomically (write to a sibling, then rename).
fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), BackendError> {
    vigil_agent::sessions::write_atomic(path, contents)
        .map_err(BackendError::io(format!("write {}", path.display())))
}

/// Copies a folder tree, regular files and folders only (sockets and pipes are not disk state).
fn copy_tree(from: &Path, to: &Path) -> Result<(), BackendError> {
    std::fs::create_dir_all(to).map_err(BackendError::io(format!("create {}", to.display())))?;
    let entries =
        std::fs::read_dir(from).map_err(BackendError::io(format!("read {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(BackendError::io("read a folder entry"))?;
        let kind = entry.file_type().map_err(BackendError::io("stat"))?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)
                .map_err(BackendError::io(format!("copy {}", entry.path().display())))?;
        }
    }
    Ok(())
}
