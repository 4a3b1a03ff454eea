//! The simulated platform: a folder the harness writes (machine kind, traits, clock, sessions,
//! dongle sockets), watched with inotify.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use meter_core::station::MachineRole;
use meter_core::traits::{MachineKind, MachineTraits, TraitValue, names};
use serde::Deserialize;

use super::facts::*;
use super::guest_signals::GuestSignals;
use crate::os_sources::wall_clock_ms as real_now_ms;

/// The `machine.json` of a simulated machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SimMachine {
    kind: MachineKind,
    name: String,
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    traits: BTreeMap<String, TraitValue>,
    /// What the simulated hardware shows of a hypervisor; when given, the kind is judged from
    /// it as on a real machine, not taken from `kind`.
    #[serde(default)]
    signals: Option<GuestSignals>,
}

/// A machine simulated by a folder the harness writes (layout in docs/runtime-contract.md).
///
/// Its files are read once and kept until inotify reports a change in the folder (or in `usb/`):
/// every look starts by draining the watch (one non-blocking read), so a file the harness replaced
/// before the look is always read again. Without a working watch every look reads the files.
#[derive(Debug)]
pub struct SimPlatform {
    dir: PathBuf,
    pub(crate) watch: Option<FolderWatch>,
    cache: Mutex<SimCache>,
}

/// What the simulated machine's files said when last read; `None` = not read since a change.
#[derive(Debug, Default)]
pub(crate) struct SimCache {
    machine: Option<Arc<SimMachine>>,
    clock_offset: Option<i64>,
    vmgenid: Option<Option<String>>,
    boot_id: Option<Option<String>>,
    sessions: Option<Arc<BTreeMap<u32, SessionInfo>>>,
    logins: Option<Arc<BTreeSet<u32>>>,
    usb: Option<Vec<UsbEndpoint>>,
}

/// An inotify watch on the simulated machine's folder and its `usb/` folder.
#[derive(Debug)]
pub(crate) struct FolderWatch {
    fd: std::os::fd::OwnedFd,
    /// The folder's watch descriptor.
    dir_wd: i32,
    /// The watch descriptor of `usb/`, -1 until it is watched.
    usb_wd: std::sync::atomic::AtomicI32,
    /// Set for good once the folder's own watch ended (folder removed or moved): no more caching.
    broken: std::sync::atomic::AtomicBool,
}

/// Events that mean "something in the folder may differ from what was read".
pub(crate) const WATCH_MASK: u32 = libc::IN_CREATE
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
        // Not zeroed first: almost every drain reads nothing, and only the bytes read are looked at.
        let mut buffer = std::mem::MaybeUninit::<[u8; 4096]>::uninit();
        loop {
            // SAFETY: reading into a buffer we own, within its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), 4096) };
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
                let event: libc::inotify_event = unsafe {
                    std::ptr::read_unaligned(buffer.as_ptr().cast::<u8>().add(at).cast())
                };
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

pub(crate) fn add_watch(fd: &std::os::fd::OwnedFd, path: &Path) -> Option<i32> {
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

    /// The machine's session table (`sessions.json`), empty where there is none.
    fn session_table(&self) -> Result<Arc<BTreeMap<u32, SessionInfo>>, PlatformError> {
        self.look(
            |c| &mut c.sessions,
            || {
                let path = self.dir.join("sessions.json");
                Ok(Arc::new(match read_optional(&path)? {
                    None => BTreeMap::new(),
                    Some(text) => parse_session_table(&path, &text)?,
                }))
            },
        )
    }
}

impl Platform for SimPlatform {
    fn machine_name(&self) -> Result<String, PlatformError> {
        Ok(self.machine()?.name.clone())
    }

    fn kind(&self) -> Result<MachineKind, PlatformError> {
        let machine = self.machine()?;
        Ok(match &machine.signals {
            Some(signals) if signals.is_guest() => MachineKind::Guest,
            Some(_) => MachineKind::Physical,
            None => machine.kind,
        })
    }

    fn role(&self) -> Result<MachineRole, PlatformError> {
        Ok(role_from_table(&*self.session_table()?))
    }

    fn live_login_sessions(&self) -> Result<BTreeSet<u32>, PlatformError> {
        let logins = self.look(
            |c| &mut c.logins,
            || {
                let path = self.dir.join("logins.json");
                Ok(Arc::new(match read_optional(&path)? {
                    None => BTreeSet::new(),
                    Some(text) => {
                        serde_json::from_str(&text).map_err(|e| PlatformError::Malformed {
                            path: path.clone(),
                            message: e.to_string(),
                        })?
                    }
                }))
            },
        )?;
        Ok(logins.as_ref().clone())
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
        Ok(self.session_table()?.get(&session_id).cloned())
    }

    /// The simulated machine's accounts: `passwd` in the platform folder (absent: none).
    fn user_name(&self, uid: u32) -> Result<Option<String>, PlatformError> {
        let passwd = read_optional(&self.dir.join("passwd"))?.unwrap_or_default();
        Ok(super::facts::passwd_name(&passwd, uid))
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

pub(crate) fn list_dongle_sockets(dir: &Path) -> Result<Vec<UsbEndpoint>, PlatformError> {
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
