//! Where the runtime learns about its machine: the real Linux host or a simulated folder.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use meter_core::station::{MachineRole, SessionKind};
use meter_core::traits::{MachineKind, MachineTraits, TraitValue, names};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Failure to learn something about the machine.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A platform file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A platform file is not in the documented format.
    #[error("Malformed platform file {path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The `--platform` argument names no known platform.
    #[error("Unknown platform {0:?} (expected host or sim:<dir>)")]
    UnknownSpec(String),
}

/// One login session as the platform's session table describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// What the session is (console, remote desktop, service).
    pub kind: SessionKind,
    /// The user logged in, if known.
    pub user: Option<String>,
}

/// A dongle attached to the machine, reachable at a local endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbEndpoint {
    /// The dongle's serial as the port names it.
    pub serial: String,
    /// The Unix socket (sim) or device node (host) to talk to it.
    pub path: PathBuf,
}

/// Everything the runtime learns about its machine.
pub trait Platform: Send + Sync + std::fmt::Debug {
    /// The machine's name, used as its station id.
    fn machine_name(&self) -> Result<String, PlatformError>;
    /// Physical hardware or a virtual machine (the hypervisor flag).
    fn kind(&self) -> Result<MachineKind, PlatformError>;
    /// Workstation or terminal server.
    fn role(&self) -> Result<MachineRole, PlatformError>;
    /// The machine's hardware traits.
    fn traits(&self) -> Result<MachineTraits, PlatformError>;
    /// The machine's address as other machines see it, if the platform knows it.
    fn address(&self) -> Result<Option<IpAddr>, PlatformError>;
    /// The virtual machine generation id (guests only).
    fn vmgenid(&self) -> Result<Option<String>, PlatformError>;
    /// Identifies the current boot: no process of another boot is alive.
    fn boot_id(&self) -> Result<Option<String>, PlatformError>;
    /// The machine's clock, unix milliseconds.
    fn now_ms(&self) -> Result<u64, PlatformError>;
    /// What the session with this id is, if the session table knows it.
    fn session(&self, session_id: u32) -> Result<Option<SessionInfo>, PlatformError>;
    /// Dongles attached to the machine.
    fn usb_endpoints(&self) -> Result<Vec<UsbEndpoint>, PlatformError>;
    /// Where [`Platform::usb_endpoints`] looks, for messages.
    fn usb_scanned(&self) -> String;
    /// Human-readable description (`host` or `sim:<dir>`).
    fn describe(&self) -> String;
}

/// Builds the platform named by a `--platform` argument (`host` or `sim:<dir>`).
pub fn from_spec(spec: &str) -> Result<Arc<dyn Platform>, PlatformError> {
    if spec == "host" {
        Ok(Arc::new(HostPlatform::new()))
    } else if let Some(dir) = spec.strip_prefix("sim:") {
        Ok(Arc::new(SimPlatform::new(dir)))
    } else {
        Err(PlatformError::UnknownSpec(spec.to_owned()))
    }
}

