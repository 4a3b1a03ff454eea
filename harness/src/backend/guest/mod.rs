//! The guest driver: guests are virtual machines booted from the image of `images/` (kernel +
//! initramfs with `meter`, `meterd` and `vigil-agent`) with their own SMBIOS identity, MAC,
//! disk serial, generation id and their host's CPU, and a qcow2 data disk holding the runtime's
//! state. The driver talks to each guest over the agent's virtio-serial port ([`agent`]) for
//! everything inside it; the [`hypervisor::Hypervisor`] under it (the qemu backend's own QEMU
//! processes, or libvirt's domains) starts, stops, snapshots, copies and moves whole guests.
//! A revert runs the snapshot's state with a new generation id; a clone copies the disk and
//! boots cold with a new identity; a migration moves the running guest live to another host.
//!
//! Guests reach servers through user networking: the harness machine is 10.0.2.2 inside a
//! guest, where the composite's link for each (guest, server) pair listens and connects on from
//! the guest's own loopback address, so servers see one peer per guest.

pub mod agent;
pub mod hypervisor;
pub mod image;
mod runtime_disk;
mod server;
pub mod usb_plug;
mod usbip;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use self::agent::{AgentError, Op, Outcome};
use self::hypervisor::{Hypervisor, LaunchSpec, RunningGuest};
use self::usb_plug::{UsbRedirPlug, XHCI_USB2_PORTS};
use self::usbip::UsbipImport;
use super::driver::{DongleLink, MachineDriver, MachineSpec, ServerLink, Unplug};
use super::fabric::Fabric;
use super::fabric::accounts::CONSOLE_USER;
use super::types::{
    AppStatus, BackendError, Caller, CloneIdentity, CommandOutput, CpuProfile, HardwareIdentity,
    Power, Role, ServerInfo, ServerSettings, SessionSpec, WorldConfig,
};
use crate::identity::IdentityMint;
use crate::usb::usbip::UsbipServer;
use crate::usb::usbredir::UsbredirServer;

/// Where the runtime keeps its state inside a guest (on the data disk).
const GUEST_STATE: &str = "/disk/meter";
/// Where files the harness puts on a guest land (on the data disk).
const GUEST_HOME: &str = "/disk/home";
/// The runtime's socket inside a guest.
const GUEST_SOCKET: &str = "/run/meter/meterd.sock";
/// The runtime's log inside a guest.
const GUEST_RUNTIME_LOG: &str = "/run/vigil/meterd.log";
/// The harness machine as a guest sees it through user networking.
const HOST_FROM_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// How long a guest may take from its start to a ready runtime (TCG on a busy machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a guest may take to enumerate a plugged dongle or to drop an unplugged one.
const USB_ENUMERATION_TIMEOUT: Duration = Duration::from_secs(30);

struct Snapshot {
    /// Whether the snapshot holds the running state (taken while the guest ran).
    live: bool,
    /// Sessions open when it was taken (they come back with the memory).
    sessions: BTreeSet<String>,
    /// Dongles plugged in over usbredir when it was taken (the restored device set).
    usb: BTreeMap<String, UsbRedirPlug>,
}

struct Guest<V> {
    name: String,
    role: Role,
    /// The CPUID hypervisor bit is switched off.
    hide_hypervisor: bool,
    identity: HardwareIdentity,
    /// The CPU the guest booted with (kept through a live migration).
    cpu: CpuProfile,
    vmgenid: String,
    dir: PathBuf,
    power: Power,
    vm: Option<V>,
    /// Increments for every start of the guest, so each gets fresh sockets.
    incarnation: u32,
    sessions: BTreeSet<String>,
    snapshots: BTreeMap<String, Snapshot>,
    /// How far its clock runs past real time.
    clock_ms: i64,
    /// The servers its runtime reaches (configured after every start).
    servers: Vec<ServerLink>,
    /// Apps started in the guest since it last started.
    apps: BTreeSet<String>,
    /// Dongles passed through over usbredir: dongle → its device on the xhci controller.
    usb: BTreeMap<String, UsbRedirPlug>,
    /// Its own address on the world's network (where its forwarded ports listen).
    ip: Ipv4Addr,
    /// The network server its runtime runs, if it runs one.
    server: Option<ServerSettings>,
}

impl<V> Guest<V> {
    fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
}

/// Timings of the last operations, for benchmarks.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Milliseconds from start to a ready runtime, per boot.
    pub boot_ms: Vec<f64>,
    /// Snapshot milliseconds.
    pub snapshot_ms: Vec<f64>,
    /// Milliseconds from revert start to a ready runtime.
    pub revert_ms: Vec<f64>,
    /// Clone (disk copy) milliseconds.
    pub clone_ms: Vec<f64>,
    /// Live migration wall milliseconds (start to destination running).
    pub migrate_ms: Vec<f64>,
    /// Migration downtime the hypervisor reported, milliseconds.
    pub migrate_downtime_ms: Vec<f64>,
}

/// The guest driver over a hypervisor.
pub struct GuestDriver<H: Hypervisor> {
    config: WorldConfig,
    hv: H,
    guests: BTreeMap<String, Guest<H::Vm>>,
    mint: IdentityMint,
    /// The world's shared parts (dongles, folders).
    fabric: Fabric,
    timings: Timings,
    /// One usbredir server per dongle passed through to guests.
    usbredir: BTreeMap<String, UsbredirServer>,
    /// usbredir plugs so far (each gets its own QEMU ids).
    usb_plugs: u32,
    /// The disk carrying a runtime given by `--runtime` into every guest.
    runtime_disk: Option<PathBuf>,
    /// Dongles guests imported over USB/IP: dongle → its export and importer.
    usbip: BTreeMap<String, usbip::UsbipImport>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

/// A server link's address as a guest reaches it (`meter servers add|remove` takes it so).
fn guest_address(link: &ServerLink) -> String {
    link.address(|via| SocketAddr::from((HOST_FROM_GUEST, via.port())))
}

impl<H: Hypervisor> GuestDriver<H> {
    /// A driver with no guests yet, over the world's `fabric`, running guests on `hv`.
    pub fn new(config: WorldConfig, fabric: Fabric, hv: H) -> Result<GuestDriver<H>, BackendError> {
        std::fs::create_dir_all(config.work_dir.join("guests"))
            .map_err(BackendError::io("create the guests folder"))?;
        let runtime_disk = if config.builtin_runtime {
            None
        } else {
            Some(runtime_disk::build(
                &config.runtime_bin,
                &config.work_dir,
                hv.kind(),
            )?)
        };
        Ok(GuestDriver {
            mint: IdentityMint::new(config.seed ^ 0x9e37_79b9),
            config,
            hv,
            guests: BTreeMap::new(),
            fabric,
            timings: Timings::default(),
            usbredir: BTreeMap::new(),
            usb_plugs: 0,
            runtime_disk,
            usbip: BTreeMap::new(),
        })
    }

