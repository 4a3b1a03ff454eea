//! The one backend: machine drivers over a shared fabric.
//!
//! Every backend kind is this composite with other drivers: `sim` runs hosts and guests on the
//! sim driver; `qemu` runs hosts on the sim driver and guests on the qemu driver. The composite
//! owns what spans machines — where each machine runs and on which host, the network links and
//! servers, the world clock and skews, the dongles' moves between machines, the apps' machines
//! and the power rules — so a driver only runs its own machines.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::driver::{DongleLink, MachineDriver, MachineSpec, ServerLink, Unplug};
use super::fabric::Fabric;
use super::fabric::network::{Floods, Links};
use super::runner::Backend;
use super::types::{
    AppStatus, BackendError, BackendKind, Caller, CloneIdentity, CommandOutput, CpuProfile,
    GuestSpec, HostSpec, Power, Role, ServerInfo, ServerSettings, SessionSpec, UsbMode,
    WorldConfig,
};
use crate::identity::IdentityMint;

/// Where a machine runs.
struct Placement {
    /// Index of its driver.
    driver: usize,
    /// The host it is on now (a host is on itself).
    host: String,
    role: Role,
    ip: Ipv4Addr,
    /// A guest whose CPUID hypervisor bit is switched off (its clones inherit the setting).
    hide_hypervisor: bool,
}

/// An app and whether it still has a machine to run on.
struct AppPlace {
    machine: String,
    /// False once its machine was powered off or reverted: the app ended with it.
    alive: bool,
}

/// A world of machines run by drivers over one fabric.
pub struct World {
    kind: BackendKind,
    config: WorldConfig,
    fabric: Fabric,
    drivers: Vec<Box<dyn MachineDriver>>,
    /// The driver that runs guests (hosts always run on the first).
    guest_driver: usize,
    hosts: BTreeMap<String, HostSpec>,
    machines: BTreeMap<String, Placement>,
    apps: BTreeMap<String, AppPlace>,
    servers: BTreeMap<String, ServerInfo>,
    /// Server triads, each its three members in order.
    triads: Vec<Vec<String>>,
    links: Links,
    floods: Floods,
    skews: BTreeMap<String, i64>,
    mint: IdentityMint,
}

/// Where a machine's network server listens, as its start reported it.
fn listen_addr(machine: &str, info: &ServerInfo) -> Result<SocketAddr, BackendError> {
    info.listen.parse().map_err(|_| BackendError::Runtime {
        machine: machine.into(),
        message: format!("bad listen address {}", info.listen),
    })
}

impl World {
    /// A world of `kind` whose hosts run on `drivers[0]` and guests on `drivers[guest_driver]`.
    pub fn new(
        kind: BackendKind,
        config: WorldConfig,
        fabric: Fabric,
        drivers: Vec<Box<dyn MachineDriver>>,
        guest_driver: usize,
    ) -> World {
        assert!(
            guest_driver < drivers.len(),
            "the guest driver is one of the drivers"
        );
        World {
            kind,
            mint: IdentityMint::new(config.seed),
            config,
            fabric,
            drivers,
            guest_driver,
            hosts: BTreeMap::new(),
            machines: BTreeMap::new(),
            apps: BTreeMap::new(),
            servers: BTreeMap::new(),
            triads: Vec::new(),
            links: Links::default(),
            floods: Floods::default(),
            skews: BTreeMap::new(),
        }
    }

    /// The first driver of type `D`, for tests and benchmarks that reach past the trait.
    pub fn driver_mut<D: MachineDriver>(&mut self) -> Option<&mut D> {
        self.drivers
            .iter_mut()
            .find_map(|d| d.as_any_mut().downcast_mut::<D>())
    }

    /// An error unless `machine` runs a network server.
    fn serving(&self, machine: &str) -> Result<(), BackendError> {
        self.placement(machine)?;
        if !self.servers.contains_key(machine) {
            return Err(BackendError::Unknown {
                kind: "server",
                name: machine.to_string(),
            });
        }
        Ok(())
    }

