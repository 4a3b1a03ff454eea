//! Starting and stopping one host's libvirt daemon in a private mount namespace.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The daemon binary.
pub const LIBVIRTD: &str = "libvirtd";
/// The subreaper the daemon runs under (Debian's `tini`), when installed.
const TINI: &str = "/usr/bin/tini";

/// The folders libvirt's privileged daemon uses, and the host folder's part bind-mounted over
/// each.
const PRIVATE_FOLDERS: [(&str, &str); 5] = [
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
    ("etc", "/etc/libvirt"),
];

/// How long a daemon may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A libvirt daemon that could not be started, reached or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `libvirtd` is not installed.
    #[error("libvirtd is not installed (make deps installs libvirt 11 from bookworm-backports)")]
    NotInstalled,
    /// Starting it needs root (private mounts and the privileged daemon).
    #[error("A libvirt daemon per host needs root (private mount namespaces)")]
    NotRoot,
    /// A folder or file could not be made.
    #[error("Cannot prepare {path}")]
    Prepare {
        /// What could not be made.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("Cannot start libvirtd")]
    Spawn(#[source] std::io::Error),
    /// It exited or did not answer in time.
    #[error("libvirtd for {dir} did not come up: {why}")]
    NotReady {
        /// The host's folder.
        dir: PathBuf,
        /// What happened, with the end of its log.
        why: String,
    },
    /// A libvirt call failed.
    #[error("libvirt refused: {0}")]
    Libvirt(#[source] virt::error::Error),
}

/// One host's running libvirt daemon; stopped (with every guest it runs) when dropped.
#[derive(Debug)]
pub struct HostDaemon {
    dir: PathBuf,
    host_uuid: String,
    child: Option<Child>,
    /// Its registration for a later run to sweep, should this one be killed.
    registration: Option<super::leftovers::Registration>,
}

/// Whether `libvirtd` can be found on the PATH.
pub fn installed() -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin")])
            .any(|dir| dir.join(LIBVIRTD).is_file())
    })
}

/// Whether the subreaper the daemon runs under is installed.
pub fn reaper_installed() -> bool {
    Path::new(TINI).is_file()
}