    /// Timings measured so far (boot, snapshot, revert, clone, migration).
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// The accelerator guests run with (`kvm` or `tcg`).
    pub fn accelerator(&self) -> &'static str {
        self.hv.accelerator()
    }

    /// The hypervisor under the driver.
    pub fn hypervisor(&self) -> &H {
        &self.hv
    }

    fn guest(&self, name: &str) -> Result<&Guest<H::Vm>, BackendError> {
        self.guests.get(name).ok_or_else(|| BackendError::Unknown {
            kind: "machine",
            name: name.to_string(),
        })
    }

    fn guest_mut(&mut self, name: &str) -> Result<&mut Guest<H::Vm>, BackendError> {
        self.guests
            .get_mut(name)
            .ok_or_else(|| BackendError::Unknown {
                kind: "machine",
                name: name.to_string(),
            })
    }

    fn insert_guest(&mut self, spec: &MachineSpec) -> Result<(), BackendError> {
        let name = spec.name.as_str();
        BackendError::check_name("machine", name)?;
        let dir = self
            .fabric
            .folders
            .next_under(&self.config.work_dir.join("guests"));
        std::fs::create_dir_all(&dir)
            .map_err(BackendError::io(format!("create {}", dir.display())))?;
        std::fs::create_dir_all(self.config.log_dir.join(name))
            .map_err(BackendError::io("create the guest's log folder"))?;
        let vmgenid = self.mint.generation_id();
        self.hv.add_guest(name, &spec.host)?;
        self.guests.insert(
            name.to_string(),
            Guest {
                name: name.to_string(),
                role: spec.role,
                hide_hypervisor: spec.hide_hypervisor,
                identity: spec.identity.clone(),
                cpu: spec.cpu.clone(),
                vmgenid,
                dir,
                power: Power::Off,
                vm: None,
                incarnation: 0,
                sessions: BTreeSet::new(),
                snapshots: BTreeMap::new(),
                clock_ms: 0,
                servers: Vec::new(),
                apps: BTreeSet::new(),
                usb: BTreeMap::new(),
                ip: spec.ip,
                server: None,
            },
        );
        Ok(())
    }

    fn spec_for(&mut self, name: &str, loadvm: Option<String>) -> LaunchSpec {
        let log_dir = self.config.log_dir.join(name);
        let g = self.guests.get_mut(name).expect("guest exists");
        g.incarnation += 1;
        let run_dir = g.dir.join(format!("run-{}", g.incarnation));
        LaunchSpec {
            name: g.name.clone(),
            identity: g.identity.clone(),
            cpu: g.cpu.clone(),
            hide_hypervisor: g.hide_hypervisor,
            vmgenid: g.vmgenid.clone(),
            disk: g.disk(),
            run_dir,
            log_dir,
            loadvm,
            usb: g.usb.values().cloned().collect(),
            runtime_disk: self.runtime_disk.clone(),
            harness_root: self.config.harness_root.clone(),
        }
    }

    /// Talks to a running guest's agent; failures name the guest, its console and hypervisor.
    fn call(&mut self, machine: &str, op: Op, timeout: Duration) -> Result<Outcome, BackendError> {
        let g = self.guest_mut(machine)?;
        let vm = g.vm.as_mut().ok_or_else(|| BackendError::WrongState {
            machine: machine.to_string(),
            state: Power::Off.name(),
            operation: "talk to its agent",
            needed: "running",
        })?;
        match vm.agent().call(op, timeout) {
            Ok(outcome) => Ok(outcome),
            Err(AgentError::Refused { op, message }) => Err(BackendError::Runtime {
                machine: machine.to_string(),
                message: format!("the guest agent could not `{op}`: {message}"),
            }),
            Err(AgentError::CommandTimedOut { message, .. }) => Err(BackendError::Timeout {
                what: format!("{message} on {machine}"),
                after: timeout,
            }),
            Err(e) => Err(vm.failure(&e.to_string())),
        }
    }

    /// What the agent knows of an app in a guest: its output so far and, once ended, its exit.
    fn guest_app(&mut self, machine: &str, app: &str) -> Result<Outcome, BackendError> {
        self.call(
            machine,
            Op::AppStatus {
                app: app.to_string(),
            },
            Duration::from_secs(10),
        )
    }

    /// Brings a freshly started guest to a ready runtime: agent up, clock and vmgenid set.
    fn finish_start(&mut self, machine: &str, started: Instant) -> Result<(), BackendError> {
        let ready_file = format!("{GUEST_STATE}/meterd.ready");
        {
            let g = self.guest_mut(machine)?;
            let vm = g.vm.as_mut().expect("vm just launched");
            if let Err(e) = vm.agent().wait_ready(&ready_file, BOOT_TIMEOUT) {
                let err = vm.failure(&format!("guest did not become ready: {e}"));
                if let Some(vm) = g.vm.take() {
                    vm.kill();
                }
                g.power = Power::Off;
                return Err(err);
            }
        }
        {
            // The hypervisor's choice, when it made one, is what later starts keep.
            let g = self.guest_mut(machine)?;
            if let Some(id) = g.vm.as_ref().and_then(RunningGuest::generation_id) {
                g.vmgenid = id;
            }
        }
        self.push_guest_clock(machine)?;
        self.call(machine, Op::RefreshVmgenid, Duration::from_secs(5))?;
        tracing::info!(
            guest = machine,
            ms = started.elapsed().as_millis() as u64,
            accelerator = self.hv.accelerator(),
            "guest ready"
        );
        Ok(())
    }