    fn placement(&self, machine: &str) -> Result<&Placement, BackendError> {
        self.machines
            .get(machine)
            .ok_or_else(|| BackendError::Unknown {
                kind: "machine",
                name: machine.to_string(),
            })
    }

    /// The driver running `machine`.
    fn driver(&mut self, machine: &str) -> Result<&mut dyn MachineDriver, BackendError> {
        let index = self.placement(machine)?.driver;
        Ok(self.drivers[index].as_mut())
    }

    fn host(&self, name: &str) -> Result<&HostSpec, BackendError> {
        self.hosts.get(name).ok_or_else(|| BackendError::Unknown {
            kind: "host",
            name: name.to_string(),
        })
    }

    /// The CPU of the host `machine` is on now.
    fn host_cpu(&self, machine: &str) -> Result<CpuProfile, BackendError> {
        let host = &self.placement(machine)?.host;
        Ok(self.host(host)?.cpu.clone())
    }

    fn require(
        &self,
        machine: &str,
        operation: &'static str,
        allowed: &[Power],
        needed: &'static str,
    ) -> Result<(), BackendError> {
        let index = self.placement(machine)?.driver;
        self.drivers[index]
            .power(machine)?
            .require(machine, operation, allowed, needed)
    }

    fn app(&self, app: &str) -> Result<&AppPlace, BackendError> {
        self.apps.get(app).ok_or_else(|| BackendError::Unknown {
            kind: "app",
            name: app.into(),
        })
    }

    /// Signals an app, unless it ended with its machine.
    fn signal_app(&mut self, app: &str, signal: i32) -> Result<(), BackendError> {
        let place = self.app(app)?;
        if !place.alive {
            return Ok(());
        }
        let machine = place.machine.clone();
        self.driver(&machine)?.signal_app(&machine, app, signal)
    }

    /// Apps of a machine that stopped or went back in time end with it.
    fn end_apps_of(&mut self, machine: &str) {
        for app in self.apps.values_mut().filter(|a| a.machine == machine) {
            app.alive = false;
        }
    }

    /// A machine name that is new to the world and safe as a file name.
    fn check_new(&self, machine: &str) -> Result<(), BackendError> {
        BackendError::check_name("machine", machine)?;
        if self.machines.contains_key(machine) {
            return Err(BackendError::Runtime {
                machine: machine.to_string(),
                message: "a machine of this name exists already".into(),
            });
        }
        Ok(())
    }

    /// Places a new machine on a driver and gives it the world's clock and servers.
    fn place(&mut self, spec: &MachineSpec, driver: usize, host: &str) -> Result<(), BackendError> {
        self.machines.insert(
            spec.name.clone(),
            Placement {
                driver,
                host: host.to_string(),
                role: spec.role,
                ip: spec.ip,
                hide_hypervisor: spec.hide_hypervisor,
            },
        );
        self.push_clock(&spec.name)?;
        let servers: Vec<String> = self.servers.keys().cloned().collect();
        for server in servers {
            self.connect_to(&server)?;
        }
        Ok(())
    }

    fn push_clock(&mut self, machine: &str) -> Result<(), BackendError> {
        let skew = self.skews.get(machine).copied().unwrap_or_default();
        let offset = self.fabric.clock.offset_ms().saturating_add(skew);
        self.driver(machine)?.set_clock(machine, offset)
    }

    /// Links every other machine to a server (those linked already keep their link).
    fn connect_to(&mut self, server: &str) -> Result<(), BackendError> {
        let info = self
            .servers
            .get(server)
            .cloned()
            .ok_or_else(|| BackendError::Runtime {
                machine: server.into(),
                message: "server has no address".into(),
            })?;
        let target = listen_addr(server, &info)?;
        let clients: Vec<(String, Ipv4Addr)> = self
            .machines
            .iter()
            .filter(|(name, _)| *name != server)
            .map(|(name, p)| (name.clone(), p.ip))
            .collect();
        for (client, ip) in clients {
            if self.links.connect(&client, server, ip, target)? {
                self.push_servers(&client)?;
            }
        }
        Ok(())
    }

