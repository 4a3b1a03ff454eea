//! Guests as domains of libvirt daemons, one private daemon per simulated host: the guest
//! driver's starts, snapshots, reverts, copies and moves go through libvirt's API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::domain_snapshot::DomainSnapshot;

use super::cpu_model;
use super::daemon::{DaemonError, HostDaemon, LIBVIRTD};
use super::domain_xml::DomainSpec;
use super::running::DomainVm;
use crate::backend::guest::agent::AgentClient;
use crate::backend::guest::hypervisor::{
    Hypervisor, LaunchSpec, Migrated, RunningGuest, copy_disk_file, run_qemu_img,
};
use crate::backend::guest::image::{self, Accelerator, MEMORY_MIB, guid};
use crate::backend::types::{BackendError, BackendKind, WorldConfig};

/// How long a started domain's agent socket may take to appear.
const AGENT_CONNECT: Duration = Duration::from_secs(30);

/// One host's daemon and the harness's connection to it.
struct Host {
    /// Closed before the daemon stops (fields drop in order).
    connection: Connect,
    daemon: HostDaemon,
}

/// libvirt daemons, one per host that has guests.
pub struct LibvirtHypervisor {
    image_dir: PathBuf,
    accelerator: Accelerator,
    /// Where each host's daemon keeps its folders.
    hosts_dir: PathBuf,
    log_dir: PathBuf,
    seed: u64,
    hosts: BTreeMap<String, Host>,
    /// Guest → the host whose daemon has its domain.
    placement: BTreeMap<String, String>,
    /// Guest → its log folder (libvirt's QEMU log is copied there at the end).
    logs: BTreeMap<String, PathBuf>,
    /// CPU features every guest is given without (what TCG lacks; none under KVM).
    disabled_features: Vec<String>,
    /// The daemons' logs kept in the run's log folder at the end.
    daemon_logs: Vec<PathBuf>,
}

/// Why the libvirt backend cannot run here, if it cannot.
pub fn missing_prerequisite(image_dir: &Path) -> Option<String> {
    if !super::daemon::installed() {
        return Some(DaemonError::NotInstalled.to_string());
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Some(DaemonError::NotRoot.to_string());
    }
    image::missing_qemu_or_image(image_dir)
}

impl LibvirtHypervisor {
    /// Checks libvirtd, root, QEMU and the image; no daemon runs until a host has a guest.
    pub fn detect(config: &WorldConfig) -> Result<LibvirtHypervisor, BackendError> {
        let image_dir = image::image_dir();
        if let Some(why) = missing_prerequisite(&image_dir) {
            return Err(BackendError::Unsupported {
                backend: BackendKind::Libvirt,
                operation: "start",
                why,
            });
        }
        let accelerator = Accelerator::detect();
        let disabled_features = if accelerator.name == "kvm" {
            Vec::new()
        } else {
            cpu_model::tcg_disabled_features()
        };
        Ok(LibvirtHypervisor {
            image_dir,
            accelerator,
            disabled_features,
            hosts_dir: config.work_dir.join("libvirt"),
            log_dir: config.log_dir.clone(),
            seed: config.seed,
            hosts: BTreeMap::new(),
            placement: BTreeMap::new(),
            logs: BTreeMap::new(),
            daemon_logs: Vec::new(),
        })
    }

    /// The host's daemon, started at its first guest.
    fn host(&mut self, host: &str) -> Result<&Host, BackendError> {
        if !self.hosts.contains_key(host) {
            let dir = self.hosts_dir.join(format!("{:02}", self.hosts.len()));
            let uuid = host_uuid(self.seed, host);
            let daemon = HostDaemon::start_with_cache(&dir, &uuid, Some(&shared_cache()))
                .map_err(|e| daemon_error(host, e))?;
            let connection = daemon.connect().map_err(|e| daemon_error(host, e))?;
            tracing::info!(host, uuid, uri = daemon.uri(), "libvirt daemon started");
            self.hosts
                .insert(host.to_string(), Host { connection, daemon });
        }
        Ok(&self.hosts[host])
    }