    fn launch(&mut self, machine: &str, loadvm: Option<String>) -> Result<Instant, BackendError> {
        let spec = self.spec_for(machine, loadvm);
        let started = Instant::now();
        let vm = self.hv.launch(spec)?;
        let g = self.guest_mut(machine)?;
        g.vm = Some(vm);
        g.power = Power::Running;
        self.forward_server_ports(machine)?;
        Ok(started)
    }

    fn push_guest_clock(&mut self, machine: &str) -> Result<(), BackendError> {
        let epoch_ms = now_ms().saturating_add(self.guest(machine)?.clock_ms);
        self.call(machine, Op::SetClock { epoch_ms }, Duration::from_secs(5))?;
        Ok(())
    }

    /// Opens a session in a guest: a login, or without `login` an unattended console.
    fn open_guest_session(
        &mut self,
        machine: &str,
        session: &str,
        spec: &SessionSpec,
        login: bool,
    ) -> Result<(), BackendError> {
        self.call(
            machine,
            Op::SessionOpen {
                name: session.to_string(),
                session: spec.clone(),
                login,
                uid: Some(self.fabric.accounts.uid(spec.user())?),
            },
            Duration::from_secs(10),
        )?;
        self.guest_mut(machine)?
            .sessions
            .insert(session.to_string());
        Ok(())
    }

    /// Points a running guest's runtime at servers, through their links on the harness machine.
    /// Stops the guest's runtime, runs `middle` (shell; `$1`… are `args`, it shifts what it
    /// uses and may set `rc=1` on failure), starts the runtime again with the remaining args,
    /// and waits until it is ready.
    fn restart_runtime(
        &mut self,
        machine: &str,
        signal: i32,
        middle: &str,
        args: &[&str],
        failure: &str,
    ) -> Result<(), BackendError> {
        const STOP: &str = r#"rc=0
pid=$(cat /disk/meter/meterd.ready 2>/dev/null)
alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
if [ -n "$pid" ]; then
  kill "-$STOP_SIGNAL" "$pid"
  # The old daemon holds the database until it exits, after its ready file is gone.
  i=0
  while alive "$pid" && [ $i -lt 300 ]; do sleep 0.05; i=$((i+1)); done
  if alive "$pid"; then
    # Seen once in ~10 runs under TCG: the daemon ignores SIGTERM. Say so where its log is.
    echo "vigil: meterd $pid still running 15 s after SIGTERM: killed" >>/run/vigil/meterd.log
    kill -9 "$pid"
    i=0
    while alive "$pid" && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
  fi
  if alive "$pid"; then
    # What it is doing, for the report: its state, where it waits in the kernel, what it is.
    echo "meterd $pid did not stop, even killed ($(grep '^State:' "/proc/$pid/status" 2>/dev/null | tr -s '\t ' ' '); wchan $(cat "/proc/$pid/wchan" 2>/dev/null); $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null))" >&2
    exit 1
  fi
fi
rm -f /disk/meter/meterd.ready
"#;
        const START: &str = r#"
# A network server's options come from the machine's configuration (see `server.rs`).
METER_LOG=${METER_LOG:-info} setsid /bin/meterd --platform host --state /disk/meter \
  --socket /run/meter/meterd.sock $(cat /disk/server.args 2>/dev/null) "$@" \
  >>/run/vigil/meterd.log 2>&1 </dev/null &
exit $rc
"#;
        let script = format!("STOP_SIGNAL={signal}\n{STOP}{middle}{START}");
        let mut argv = vec!["sh", "-c", script.as_str(), "restart-runtime"];
        argv.extend_from_slice(args);
        self.guest_exec_ok(machine, &argv, Duration::from_secs(40), failure)?;
        let ready_file = format!("{GUEST_STATE}/meterd.ready");
        let g = self.guest_mut(machine)?;
        let vm = g.vm.as_mut().expect("a running guest has a vm");
        let waited = vm.agent().wait_ready(&ready_file, BOOT_TIMEOUT).map(drop);
        match waited {
            Ok(()) => Ok(()),
            Err(e) => {
                let log = self.guest_exec(
                    machine,
                    &["tail", "-n", "12", "/run/vigil/meterd.log"],
                    Duration::from_secs(10),
                );
                let tail = log.map(|o| o.stdout).unwrap_or_default();
                Err(self.guest_failure(
                    machine,
                    format!(
                        "runtime did not come back: {e}; its log ends:\n{}",
                        tail.trim_end()
                    ),
                ))
            }
        }
    }

    fn configure_servers(
        &mut self,
        machine: &str,
        links: &[ServerLink],
    ) -> Result<(), BackendError> {
        for link in links {
            let address = guest_address(link);
            self.meter_checked(
                machine,
                &[
                    "servers".into(),
                    "add".into(),
                    address,
                    "--pin".into(),
                    link.pins(),
                ],
            )?;
        }
        Ok(())
    }

    /// Stops a running guest's runtime forwarding to servers it should no longer know.
    fn unconfigure_servers(
        &mut self,
        machine: &str,
        links: &[ServerLink],
    ) -> Result<(), BackendError> {
        for link in links {
            let address = guest_address(link);
            self.meter_checked(machine, &["servers".into(), "remove".into(), address])?;
        }
        Ok(())
    }

    /// Points a running guest's runtime at every server it should know.
    fn configure_all_servers(&mut self, machine: &str) -> Result<(), BackendError> {
        let links = self.guest(machine)?.servers.clone();
        self.configure_servers(machine, &links)
    }