    /// Tells a machine's driver which servers its runtime reaches, through which links: a
    /// triad's members as one server (none to a member of it).
    fn push_servers(&mut self, client: &str) -> Result<(), BackendError> {
        let triad_of = |server: &str| self.triads.iter().find(|t| t.iter().any(|m| m == server));
        let mut links: Vec<ServerLink> = self
            .links
            .of_client(client)
            .filter(|relay| triad_of(&relay.server).is_none())
            .filter_map(|relay| {
                let pin = self.servers.get(&relay.server)?.pin.clone();
                Some(ServerLink::single(relay.local, pin))
            })
            .collect();
        for triad in self
            .triads
            .iter()
            .filter(|t| !t.iter().any(|m| m == client))
        {
            let endpoints: Option<Vec<(SocketAddr, String)>> = triad
                .iter()
                .map(|member| {
                    let relay = self.links.of_client(client).find(|r| &r.server == member)?;
                    Some((relay.local, self.servers.get(member)?.pin.clone()))
                })
                .collect();
            if let Some(endpoints) = endpoints {
                links.push(ServerLink { endpoints });
            }
        }
        self.driver(client)?.set_servers(client, &links)
    }

    /// Runs `meter <args> --json` as the administrator of `machine`; its JSON answer.
    fn admin_json(
        &mut self,
        machine: &str,
        args: &[&str],
    ) -> Result<serde_json::Value, BackendError> {
        let mut full: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
        full.push("--json".into());
        let out = self.driver(machine)?.run_meter(
            machine,
            Caller::Admin,
            &full,
            Duration::from_secs(20),
        )?;
        let answer: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap_or_default();
        if out.code != Some(0) {
            return Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!(
                    "meter {} failed: {}{}",
                    args.join(" "),
                    answer
                        .get("error")
                        .and_then(|e| e.as_str())
                        .unwrap_or_default(),
                    out.stderr.trim()
                ),
            });
        }
        Ok(answer)
    }

    /// Ends a machine's server and the links to it.
    fn drop_server(&mut self, machine: &str) -> Result<(), BackendError> {
        if self.servers.remove(machine).is_none() {
            return Ok(());
        }
        self.links.drop_to(machine);
        let clients: Vec<String> = self.machines.keys().cloned().collect();
        for client in clients.iter().filter(|c| *c != machine) {
            self.push_servers(client)?;
        }
        Ok(())
    }

    /// Every machine that holds the dongle now, and how.
    fn holders(&self, dongle: &str) -> Result<Vec<(String, DongleLink)>, BackendError> {
        self.fabric.dongles.core(dongle)?;
        Ok(self
            .drivers
            .iter()
            .flat_map(|d| d.dongle_holders(dongle))
            .collect())
    }

    /// Takes a dongle from every holder `keep` does not name.
    fn take_dongle(
        &mut self,
        dongle: &str,
        how: Unplug,
        keep: impl Fn(&str, DongleLink) -> bool,
    ) -> Result<(), BackendError> {
        for (machine, link) in self.holders(dongle)? {
            if !keep(&machine, link) {
                self.driver(&machine)?
                    .unplug_dongle(dongle, &machine, how)?;
            }
        }
        Ok(())
    }
}

impl Backend for World {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn describe(&self) -> serde_json::Value {
        let mut out = json!({
            "backend": self.kind.to_string(),
            "runtime": self.config.runtime_bin.display().to_string(),
            "addresses": self.fabric.addresses.network(),
        });
        for driver in &self.drivers {
            if let (Some(all), serde_json::Value::Object(more)) =
                (out.as_object_mut(), driver.describe())
            {
                all.extend(more);
            }
        }
        out
    }

