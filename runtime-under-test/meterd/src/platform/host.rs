//! The real Linux host: DMI, CPUID, network interfaces, hidraw dongles, the session table file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use meter_core::station::MachineRole;
use meter_core::traits::{MachineKind, MachineTraits, names};
use sha2::{Digest, Sha256};

use super::facts::*;
use super::guest_signals::{GuestSignals, parse_pci_vendor};
use crate::os_sources::wall_clock_ms as real_now_ms;

/// Where the kernel lists hidraw devices; each entry's `device/uevent` describes its HID device.
pub const HIDRAW_CLASS: &str = "/sys/class/hidraw";

/// The dongles among the hidraw devices listed in `class_dir`, with their nodes in `dev_dir`.
///
/// A dongle is a USB HID device (`HID_ID=0003:<vendor>:<product>`) with the dongle crate's ids;
/// its serial is the USB serial string (`HID_UNIQ`). Devices without a serial are skipped, and a
/// serial seen twice keeps its lowest-numbered node. Sorted by serial.
pub(crate) fn list_hidraw_dongles(
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
pub(crate) fn dongle_serial_from_uevent(uevent: &str) -> Option<String> {
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
pub(crate) const BUS_USB: u32 = 0x0003;

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

    /// What the hardware shows that a hypervisor would give away.
    pub fn guest_signals(&self) -> GuestSignals {
        let cpuid_hypervisor = cpuid_hypervisor_bit().unwrap_or_else(|| {
            self.cpuinfo()
                .get("flags")
                .is_some_and(|flags| flags.split_whitespace().any(|f| f == "hypervisor"))
        });
        let pci_vendors = fs::read_dir(self.path("/sys/bus/pci/devices"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|entry| fs::read_to_string(entry.path().join("vendor")).ok())
                    .filter_map(|text| parse_pci_vendor(&text))
                    .collect()
            })
            .unwrap_or_default();
        GuestSignals {
            cpuid_hypervisor,
            dmi_vendor: self.dmi("sys_vendor"),
            dmi_product: self.dmi("product_name"),
            sys_hypervisor: fs::read_to_string(self.path("/sys/hypervisor/type"))
                .ok()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
            pci_vendors,
        }
    }

    fn dmi(&self, field: &str) -> Option<String> {
        fs::read_to_string(self.path(&format!("/sys/class/dmi/id/{field}")))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }
}

/// Key/value pairs of the first processor block of `/proc/cpuinfo`.
pub(crate) fn parse_cpuinfo_first(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// The hypervisor-present bit of CPUID leaf 1, where the CPU can be asked.
pub(crate) fn cpuid_hypervisor_bit() -> Option<bool> {
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
pub(crate) fn cpuid_vendor() -> Option<String> {
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
        Ok(if self.guest_signals().is_guest() {
            MachineKind::Guest
        } else {
            MachineKind::Physical
        })
    }

    fn role(&self) -> Result<MachineRole, PlatformError> {
        Ok(role_from_table(&self.session_table()?))
    }

    fn live_login_sessions(&self) -> Result<BTreeSet<u32>, PlatformError> {
        let proc = self.path("/proc");
        let entries = fs::read_dir(&proc).map_err(|source| PlatformError::Read {
            path: proc.clone(),
            source,
        })?;
        Ok(entries
            .filter_map(Result::ok)
            .filter(|entry| entry.file_name().to_str().is_some_and(is_pid))
            .filter_map(|entry| fs::read_to_string(entry.path().join("sessionid")).ok())
            .filter_map(|text| parse_login_session(&text))
            .collect())
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
        if let Some(ip) = self.default_route_ipv4() {
            traits.set(names::NET_IP, ip.to_string());
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
        Ok(read_root_owned(Path::new(HOST_VMGENID_FILE))?
            .map(|text| text.trim().to_ascii_lowercase())
            .filter(|text| !text.is_empty()))
    }

    fn now_ms(&self) -> Result<u64, PlatformError> {
        Ok(real_now_ms())
    }

    fn session(&self, session_id: u32) -> Result<Option<SessionInfo>, PlatformError> {
        Ok(self.session_table()?.remove(&session_id))
    }

    fn user_name(&self, uid: u32) -> Result<Option<String>, PlatformError> {
        let passwd = read_optional(&self.path("/etc/passwd"))?.unwrap_or_default();
        Ok(super::facts::passwd_name(&passwd, uid))
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
        // Only a root-owned table is believed: anyone else could claim to be a console.
        let path = PathBuf::from(HOST_SESSION_TABLE);
        match read_root_owned(&path)? {
            Some(text) => parse_session_table(&path, &text),
            None => Ok(BTreeMap::new()),
        }
    }

    /// The IPv4 address of the interface that carries the default route (the `net.ip` trait).
    fn default_route_ipv4(&self) -> Option<std::net::Ipv4Addr> {
        let routes = fs::read_to_string(self.path("/proc/net/route")).ok()?;
        let interface = default_route_interface(&routes)?;
        nix::ifaddrs::getifaddrs()
            .ok()?
            .filter(|ifaddr| ifaddr.interface_name == interface)
            .find_map(|ifaddr| ifaddr.address?.as_sockaddr_in().map(|sin| sin.ip()))
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

/// A machine fact only root may have written: the file, when it is owned by root and neither its
/// group nor others may write it; `None` (logged) for any other file, as for a missing one.
fn read_root_owned(path: &Path) -> Result<Option<String>, PlatformError> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(meta) if meta.uid() == 0 && meta.mode() & 0o022 == 0 => read_optional(path),
        Ok(meta) => {
            tracing::warn!(
                path = %path.display(),
                owner = meta.uid(),
                mode = format_args!("{:o}", meta.mode() & 0o777),
                "Machine fact not written by root alone, ignored"
            );
            Ok(None)
        }
        Err(_) => Ok(None),
    }
}

/// The interface of the default route in `/proc/net/route` (destination 0, the lowest metric).
pub(crate) fn default_route_interface(routes: &str) -> Option<String> {
    routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (interface, destination, metric) =
                (fields.first()?, fields.get(1)?, fields.get(6)?);
            (*destination == "00000000")
                .then(|| (metric.parse::<u32>().unwrap_or(u32::MAX), *interface))
        })
        .min()
        .map(|(_, interface)| interface.to_owned())
}