fn read_to_string(path: &Path) -> Result<String, PlatformError> {
    fs::read_to_string(path).map_err(|source| PlatformError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_optional(path: &Path) -> Result<Option<String>, PlatformError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PlatformError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

use crate::os_sources::wall_clock_ms as real_now_ms;

/// One entry of a session table file (`sessions.json`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
struct SessionEntry {
    kind: SessionEntryKind,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    client_name: String,
    #[serde(default)]
    client_ip: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SessionEntryKind {
    Console,
    Rdp,
    Service,
}

fn parse_session_table(
    path: &Path,
    text: &str,
) -> Result<BTreeMap<u32, SessionInfo>, PlatformError> {
    let raw: BTreeMap<String, SessionEntry> =
        serde_json::from_str(text).map_err(|e| PlatformError::Malformed {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    raw.into_iter()
        .map(|(id, entry)| {
            let id: u32 = id.parse().map_err(|_| PlatformError::Malformed {
                path: path.to_owned(),
                message: format!("session id {id:?} is not a number"),
            })?;
            let kind = match entry.kind {
                SessionEntryKind::Console => SessionKind::Console,
                SessionEntryKind::Service => SessionKind::Service,
                SessionEntryKind::Rdp => SessionKind::Rdp {
                    client_name: entry.client_name,
                    client_ip: entry.client_ip,
                },
            };
            Ok((
                id,
                SessionInfo {
                    kind,
                    user: entry.user,
                },
            ))
        })
        .collect()
}

/// The `machine.json` of a simulated machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimMachine {
    kind: MachineKind,
    role: MachineRole,
    name: String,
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    traits: BTreeMap<String, TraitValue>,
}

/// A machine simulated by a folder the harness writes (layout in docs/runtime-contract.md).
///
/// Its files are read once and kept until inotify reports a change in the folder (or in `usb/`):
/// every look starts by draining the watch (one non-blocking read), so a file the harness replaced
/// before the look is always read again. Without a working watch every look reads the files.
#[derive(Debug)]
pub struct SimPlatform {
    dir: PathBuf,
    watch: Option<FolderWatch>,
    cache: Mutex<SimCache>,
}

/// What the simulated machine's files said when last read; `None` = not read since a change.
#[derive(Debug, Default)]
struct SimCache {
    machine: Option<Arc<SimMachine>>,
    clock_offset: Option<i64>,
    vmgenid: Option<Option<String>>,
    boot_id: Option<Option<String>>,
    sessions: Option<Arc<BTreeMap<u32, SessionInfo>>>,
    usb: Option<Vec<UsbEndpoint>>,
}

/// An inotify watch on the simulated machine's folder and its `usb/` folder.
#[derive(Debug)]
struct FolderWatch {
    fd: std::os::fd::OwnedFd,
    /// The folder's watch descriptor.
    dir_wd: i32,
    /// The watch descriptor of `usb/`, -1 until it is watched.
    usb_wd: std::sync::atomic::AtomicI32,
    /// Set for good once the folder's own watch ended (folder removed or moved): no more caching.
    broken: std::sync::atomic::AtomicBool,
}

/// Events that mean "something in the folder may differ from what was read".
const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

impl FolderWatch {
    fn new(dir: &Path) -> Option<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: inotify_init1 takes flags only; the result is checked.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if raw < 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "No inotify: platform files are read at every look");
            return None;
        }
        // SAFETY: raw is a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let dir_wd = add_watch(&fd, dir)?;
        Some(FolderWatch {
            fd,
            dir_wd,
            usb_wd: std::sync::atomic::AtomicI32::new(-1),
            broken: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads every pending event; true when nothing changed since the last drain.
    fn drain(&self) -> bool {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering;
        let mut clean = true;
        let mut buffer = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer we own, within its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n < 0 {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        tracing::warn!(%error, "Platform folder watch failed: files are read at every look");
                        self.broken.store(true, Ordering::Relaxed);
                        return false;
                    }
                }
            }
            clean = false;
            let n = n as usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut at = 0;
            while at + header <= n {
                // SAFETY: the kernel wrote a whole event header at `at`; read it unaligned.
                let event: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buffer.as_ptr().add(at).cast()) };
                if event.mask & libc::IN_IGNORED != 0 {
                    if event.wd == self.dir_wd {
                        self.broken.store(true, Ordering::Relaxed);
                    } else if event.wd == self.usb_wd.load(Ordering::Relaxed) {
                        self.usb_wd.store(-1, Ordering::Relaxed);
                    }
                }
                at += header + event.len as usize;
            }
        }
        clean && !self.broken.load(Ordering::Relaxed)
    }

    /// Watches `usb/` too, if it exists and is not watched yet (before it is listed).
    fn watch_usb(&self, usb: &Path) {
        use std::sync::atomic::Ordering;
        if self.usb_wd.load(Ordering::Relaxed) < 0
            && let Some(wd) = add_watch(&self.fd, usb)
        {
            self.usb_wd.store(wd, Ordering::Relaxed);
        }
    }

    fn usable(&self) -> bool {
        !self.broken.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn add_watch(fd: &std::os::fd::OwnedFd, path: &Path) -> Option<i32> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: fd is our inotify descriptor and path a valid C string.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), WATCH_MASK) };
    (wd >= 0).then_some(wd)
}

