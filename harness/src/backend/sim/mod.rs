//! The sim driver: machines as folders with a simulated OS view, real runtime processes.
//!
//! Each machine is a numbered folder under `<run>/machines/` with `platform/` (what the
//! runtime's `sim:` platform reads: identity, vmgenid, clock, session table, USB), `disk/` (the
//! runtime's durable state, the part snapshots and clones copy) and `run/` (sockets). Its
//! runtime is a real `meterd`; apps are real processes inside real sessions (see
//! [`crate::session_leader`]). Every process dies with the harness (process groups plus a
//! parent-death signal), Ctrl-C included.

pub mod session;
mod stopped;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use self::session::{ExitInfo, LeaderHandle};
use super::driver::{DongleLink, MachineDriver, MachineSpec, ServerLink, Unplug};
use super::fabric::Fabric;
use super::fabric::accounts::CONSOLE_USER;
use super::types::{
    AppStatus, BackendError, BackendKind, Caller, CloneIdentity, CommandOutput, CpuProfile,
    HardwareIdentity, Power, Role, ServerInfo, ServerSettings, SessionSpec,
};
use crate::identity::IdentityMint;

/// Where the sim driver finds its programs and puts its files.
pub type SimConfig = super::types::WorldConfig;

struct Machine {
    name: String,
    guest: bool,
    /// A guest whose CPUID hypervisor bit is switched off.
    hide_hypervisor: bool,
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
    server: Option<ServerSettings>,
    /// The servers its runtime reaches (given at every start, added to a running runtime).
    servers: Vec<ServerLink>,
    /// Snapshot → its disk copy and, when taken running, the CPU its memory saw at boot.
    snapshots: BTreeMap<String, (PathBuf, Option<CpuProfile>)>,
    /// How far its clock runs past real time.
    clock_ms: i64,
    /// Dongles it holds and how they reached it.
    dongles: BTreeMap<String, DongleLink>,
    /// The identity its runtime presents instead of its own (an impersonation), until shutdown:
    /// a machine name and maybe a runtime id.
    presents: Option<(String, Option<String>)>,
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
    fn usb_dir(&self) -> PathBuf {
        self.platform().join("usb")
    }
}

struct App {
    machine: String,
    session: String,
    pid: i32,
    stdout: PathBuf,
}

/// The simulation driver: hosts, and guests too on the sim backend.
pub struct SimDriver {
    config: SimConfig,
    machines: BTreeMap<String, Machine>,
    apps: BTreeMap<String, App>,
    mint: IdentityMint,
    /// The world's shared parts (dongles, folders).
    fabric: Fabric,
    command_counter: u64,
    /// Whether the run's app and session logs were folded into the report already.
    logs_gathered: bool,
}