/// The audit session id the kernel gives a process outside any login session.
const NO_LOGIN_SESSION: u32 = u32::MAX;

/// The session a process counts in, and when the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSession {
    /// Its login session, or its process session where it has none.
    pub id: u32,
    /// True when `id` is a login session.
    pub login: bool,
    /// The process's start time (clock ticks since boot), which tells a reused pid apart.
    pub start: u64,
}

/// The session a process counts in and its start time: its login session (the audit session
/// id, `/proc/<pid>/sessionid`, which `setsid` cannot change), or its process session
/// (`/proc/<pid>/stat`) where it has none.
pub fn process_session_and_start(pid: u32) -> io::Result<ProcessSession> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (session, start) = parse_proc_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed /proc/{pid}/stat"),
        )
    })?;
    let process = ProcessSession {
        id: session,
        login: false,
        start,
    };
    if crate::weakened::is(crate::weakened::Defence::LoginSessions) {
        // Weakened: the process session, which any process may leave with setsid.
        return Ok(process);
    }
    Ok(match login_session(pid) {
        Some(id) => ProcessSession {
            id,
            login: true,
            start,
        },
        None => process,
    })
}

/// The audit login session of a process, if it has one.
fn login_session(pid: u32) -> Option<u32> {
    parse_login_session(&fs::read_to_string(format!("/proc/{pid}/sessionid")).ok()?)
}

/// A `/proc/<pid>/sessionid` text as a login session, `None` for "no login session".
fn parse_login_session(text: &str) -> Option<u32> {
    text.trim()
        .parse()
        .ok()
        .filter(|id| *id != NO_LOGIN_SESSION)
}

/// Whether a `/proc` entry names a process.
fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) fn parse_proc_stat(text: &str) -> Option<(u32, u64)> {
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
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn live_login_sessions_are_the_set_audit_session_ids_of_processes() {
        let root = tempfile::tempdir().unwrap();
        for (entry, sessionid) in [
            ("1", "4294967295"),
            ("20", "7"),
            ("21", "7"),
            ("30", "9\n"),
            ("self", "12"),
            ("bogus", "13"),
        ] {
            let dir = root.path().join("proc").join(entry);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("sessionid"), sessionid).unwrap();
        }
        let host = HostPlatform::with_root(root.path());
        assert_eq!(host.live_login_sessions().unwrap(), BTreeSet::from([7, 9]));
    }

    #[test]
    fn the_default_route_names_the_interface_of_net_ip() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth0\t00000000\t0202000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(routes).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
    }

    #[test]
    fn a_machine_with_a_default_route_has_net_ip() {
        let routes = fs::read_to_string("/proc/net/route").unwrap_or_default();
        let Some(interface) = default_route_interface(&routes) else {
            eprintln!("SKIPPED: no default route here");
            return;
        };
        let traits = HostPlatform::new().traits().unwrap();
        let ip = traits.one(names::NET_IP);
        assert!(
            ip.is_some(),
            "no net.ip though {interface} carries the default route"
        );
    }

    #[test]
    fn a_fact_others_may_write_is_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmgenid");
        fs::write(&path, "00112233").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(read_root_owned(&path).unwrap(), None);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let owned_by_root = nix::unistd::getuid().is_root();
        assert_eq!(
            read_root_owned(&path).unwrap(),
            owned_by_root.then(|| "00112233".to_owned()),
            "a 0644 file is believed only when root owns it"
        );
        assert_eq!(read_root_owned(&dir.path().join("missing")).unwrap(), None);
    }
}