impl SimPlatform {
    /// A simulated machine backed by `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        SimPlatform {
            watch: FolderWatch::new(&dir),
            dir,
            cache: Mutex::new(SimCache::default()),
        }
    }

    /// One value of the machine's files: from the cache while the folder is unchanged, else
    /// read by `load` (and kept if the folder is watched). Errors are never kept.
    fn look<T: Clone>(
        &self,
        slot: impl Fn(&mut SimCache) -> &mut Option<T>,
        load: impl FnOnce() -> Result<T, PlatformError>,
    ) -> Result<T, PlatformError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let watched = match &self.watch {
            Some(watch) => {
                if !watch.drain() {
                    *cache = SimCache::default();
                }
                watch.usable()
            }
            None => false,
        };
        if let Some(value) = slot(&mut cache) {
            return Ok(value.clone());
        }
        let value = load()?;
        if watched {
            *slot(&mut cache) = Some(value.clone());
        }
        Ok(value)
    }

    fn machine(&self) -> Result<Arc<SimMachine>, PlatformError> {
        self.look(
            |c| &mut c.machine,
            || {
                let path = self.dir.join("machine.json");
                let text = read_to_string(&path)?;
                let machine: SimMachine =
                    serde_json::from_str(&text).map_err(|e| PlatformError::Malformed {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                Ok(Arc::new(machine))
            },
        )
    }
}

impl Platform for SimPlatform {
    fn machine_name(&self) -> Result<String, PlatformError> {
        Ok(self.machine()?.name.clone())
    }

    fn kind(&self) -> Result<MachineKind, PlatformError> {
        Ok(self.machine()?.kind)
    }

    fn role(&self) -> Result<MachineRole, PlatformError> {
        Ok(self.machine()?.role)
    }

    fn traits(&self) -> Result<MachineTraits, PlatformError> {
        let machine = self.machine()?;
        let mut traits = MachineTraits::from(machine.traits.clone());
        if let Some(address) = machine.address {
            traits.set(names::NET_IP, address.to_string());
        }
        Ok(traits)
    }

    fn address(&self) -> Result<Option<IpAddr>, PlatformError> {
        Ok(self.machine()?.address)
    }

    fn boot_id(&self) -> Result<Option<String>, PlatformError> {
        self.look(
            |c| &mut c.boot_id,
            || {
                Ok(read_optional(&self.dir.join("boot_id"))?
                    .map(|text| text.trim().to_owned())
                    .filter(|text| !text.is_empty()))
            },
        )
    }

    fn vmgenid(&self) -> Result<Option<String>, PlatformError> {
        self.look(
            |c| &mut c.vmgenid,
            || {
                Ok(read_optional(&self.dir.join("vmgenid"))?
                    .map(|text| text.trim().to_ascii_lowercase())
                    .filter(|text| !text.is_empty()))
            },
        )
    }

    fn now_ms(&self) -> Result<u64, PlatformError> {
        let offset = self.look(
            |c| &mut c.clock_offset,
            || {
                let path = self.dir.join("clock");
                match read_optional(&path)? {
                    None => Ok(0),
                    Some(text) if text.trim().is_empty() => Ok(0),
                    Some(text) => text.trim().parse().map_err(|_| PlatformError::Malformed {
                        path: path.clone(),
                        message: format!("clock offset {:?} is not an integer", text.trim()),
                    }),
                }
            },
        )?;
        Ok(real_now_ms().saturating_add_signed(offset))
    }

    fn session(&self, session_id: u32) -> Result<Option<SessionInfo>, PlatformError> {
        let table = self.look(
            |c| &mut c.sessions,
            || {
                let path = self.dir.join("sessions.json");
                Ok(Arc::new(match read_optional(&path)? {
                    None => BTreeMap::new(),
                    Some(text) => parse_session_table(&path, &text)?,
                }))
            },
        )?;
        Ok(table.get(&session_id).cloned())
    }

    fn usb_endpoints(&self) -> Result<Vec<UsbEndpoint>, PlatformError> {
        self.look(
            |c| &mut c.usb,
            || {
                let usb = self.dir.join("usb");
                if let Some(watch) = &self.watch {
                    watch.watch_usb(&usb);
                }
                list_dongle_sockets(&usb)
            },
        )
    }

    fn usb_scanned(&self) -> String {
        format!("{}/*.sock", self.dir.join("usb").display())
    }

    fn describe(&self) -> String {
        format!("sim:{}", self.dir.display())
    }
}

fn list_dongle_sockets(dir: &Path) -> Result<Vec<UsbEndpoint>, PlatformError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PlatformError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut endpoints: Vec<UsbEndpoint> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let serial = path
                .file_name()?
                .to_str()?
                .strip_suffix(".sock")?
                .to_owned();
            Some(UsbEndpoint { serial, path })
        })
        .collect();
    endpoints.sort_by(|a, b| a.serial.cmp(&b.serial));
    Ok(endpoints)
}