impl SimDriver {
    /// A driver with no machines yet, over the world's `fabric`.
    pub fn new(config: SimConfig, fabric: Fabric) -> Result<SimDriver, BackendError> {
        for dir in [&config.work_dir, &config.log_dir] {
            std::fs::create_dir_all(dir)
                .map_err(BackendError::io(format!("create {}", dir.display())))?;
        }
        // Apps run as unprivileged users and must reach the runtime's socket and program.
        for dir in [&config.work_dir, &config.runtime_bin] {
            let dir = std::fs::canonicalize(dir)
                .map_err(BackendError::io(format!("find {}", dir.display())))?;
            let mut at = Some(dir.as_path());
            while let Some(dir) = at {
                let_users_through(dir)?;
                at = dir.parent();
            }
        }
        let mint = IdentityMint::new(config.seed);
        Ok(SimDriver {
            config,
            machines: BTreeMap::new(),
            apps: BTreeMap::new(),
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

    fn insert_machine(&mut self, spec: &MachineSpec) -> Result<(), BackendError> {
        BackendError::check_name("machine", &spec.name)?;
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
            self.config.log_dir.join(&spec.name),
            self.run_logs(&spec.name).join("apps"),
        ] {
            std::fs::create_dir_all(&path)
                .map_err(BackendError::io(format!("create {}", path.display())))?;
        }
        let vmgenid = self.mint.generation_id();
        self.machines.insert(
            spec.name.clone(),
            Machine {
                name: spec.name.clone(),
                guest: spec.guest,
                hide_hypervisor: spec.hide_hypervisor,
                role: spec.role,
                identity: spec.identity.clone(),
                cpu: spec.cpu.clone(),
                ip: spec.ip,
                vmgenid,
                dir,
                power: Power::Off,
                daemon: None,
                sessions: BTreeMap::new(),
                session_table: Default::default(),
                server: None,
                servers: Vec::new(),
                snapshots: BTreeMap::new(),
                clock_ms: 0,
                dongles: BTreeMap::new(),
                presents: None,
            },
        );
        Ok(())
    }

    fn write_platform(&self, machine: &str) -> Result<(), BackendError> {
        let m = self.machine(machine)?;
        let cpu = &m.cpu;
        // What the hardware shows: a guest's virtual firmware and virtio devices as QEMU gives
        // them (the hypervisor bit unless hidden); a host's vendor firmware and Intel devices.
        let signals = if m.guest {
            json!({
                "cpuid-hypervisor": !m.hide_hypervisor,
                "dmi-vendor": "QEMU",
                "dmi-product": "Standard PC (i440FX + PIIX, 1996)",
                "pci-vendors": [0x8086, 0x1af4],
            })
        } else {
            json!({
                "cpuid-hypervisor": false,
                "dmi-vendor": "Dell Inc.",
                "dmi-product": "PowerEdge R650",
                "pci-vendors": [0x8086, 0x14e4],
            })
        };
        let description = json!({
            "kind": if m.guest { "guest" } else { "physical" },
            "signals": signals,
            "name": m.presents.as_ref().map_or(&m.name, |(name, _)| name),
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
        write_atomic(&platform.join("clock"), m.clock_ms.to_string().as_bytes())?;
        self.write_sessions(machine)
    }

    /// Opens a session; a login (in the session table and `logins.json`) or, without `login`,
    /// an unattended console the table does not list.
    fn start_session(
        &mut self,
        machine: &str,
        session: &str,
        spec: &SessionSpec,
        login: bool,
    ) -> Result<(), BackendError> {
        let log = self
            .run_logs(machine)
            .join(format!("session-{session}.log"));
        let uid = self.fabric.accounts.uid(spec.user())?;
        // The simulated machine's accounts, where its runtime looks users up.
        let passwd = self.machine(machine)?.platform().join("passwd");
        write_atomic(&passwd, self.fabric.accounts.passwd().as_bytes())?;
        let leader = LeaderHandle::start(&self.config.harness_exe, &log, login, uid)?;
        let m = self.machine_mut(machine)?;
        if login {
            let key = leader.table_key();
            if m.session_table.contains(key) {
                leader.close();
                return Err(BackendError::Unsupported {
                    backend: BackendKind::Sim,
                    operation: "session-open",
                    why: format!(
                        "two sessions would share login session {key}: the harness runs inside a \
                         login session and may not open new ones (writing /proc/self/loginuid \
                         needs root and a kernel with audit support)"
                    ),
                });
            }
            m.session_table.insert(key, spec.clone());
        }
        if let Some(old) = m.sessions.insert(session.to_string(), leader) {
            old.close();
        }
        if login {
            self.write_sessions(machine)
        } else {
            Ok(())
        }
    }

    /// Writes the session table (unless the licensee dropped it) and the login sessions alive,
    /// which the simulated kernel shows whatever the table says.
    fn write_sessions(&self, machine: &str) -> Result<(), BackendError> {
        let m = self.machine(machine)?;
        let path = m.platform().join("sessions.json");
        m.session_table
            .write(&path)
            .map_err(BackendError::io(format!("write {}", path.display())))?;
        let logins: Vec<i32> = m.session_table.keys().collect();
        let path = m.platform().join("logins.json");
        write_atomic(&path, &serde_json::to_vec(&logins).expect("json"))
    }

    fn start_daemon(&mut self, machine: &str) -> Result<(), BackendError> {
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
            if !server.usage_log {
                command.arg("--no-usage-log");
            }
        }
        if let Some((_, Some(id))) = &m.presents {
            command.arg("--runtime-id").arg(id);
        }
        for link in &m.servers {
            command
                .arg("--remote")
                .arg(link.address(|via| via))
                .arg("--pin")
                .arg(link.pins());
        }
        if let Some(root) = &self.config.harness_root {
            command.env(crate::runtime::world_root::HARNESS_ROOT_VARIABLE, root);
        }
        command
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

    /// Returns once the machine's stopped runtime stands still (a frame sent while SIGSTOP was
    /// on its way would land after later steps); warns after 5 s.
    fn wait_daemon_stopped(&self, machine: &str) -> Result<(), BackendError> {
        if let Some(child) = &self.machine(machine)?.daemon
            && !stopped::wait_stopped(child.id(), Duration::from_secs(5))
        {
            tracing::warn!(
                machine,
                "The stopped machine's runtime did not stop within 5 s"
            );
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

    fn boot_inner(&mut self, machine: &str, cpu: &CpuProfile) -> Result<(), BackendError> {
        // A guest boots on its host's CPU model.
        self.machine_mut(machine)?.cpu = cpu.clone();
        self.write_platform(machine)?;
        // Every boot is a new boot: no process of an earlier one survives it.
        let boot_id = self.mint.generation_id();
        let platform = self.machine(machine)?.platform();
        write_atomic(&platform.join("boot_id"), boot_id.as_bytes())?;
        self.start_daemon(machine)?;
        self.machine_mut(machine)?.power = Power::Running;
        let login = self.machine(machine)?.role.console_is_a_login();
        self.start_session(
            machine,
            "console",
            &SessionSpec::Console {
                user: CONSOLE_USER.into(),
            },
            login,
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

    fn run_meter_checked(&mut self, machine: &str, args: &[String]) -> Result<(), BackendError> {
        let out = self.run_meter(machine, Caller::Admin, args, Duration::from_secs(10))?;
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
        leaves_session: bool,
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
        if leaves_session && leader.login.is_none() {
            return Err(BackendError::Unsupported {
                backend: BackendKind::Sim,
                operation: "start-app leave-session",
                why: "the session has no login session: writing /proc/self/loginuid was refused \
                      (it needs root, CAP_AUDIT_CONTROL and a kernel with audit support), so a \
                      process that calls setsid could not be told from the machine's own"
                    .into(),
            });
        }
        let pid = leader.spawn(&argv, &env, stdout, stderr, leaves_session)?;
        Ok((leader, pid))
    }

    /// Runs `meter <args>` as the machine's administrator: root, outside every session of the
    /// machine; `None` when it did not end in time (it is killed).
    fn run_admin_command(
        &self,
        machine: &str,
        args: &[String],
        stdout: &Path,
        stderr: &Path,
        timeout: Duration,
    ) -> Result<Option<ExitInfo>, BackendError> {
        let meter = self.config.runtime_bin.join("meter");
        let file = |path: &Path| {
            std::fs::File::create(path)
                .map_err(BackendError::io(format!("create {}", path.display())))
        };
        let mut child = Command::new(&meter)
            .args(args)
            .env("METER_SOCKET", self.machine(machine)?.socket())
            .stdin(Stdio::null())
            .stdout(file(stdout)?)
            .stderr(file(stderr)?)
            .spawn()
            .map_err(BackendError::io(format!("start {}", meter.display())))?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(500);
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(BackendError::io("wait for `meter`"))?
            {
                use std::os::unix::process::ExitStatusExt;
                return Ok(Some(ExitInfo {
                    code: status.code(),
                    signal: status.signal(),
                }));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Connects a dongle to a machine's simulated USB bus.
    fn attach(
        &mut self,
        dongle: &str,
        machine: &str,
        link: DongleLink,
    ) -> Result<(), BackendError> {
        let dir = self.machine(machine)?.usb_dir();
        self.fabric
            .dongles
            .with(dongle, |device| device.attach(machine, &dir))??;
        self.machine_mut(machine)?
            .dongles
            .insert(dongle.to_string(), link);
        Ok(())
    }

    fn app(&self, machine: &str, app: &str) -> Result<&App, BackendError> {
        self.apps
            .get(app)
            .filter(|a| a.machine == machine)
            .ok_or_else(|| BackendError::Unknown {
                kind: "app",
                name: app.into(),
            })
    }
}

impl MachineDriver for SimDriver {
    fn describe(&self) -> serde_json::Value {
        json!({})
    }

    fn power(&self, machine: &str) -> Result<Power, BackendError> {
        Ok(self.machine(machine)?.power)
    }

    fn add_machine(&mut self, spec: &MachineSpec) -> Result<(), BackendError> {
        self.insert_machine(spec)
    }

    fn boot(&mut self, machine: &str, cpu: &CpuProfile) -> Result<(), BackendError> {
        self.boot_inner(machine, cpu)
    }

    fn shutdown(&mut self, machine: &str) -> Result<(), BackendError> {
        self.signal_machine(machine, libc::SIGCONT)?;
        self.close_all_sessions(machine)?;
        self.stop_daemon(machine, true)?;
        let m = self.machine_mut(machine)?;
        m.power = Power::Off;
        // A machine that is off serves nobody: its server ends with it.
        m.server = None;
        m.presents = None;
        Ok(())
    }

    fn impersonate(
        &mut self,
        machine: &str,
        name: &str,
        runtime_id: Option<&str>,
    ) -> Result<(), BackendError> {
        self.machine_mut(machine)?.presents =
            Some((name.to_string(), runtime_id.map(str::to_string)));
        self.stop_daemon(machine, true)?;
        self.write_platform(machine)?;
        self.start_daemon(machine)
    }

    fn save_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        let (state, dest) = {
            let m = self.machine(machine)?;
            (m.state(), m.dir.join("state-copies").join(name))
        };
        // As root would: stop the service, copy its folder, start it again.
        self.stop_daemon(machine, true)?;
        let _ = std::fs::remove_dir_all(&dest);
        let copied = copy_tree(&state, &dest);
        let _ = std::fs::remove_file(dest.join("meterd.ready"));
        let started = self.start_daemon(machine);
        copied.and(started)
    }

    fn restore_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        let (state, source) = {
            let m = self.machine(machine)?;
            (m.state(), m.dir.join("state-copies").join(name))
        };
        if !source.is_dir() {
            return Err(BackendError::Unknown {
                kind: "state copy",
                name: name.to_string(),
            });
        }
        self.stop_daemon(machine, true)?;
        std::fs::remove_dir_all(&state).map_err(BackendError::io("remove the state folder"))?;
        copy_tree(&source, &state)?;
        self.start_daemon(machine)
    }

    fn pause(&mut self, machine: &str) -> Result<(), BackendError> {
        self.signal_machine(machine, libc::SIGSTOP)?;
        self.wait_daemon_stopped(machine)?;
        self.machine_mut(machine)?.power = Power::Paused;
        Ok(())
    }

    fn resume(&mut self, machine: &str) -> Result<(), BackendError> {
        self.signal_machine(machine, libc::SIGCONT)?;
        self.machine_mut(machine)?.power = Power::Running;
        Ok(())
    }

    fn snapshot(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        BackendError::check_name("snapshot", name)?;
        let dest = self.machine(machine)?.dir.join("snapshots").join(name);
        let _ = std::fs::remove_dir_all(&dest);
        self.copy_disk(machine, &dest)?;
        let m = self.machine(machine)?;
        let booted_cpu = (m.power != Power::Off).then(|| m.cpu.clone());
        self.machine_mut(machine)?
            .snapshots
            .insert(name.to_string(), (dest, booted_cpu));
        Ok(())
    }

    fn revert(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        let (source, booted_cpu) = self
            .machine(machine)?
            .snapshots
            .get(name)
            .cloned()
            .ok_or_else(|| BackendError::Unknown {
                kind: "snapshot",
                name: name.to_string(),
            })?;
        self.power_cut(machine)?;
        // A revert boots the snapshot's runtime, not an impersonation started since.
        self.machine_mut(machine)?.presents = None;
        let disk = self.machine(machine)?.dir.join("disk");
        std::fs::remove_dir_all(&disk).map_err(BackendError::io("remove the disk"))?;
        copy_tree(&source, &disk)?;
        // A revert starts a new hypervisor process with a new generation id.
        let vmgenid = self.mint.generation_id();
        self.machine_mut(machine)?.vmgenid = vmgenid;
        // Apps that were running are gone: the sim cannot restore process memory.
        self.apps.retain(|_, app| app.machine != machine);
        // The guest comes back in the power state it had when the snapshot was taken; running,
        // its restored kernel tells the CPU it booted with (a guest's kernel reads its CPU
        // once, at boot), whichever host it is put back on.
        if let Some(cpu) = booted_cpu {
            self.boot_inner(machine, &cpu)?;
        }
        Ok(())
    }

    fn clone_machine(
        &mut self,
        from: &str,
        to: &MachineSpec,
        identity: CloneIdentity,
    ) -> Result<(), BackendError> {
        let source = self.machine(from)?;
        let mut spec = to.clone();
        spec.role = source.role;
        if identity == CloneIdentity::Perfect {
            spec.identity = source.identity.clone();
        }
        self.insert_machine(&spec)?;
        let target_disk = self.machine(&spec.name)?.dir.join("disk");
        std::fs::remove_dir_all(&target_disk).map_err(BackendError::io("prepare the clone"))?;
        self.copy_disk(from, &target_disk)?;
        // Pidfiles and sockets of the source are not part of a clean clone.
        let _ = std::fs::remove_file(target_disk.join("meter").join("meterd.ready"));
        Ok(())
    }

    fn migrate(&mut self, machine: &str, _host: &str) -> Result<(), BackendError> {
        // Live migration keeps the guest running with the hardware it booted with.
        self.machine(machine).map(drop)
    }

    fn replace_nic(&mut self, machine: &str, mac: String) -> Result<(), BackendError> {
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
        self.start_session(machine, session, spec, true)
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
        m.session_table.remove(leader.table_key());
        leader.close();
        self.write_sessions(machine)
    }

    fn drop_session_table(&mut self, machine: &str) -> Result<(), BackendError> {
        let m = self.machine_mut(machine)?;
        m.power
            .require(machine, "drop-session-table", &[Power::Running], "running")?;
        let path = m.platform().join("sessions.json");
        m.session_table
            .drop_file(&path)
            .map_err(BackendError::io(format!("delete {}", path.display())))
    }

    fn run_meter(
        &mut self,
        machine: &str,
        caller: Caller<'_>,
        args: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        self.command_counter += 1;
        let n = self.command_counter;
        let run_dir = self.machine(machine)?.dir.join("run");
        let stdout = run_dir.join(format!("cmd-{n}.out"));
        let stderr = run_dir.join(format!("cmd-{n}.err"));
        let timed_out = || BackendError::Timeout {
            what: format!("`meter {}` on {machine}", args.join(" ")),
            after: timeout,
        };
        let exit = match caller {
            Caller::Session(session) => {
                let (leader, pid) =
                    self.spawn_meter(machine, session, args, &stdout, &stderr, false)?;
                let Some(exit) = leader.wait_exit(pid, timeout) else {
                    // SAFETY: killing our own descendant.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return Err(timed_out());
                };
                exit
            }
            Caller::Admin => self
                .run_admin_command(machine, args, &stdout, &stderr, timeout)?
                .ok_or_else(timed_out)?,
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
        leaves_session: bool,
    ) -> Result<(), BackendError> {
        BackendError::check_name("app", app)?;
        let apps_dir = self.run_logs(machine).join("apps");
        let stdout = apps_dir.join(format!("{app}.out"));
        let stderr = apps_dir.join(format!("{app}.err"));
        let (_, pid) =
            self.spawn_meter(machine, session, args, &stdout, &stderr, leaves_session)?;
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

    fn app_output(&mut self, machine: &str, app: &str) -> Result<Vec<String>, BackendError> {
        let app = self.app(machine, app)?;
        let text = std::fs::read_to_string(&app.stdout).unwrap_or_default();
        Ok(super::process::complete_lines(&text))
    }

    fn app_status(&mut self, machine: &str, app: &str) -> Result<AppStatus, BackendError> {
        let (session, pid) = {
            let a = self.app(machine, app)?;
            (a.session.clone(), a.pid)
        };
        let m = self.machine_mut(machine)?;
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

    fn signal_app(&mut self, machine: &str, app: &str, signal: i32) -> Result<(), BackendError> {
        let pid = self.app(machine, app)?.pid;
        // SAFETY: signalling a process of our own session.
        unsafe { libc::kill(pid, signal) };
        Ok(())
    }

    fn set_clock(&mut self, machine: &str, offset_ms: i64) -> Result<(), BackendError> {
        let m = self.machine_mut(machine)?;
        m.clock_ms = offset_ms;
        write_atomic(
            &m.platform().join("clock"),
            offset_ms.to_string().as_bytes(),
        )
    }

    fn set_servers(&mut self, machine: &str, servers: &[ServerLink]) -> Result<(), BackendError> {
        let m = self.machine_mut(machine)?;
        let (new, gone) = ServerLink::adopt(&mut m.servers, servers);
        if m.power != Power::Running {
            return Ok(());
        }
        for link in gone {
            self.run_meter_checked(
                machine,
                &["servers".into(), "remove".into(), link.address(|via| via)],
            )?;
        }
        for link in new {
            self.run_meter_checked(
                machine,
                &[
                    "servers".into(),
                    "add".into(),
                    link.address(|via| via),
                    "--pin".into(),
                    link.pins(),
                ],
            )?;
        }
        Ok(())
    }

    fn start_server(
        &mut self,
        machine: &str,
        settings: ServerSettings,
    ) -> Result<ServerInfo, BackendError> {
        let port = settings.port;
        self.machine_mut(machine)?.server = Some(settings);
        self.stop_daemon(machine, true)?;
        self.start_daemon(machine)?;
        let m = self.machine(machine)?;
        let pin_path = m.state().join("server.pin");
        let pin = std::fs::read_to_string(&pin_path)
            .map_err(BackendError::io(format!("read {}", pin_path.display())))?
            .trim()
            .to_string();
        let listen = SocketAddr::from((m.ip, port));
        Ok(ServerInfo {
            listen: listen.to_string(),
            bind: listen,
            pin,
        })
    }

    fn stop_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.machine_mut(machine)?.server = None;
        if self.machine(machine)?.power == Power::Running {
            self.stop_daemon(machine, true)?;
            self.start_daemon(machine)?;
        }
        Ok(())
    }

    fn crash_server(&mut self, machine: &str) -> Result<(), BackendError> {
        // No SIGTERM, no clean stop: the state is as the killed process left it.
        self.stop_daemon(machine, false)?;
        self.start_daemon(machine)
    }

    fn pause_server(&mut self, machine: &str) -> Result<(), BackendError> {
        // Only the runtime stands still: the machine's apps and sessions run on.
        if let Some(child) = &self.machine(machine)?.daemon {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
        }
        self.wait_daemon_stopped(machine)
    }

    fn resume_server(&mut self, machine: &str) -> Result<(), BackendError> {
        if let Some(child) = &self.machine(machine)?.daemon {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
        Ok(())
    }

    fn plug_dongle(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        self.attach(dongle, machine, DongleLink::Usb)
    }

    fn import_dongle(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        // The simulation's USB/IP import reaches the same bus socket as a plug.
        self.attach(dongle, machine, DongleLink::Usbip)
    }

    fn unplug_dongle(
        &mut self,
        dongle: &str,
        machine: &str,
        _how: Unplug,
    ) -> Result<(), BackendError> {
        // A cut connection and an unplug look the same to the simulated runtime: the device
        // vanishes mid-use.
        if self.machine_mut(machine)?.dongles.remove(dongle).is_some() {
            self.fabric
                .dongles
                .with(dongle, |device| device.detach(Some(machine)))?;
        }
        Ok(())
    }

    fn dongle_holders(&self, dongle: &str) -> Vec<(String, DongleLink)> {
        self.machines
            .values()
            .filter_map(|m| Some((m.name.clone(), *m.dongles.get(dongle)?)))
            .collect()
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
        self.gather_logs();
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Drop for SimDriver {
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
/// Lets every user pass through `dir` (search permission for others) when the harness owns it
/// and it keeps them out; a folder of someone else's is left as it is.
fn let_users_through(dir: &Path) -> Result<(), BackendError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta =
        std::fs::metadata(dir).map_err(BackendError::io(format!("inspect {}", dir.display())))?;
    if meta.mode() & 0o001 != 0 {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    // Only scratch folders are opened (a private temporary folder of the harness or its
    // tests); a folder elsewhere, such as a home folder, is the user's to open.
    let scratch = [std::env::temp_dir(), PathBuf::from("/dev/shm")]
        .iter()
        .filter_map(|root| std::fs::canonicalize(root).ok())
        .any(|root| dir.starts_with(&root) && dir != root);
    if meta.uid() != me || !scratch {
        return Err(BackendError::Unsupported {
            backend: BackendKind::Sim,
            operation: "run apps as the scenario's users",
            why: format!(
                "they cannot pass through {}: give others search permission on it (chmod o+x) \
                 or set TMPDIR to a folder they can reach",
                dir.display()
            ),
        });
    }
    let mode = (meta.mode() & 0o7777) | 0o001;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(BackendError::io(
        format!("open {} to the machines' users", dir.display()),
    ))
}
