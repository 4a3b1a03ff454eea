//! Whether a process has really stopped after a `SIGSTOP` (the signal is delivered
//! asynchronously: until every thread has stopped, the process can still send).

use std::time::{Duration, Instant};

/// Whether every thread of `pid` is stopped (`T` or `t` in its stat); false once it is gone.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The state follows the command name, which ends with the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if !matches!(state, Some('T' | 't')) {
            return false;
        }
        any = true;
    }
    any
}

/// Waits until every thread of `pid` has stopped, or `within` passed; whether they did.
pub fn wait_stopped(pid: u32, within: Duration) -> bool {
    let started = Instant::now();
    loop {
        if all_threads_stopped(pid) {
            return true;
        }
        if started.elapsed() >= within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_child_is_seen_stopped_and_a_running_one_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(!wait_stopped(pid, Duration::from_millis(20)));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        assert!(wait_stopped(pid, Duration::from_secs(5)));
        let _ = child.kill();
        let _ = child.wait();
    }
}