    /// The host a guest is placed on.
    fn placed(&self, guest: &str) -> Result<String, BackendError> {
        self.placement
            .get(guest)
            .cloned()
            .ok_or_else(|| BackendError::Unknown {
                kind: "machine",
                name: guest.to_string(),
            })
    }

    /// The guest's domain on its host's daemon, if it was defined there.
    fn domain(&mut self, guest: &str) -> Result<Option<Domain>, BackendError> {
        let host = self.placed(guest)?;
        Ok(self
            .host(&host)?
            .connection
            .lookup_domain_by_name(guest)
            .ok())
    }

    fn qemu_log(&self, guest: &str) -> PathBuf {
        self.placement
            .get(guest)
            .and_then(|host| self.hosts.get(host))
            .map(|h| h.daemon.qemu_log(guest))
            .unwrap_or_default()
    }

    /// The domain XML of a start of `spec` with generation id `genid` (a GUID).
    fn domain_xml(&self, spec: &LaunchSpec, genid: String) -> String {
        self.domain_spec(spec, genid).xml()
    }

    /// The domain of a start of `spec` with generation id `genid` (a GUID).
    fn domain_spec(&self, spec: &LaunchSpec, genid: String) -> DomainSpec {
        DomainSpec {
            name: spec.name.clone(),
            uuid: spec.identity.product_uuid.clone(),
            system_serial: spec.identity.product_serial.clone(),
            board_serial: spec.identity.board_serial.clone(),
            mac: spec.identity.macs.first().cloned(),
            disk_serial: spec.identity.disk_serials.first().cloned(),
            genid: Some(genid),
            memory_mib: MEMORY_MIB,
            domain_type: if self.accelerator.name == "kvm" {
                "kvm"
            } else {
                "qemu"
            },
            cpu_model: cpu_model::named_model(&spec.cpu).to_string(),
            cpu_vendor_id: cpu_model::vendor_id(&spec.cpu),
            hide_hypervisor: spec.hide_hypervisor,
            disabled_features: self.disabled_features.clone(),
            kernel: image::guest_kernel(&self.image_dir).1,
            initrd: image::image_file(&self.image_dir, "initramfs.cpio"),
            cmdline: image::kernel_cmdline(spec),
            disk: spec.disk.clone(),
            agent_socket: spec.agent_socket(),
            serial_log: spec.serial_log(),
            runtime_disk: spec.runtime_disk.clone(),
            usb: spec.usb.clone(),
        }
    }

    /// Defines (or redefines) the guest's domain from `spec`, with the generation id the
    /// driver keeps for it (the one libvirt gave at the last revert, or a new one after a revert
    /// of a stopped guest).
    fn define(&mut self, spec: &LaunchSpec) -> Result<(Domain, PathBuf), BackendError> {
        let host = self.placed(&spec.name)?;
        let existing = self.domain(&spec.name)?;
        let xml = self.domain_xml(spec, guid(&spec.vmgenid));
        let xml_file = write_domain_xml(spec, &xml)?;
        let connection = &self.host(&host)?.connection;
        if existing.is_none()
            && let Ok(twin) = connection.lookup_domain_by_uuid_string(&spec.identity.product_uuid)
        {
            return Err(BackendError::Unsupported {
                backend: BackendKind::Libvirt,
                operation: "define a guest",
                why: format!(
                    "{} has the SMBIOS UUID of {} on host {host}, and libvirt keys a host's \
                     domains by that UUID: a perfect copy must go to another host",
                    spec.name,
                    twin.name().unwrap_or_default()
                ),
            });
        }
        let domain = connection
            .define_domain_xml(&xml)
            .map_err(|e| refused(&spec.name, "define the domain", e, &xml_file))?;
        Ok((domain, xml_file))
    }

