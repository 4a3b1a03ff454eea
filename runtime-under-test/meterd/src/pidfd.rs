//! Watching a process for its exit with a pidfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A handle on a running process that becomes ready when the process exits.
#[derive(Debug)]
pub struct ProcessWatch {
    fd: AsyncFd<OwnedFd>,
}

impl ProcessWatch {
    /// Opens a pidfd on `pid`; fails if the process no longer exists.
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just handed us this descriptor; nobody else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // SAFETY: `OwnedFd` keeps the same open descriptor until the `AsyncFd` drops it.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(ProcessWatch { fd })
    }

    /// Waits until the process has exited (or been killed).
    pub async fn exited(&self) -> io::Result<()> {
        let _guard = self.fd.readable().await?;
        Ok(())
    }

    /// True if the process has already exited.
    pub fn has_exited(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn watch_fires_when_a_killed_process_exits() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let watch = ProcessWatch::open(child.id()).unwrap();
        assert!(!watch.has_exited());
        let started = Instant::now();
        child.kill().unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.exited())
            .await
            .unwrap()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(watch.has_exited());
        child.wait().unwrap();
    }

    #[test]
    fn open_fails_for_a_missing_process() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(ProcessWatch::open(pid).is_err());
    }
}