    fn power(&self, machine: &str) -> Result<Power, BackendError> {
        let index = self.placement(machine)?.driver;
        self.drivers[index].power(machine)
    }

    fn host_of(&self, machine: &str) -> Result<String, BackendError> {
        Ok(self.placement(machine)?.host.clone())
    }

    fn machines(&self) -> Vec<String> {
        self.machines.keys().cloned().collect()
    }

    fn add_host(&mut self, host: &HostSpec) -> Result<(), BackendError> {
        self.check_new(&host.name)?;
        let spec = MachineSpec {
            name: host.name.clone(),
            guest: false,
            role: host.role,
            identity: host.identity.clone(),
            cpu: host.cpu.clone(),
            ip: self.fabric.addresses.allocate()?,
            hide_hypervisor: false,
            host: host.name.clone(),
        };
        self.drivers[0].add_machine(&spec)?;
        self.hosts.insert(host.name.clone(), host.clone());
        self.place(&spec, 0, &host.name)
    }

    fn add_guest(&mut self, guest: &GuestSpec) -> Result<(), BackendError> {
        self.check_new(&guest.name)?;
        let cpu = self.host(&guest.host)?.cpu.clone();
        let spec = MachineSpec {
            name: guest.name.clone(),
            guest: true,
            role: guest.role,
            identity: guest.identity.clone(),
            cpu,
            ip: self.fabric.addresses.allocate()?,
            hide_hypervisor: guest.hide_hypervisor,
            host: guest.host.clone(),
        };
        let driver = self.guest_driver;
        self.drivers[driver].add_machine(&spec)?;
        self.place(&spec, driver, &guest.host)
    }

    fn boot(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(machine, "boot", &[Power::Off], "powered off")?;
        let cpu = self.host_cpu(machine)?;
        self.driver(machine)?.boot(machine, &cpu)
    }

    fn shutdown(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(
            machine,
            "shutdown",
            &[Power::Running, Power::Paused],
            "running",
        )?;
        let result = self.driver(machine)?.shutdown(machine);
        self.end_apps_of(machine);
        // A machine that is off serves nobody: its server ends with it.
        self.drop_server(machine)?;
        result
    }

    fn pause(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(machine, "pause", &[Power::Running], "running")?;
        self.driver(machine)?.pause(machine)
    }

    fn resume(&mut self, machine: &str) -> Result<(), BackendError> {
        self.require(machine, "resume", &[Power::Paused], "paused")?;
        self.driver(machine)?.resume(machine)
    }

    fn snapshot(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        BackendError::check_name("snapshot", name)?;
        self.driver(machine)?.snapshot(machine, name)
    }

    fn revert(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        // The restored configuration has the devices it had when saved: its dongles come back
        // from wherever they went since.
        let index = self.placement(machine)?.driver;
        for dongle in self.drivers[index].snapshot_dongles(machine, name)? {
            self.take_dongle(&dongle, Unplug::Clean, |holder, link| {
                holder == machine && link == DongleLink::Usb
            })?;
        }
        self.end_apps_of(machine);
        self.driver(machine)?.revert(machine, name)
    }

    fn clone_guest(
        &mut self,
        from: &str,
        to: &str,
        host: &str,
        identity: CloneIdentity,
    ) -> Result<(), BackendError> {
        self.check_new(to)?;
        let (driver, role, hide_hypervisor) = {
            let source = self.placement(from)?;
            (source.driver, source.role, source.hide_hypervisor)
        };
        let spec = MachineSpec {
            name: to.to_string(),
            guest: true,
            role,
            identity: self.mint.guest_identity(to),
            cpu: self.host(host)?.cpu.clone(),
            ip: self.fabric.addresses.allocate()?,
            hide_hypervisor,
            host: host.to_string(),
        };
        self.drivers[driver].clone_machine(from, &spec, identity)?;
        self.place(&spec, driver, host)
    }