/// Where the kernel lists hidraw devices; each entry's `device/uevent` describes its HID device.
pub const HIDRAW_CLASS: &str = "/sys/class/hidraw";

/// The dongles among the hidraw devices listed in `class_dir`, with their nodes in `dev_dir`.
///
/// A dongle is a USB HID device (`HID_ID=0003:<vendor>:<product>`) with the dongle crate's ids;
/// its serial is the USB serial string (`HID_UNIQ`). Devices without a serial are skipped, and a
/// serial seen twice keeps its lowest-numbered node. Sorted by serial.
fn list_hidraw_dongles(
    class_dir: &Path,
    dev_dir: &Path,
) -> Result<Vec<UsbEndpoint>, PlatformError> {
    let entries = match fs::read_dir(class_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PlatformError::Read {
                path: class_dir.to_owned(),
                source,
            });
        }
    };
    let mut found: Vec<(String, u64, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let number: u64 = name.strip_prefix("hidraw")?.parse().ok()?;
            // A device unplugged between the listing and this read is simply not there.
            let uevent = fs::read_to_string(entry.path().join("device/uevent")).ok()?;
            let serial = dongle_serial_from_uevent(&uevent)?;
            Some((serial, number, name))
        })
        .collect();
    found.sort();
    found.dedup_by(|later, first| later.0 == first.0);
    Ok(found
        .into_iter()
        .map(|(serial, _, name)| UsbEndpoint {
            serial,
            path: dev_dir.join(name),
        })
        .collect())
}

/// The dongle serial of a HID device's uevent, if the device is a USB dongle with a serial.
fn dongle_serial_from_uevent(uevent: &str) -> Option<String> {
    let mut is_dongle = false;
    let mut serial = None;
    for line in uevent.lines() {
        if let Some(id) = line.strip_prefix("HID_ID=") {
            let mut parts = id.trim().split(':');
            let bus = u32::from_str_radix(parts.next()?, 16).ok()?;
            let vendor = u32::from_str_radix(parts.next()?, 16).ok()?;
            let product = u32::from_str_radix(parts.next()?, 16).ok()?;
            is_dongle = bus == BUS_USB
                && vendor == u32::from(dongle::USB_VENDOR_ID)
                && product == u32::from(dongle::USB_PRODUCT_ID);
        } else if let Some(uniq) = line.strip_prefix("HID_UNIQ=") {
            serial = Some(uniq.trim().to_owned()).filter(|s| !s.is_empty());
        }
    }
    if is_dongle { serial } else { None }
}

/// The USB bus type in a `HID_ID` (`BUS_USB` of the kernel's input.h).
const BUS_USB: u32 = 0x0003;

/// The real Linux machine this process runs on.
#[derive(Debug)]
pub struct HostPlatform {
    root: PathBuf,
}

impl Default for HostPlatform {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the host platform's root-owned session table lives.
pub const HOST_SESSION_TABLE: &str = "/run/meter/sessions.json";
/// Where an in-guest agent may record the ACPI vmgenid (Linux does not expose it to user space).
pub const HOST_VMGENID_FILE: &str = "/run/meter/vmgenid";

impl HostPlatform {
    /// The host as seen from `/`.
    pub fn new() -> Self {
        Self::with_root("/")
    }