    /// Connects to a started domain's agent (its socket is the one its live XML names: a
    /// revert brings back the snapshot's).
    fn attach(
        &mut self,
        domain: Domain,
        spec: LaunchSpec,
        xml_file: PathBuf,
    ) -> Result<DomainVm, BackendError> {
        let socket = domain
            .xml_desc(0)
            .ok()
            .and_then(|xml| agent_socket_of(&xml))
            .unwrap_or_else(|| spec.agent_socket());
        let qemu_log = self.qemu_log(&spec.name);
        self.logs.insert(spec.name.clone(), spec.log_dir.clone());
        let started = std::time::Instant::now();
        let connected = AgentClient::connect(&socket, AGENT_CONNECT);
        tracing::info!(
            guest = %spec.name,
            ms = started.elapsed().as_millis() as u64,
            "agent socket connected"
        );
        match connected {
            Ok(agent) => Ok(DomainVm {
                domain,
                agent,
                spec,
                qemu_log,
                xml_file,
            }),
            Err(e) => {
                let _ = domain.destroy();
                Err(DomainVm::failure_of(
                    &spec,
                    &qemu_log,
                    &xml_file,
                    &e.to_string(),
                ))
            }
        }
    }

    /// The snapshot `name` of `spec`'s guest, its definition given the CPU the guest's host
    /// gives it now: a guest sees its host's CPU, also after a revert to a snapshot taken on
    /// another host (libvirt would bring the snapshot's CPU back, and a later migration would
    /// be refused for a CPU the world does not give the guest).
    fn snapshot_on_this_host(
        &mut self,
        spec: &LaunchSpec,
        name: &str,
    ) -> Result<DomainSnapshot, BackendError> {
        let snapshot = self.snapshot_of(&spec.name, name)?;
        let cpu = self.domain_spec(spec, guid(&spec.vmgenid)).cpu_xml();
        let definition = snapshot
            .xml_desc(virt::sys::VIR_DOMAIN_SNAPSHOT_XML_SECURE)
            .map_err(|e| refused_plain(&spec.name, "read the snapshot", e))?;
        let aligned = with_cpu(&definition, &cpu);
        if aligned == definition {
            return Ok(snapshot);
        }
        let domain = snapshot
            .domain()
            .map_err(|e| refused_plain(&spec.name, "find the snapshot's domain", e))?;
        // Its metadata is replaced whole (set aside, then defined again), as a migration
        // carries it; the snapshot's state in the disk is untouched.
        snapshot
            .delete(virt::sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
            .map_err(|e| refused_plain(&spec.name, "set the snapshot aside", e))?;
        domain
            .create_snapshot_xml(&aligned, virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
            .map_err(|e| {
                // The snapshot as it was, rather than none.
                let _ = domain.create_snapshot_xml(
                    &definition,
                    virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE,
                );
                refused_plain(&spec.name, "give the snapshot this host's CPU", e)
            })
    }

    fn snapshot_of(&mut self, guest: &str, name: &str) -> Result<DomainSnapshot, BackendError> {
        let domain = self.domain(guest)?.ok_or_else(|| BackendError::Unknown {
            kind: "snapshot",
            name: name.to_string(),
        })?;
        Domain::lookup_snapshot_by_name(&domain, name, 0).map_err(|_| BackendError::Unknown {
            kind: "snapshot",
            name: name.to_string(),
        })
    }
}

impl Hypervisor for LibvirtHypervisor {
    type Vm = DomainVm;

    fn kind(&self) -> BackendKind {
        BackendKind::Libvirt
    }

    fn accelerator(&self) -> &'static str {
        self.accelerator.name
    }

    fn image_dir(&self) -> &Path {
        &self.image_dir
    }

    fn describe(&self) -> serde_json::Value {
        let version = std::process::Command::new(LIBVIRTD)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let daemons: BTreeMap<&String, serde_json::Value> = self
            .hosts
            .iter()
            .map(|(host, h)| {
                (
                    host,
                    json!({"uri": h.daemon.uri(), "host_uuid": h.daemon.host_uuid()}),
                )
            })
            .collect();
        json!({
            "accelerator": self.accelerator.name,
            "accelerator_reason": self.accelerator.reason,
            "guest_kernel": image::guest_kernel(&self.image_dir).0,
            "libvirt": version,
            "qemu": crate::capabilities::version_of(image::QEMU),
            "daemons": daemons,
        })
    }

    fn add_guest(&mut self, guest: &str, host: &str) -> Result<(), BackendError> {
        self.host(host)?;
        self.placement.insert(guest.to_string(), host.to_string());
        Ok(())
    }

    fn launch(&mut self, spec: LaunchSpec) -> Result<DomainVm, BackendError> {
        for dir in [&spec.run_dir, &spec.log_dir] {
            std::fs::create_dir_all(dir)
                .map_err(BackendError::io(format!("create {}", dir.display())))?;
        }
        match spec.loadvm.clone() {
            Some(name) => {
                let snapshot = self.snapshot_on_this_host(&spec, &name)?;
                let xml_file = spec.log_dir.join("libvirt-domain.xml");
                // libvirt restores the snapshot's definition and gives it a new generation id.
                let started = std::time::Instant::now();
                snapshot
                    .revert(virt::sys::VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
                    .map_err(|e| refused(&spec.name, "revert to the snapshot", e, &xml_file))?;
                tracing::info!(
                    guest = %spec.name,
                    snapshot = %name,
                    ms = started.elapsed().as_millis() as u64,
                    "libvirt reverted the domain"
                );
                let domain = snapshot
                    .domain()
                    .map_err(|e| refused(&spec.name, "find the reverted domain", e, &xml_file))?;
                self.attach(domain, spec, xml_file)
            }
            None => {
                let started = std::time::Instant::now();
                let (domain, xml_file) = self.define(&spec)?;
                domain
                    .create()
                    .map_err(|e| refused(&spec.name, "start the domain", e, &xml_file))?;
                tracing::info!(
                    guest = %spec.name,
                    ms = started.elapsed().as_millis() as u64,
                    "libvirt started the domain"
                );
                self.attach(domain, spec, xml_file)
            }
        }
    }

    fn snapshot(
        &mut self,
        spec: &LaunchSpec,
        vm: Option<&mut DomainVm>,
        name: &str,
    ) -> Result<(), BackendError> {
        let domain = match vm {
            Some(vm) => vm.domain.clone(),
            None => match self.domain(&spec.name)? {
                Some(domain) => domain,
                // Never started: the domain is defined to hold the snapshot.
                None => self.define(spec)?.0,
            },
        };
        // A snapshot of an existing name replaces it (as QEMU's savevm does).
        if let Ok(old) = Domain::lookup_snapshot_by_name(&domain, name, 0) {
            old.delete(0)
                .map_err(|e| refused_plain(&spec.name, "replace the snapshot", e))?;
        }
        domain
            .create_snapshot_xml(&snapshot_xml(name), 0)
            .map(drop)
            .map_err(|e| refused_plain(&spec.name, "take the snapshot", e))
    }

    fn revert_stopped(&mut self, spec: &LaunchSpec, name: &str) -> Result<(), BackendError> {
        let snapshot = self.snapshot_of(&spec.name, name)?;
        let running_state = snapshot
            .xml_desc(0)
            .map(|xml| !xml.contains("<state>shutoff</state>"))
            .unwrap_or(true);
        if running_state {
            // libvirt would start the guest to restore a running state (its dongles would
            // connect to their servers meanwhile); the stopped guest only needs its disk back,
            // which is what libvirt itself does for a snapshot of a stopped domain.
            run_qemu_img(&["snapshot", "-a", name], &spec.disk)
        } else {
            snapshot
                .revert(0)
                .map_err(|e| refused_plain(&spec.name, "revert to the snapshot", e))
        }
    }

    fn copy_disk(
        &mut self,
        spec: &LaunchSpec,
        vm: Option<&mut DomainVm>,
        target: &Path,
    ) -> Result<(), BackendError> {
        let copy = || copy_disk_file(spec, target);
        let Some(vm) = vm else {
            return copy();
        };
        // The guest is frozen and a temporary snapshot flushes QEMU's caches to the file.
        let tag = format!("vigil-copy-{}", spec.name);
        let running = vm
            .domain
            .state()
            .is_ok_and(|(state, _)| state.is(virt::domain::DomainState::Running));
        if running {
            vm.domain
                .suspend()
                .map_err(|e| refused_plain(&spec.name, "suspend the domain", e))?;
        }
        let copied = vm
            .domain
            .create_snapshot_xml(&snapshot_xml(&tag), 0)
            .map_err(|e| refused_plain(&spec.name, "take the copy's snapshot", e))
            .and_then(|snapshot| {
                let copied = copy();
                let _ = snapshot.delete(0);
                copied
            });
        if running {
            vm.domain
                .resume()
                .map_err(|e| refused_plain(&spec.name, "resume the domain", e))?;
        }
        copied?;
        run_qemu_img(&["snapshot", "-d", &tag], target)
    }

    fn migrate(
        &mut self,
        source: &mut DomainVm,
        destination: LaunchSpec,
        host: &str,
    ) -> Result<Migrated<DomainVm>, BackendError> {
        let from = self.placed(&destination.name)?;
        if from == host {
            return Err(BackendError::Unsupported {
                backend: BackendKind::Libvirt,
                operation: "migrate",
                why: format!(
                    "{} is on {host} already; libvirt migrates between two hosts' daemons",
                    destination.name
                ),
            });
        }
        std::fs::create_dir_all(&destination.run_dir).map_err(BackendError::io(format!(
            "create {}",
            destination.run_dir.display()
        )))?;
        // The destination runs the same generation id (a migration is not a revert) with its
        // own agent socket (the source keeps its own until the move completes).
        let genid = source
            .generation_id()
            .unwrap_or_else(|| destination.vmgenid.clone());
        let xml = self.domain_xml(&destination, guid(&genid));
        let xml_file = write_domain_xml(&destination, &xml)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BackendError::io("find a port for the migration stream"))?
            .port();
        let flags = virt::sys::VIR_MIGRATE_LIVE
            | virt::sys::VIR_MIGRATE_UNSAFE
            | virt::sys::VIR_MIGRATE_PERSIST_DEST
            | virt::sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        // libvirt migrates no domain with snapshot metadata: it leaves with the definition and
        // comes back on the destination (the snapshots themselves are in the shared disk).
        let snapshots = snapshot_definitions(&source.domain);
        for snapshot in source.domain.list_all_snapshots(0).unwrap_or_default() {
            snapshot
                .delete(virt::sys::VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                .map_err(|e| refused_plain(&destination.name, "set the snapshots aside", e))?;
        }
        let target = &self.host(host)?.connection;
        let started = std::time::Instant::now();
        let migrated = source.domain.migrate2(
            target,
            Some(&xml),
            flags,
            None,
            Some(&format!("tcp:127.0.0.1:{port}")),
            0,
        );
        let moved = match migrated {
            Ok(moved) => moved,
            Err(e) => {
                redefine_snapshots(&source.domain, &snapshots, &destination.name)?;
                return Err(source.failure(&format!("libvirt refused the live migration: {e}")));
            }
        };
        redefine_snapshots(&moved, &snapshots, &destination.name)?;
        tracing::info!(
            guest = %destination.name,
            host,
            ms = started.elapsed().as_millis() as u64,
            "libvirt migrated the domain"
        );
        let downtime_ms = moved
            .job_stats(virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
            .ok()
            .and_then(|stats| stats.downtime)
            .map(|ms| ms as f64);
        self.placement
            .insert(destination.name.clone(), host.to_string());
        let vm = self.attach(moved, destination, xml_file)?;
        Ok(Migrated { vm, downtime_ms })
    }

    fn move_guest(&mut self, guest: &str, host: &str) -> Result<(), BackendError> {
        let from = self.placed(guest)?;
        if from == host {
            return Ok(());
        }
        if let Some(domain) = self.domain(guest)? {
            // The definition and its snapshots' metadata move; the disk (and the snapshots in
            // it) is one file both hosts see.
            let xml = domain
                .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(|e| refused_plain(guest, "read the domain", e))?;
            let snapshots = snapshot_definitions(&domain);
            let target = &self.host(host)?.connection;
            let moved = target
                .define_domain_xml(&xml)
                .map_err(|e| refused_plain(guest, "define the domain on its new host", e))?;
            redefine_snapshots(&moved, &snapshots, guest)?;
            domain
                .undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
                .map_err(|e| refused_plain(guest, "undefine the domain on its old host", e))?;
        }
        self.placement.insert(guest.to_string(), host.to_string());
        Ok(())
    }

    fn own_steps_ms(&self) -> BTreeMap<&'static str, Vec<f64>> {
        let mut steps: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for log in &self.daemon_logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            for (step, ms) in super::start_steps::step_durations(&text) {
                steps.entry(step).or_default().extend(ms);
            }
        }
        steps
    }

    fn teardown(&mut self) {
        for (guest, log_dir) in &self.logs {
            let log = self.qemu_log(guest);
            let _ = std::fs::copy(&log, log_dir.join("libvirt-qemu.log"));
        }
        for (host, mut h) in std::mem::take(&mut self.hosts) {
            let kept = self.log_dir.join(format!("libvirtd-{host}.log"));
            if std::fs::copy(h.daemon.log_file(), &kept).is_ok() {
                self.daemon_logs.push(kept);
            }
            drop(h.connection);
            if let Err(e) = h.daemon.stop() {
                tracing::warn!(host, error = %e, "libvirt daemon not stopped cleanly");
            }
        }
    }
}

/// libvirt's cache shared by every run's daemons on this machine: `VIGIL_LIBVIRT_CACHE`, else
/// `vigil-libvirt-cache` in the temporary folder.
fn shared_cache() -> PathBuf {
    std::env::var_os("VIGIL_LIBVIRT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("vigil-libvirt-cache"))
}

/// A domain's snapshot definitions, parents first.
fn snapshot_definitions(domain: &Domain) -> Vec<String> {
    domain
        .list_all_snapshots(virt::sys::VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL)
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s.xml_desc(virt::sys::VIR_DOMAIN_SNAPSHOT_XML_SECURE).ok())
        .collect()
}

/// Gives `domain` the snapshot metadata `definitions` (parents first) again.
fn redefine_snapshots(
    domain: &Domain,
    definitions: &[String],
    guest: &str,
) -> Result<(), BackendError> {
    for definition in definitions {
        domain
            .create_snapshot_xml(definition, virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
            .map_err(|e| refused_plain(guest, "carry a snapshot along", e))?;
    }
    Ok(())
}

/// Where the first `<cpu>` element of `xml` starts and ends.
fn cpu_span(xml: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    loop {
        let start = from + xml[from..].find("<cpu")?;
        let after = &xml[start + "<cpu".len()..];
        if after.starts_with([' ', '>', '/']) {
            let tag_end = start + xml[start..].find('>')? + 1;
            if xml[..tag_end].ends_with("/>") {
                return Some((start, tag_end));
            }
            let end = tag_end + xml[tag_end..].find("</cpu>")? + "</cpu>".len();
            return Some((start, end));
        }
        from = start + "<cpu".len();
    }
}

/// `definition` (a snapshot's) with each of its domains' `<cpu>` elements replaced by `cpu`.
fn with_cpu(definition: &str, cpu: &str) -> String {
    let mut out = String::with_capacity(definition.len());
    let mut rest = definition;
    while let Some((start, end)) = cpu_span(rest) {
        out.push_str(&rest[..start]);
        out.push_str(cpu);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A snapshot definition with only its name (libvirt takes an internal snapshot of a qcow2
/// disk, with the running state when the domain runs).
fn snapshot_xml(name: &str) -> String {
    format!("<domainsnapshot><name>{name}</name></domainsnapshot>")
}

/// The host UUID of a host's daemon: stable for a world's seed and the host's name.
fn host_uuid(seed: u64, host: &str) -> String {
    let d: [u8; 32] = Sha256::digest(format!("libvirt-host:{seed}:{host}")).into();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    guid(&h)
}

/// Writes the domain XML beside the guest's logs; returns where.
fn write_domain_xml(spec: &LaunchSpec, xml: &str) -> Result<PathBuf, BackendError> {
    std::fs::create_dir_all(&spec.log_dir).map_err(BackendError::io(format!(
        "create {}",
        spec.log_dir.display()
    )))?;
    let file = spec.log_dir.join("libvirt-domain.xml");
    std::fs::write(&file, xml).map_err(BackendError::io(format!("write {}", file.display())))?;
    Ok(file)
}

/// The Unix socket of the agent's channel (`vigil`) in a domain's XML.
fn agent_socket_of(xml: &str) -> Option<PathBuf> {
    xml.split("<channel ")
        .skip(1)
        .filter_map(|rest| rest.split("</channel>").next())
        .find(|channel| channel.contains("name='vigil'"))
        .and_then(|channel| {
            let start = channel.find("path='")? + "path='".len();
            let end = start + channel[start..].find('\'')?;
            Some(PathBuf::from(
                channel[start..end]
                    .replace("&apos;", "'")
                    .replace("&quot;", "\"")
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&amp;", "&"),
            ))
        })
}

fn daemon_error(host: &str, e: DaemonError) -> BackendError {
    BackendError::Runtime {
        machine: host.to_string(),
        message: format!("the host's libvirt daemon: {e}"),
    }
}

fn refused(guest: &str, what: &str, e: virt::error::Error, xml_file: &Path) -> BackendError {
    BackendError::Runtime {
        machine: guest.to_string(),
        message: format!(
            "libvirt refused to {what}: {e} (domain XML: {})",
            xml_file.display()
        ),
    }
}

fn refused_plain(guest: &str, what: &str, e: virt::error::Error) -> BackendError {
    BackendError::Runtime {
        machine: guest.to_string(),
        message: format!("libvirt refused to {what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_socket_and_generation_id_are_read_from_live_xml() {
        let xml = "<domain><genid>0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a</genid>\n\
            <channel type='unix'>\n<source mode='bind' path='/g/run-2/qga.sock'/>\n\
            <target type='virtio' name='org.qemu.guest_agent.0'/>\n</channel>\n\
            <channel type='unix'>\n<source mode='bind' path='/g/run-1/agent.sock'/>\n\
            <target type='virtio' name='vigil' state='connected'/>\n</channel></domain>";
        assert_eq!(
            agent_socket_of(xml),
            Some(PathBuf::from("/g/run-1/agent.sock"))
        );
        assert_eq!(
            super::super::domain_xml::genid_of(xml).as_deref(),
            Some("0d9e8f7a6b5c4d3e8f2a1b0c9d8e7f6a")
        );
    }

    #[test]
    fn host_uuids_differ_per_host_and_are_stable() {
        assert_eq!(host_uuid(7, "host-a"), host_uuid(7, "host-a"));
        assert_ne!(host_uuid(7, "host-a"), host_uuid(7, "host-b"));
        assert_eq!(host_uuid(7, "host-a").len(), 36);
    }

    #[test]
    fn a_snapshots_domains_get_the_cpu_given() {
        let snapshot = "<domainsnapshot><name>s1</name><domain><vcpu>1</vcpu><cputune/>\
            <cpu mode='custom' check='full'><model>Cascadelake-Server</model>\
            <feature policy='disable' name='pcid'/></cpu><devices/></domain>\
            <inactiveDomain><cpu mode='custom'/></inactiveDomain></domainsnapshot>";
        let cpu = "<cpu mode='custom' check='none'><model>SapphireRapids</model></cpu>";
        assert_eq!(
            with_cpu(snapshot, cpu),
            "<domainsnapshot><name>s1</name><domain><vcpu>1</vcpu><cputune/>\
            <cpu mode='custom' check='none'><model>SapphireRapids</model></cpu><devices/></domain>\
            <inactiveDomain><cpu mode='custom' check='none'><model>SapphireRapids</model></cpu>\
            </inactiveDomain></domainsnapshot>"
        );
        assert_eq!(
            cpu_span(&format!("<domain>{cpu}</domain>")),
            Some(("<domain>".len(), "<domain>".len() + cpu.len()))
        );
        assert_eq!(with_cpu("<domain/>", cpu), "<domain/>");
    }
}
