//! Host daemons and guests a killed harness left running, found and stopped by the next run.
//!
//! libvirt's QEMU processes outlive their daemon by design, and a harness killed with SIGKILL
//! (or a second Ctrl-C) stops neither. Each started host daemon is therefore registered in a
//! folder every harness process of the machine shares: the host folder and its owner (the
//! harness's pid and start time, so a reused pid is not taken for the owner). A later start
//! sweeps the registrations whose owner is gone: it kills the daemon and the guests named by
//! the pid files in the host's folder, each only when its command line is the one expected, so
//! a pid reused by another process is never killed.

use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A registered host daemon; the registration goes when this is dropped (a clean stop).
#[derive(Debug)]
pub struct Registration {
    file: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Where registrations live: shared by every harness process of the machine.
pub fn registry() -> PathBuf {
    std::env::temp_dir().join("vigil-libvirt-hosts")
}

/// When process `pid` started (clock ticks since boot), while it runs.
fn started_at(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid` runs a command line containing `needle`.
fn runs(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
}

/// Registers the host daemon of `host_dir` as this process's in `registry`.
pub fn register(registry: &Path, host_dir: &Path) -> std::io::Result<Registration> {
    std::fs::create_dir_all(registry)?;
    let me = std::process::id();
    let since = started_at(me).unwrap_or(0);
    let name = format!("{me}-{since}-{:016x}", fingerprint(host_dir));
    let file = registry.join(name);
    std::fs::write(&file, host_dir.as_os_str().as_encoded_bytes())?;
    Ok(Registration { file })
}

/// A stable short name for a folder.
fn fingerprint(path: &Path) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// What a sweep stopped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Host daemons killed.
    pub daemons: usize,
    /// Guests (QEMU processes) killed.
    pub guests: usize,
}

/// Stops what the registrations in `registry` of owners no longer running left behind, and
/// removes those registrations.
pub fn sweep(registry: &Path) -> Swept {
    let mut swept = Swept::default();
    let Ok(entries) = std::fs::read_dir(registry) else {
        return swept;
    };
    for entry in entries.flatten() {
        let file = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '-');
        let (Some(pid), Some(since)) = (
            parts.next().and_then(|p| p.parse::<u32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if started_at(pid) == Some(since) {
            continue;
        }
        if let Ok(dir) = std::fs::read(&file) {
            let dir = PathBuf::from(String::from_utf8_lossy(&dir).into_owned());
            swept.guests += kill_guests(&dir.join("run/qemu"), "qemu");
            if kill_named(&dir.join("libvirtd.pid"), "libvirtd") {
                swept.daemons += 1;
            }
        }
        let _ = std::fs::remove_file(&file);
    }
    if swept != Swept::default() {
        tracing::warn!(
            daemons = swept.daemons,
            guests = swept.guests,
            "Stopped libvirt daemons and guests a killed run left behind"
        );
    }
    swept
}

/// Kills the process a pid file names when its command line contains `needle`.
fn kill_named(pid_file: &Path, needle: &str) -> bool {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|pid| *pid > 1)
    else {
        return false;
    };
    if !runs(pid, needle) {
        return false;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok()
}

/// Kills the processes named by `*.pid` files in `folder` whose command line contains
/// `needle`; how many.
pub fn kill_guests(folder: &Path, needle: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "pid"))
        .filter(|path| kill_named(path, needle))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A process whose command line holds `name` (its argv[0]; bash's `exec -a`).
    fn process_named(name: &str) -> Child {
        let child = Command::new("bash")
            .args(["-c", &format!("exec -a {name} sleep 60")])
            .spawn()
            .unwrap();
        // Until bash has become `sleep`, its command line is bash's.
        let became = (0..500).any(|_| {
            let argv0 = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
            if argv0.starts_with(name.as_bytes()) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            false
        });
        assert!(became, "{name} did not start");
        child
    }

    fn gone(child: &mut Child) -> bool {
        for _ in 0..100 {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_dead_owners_daemon_and_guests_are_killed_and_nothing_else() {
        let registry = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("run/qemu")).unwrap();
        let mut guest = process_named("qemu-system-x86_64-fake");
        let mut daemon = process_named("libvirtd-fake");
        let mut stranger = process_named("not-a-guest");
        std::fs::write(host.path().join("run/qemu/vm1.pid"), guest.id().to_string()).unwrap();
        std::fs::write(
            host.path().join("run/qemu/vm2.pid"),
            stranger.id().to_string(),
        )
        .unwrap();
        std::fs::write(host.path().join("libvirtd.pid"), daemon.id().to_string()).unwrap();

        // Registered by this (live) process: left alone.
        let mine = register(registry.path(), host.path()).unwrap();
        assert_eq!(sweep(registry.path()), Swept::default());
        assert!(mine.file.exists());
        std::mem::forget(mine);

        // Registered by an owner that has exited: swept.
        let mut owner = Command::new("true").spawn().unwrap();
        owner.wait().unwrap();
        std::fs::write(
            registry.path().join(format!("{}-1-00", owner.id())),
            host.path().as_os_str().as_encoded_bytes(),
        )
        .unwrap();
        let swept = sweep(registry.path());
        assert_eq!(swept.daemons, 1);
        assert_eq!(swept.guests, 1);
        assert!(gone(&mut guest) && gone(&mut daemon));
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "a stranger was killed"
        );
        let _ = stranger.kill();
        let _ = stranger.wait();
        let left: Vec<_> = std::fs::read_dir(registry.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the live owner's registration is left");
    }
}