    fn meter_checked(&mut self, machine: &str, args: &[String]) -> Result<(), BackendError> {
        let mut full = args.to_vec();
        full.push("--json".into());
        let out = self.run_meter(machine, Caller::Admin, &full, Duration::from_secs(20))?;
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

    /// Stops a guest at once (power cut), keeping its disk.
    fn power_cut(&mut self, machine: &str) -> Result<(), BackendError> {
        let g = self.guest_mut(machine)?;
        if let Some(vm) = g.vm.take() {
            vm.kill();
        }
        g.power = Power::Off;
        g.sessions.clear();
        g.apps.clear();
        self.end_usbip_imports_of(machine);
        Ok(())
    }

    /// A guest that stops loses its USB/IP imports with its kernel: their exports end.
    fn end_usbip_imports_of(&mut self, machine: &str) {
        self.usbip.retain(|_, import| import.machine != machine);
    }

    /// Copies the guest's runtime log out of the guest into the report folder.
    fn collect_runtime_log(&mut self, machine: &str) {
        let path = GUEST_RUNTIME_LOG.to_string();
        if let Ok(Outcome::File { data_hex }) =
            self.call(machine, Op::ReadFile { path }, Duration::from_secs(5))
            && let Ok(data) = hex::decode(data_hex)
        {
            let target = self.config.log_dir.join(machine).join("meterd.log");
            let _ = std::fs::write(target, data);
        }
    }

    /// Passes a dongle through to a guest over usbredir (hot-plugged when the guest runs, at
    /// its next start otherwise).
    fn plug_into_guest(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        if self.guest(machine)?.usb.contains_key(dongle) {
            return Ok(());
        }
        let core = self.fabric.dongles.core(dongle)?;
        let port = self.usbredir_port(dongle)?;
        self.usb_plugs += 1;
        let plug_number = self.usb_plugs;
        let backend = self.hv.kind();
        let g = self.guest_mut(machine)?;
        let used: BTreeSet<u8> = g.usb.values().map(|p| p.xhci_port).collect();
        let xhci_port = XHCI_USB2_PORTS
            .clone()
            .find(|p| !used.contains(p))
            .ok_or_else(|| BackendError::Unsupported {
                backend,
                operation: "usb-attach",
                why: format!(
                    "{machine} has all {} USB 2 ports of its controller in use",
                    XHCI_USB2_PORTS.count()
                ),
            })?;
        let plug = UsbRedirPlug {
            id: usb_device_id(dongle, plug_number),
            port,
            xhci_port,
        };
        let running = g.power == Power::Running;
        core.plugged();
        if let Some(vm) = g.vm.as_mut()
            && let Err(e) = vm.usb_plug(&plug)
        {
            core.unplugged();
            return Err(e);
        }
        g.usb.insert(dongle.to_string(), plug);
        if running {
            self.wait_for_guest_dongle(machine, dongle, true)?;
        }
        Ok(())
    }

    /// Waits until the guest's kernel shows (or no longer shows) the dongle as a hidraw device,
    /// as a hypervisor's plug finishes once the guest has enumerated the device.
    fn wait_for_guest_dongle(
        &mut self,
        machine: &str,
        dongle: &str,
        present: bool,
    ) -> Result<(), BackendError> {
        let serial = self.fabric.dongles.core(dongle)?.serial().to_string();
        let wanted = format!("HID_UNIQ={serial}");
        let started = Instant::now();
        let deadline = started + USB_ENUMERATION_TIMEOUT;
        loop {
            let uevents = self.guest_exec(
                machine,
                &[
                    "/bin/sh",
                    "-c",
                    "cat /sys/class/hidraw/*/device/uevent 2>/dev/null; true",
                ],
                Duration::from_secs(10),
            )?;
            let seen = uevents.stdout.lines().any(|line| line.trim() == wanted);
            if seen == present {
                tracing::debug!(
                    guest = machine,
                    dongle,
                    present,
                    ms = started.elapsed().as_millis() as u64,
                    "guest USB settled"
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let what = if present {
                    "did not enumerate"
                } else {
                    "was not removed"
                };
                return Err(self.guest_failure(
                    machine,
                    format!(
                        "dongle {dongle} (serial {serial}) {what} in the guest within {} s",
                        USB_ENUMERATION_TIMEOUT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Unplugs a dongle from a guest, if it is plugged in there.
    fn unplug_from_guest(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        let g = self.guest_mut(machine)?;
        let Some(plug) = g.usb.remove(dongle) else {
            return Ok(());
        };
        let running = g.power == Power::Running;
        let unplugged = match g.vm.as_mut() {
            Some(vm) => vm.usb_unplug(&plug),
            None => Ok(()),
        };
        self.fabric.dongles.core(dongle)?.unplugged();
        unplugged?;
        if running {
            self.wait_for_guest_dongle(machine, dongle, false)?;
        }
        Ok(())
    }

    /// Runs a program in a running guest as a service of the agent (tests and benchmarks).
    pub fn guest_exec(
        &mut self,
        machine: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        let argv = argv.iter().map(|a| a.to_string()).collect();
        self.exec(machine, argv, Vec::new(), None, timeout)
    }

    /// Runs a program in a running guest that must succeed; else a failure saying `failure`
    /// with what it printed on its error output.
    fn guest_exec_ok(
        &mut self,
        machine: &str,
        argv: &[&str],
        timeout: Duration,
        failure: &str,
    ) -> Result<(), BackendError> {
        let out = self.guest_exec(machine, argv, timeout)?;
        if out.code != Some(0) {
            return Err(self.guest_failure(machine, format!("{failure}: {}", out.stderr.trim())));
        }
        Ok(())
    }

    /// Runs a program to completion in a guest (inside `session` when named); its exit and output.
    fn exec(
        &mut self,
        machine: &str,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        session: Option<String>,
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        let op = Op::Exec { argv, env, session };
        match self.call(machine, op, timeout)? {
            Outcome::Exited {
                exit,
                stdout,
                stderr,
            } => Ok(CommandOutput {
                code: exit.code,
                stdout,
                stderr,
            }),
            other => Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("the agent answered exec with {other:?}"),
            }),
        }
    }

    /// A failure of a guest: with its console and hypervisor logs while it runs.
    fn guest_failure(&self, machine: &str, message: String) -> BackendError {
        match self.guests.get(machine).and_then(|g| g.vm.as_ref()) {
            Some(vm) => vm.failure(&message),
            None => BackendError::Runtime {
                machine: machine.into(),
                message,
            },
        }
    }

    /// Waits until a freshly started guest shows every dongle passed through to it.
    fn wait_for_guest_dongles(&mut self, machine: &str) -> Result<(), BackendError> {
        let dongles: Vec<String> = self.guest(machine)?.usb.keys().cloned().collect();
        for dongle in dongles {
            self.wait_for_guest_dongle(machine, &dongle, true)?;
        }
        Ok(())
    }

    /// Guests a dongle is passed through to.
    fn guests_with_dongle(&self, dongle: &str) -> Vec<String> {
        self.guests
            .values()
            .filter(|g| g.usb.contains_key(dongle))
            .map(|g| g.name.clone())
            .collect()
    }

    /// The usbredir server of a dongle (started at its first passthrough).
    fn usbredir_port(&mut self, dongle: &str) -> Result<u16, BackendError> {
        if let Some(server) = self.usbredir.get(dongle) {
            return Ok(server.port());
        }
        let core = self.fabric.dongles.core(dongle)?;
        let server = UsbredirServer::start(core).map_err(|e| BackendError::Runtime {
            machine: dongle.to_string(),
            message: format!("cannot serve the dongle over usbredir: {e}"),
        })?;
        let port = server.port();
        self.usbredir.insert(dongle.to_string(), server);
        Ok(port)
    }

    /// Gives a guest about to be restored (its old instance already gone) the dongles its snapshot had,
    /// as the restored configuration passes them through: a dongle that went elsewhere since is
    /// taken back exclusively; one the guest has now but the snapshot had not is unplugged.
    fn restore_usb(
        &mut self,
        machine: &str,
        usb: BTreeMap<String, UsbRedirPlug>,
    ) -> Result<(), BackendError> {
        let current: Vec<String> = self.guest(machine)?.usb.keys().cloned().collect();
        for dongle in current {
            if !usb.contains_key(&dongle) {
                self.guest_mut(machine)?.usb.remove(&dongle);
                self.fabric.dongles.core(&dongle)?.unplugged();
            }
        }
        let mut restored = BTreeMap::new();
        for (dongle, plug) in usb {
            // The composite took it from every other machine before the revert.
            if !self.guest(machine)?.usb.contains_key(&dongle) {
                self.fabric.dongles.core(&dongle)?.plugged();
            }
            let port = self.usbredir_port(&dongle)?;
            restored.insert(dongle, UsbRedirPlug { port, ..plug });
        }
        self.guest_mut(machine)?.usb = restored;
        Ok(())
    }

    /// How many usbredir connections of each of a guest's dongles have been configured so far.
    fn usbredir_configured(&self, machine: &str) -> Result<Vec<(String, u64)>, BackendError> {
        Ok(self
            .guest(machine)?
            .usb
            .keys()
            .map(|dongle| {
                let seen = self.usbredir.get(dongle).map_or(0, |s| s.configured());
                (dongle.clone(), seen)
            })
            .collect())
    }

    /// Waits until each dongle's usbredir server has configured a connection beyond `before`
    /// (a restored guest's device reconnects: until then the guest still lists the old one),
    /// then until the guest shows it.
    fn wait_for_usbredir_reconnects(
        &mut self,
        machine: &str,
        before: Vec<(String, u64)>,
    ) -> Result<(), BackendError> {
        let deadline = Instant::now() + USB_ENUMERATION_TIMEOUT;
        for (dongle, seen) in before {
            while self
                .usbredir
                .get(&dongle)
                .is_some_and(|s| s.configured() <= seen)
            {
                if Instant::now() > deadline {
                    return Err(self.guest_failure(
                        machine,
                        format!(
                            "dongle {dongle} did not reconnect over usbredir within {} s",
                            USB_ENUMERATION_TIMEOUT.as_secs()
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.wait_for_guest_dongle(machine, &dongle, true)?;
        }
        Ok(())
    }

    /// Checks that `app` was started in `machine` since it last started.
    fn guest_app_known(&self, machine: &str, app: &str) -> Result<(), BackendError> {
        if self.guest(machine)?.apps.contains(app) {
            Ok(())
        } else {
            Err(BackendError::Unknown {
                kind: "app",
                name: app.into(),
            })
        }
    }
}

/// Dongles imported by guests over USB/IP.
impl<H: Hypervisor> GuestDriver<H> {
    /// Exports a dongle over USB/IP and has a running guest's kernel import it (the composite
    /// took the dongle from every other machine: a USB/IP export has one importer).
    fn usbip_attach_guest(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        if let Some(import) = self.usbip.get(dongle)
            && import.machine == machine
            && import.server.is_imported()
        {
            return Ok(());
        }
        // An import that died with an earlier boot of the guest ends first.
        self.end_usbip(dongle)?;
        let started = Instant::now();
        let server = UsbipServer::start(self.fabric.dongles.core(dongle)?).map_err(|e| {
            BackendError::Runtime {
                machine: dongle.to_string(),
                message: format!("cannot export the dongle over USB/IP: {e}"),
            }
        })?;
        let outcome = self.call(
            machine,
            Op::UsbipAttach {
                host: HOST_FROM_GUEST.to_string(),
                port: server.port(),
                busid: UsbipServer::BUS_ID.to_string(),
            },
            Duration::from_secs(20),
        )?;
        let Outcome::UsbipAttached { vhci_port } = outcome else {
            return Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("the agent answered usbip-attach with {outcome:?}"),
            });
        };
        self.usbip.insert(
            dongle.to_string(),
            UsbipImport {
                machine: machine.to_string(),
                server,
                vhci_port,
            },
        );
        self.wait_for_guest_dongle(machine, dongle, true)?;
        tracing::info!(
            guest = machine,
            dongle,
            vhci_port,
            ms = started.elapsed().as_millis() as u64,
            "dongle attached over USB/IP"
        );
        Ok(())
    }

    /// Detaches a dongle a guest imported over USB/IP (as `usbip detach` in the guest) and ends
    /// its export; false when no guest had it.
    fn end_usbip(&mut self, dongle: &str) -> Result<bool, BackendError> {
        let Some(import) = self.usbip.remove(dongle) else {
            return Ok(false);
        };
        let running = self
            .guests
            .get(&import.machine)
            .is_some_and(|g| g.power == Power::Running);
        // A guest that stopped or restarted since has no such device any more.
        if running && import.server.is_imported() {
            self.call(
                &import.machine,
                Op::UsbipDetach {
                    vhci_port: import.vhci_port,
                },
                Duration::from_secs(10),
            )?;
            self.wait_for_guest_dongle(&import.machine, dongle, false)?;
        }
        drop(import.server);
        Ok(true)
    }

    /// Cuts the USB/IP connection of a dongle a guest imported (a network fault) and waits until
    /// the guest's kernel has dropped the device; false when no guest had it.
    fn usbip_cut(&mut self, dongle: &str) -> Result<bool, BackendError> {
        let Some(import) = self.usbip.remove(dongle) else {
            return Ok(false);
        };
        import.server.disconnect();
        drop(import.server);
        let running = self
            .guests
            .get(&import.machine)
            .is_some_and(|g| g.power == Power::Running);
        if running {
            self.wait_for_guest_dongle(&import.machine, dongle, false)?;
        }
        Ok(true)
    }
}

impl<H: Hypervisor> MachineDriver for GuestDriver<H> {
    fn power(&self, machine: &str) -> Result<Power, BackendError> {
        Ok(self.guest(machine)?.power)
    }

    fn describe(&self) -> serde_json::Value {
        let image_dir = self.hv.image_dir();
        let manifest = std::fs::read_to_string(image_dir.join("manifest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let mut description = self.hv.describe();
        if let Some(fields) = description.as_object_mut() {
            fields.insert("image".into(), json!(image_dir.display().to_string()));
            fields.insert("image_manifest".into(), json!(manifest));
        }
        description
    }

    fn add_machine(&mut self, spec: &MachineSpec) -> Result<(), BackendError> {
        self.insert_guest(spec)?;
        let disk = self.guest(&spec.name)?.disk();
        let template = self.hv.image_dir().join("data.qcow2");
        std::fs::copy(&template, &disk)
            .map_err(BackendError::io(format!("copy {}", template.display())))?;
        Ok(())
    }

    fn boot(&mut self, machine: &str, cpu: &CpuProfile) -> Result<(), BackendError> {
        // A guest boots on its host's CPU model.
        self.guest_mut(machine)?.cpu = cpu.clone();
        let started = self.launch(machine, None)?;
        self.finish_start(machine, started)?;
        self.wait_for_guest_dongles(machine)?;
        self.timings
            .boot_ms
            .push(started.elapsed().as_secs_f64() * 1000.0);
        let login = self.guest(machine)?.role.console_is_a_login();
        self.open_guest_session(
            machine,
            "console",
            &SessionSpec::Console {
                user: CONSOLE_USER.into(),
            },
            login,
        )?;
        self.configure_all_servers(machine)
    }

    fn shutdown(&mut self, machine: &str) -> Result<(), BackendError> {
        if self.guest(machine)?.power == Power::Paused {
            self.resume(machine)?;
        }
        self.forget_guest_server(machine)?;
        self.collect_runtime_log(machine);
        let answer = self.call(
            machine,
            Op::PowerOff {
                daemon: "meterd".into(),
            },
            Duration::from_secs(10),
        );
        let g = self.guest_mut(machine)?;
        if let Some(vm) = g.vm.take() {
            // The guest powers itself off; its plug is pulled if it does not.
            vm.wait_off(Duration::from_secs(10));
        }
        g.power = Power::Off;
        g.sessions.clear();
        g.apps.clear();
        self.end_usbip_imports_of(machine);
        answer.map(drop)
    }

    fn pause(&mut self, machine: &str) -> Result<(), BackendError> {
        let g = self.guest_mut(machine)?;
        let vm = g.vm.as_mut().expect("running guest has a VM");
        vm.pause()?;
        g.power = Power::Paused;
        Ok(())
    }

    fn resume(&mut self, machine: &str) -> Result<(), BackendError> {
        let g = self.guest_mut(machine)?;
        let vm = g.vm.as_mut().expect("paused guest has a VM");
        vm.resume()?;
        g.power = Power::Running;
        // A stopped guest's clock stood still; the world's did not.
        self.push_guest_clock(machine)?;
        // Dongles plugged in while it was paused are enumerated now.
        self.wait_for_guest_dongles(machine)
    }

    fn snapshot(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        BackendError::check_name("snapshot", name)?;
        let started = Instant::now();
        let spec = self.spec_for(machine, None);
        let g = self
            .guests
            .get_mut(machine)
            .expect("spec_for found the guest");
        let live = g.vm.is_some();
        self.hv.snapshot(&spec, g.vm.as_mut(), name)?;
        let sessions = g.sessions.clone();
        let usb = g.usb.clone();
        g.snapshots.insert(
            name.to_string(),
            Snapshot {
                live,
                sessions,
                usb,
            },
        );
        self.timings
            .snapshot_ms
            .push(started.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    fn snapshot_dongles(&self, machine: &str, name: &str) -> Result<Vec<String>, BackendError> {
        let g = self.guest(machine)?;
        Ok(match g.snapshots.get(name) {
            Some(snap) if snap.live && g.power != Power::Off => snap.usb.keys().cloned().collect(),
            _ => Vec::new(),
        })
    }

    fn revert(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        let started = Instant::now();
        let (live, sessions, usb) =
            {
                let snap = self.guest(machine)?.snapshots.get(name).ok_or_else(|| {
                    BackendError::Unknown {
                        kind: "snapshot",
                        name: name.to_string(),
                    }
                })?;
                (snap.live, snap.sessions.clone(), snap.usb.clone())
            };
        self.power_cut(machine)?;
        // A revert is a new hypervisor process with a new generation id.
        let vmgenid = self.mint.generation_id();
        self.guest_mut(machine)?.vmgenid = vmgenid;
        // The guest comes back in the power state it had when the snapshot was taken.
        if live {
            // The restored machine has the devices it had when saved: its dongles come back.
            self.restore_usb(machine, usb)?;
            let configured = self.usbredir_configured(machine)?;
            let started_vm = self.launch(machine, Some(name.to_string()))?;
            self.guest_mut(machine)?.sessions = sessions;
            self.finish_start(machine, started_vm)?;
            self.wait_for_usbredir_reconnects(machine, configured)?;
            // The restored memory may lack the servers added since the snapshot.
            self.configure_all_servers(machine)?;
        } else {
            let spec = self.spec_for(machine, None);
            self.hv.revert_stopped(&spec, name)?;
        }
        self.timings
            .revert_ms
            .push(started.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    fn clone_machine(
        &mut self,
        from: &str,
        to: &MachineSpec,
        identity: CloneIdentity,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        let source = self.guest(from)?;
        let mut spec = to.clone();
        spec.role = source.role;
        if identity == CloneIdentity::Perfect {
            spec.identity = source.identity.clone();
        }
        self.insert_guest(&spec)?;
        let target_disk = self.guest(&spec.name)?.disk();
        if self.guest(from)?.power == Power::Running {
            // As a hypervisor's guest agent does before a snapshot: flush the guest's caches.
            self.guest_exec(from, &["/bin/sync"], Duration::from_secs(20))?;
        }
        // A running source is frozen meanwhile so the copy is crash-consistent, as a
        // hypervisor's clone of a running VM is.
        let source_spec = self.spec_for(from, None);
        let g = self.guests.get_mut(from).expect("spec_for found the guest");
        self.hv
            .copy_disk(&source_spec, g.vm.as_mut(), &target_disk)?;
        self.timings
            .clone_ms
            .push(started.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    fn migrate(&mut self, machine: &str, host: &str) -> Result<(), BackendError> {
        if let Some(dongle) = self.guest(machine)?.usb.keys().next() {
            return Err(BackendError::Unsupported {
                backend: self.hv.kind(),
                operation: "migrate",
                why: format!(
                    "{machine} has dongle {dongle} passed through over usbredir; unplug it \
                     (usb-detach) before a live migration"
                ),
            });
        }
        if let Some((dongle, _)) = self.usbip.iter().find(|(_, i)| i.machine == machine) {
            return Err(BackendError::Unsupported {
                backend: self.hv.kind(),
                operation: "migrate",
                why: format!(
                    "{machine} imported dongle {dongle} over USB/IP, whose connection does not \
                     move with the guest; detach it (usbip-detach) before a live migration"
                ),
            });
        }
        let started = Instant::now();
        // The destination has the same CPU model, identity and generation id (shared disk).
        let spec = self.spec_for(machine, None);
        let g = self
            .guests
            .get_mut(machine)
            .expect("spec_for found the guest");
        let source = g.vm.as_mut().expect("running guest has a VM");
        let moved = self.hv.migrate(source, spec, host)?;
        if let Some(old) = g.vm.replace(moved.vm) {
            old.kill();
        }
        // The source's forwarded ports closed with it.
        self.forward_server_ports(machine)?;
        self.timings
            .migrate_ms
            .push(started.elapsed().as_secs_f64() * 1000.0);
        if let Some(downtime) = moved.downtime_ms {
            self.timings.migrate_downtime_ms.push(downtime);
        }
        Ok(())
    }

    fn move_machine(&mut self, machine: &str, host: &str) -> Result<(), BackendError> {
        self.guest(machine)?;
        self.hv.move_guest(machine, host)
    }

    fn replace_nic(&mut self, machine: &str, mac: String) -> Result<(), BackendError> {
        if self.guest(machine)?.power != Power::Off {
            return Err(BackendError::Unsupported {
                backend: self.hv.kind(),
                operation: "replace-part",
                why: "a NIC of a running guest is not hot-swapped yet; shut it down first".into(),
            });
        }
        let g = self.guest_mut(machine)?;
        if let Some(first) = g.identity.macs.first_mut() {
            *first = mac;
        } else {
            g.identity.macs.push(mac);
        }
        Ok(())
    }

    fn open_session(
        &mut self,
        machine: &str,
        session: &str,
        spec: &SessionSpec,
    ) -> Result<(), BackendError> {
        self.open_guest_session(machine, session, spec, true)
    }

    fn close_session(&mut self, machine: &str, session: &str) -> Result<(), BackendError> {
        if !self.guest(machine)?.sessions.contains(session) {
            return Err(BackendError::Unknown {
                kind: "session",
                name: session.into(),
            });
        }
        self.call(
            machine,
            Op::SessionClose {
                name: session.to_string(),
            },
            Duration::from_secs(10),
        )?;
        self.guest_mut(machine)?.sessions.remove(session);
        Ok(())
    }

    fn drop_session_table(&mut self, machine: &str) -> Result<(), BackendError> {
        self.guest(machine)?.power.require(
            machine,
            "drop-session-table",
            &[Power::Running],
            "running",
        )?;
        self.call(machine, Op::DropSessionTable, Duration::from_secs(5))?;
        Ok(())
    }

    fn run_meter(
        &mut self,
        machine: &str,
        caller: Caller<'_>,
        args: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        let mut argv = vec!["/bin/meter".to_string()];
        argv.extend(args.iter().cloned());
        // The guest runs slower than the harness (TCG): give commands more room.
        let timeout = timeout.max(Duration::from_secs(30));
        let env = vec![("METER_SOCKET".into(), GUEST_SOCKET.into())];
        let session = match caller {
            Caller::Admin => None,
            Caller::Session(session) => Some(session.to_string()),
        };
        match self.exec(machine, argv, env, session, timeout) {
            Err(BackendError::Timeout { after, .. }) => Err(BackendError::Timeout {
                what: format!("`meter {}` on {machine}", args.join(" ")),
                after,
            }),
            other => other,
        }
    }

    fn impersonate(
        &mut self,
        machine: &str,
        name: &str,
        runtime_id: Option<&str>,
    ) -> Result<(), BackendError> {
        // The name and id reach the shell as arguments, never as script text.
        let mut args = vec![name];
        if let Some(id) = runtime_id {
            args.extend(["--runtime-id", id]);
        }
        self.restart_runtime(
            machine,
            libc::SIGTERM,
            r#"hostname "$1"; shift"#,
            &args,
            &format!("cannot restart the runtime as {name}"),
        )
    }

    fn save_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        self.restart_runtime(
            machine,
            libc::SIGTERM,
            r#"copy="/disk/.state-copies/$1"; shift
rm -rf "$copy"
mkdir -p /disk/.state-copies && cp -a /disk/meter "$copy" || { echo "cannot copy the state folder" >&2; rc=1; }"#,
            &[name],
            &format!("cannot save the runtime's state as {name}"),
        )
    }

    fn restore_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        self.restart_runtime(
            machine,
            libc::SIGTERM,
            r#"copy="/disk/.state-copies/$1"; shift
if [ -d "$copy" ]; then
  rm -rf /disk/meter && cp -a "$copy" /disk/meter || { echo "cannot put the state folder back" >&2; rc=1; }
else
  echo "no state copy $copy" >&2; rc=1
fi"#,
            &[name],
            &format!("cannot restore the runtime's state {name}"),
        )
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
        let mut argv = vec!["/bin/meter".to_string()];
        argv.extend(args.iter().cloned());
        self.call(
            machine,
            Op::Spawn {
                app: app.to_string(),
                session: session.to_string(),
                argv,
                env: vec![("METER_SOCKET".into(), GUEST_SOCKET.into())],
                leave_session: leaves_session,
            },
            Duration::from_secs(20),
        )?;
        self.guest_mut(machine)?.apps.insert(app.to_string());
        Ok(())
    }

    fn app_output(&mut self, machine: &str, app: &str) -> Result<Vec<String>, BackendError> {
        self.guest_app_known(machine, app)?;
        let Outcome::AppStatus { stdout, .. } = self.guest_app(machine, app)? else {
            return Ok(Vec::new());
        };
        Ok(super::process::complete_lines(&stdout))
    }

    fn app_status(&mut self, machine: &str, app: &str) -> Result<AppStatus, BackendError> {
        self.guest_app_known(machine, app)?;
        Ok(match self.guest_app(machine, app)? {
            Outcome::AppStatus {
                exit: Some(exit), ..
            } => AppStatus::Exited {
                code: exit.code,
                signal: exit.signal,
            },
            _ => AppStatus::Running,
        })
    }

    fn signal_app(&mut self, machine: &str, app: &str, signal: i32) -> Result<(), BackendError> {
        self.guest_app_known(machine, app)?;
        self.call(
            machine,
            Op::AppSignal {
                app: app.to_string(),
                signal,
            },
            Duration::from_secs(10),
        )
        .map(drop)
    }

    fn set_clock(&mut self, machine: &str, offset_ms: i64) -> Result<(), BackendError> {
        let g = self.guest_mut(machine)?;
        g.clock_ms = offset_ms;
        if g.power == Power::Running {
            self.push_guest_clock(machine)?;
        }
        Ok(())
    }

    fn set_servers(&mut self, machine: &str, servers: &[ServerLink]) -> Result<(), BackendError> {
        let g = self.guest_mut(machine)?;
        let (new, gone) = ServerLink::adopt(&mut g.servers, servers);
        if g.power == Power::Running {
            self.unconfigure_servers(machine, &gone)?;
            self.configure_servers(machine, &new)?;
        }
        Ok(())
    }

    fn reach(&self, _machine: &str, via: SocketAddr) -> SocketAddr {
        SocketAddr::from((HOST_FROM_GUEST, via.port()))
    }

    fn start_server(
        &mut self,
        machine: &str,
        settings: ServerSettings,
    ) -> Result<ServerInfo, BackendError> {
        self.start_guest_server(machine, settings)
    }

    fn stop_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.stop_guest_server(machine)
    }

    fn crash_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.crash_guest_server(machine)
    }

    fn pause_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.signal_guest_runtime(machine, libc::SIGSTOP)
    }

    fn resume_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.signal_guest_runtime(machine, libc::SIGCONT)
    }

    fn plug_dongle(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        self.plug_into_guest(dongle, machine)
    }

    fn import_dongle(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        self.usbip_attach_guest(dongle, machine)
    }

    fn unplug_dongle(
        &mut self,
        dongle: &str,
        machine: &str,
        how: Unplug,
    ) -> Result<(), BackendError> {
        if self.usbip.get(dongle).is_some_and(|i| i.machine == machine) {
            match how {
                Unplug::Clean => self.end_usbip(dongle)?,
                Unplug::Cut => self.usbip_cut(dongle)?,
            };
            return Ok(());
        }
        self.unplug_from_guest(dongle, machine)
    }

    fn dongle_holders(&self, dongle: &str) -> Vec<(String, DongleLink)> {
        let mut holders: Vec<(String, DongleLink)> = self
            .guests_with_dongle(dongle)
            .into_iter()
            .map(|g| (g, DongleLink::Usb))
            .collect();
        if let Some(import) = self.usbip.get(dongle) {
            holders.push((import.machine.clone(), DongleLink::Usbip));
        }
        holders
    }

    fn put_file(
        &mut self,
        machine: &str,
        name: &str,
        contents: &[u8],
    ) -> Result<String, BackendError> {
        BackendError::check_name("file", name)?;
        let path = format!("{GUEST_HOME}/{name}");
        self.call(
            machine,
            Op::WriteFile {
                path: path.clone(),
                data_hex: hex::encode(contents),
            },
            Duration::from_secs(10),
        )?;
        Ok(path)
    }

    fn get_file(&mut self, machine: &str, path: &str) -> Result<Vec<u8>, BackendError> {
        match self.call(
            machine,
            Op::ReadFile {
                path: path.to_string(),
            },
            Duration::from_secs(10),
        )? {
            Outcome::File { data_hex } => {
                hex::decode(data_hex).map_err(|e| BackendError::Runtime {
                    machine: machine.into(),
                    message: format!("the agent sent bad file contents: {e}"),
                })
            }
            other => Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("the agent answered read-file with {other:?}"),
            }),
        }
    }

    fn teardown(&mut self) -> Result<(), BackendError> {
        let names: Vec<String> = self.guests.keys().cloned().collect();
        for name in names {
            if self.guest(&name)?.vm.is_some() {
                self.collect_runtime_log(&name);
                self.power_cut(&name)?;
            }
        }
        self.hv.teardown();
        let timings = serde_json::to_vec_pretty(&json!({
            "accelerator": self.hv.accelerator(),
            "timings": self.timings,
            "hypervisor_steps_ms": self.hv.own_steps_ms(),
        }))
        .unwrap_or_default();
        let file = format!("{}-timings.json", self.hv.kind());
        let _ = std::fs::write(self.config.log_dir.join(file), timings);
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl<H: Hypervisor> Drop for GuestDriver<H> {
    fn drop(&mut self) {
        for g in self.guests.values_mut() {
            if let Some(vm) = g.vm.take() {
                drop(vm);
            }
        }
    }
}

/// A QEMU id for a dongle's usbredir chardev and device (letters, digits, `-`, `_`, `.`).
/// Unique per plug: QEMU deletes an unplugged device's chardev only once the device is gone.
fn usb_device_id(dongle: &str, plug: u32) -> String {
    let safe: String = dongle
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("usb-{safe}-{plug}")
}