    fn migrate(&mut self, machine: &str, host: &str) -> Result<(), BackendError> {
        self.require(machine, "migrate", &[Power::Running], "running")?;
        self.host(host)?;
        self.driver(machine)?.migrate(machine, host)?;
        if let Some(p) = self.machines.get_mut(machine) {
            p.host = host.to_string();
        }
        // The guest's clock kept running through the move; the world's too.
        self.push_clock(machine)
    }

    fn move_guest(&mut self, machine: &str, host: &str) -> Result<(), BackendError> {
        self.host(host)?;
        if self.power(machine)? != Power::Off {
            self.shutdown(machine)?;
        }
        self.driver(machine)?.move_machine(machine, host)?;
        if let Some(p) = self.machines.get_mut(machine) {
            p.host = host.to_string();
        }
        Ok(())
    }

    fn replace_nic(&mut self, machine: &str) -> Result<(), BackendError> {
        let mac = self.mint.mac(&format!("{machine}-replacement"));
        self.driver(machine)?.replace_nic(machine, mac)
    }

    fn open_session(
        &mut self,
        machine: &str,
        session: &str,
        spec: &SessionSpec,
    ) -> Result<(), BackendError> {
        self.require(machine, "session-open", &[Power::Running], "running")?;
        BackendError::check_name("session", session)?;
        self.driver(machine)?.open_session(machine, session, spec)
    }

    fn close_session(&mut self, machine: &str, session: &str) -> Result<(), BackendError> {
        self.driver(machine)?.close_session(machine, session)
    }

    fn run_meter(
        &mut self,
        machine: &str,
        caller: Caller<'_>,
        args: &[String],
        timeout: Duration,
    ) -> Result<CommandOutput, BackendError> {
        self.require(machine, "run meter", &[Power::Running], "running")?;
        self.driver(machine)?
            .run_meter(machine, caller, args, timeout)
    }

    fn start_app(
        &mut self,
        machine: &str,
        session: &str,
        app: &str,
        args: &[String],
        leaves_session: bool,
    ) -> Result<(), BackendError> {
        self.require(machine, "start-app", &[Power::Running], "running")?;
        BackendError::check_name("app", app)?;
        self.driver(machine)?
            .start_app(machine, session, app, args, leaves_session)?;
        self.apps.insert(
            app.to_string(),
            AppPlace {
                machine: machine.to_string(),
                alive: true,
            },
        );
        Ok(())
    }

    fn app_output(&mut self, app: &str) -> Result<Vec<String>, BackendError> {
        let place = self.app(app)?;
        let (machine, alive) = (place.machine.clone(), place.alive);
        match self.driver(&machine)?.app_output(&machine, app) {
            // An app that ended with its machine may have left nothing to read.
            Err(BackendError::Unknown { .. }) if !alive => Ok(Vec::new()),
            other => other,
        }
    }

    fn app_status(&mut self, app: &str) -> Result<AppStatus, BackendError> {
        let place = self.app(app)?;
        if !place.alive {
            return Ok(AppStatus::Exited {
                code: None,
                signal: Some(libc::SIGKILL),
            });
        }
        let machine = place.machine.clone();
        self.driver(&machine)?.app_status(&machine, app)
    }

    fn terminate_app(&mut self, app: &str) -> Result<(), BackendError> {
        self.signal_app(app, libc::SIGTERM)
    }

    fn kill_app(&mut self, app: &str) -> Result<(), BackendError> {
        self.signal_app(app, libc::SIGKILL)
    }

    fn set_clock(
        &mut self,
        world_offset: i64,
        skews: &[(String, i64)],
    ) -> Result<(), BackendError> {
        for (machine, _) in skews {
            self.placement(machine)?;
        }
        self.fabric.clock.set_offset_ms(world_offset);
        self.skews.extend(skews.iter().cloned());
        let names: Vec<String> = self.machines.keys().cloned().collect();
        for name in names {
            self.push_clock(&name)?;
        }
        Ok(())
    }