    /// The host as seen from another root folder (a chroot, or a fake tree in tests).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        HostPlatform { root: root.into() }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative.trim_start_matches('/'))
    }

    fn cpuinfo(&self) -> BTreeMap<String, String> {
        let text = fs::read_to_string(self.path("/proc/cpuinfo")).unwrap_or_default();
        parse_cpuinfo_first(&text)
    }

    fn dmi(&self, field: &str) -> Option<String> {
        fs::read_to_string(self.path(&format!("/sys/class/dmi/id/{field}")))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }
}

/// Key/value pairs of the first processor block of `/proc/cpuinfo`.
fn parse_cpuinfo_first(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// The hypervisor-present bit of CPUID leaf 1, where the CPU can be asked.
fn cpuid_hypervisor_bit() -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf1 = core::arch::x86_64::__cpuid(1);
        Some(leaf1.ecx & (1 << 31) != 0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The CPU vendor string from CPUID leaf 0, where the CPU can be asked.
fn cpuid_vendor() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let leaf0 = core::arch::x86_64::__cpuid(0);
        let bytes: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        String::from_utf8(bytes).ok()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

impl Platform for HostPlatform {
    fn machine_name(&self) -> Result<String, PlatformError> {
        Ok(read_to_string(&self.path("/proc/sys/kernel/hostname"))?
            .trim()
            .to_owned())
    }

    fn kind(&self) -> Result<MachineKind, PlatformError> {
        let guest = cpuid_hypervisor_bit().unwrap_or_else(|| {
            self.cpuinfo()
                .get("flags")
                .is_some_and(|flags| flags.split_whitespace().any(|f| f == "hypervisor"))
        });
        Ok(if guest {
            MachineKind::Guest
        } else {
            MachineKind::Physical
        })
    }

    fn role(&self) -> Result<MachineRole, PlatformError> {
        // A host with a session table listing more than one interactive session serves many users.
        let sessions = self.session_table()?;
        let interactive = sessions
            .values()
            .filter(|s| !matches!(s.kind, SessionKind::Service))
            .count();
        Ok(if interactive > 1 {
            MachineRole::TerminalServer
        } else {
            MachineRole::Workstation
        })
    }

    fn traits(&self) -> Result<MachineTraits, PlatformError> {
        let cpu = self.cpuinfo();
        let mut traits = MachineTraits::new();
        let vendor = cpuid_vendor().or_else(|| cpu.get("vendor_id").cloned());
        if let Some(vendor) = vendor {
            traits.set(names::CPU_VENDOR, vendor);
        }
        for (name, key) in [
            (names::CPU_MODEL_NAME, "model name"),
            (names::CPU_FAMILY, "cpu family"),
            (names::CPU_MODEL, "model"),
            (names::CPU_STEPPING, "stepping"),
            (names::CPU_MICROCODE, "microcode"),
        ] {
            if let Some(value) = cpu.get(key) {
                traits.set(name, value.clone());
            }
        }
        if let Some(flags) = cpu.get("flags") {
            traits.set(
                names::CPU_FLAGS,
                hex::encode(Sha256::digest(flags.as_bytes())),
            );
        }
        for (name, field) in [
            (names::BOARD_SERIAL, "board_serial"),
            (names::PRODUCT_UUID, "product_uuid"),
            (names::PRODUCT_SERIAL, "product_serial"),
        ] {
            if let Some(value) = self.dmi(field) {
                traits.set(name, value);
            }
        }
        let disks = self.disk_serials();
        if !disks.is_empty() {
            traits.set(names::DISK_SERIAL, disks);
        }
        let macs = self.nic_macs();
        if !macs.is_empty() {
            traits.set(names::NIC_MAC, macs);
        }
        Ok(traits)
    }

    fn address(&self) -> Result<Option<IpAddr>, PlatformError> {
        Ok(None)
    }

    fn boot_id(&self) -> Result<Option<String>, PlatformError> {
        Ok(
            read_optional(&self.path("/proc/sys/kernel/random/boot_id"))?
                .map(|text| text.trim().to_owned())
                .filter(|text| !text.is_empty()),
        )
    }

    fn vmgenid(&self) -> Result<Option<String>, PlatformError> {
        Ok(read_optional(Path::new(HOST_VMGENID_FILE))?
            .map(|text| text.trim().to_ascii_lowercase())
            .filter(|text| !text.is_empty()))
    }

    fn now_ms(&self) -> Result<u64, PlatformError> {
        Ok(real_now_ms())
    }

    fn session(&self, session_id: u32) -> Result<Option<SessionInfo>, PlatformError> {
        Ok(self.session_table()?.remove(&session_id))
    }

    fn usb_endpoints(&self) -> Result<Vec<UsbEndpoint>, PlatformError> {
        list_hidraw_dongles(&self.path(HIDRAW_CLASS), &self.path("/dev"))
    }

    fn usb_scanned(&self) -> String {
        format!(
            "{}/*/device/uevent for USB HID {:04x}:{:04x}",
            self.path(HIDRAW_CLASS).display(),
            dongle::USB_VENDOR_ID,
            dongle::USB_PRODUCT_ID
        )
    }

    fn describe(&self) -> String {
        "host".to_owned()
    }
}

impl HostPlatform {
    fn session_table(&self) -> Result<BTreeMap<u32, SessionInfo>, PlatformError> {
        use std::os::unix::fs::MetadataExt;
        let path = PathBuf::from(HOST_SESSION_TABLE);
        match fs::metadata(&path) {
            // Only a root-owned table is believed: anyone else could claim to be a console.
            Ok(meta) if meta.uid() == 0 => {
                let text = read_to_string(&path)?;
                parse_session_table(&path, &text)
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "Session table not owned by root, ignored");
                Ok(BTreeMap::new())
            }
            Err(_) => Ok(BTreeMap::new()),
        }
    }

    fn disk_serials(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.path("/sys/block")) else {
            return Vec::new();
        };
        let mut serials: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let dir = entry.path();
                ["serial", "device/serial", "device/wwid", "wwid"]
                    .iter()
                    .find_map(|f| fs::read_to_string(dir.join(f)).ok())
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
            })
            .collect();
        serials.sort();
        serials
    }

    fn nic_macs(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.path("/sys/class/net")) else {
            return Vec::new();
        };
        let mut macs: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name() != "lo")
            // Physical NICs have a device link; bridges, veths and tunnels do not.
            .filter(|entry| entry.path().join("device").exists())
            .filter_map(|entry| fs::read_to_string(entry.path().join("address")).ok())
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty() && s != "00:00:00:00:00:00")
            .collect();
        macs.sort();
        macs
    }
}