fn prepare(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Prepare {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), DaemonError> {
    std::fs::write(path, text).map_err(prepare(path))
}

/// The daemon's configuration: its host UUID, a root-only socket without authentication, and
/// its log in the host's folder, with its QEMU driver's process steps at debug level (a few
/// dozen lines a start, timed by [`super::start_steps`]).
fn libvirtd_conf(host_uuid: &str) -> String {
    format!(
        "host_uuid = \"{host_uuid}\"\n\
         unix_sock_group = \"root\"\n\
         unix_sock_rw_perms = \"0700\"\n\
         auth_unix_rw = \"none\"\n\
         log_filters = \"1:qemu.qemu_process 3:*\"\n\
         log_outputs = \"1:file:/var/log/libvirt/libvirtd.log\"\n"
    )
}

/// The QEMU driver's configuration: guests run as root on the harness's own files (no
/// relabelling, no per-guest /dev namespace), and QEMU's output goes straight to its log file
/// (no virtlogd to start).
const QEMU_CONF: &str = "user = \"root\"\n\
    group = \"root\"\n\
    dynamic_ownership = 0\n\
    remember_owner = 0\n\
    security_driver = \"none\"\n\
    namespaces = []\n\
    cgroup_controllers = []\n\
    stdio_handler = \"file\"\n";

impl HostDaemon {
    /// Starts a daemon whose folders live under `dir`, known by `host_uuid`.
    pub fn start(dir: &Path, host_uuid: &str) -> Result<HostDaemon, DaemonError> {
        HostDaemon::start_with_cache(dir, host_uuid, None)
    }

    /// As [`HostDaemon::start`], with libvirt's cache folder (what it learnt of the QEMU binary
    /// by probing it, seconds of a first start) shared at `cache` when given: libvirt keys it
    /// by the binary and its own version and replaces its files whole.
    pub fn start_with_cache(
        dir: &Path,
        host_uuid: &str,
        cache: Option<&Path>,
    ) -> Result<HostDaemon, DaemonError> {
        if !installed() {
            return Err(DaemonError::NotInstalled);
        }
        if !nix::unistd::Uid::effective().is_root() {
            return Err(DaemonError::NotRoot);
        }
        let mut binds = Vec::new();
        for (part, target) in PRIVATE_FOLDERS {
            let source = match cache {
                Some(shared) if part == "cache" => shared.to_owned(),
                _ => dir.join(part),
            };
            std::fs::create_dir_all(&source).map_err(prepare(&source))?;
            // The mount points must exist outside too.
            std::fs::create_dir_all(target).map_err(prepare(Path::new(target)))?;
            let c = |p: &Path| {
                CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| DaemonError::Prepare {
                    path: p.to_owned(),
                    source: std::io::Error::other(e),
                })
            };
            binds.push((c(&source)?, c(Path::new(target))?));
        }
        let conf = dir.join("etc/libvirtd.conf");
        write(&conf, &libvirtd_conf(host_uuid))?;
        write(&dir.join("etc/qemu.conf"), QEMU_CONF)?;
        let stderr = std::fs::File::create(dir.join("libvirtd.stderr"))
            .map_err(prepare(&dir.join("libvirtd.stderr")))?;
        // libvirt daemonises QEMU, so a guest's process is reparented when it ends; libvirt waits
        // for it to be reaped before it calls the guest destroyed. Under an init that reaps late
        // (seconds, as on the CI machines) every destroy, revert and migration waited for it, so
        // the daemon runs under a subreaper that reaps its orphans at once.
        let mut command = if reaper_installed() {
            let mut tini = Command::new(TINI);
            tini.args(["-s", "--", LIBVIRTD]);
            tini
        } else {
            tracing::warn!(
                "tini is not installed (make deps): guests' ends wait for init to reap them"
            );
            Command::new(LIBVIRTD)
        };
        command
            .arg("-f")
            .arg("/etc/libvirt/libvirtd.conf")
            .arg("-p")
            .arg(dir.join("libvirtd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: between fork and exec the child only makes system calls (unshare, mount) on
        // strings prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                unshare(CloneFlags::CLONE_NEWNS)?;
                // Mounts made here stay in this namespace.
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )?;
                for (source, target) in &binds {
                    mount(
                        Some(source.as_c_str()),
                        target.as_c_str(),
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )?;
                }
                Ok(())
            });
        }
        // Errors come back as values; libvirt's own handler would also print them.
        virt::error::clear_error_callback();
        // What a killed run left behind goes first (its guests hold memory and CPU).
        let registry = super::leftovers::registry();
        super::leftovers::sweep(&registry);
        let registration = super::leftovers::register(&registry, dir)
            .inspect_err(|e| {
                tracing::warn!(error = %e, "libvirt daemon not registered for a later sweep");
            })
            .ok();
        let child = command.spawn().map_err(DaemonError::Spawn)?;
        let mut daemon = HostDaemon {
            dir: dir.to_owned(),
            host_uuid: host_uuid.to_owned(),
            child: Some(child),
            registration,
        };
        daemon.wait_ready()?;
        tracing::info!(dir = %dir.display(), host_uuid, "libvirt daemon up");
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> Result<(), DaemonError> {
        let started = Instant::now();
        let socket = self.socket();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(self.not_ready(format!("it exited ({status})")));
            }
            if socket.exists() && self.connect().is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = self.stop();
                return Err(self.not_ready(format!(
                    "no answer on {} within {} s",
                    socket.display(),
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn not_ready(&self, why: String) -> DaemonError {
        let tail = |name: &str| {
            std::fs::read_to_string(self.dir.join(name))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        };
        DaemonError::NotReady {
            dir: self.dir.clone(),
            why: format!(
                "{why}\n{}\n{}",
                tail("libvirtd.stderr"),
                tail("log/libvirtd.log")
            ),
        }
    }

    /// The daemon's socket, outside its namespace.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/libvirt-sock")
    }

    /// The URI that reaches this daemon.
    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket().display())
    }

    /// The host UUID the daemon reports.
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// The QEMU log the daemon keeps for a domain.
    pub fn qemu_log(&self, domain: &str) -> PathBuf {
        self.dir.join("log/qemu").join(format!("{domain}.log"))
    }

    /// The daemon's own log.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("log/libvirtd.log")
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?;
        self.written_pid()
    }

    /// The process id the daemon wrote to its pid file.
    fn written_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("libvirtd.pid"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// A new connection to the daemon.
    pub fn connect(&self) -> Result<virt::connect::Connect, DaemonError> {
        virt::connect::Connect::open(Some(&self.uri())).map_err(DaemonError::Libvirt)
    }

    /// Stops every guest the daemon runs, then the daemon.
    pub fn stop(&mut self) -> Result<(), DaemonError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Ok(connection) = self.connect() {
            let active = virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE;
            for domain in connection.list_all_domains(active).unwrap_or_default() {
                if let Err(e) = domain.destroy() {
                    tracing::warn!(error = %e, "Cannot stop a guest of the libvirt daemon");
                }
            }
        }
        // Guests left running (the daemon was gone) are stopped by their pid files.
        super::leftovers::kill_guests(&self.dir.join("run/qemu"), "qemu");
        let daemon_pid = self
            .written_pid()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw);
        // The subreaper passes the signal on to the daemon and ends with it.
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    tracing::warn!(dir = %self.dir.display(), "libvirtd ignored SIGTERM: killed");
                    if let Some(daemon) = daemon_pid {
                        let _ = kill(daemon, Signal::SIGKILL);
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        self.registration = None;
        Ok(())
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "libvirt daemon not stopped cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_the_host_and_needs_no_login() {
        let conf = libvirtd_conf("6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0e01");
        assert!(conf.contains("host_uuid = \"6b1a4c1e-0f0e-4a3c-9d2b-0a0b0c0d0e01\""));
        assert!(conf.contains("auth_unix_rw = \"none\""));
        assert!(QEMU_CONF.contains("stdio_handler = \"file\""));
    }
}