    fn start_server(
        &mut self,
        machine: &str,
        settings: ServerSettings,
    ) -> Result<ServerInfo, BackendError> {
        self.require(machine, "server-start", &[Power::Running], "running")?;
        let info = self.driver(machine)?.start_server(machine, settings)?;
        self.servers.insert(machine.to_string(), info.clone());
        self.connect_to(machine)?;
        Ok(info)
    }

    fn stop_server(&mut self, machine: &str) -> Result<(), BackendError> {
        // The driver first: a stop it refuses leaves the server and its links as they were.
        self.driver(machine)?.stop_server(machine)?;
        self.drop_server(machine)
    }

    fn crash_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.serving(machine)?;
        self.driver(machine)?.crash_server(machine)
    }

    fn pause_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.serving(machine)?;
        self.driver(machine)?.pause_server(machine)
    }

    fn resume_server(&mut self, machine: &str) -> Result<(), BackendError> {
        self.serving(machine)?;
        self.driver(machine)?.resume_server(machine)
    }

    fn form_triad(&mut self, members: &[String]) -> Result<(), BackendError> {
        // Each member's triad port is its server's port + 1; each reaches the others through
        // links of its own, so partitions cut them as they cut clients.
        let mut places = Vec::new();
        for member in members {
            self.require(member, "triad", &[Power::Running], "running")?;
            let info = self
                .servers
                .get(member)
                .ok_or_else(|| BackendError::Runtime {
                    machine: member.clone(),
                    message: "runs no network server (start one with server-start first)".into(),
                })?;
            let listen = listen_addr(member, info)?;
            let port = listen
                .port()
                .checked_add(1)
                .ok_or_else(|| BackendError::Runtime {
                    machine: member.clone(),
                    message: "a server on port 65535 leaves no triad port".into(),
                })?;
            let ip = self.placement(member)?.ip;
            let own = SocketAddr::new(info.bind.ip(), port);
            places.push((
                member.clone(),
                ip,
                own,
                SocketAddr::new(listen.ip(), port),
                info.pin.clone(),
            ));
        }
        for (from, ip, own, _, _) in &places {
            let mut args = vec!["triad".to_string(), "join".to_string()];
            for (to, _, _, target, pin) in &places {
                let reach = if to == from {
                    *own
                } else {
                    let via = self.links.connect_member(from, to, *ip, *target)?;
                    self.driver(from)?.reach(from, via)
                };
                args.push(format!("{pin}@{reach}"));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.admin_json(from, &args)?;
        }
        self.triads.push(members.to_vec());
        // The first member leads once all three are up (its election comes first).
        let first = members[0].clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.admin_json(&first, &["triad", "status"])?;
            if status.get("leads").and_then(|l| l.as_bool()) == Some(true) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(BackendError::Runtime {
                    machine: first,
                    message: format!("the triad elected no leader within 20 s: {status}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let clients: Vec<String> = self.machines.keys().cloned().collect();
        for client in clients {
            self.push_servers(&client)?;
        }
        Ok(())
    }

    fn triad_history(&mut self, member: &str) -> Result<serde_json::Value, BackendError> {
        self.admin_json(member, &["triad", "status", "--history"])
    }

    fn partition(&mut self, a: &[String], b: &[String], reset: bool) -> Result<(), BackendError> {
        self.links.partition(a, b, reset);
        Ok(())
    }

    fn heal(&mut self, machines: &[String]) -> Result<(), BackendError> {
        self.links.heal(machines);
        Ok(())
    }

    fn impersonate(
        &mut self,
        machine: &str,
        name: &str,
        runtime_id: Option<&str>,
    ) -> Result<(), BackendError> {
        self.require(machine, "impersonate", &[Power::Running], "running")?;
        self.driver(machine)?.impersonate(machine, name, runtime_id)
    }

    fn drop_session_table(&mut self, machine: &str) -> Result<(), BackendError> {
        self.driver(machine)?.drop_session_table(machine)
    }

    fn save_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        BackendError::check_name("state copy", name)?;
        self.require(machine, "state-save", &[Power::Running], "running")?;
        self.driver(machine)?.save_state(machine, name)
    }

    fn restore_state(&mut self, machine: &str, name: &str) -> Result<(), BackendError> {
        BackendError::check_name("state copy", name)?;
        self.require(machine, "state-restore", &[Power::Running], "running")?;
        self.driver(machine)?.restore_state(machine, name)
    }

    fn flood(&mut self, from: &str, to: &str, connections: u32) -> Result<usize, BackendError> {
        let source = self.placement(from)?.ip;
        let info = self.servers.get(to).ok_or_else(|| BackendError::Runtime {
            machine: to.into(),
            message: "runs no network server".into(),
        })?;
        let target = listen_addr(to, info)?;
        self.floods.open(source, target, connections)
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
        for machine in machines {
            self.placement(machine)?;
        }
        if mode == UsbMode::Exclusive {
            // Passing a device through exclusively takes it away from wherever it was.
            self.take_dongle(dongle, Unplug::Clean, |holder, link| {
                link == DongleLink::Usb && machines.iter().any(|m| m == holder)
            })?;
        } else {
            // A shared attach only adds machines; the dongle must exist all the same.
            self.fabric.dongles.core(dongle)?;
        }
        for machine in machines {
            self.driver(machine)?.plug_dongle(dongle, machine)?;
        }
        Ok(())
    }

    fn usb_detach(&mut self, dongle: &str) -> Result<(), BackendError> {
        self.take_dongle(dongle, Unplug::Clean, |_, _| false)
    }

    fn usbip_attach(&mut self, dongle: &str, machine: &str) -> Result<(), BackendError> {
        // An import is made by the machine's running kernel.
        self.require(machine, "usbip-attach", &[Power::Running], "running")?;
        // A USB/IP export has one importer: the dongle leaves every other machine.
        self.take_dongle(dongle, Unplug::Clean, |holder, link| {
            holder == machine && link == DongleLink::Usbip
        })?;
        self.driver(machine)?.import_dongle(dongle, machine)
    }

    fn usbip_detach(&mut self, dongle: &str) -> Result<(), BackendError> {
        self.take_dongle(dongle, Unplug::Clean, |_, link| link != DongleLink::Usbip)
    }

    fn usbip_disconnect(&mut self, dongle: &str) -> Result<(), BackendError> {
        self.take_dongle(dongle, Unplug::Cut, |_, link| link != DongleLink::Usbip)
    }

    fn usb_hang(&mut self, dongle: &str) -> Result<(), BackendError> {
        // Every path (sim socket, usbredir, USB/IP) reaches the same firmware.
        self.fabric.dongles.hang(dongle)
    }

    fn dongle_machines(&self, dongle: &str) -> Vec<String> {
        let mut machines: Vec<String> = self
            .holders(dongle)
            .unwrap_or_default()
            .into_iter()
            .map(|(machine, _)| machine)
            .collect();
        machines.dedup();
        machines
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
        self.driver(machine)?.put_file(machine, name, contents)
    }

    fn get_file(&mut self, machine: &str, path: &str) -> Result<Vec<u8>, BackendError> {
        self.driver(machine)?.get_file(machine, path)
    }

    fn teardown(&mut self) -> Result<(), BackendError> {
        self.links.stop_all();
        self.floods.close_all();
        let mut first_error = None;
        for driver in &mut self.drivers {
            if let Err(e) = driver.teardown() {
                first_error.get_or_insert(e);
            }
        }
        self.fabric.dongles.clear();
        first_error.map_or(Ok(()), Err)
    }

    fn log_dir(&self) -> PathBuf {
        self.config.log_dir.clone()
    }
}