/// The session id and start time (clock ticks since boot) of a process, from `/proc/<pid>/stat`.
pub fn process_session_and_start(pid: u32) -> io::Result<(u32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_proc_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    })
}

fn parse_proc_stat(text: &str) -> Option<(u32, u64)> {
    // The command name (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); session is field 6, starttime field 22.
    let session = fields.get(3)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((session, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_with_spaces_in_command_parses() {
        let line = "1234 (my (odd) app) S 1 1234 777 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_proc_stat(line), Some((777, 98765)));
    }

    #[test]
    fn own_process_session_matches_getsid() {
        let (session, start) = process_session_and_start(std::process::id()).unwrap();
        // The session leader may live outside our pid namespace (CI containers): then both say 0.
        let expected = nix::unistd::getsid(None).unwrap().as_raw() as u32;
        assert_eq!(session, expected);
        assert!(start > 0);
    }

    #[test]
    fn sim_platform_reads_machine_sessions_clock_and_usb() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("machine.json"),
            r#"{"kind":"guest","role":"terminal-server","name":"ts1","address":"127.0.1.3",
               "traits":{"cpu.vendor":"GenuineIntel","nic.mac":["52:54:00:00:00:01"]}}"#,
        )
        .unwrap();
        fs::write(
            dir.path().join("sessions.json"),
            r#"{"4":{"kind":"rdp","user":"alice","client_name":"pc-7","client_ip":"10.0.0.7"},
               "1":{"kind":"console"}}"#,
        )
        .unwrap();
        fs::write(dir.path().join("clock"), "-60000\n").unwrap();
        fs::write(
            dir.path().join("vmgenid"),
            "00112233445566778899AABBCCDDEEFF",
        )
        .unwrap();
        fs::create_dir(dir.path().join("usb")).unwrap();
        fs::write(dir.path().join("usb/D-42.sock"), "").unwrap();

        let sim = SimPlatform::new(dir.path());
        assert_eq!(sim.machine_name().unwrap(), "ts1");
        assert_eq!(sim.kind().unwrap(), MachineKind::Guest);
        assert_eq!(sim.role().unwrap(), MachineRole::TerminalServer);
        let traits = sim.traits().unwrap();
        assert_eq!(traits.one(names::CPU_VENDOR), Some("GenuineIntel"));
        assert_eq!(traits.one(names::NET_IP), Some("127.0.1.3"));
        let rdp = sim.session(4).unwrap().unwrap();
        assert!(rdp.kind.is_remote_desktop());
        assert_eq!(rdp.user.as_deref(), Some("alice"));
        assert_eq!(sim.session(1).unwrap().unwrap().kind, SessionKind::Console);
        assert_eq!(sim.session(9).unwrap(), None);
        let skew = real_now_ms() as i64 - sim.now_ms().unwrap() as i64;
        assert!((59_000..61_000).contains(&skew), "skew {skew}");
        assert_eq!(
            sim.vmgenid().unwrap().as_deref(),
            Some("00112233445566778899aabbccddeeff")
        );
        assert_eq!(sim.usb_endpoints().unwrap()[0].serial, "D-42");
    }

    #[test]
    fn sim_platform_sees_an_atomically_replaced_machine_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let tmp = dir.path().join("machine.json.tmp");
            fs::write(
                &tmp,
                format!(r#"{{"kind":"physical","role":"workstation","name":"{name}"}}"#),
            )
            .unwrap();
            fs::rename(&tmp, dir.path().join("machine.json")).unwrap();
        };
        write("a");
        let sim = SimPlatform::new(dir.path());
        assert_eq!(sim.machine_name().unwrap(), "a");
        write("b");
        assert_eq!(sim.machine_name().unwrap(), "b");
    }

    #[test]
    fn sim_platform_sees_every_change_made_before_a_look() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("usb")).unwrap();
        let sim = SimPlatform::new(dir.path());
        assert!(sim.watch.is_some());
        for round in 0..20i64 {
            let offset = -1_000_000 * (round + 1);
            let tmp = dir.path().join("clock.tmp");
            fs::write(&tmp, offset.to_string()).unwrap();
            fs::rename(&tmp, dir.path().join("clock")).unwrap();
            let skew = real_now_ms() as i64 - sim.now_ms().unwrap() as i64;
            assert!(
                (-offset - 1000..-offset + 1000).contains(&skew),
                "skew {skew}"
            );
            fs::write(dir.path().join("vmgenid"), format!("{round:032x}")).unwrap();
            assert_eq!(sim.vmgenid().unwrap(), Some(format!("{round:032x}")));
            let socket = dir.path().join(format!("usb/D-{round}.sock"));
            fs::write(&socket, "").unwrap();
            assert!(
                sim.usb_endpoints()
                    .unwrap()
                    .iter()
                    .any(|e| e.path == socket)
            );
            fs::remove_file(&socket).unwrap();
            assert!(sim.usb_endpoints().unwrap().is_empty());
        }
        fs::remove_file(dir.path().join("clock")).unwrap();
        let skew = real_now_ms() as i64 - sim.now_ms().unwrap() as i64;
        assert!(skew.abs() < 1000, "skew {skew}");
        // usb/ replaced by a new folder: watched again.
        fs::remove_dir(dir.path().join("usb")).unwrap();
        assert!(sim.usb_endpoints().unwrap().is_empty());
        fs::create_dir(dir.path().join("usb")).unwrap();
        assert!(sim.usb_endpoints().unwrap().is_empty());
        fs::write(dir.path().join("usb/D-9.sock"), "").unwrap();
        assert_eq!(sim.usb_endpoints().unwrap()[0].serial, "D-9");
    }

    #[test]
    fn malformed_clock_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("clock"), "soon").unwrap();
        let err = SimPlatform::new(dir.path()).now_ms().unwrap_err();
        assert!(err.to_string().contains("clock"), "{err}");
    }

    fn hid_uevent(id: &str, uniq: Option<&str>) -> String {
        let mut text = format!("DRIVER=hid-generic\nHID_ID={id}\nHID_NAME=meter dongle\n");
        if let Some(uniq) = uniq {
            text.push_str(&format!("HID_UNIQ={uniq}\n"));
        }
        text.push_str("MODALIAS=hid:b0003g0001v00001209p00004D54\n");
        text
    }

    const DONGLE_ID: &str = "0003:00001209:00004D54";

    #[rstest::rstest]
    #[case::matching_device(vec![("hidraw0", hid_uevent(DONGLE_ID, Some("4711")))], vec![("4711", "hidraw0")])]
    #[case::lower_case_hex(vec![("hidraw5", hid_uevent("0003:00001209:00004d54", Some("9")))], vec![("9", "hidraw5")])]
    #[case::other_vendor(vec![("hidraw0", hid_uevent("0003:0000046D:00004D54", Some("4711")))], vec![])]
    #[case::other_product(vec![("hidraw0", hid_uevent("0003:00001209:00000001", Some("4711")))], vec![])]
    #[case::other_bus(vec![("hidraw0", hid_uevent("0005:00001209:00004D54", Some("4711")))], vec![])]
    #[case::missing_uniq(vec![("hidraw0", hid_uevent(DONGLE_ID, None))], vec![])]
    #[case::empty_uniq(vec![("hidraw0", hid_uevent(DONGLE_ID, Some("")))], vec![])]
    #[case::several_dongles(
        vec![
            ("hidraw11", hid_uevent(DONGLE_ID, Some("B-2"))),
            ("hidraw2", hid_uevent("0003:0000046D:0000C52B", Some("mouse"))),
            ("hidraw3", hid_uevent(DONGLE_ID, Some("A-1"))),
            ("hidraw10", hid_uevent(DONGLE_ID, Some("C-3"))),
        ],
        vec![("A-1", "hidraw3"), ("B-2", "hidraw11"), ("C-3", "hidraw10")],
    )]
    #[case::one_serial_on_two_nodes_keeps_the_lowest(
        vec![
            ("hidraw12", hid_uevent(DONGLE_ID, Some("7"))),
            ("hidraw9", hid_uevent(DONGLE_ID, Some("7"))),
        ],
        vec![("7", "hidraw9")],
    )]
    #[case::no_hidraw_class(vec![], vec![])]
    fn host_platform_finds_dongles_among_hidraw_devices(
        #[case] devices: Vec<(&str, String)>,
        #[case] expected: Vec<(&str, &str)>,
    ) {
        let root = tempfile::tempdir().unwrap();
        for (name, uevent) in &devices {
            let device = root.path().join(format!("sys/devices/hid/{name}"));
            fs::create_dir_all(&device).unwrap();
            fs::write(device.join("uevent"), uevent).unwrap();
            let class = root.path().join(format!("sys/class/hidraw/{name}"));
            fs::create_dir_all(&class).unwrap();
            // As in sysfs, `device` is a link to the HID device.
            std::os::unix::fs::symlink(&device, class.join("device")).unwrap();
        }
        let host = HostPlatform::with_root(root.path());
        let found = host.usb_endpoints().unwrap();
        let expected: Vec<UsbEndpoint> = expected
            .into_iter()
            .map(|(serial, node)| UsbEndpoint {
                serial: serial.to_owned(),
                path: root.path().join("dev").join(node),
            })
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn host_platform_reads_cpu_traits() {
        let host = HostPlatform::new();
        let traits = host.traits().unwrap();
        assert!(traits.one(names::CPU_VENDOR).is_some());
        assert!(!host.machine_name().unwrap().is_empty());
    }
}
