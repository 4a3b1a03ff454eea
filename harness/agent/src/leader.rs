//! A login-session leader inside the guest: a process that starts its own session (setsid) and
//! spawns the session's processes, so they all carry its session id as on a real login.
//!
//! The agent starts one per session (`vigil-agent leader`) and speaks newline-delimited JSON on
//! its stdin/stdout. Closing its stdin ends the session and kills its processes.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A request to spawn a process in the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// Caller-chosen id, echoed in the answer.
    pub id: u64,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// File that receives stdout.
    pub stdout: String,
    /// File that receives stderr.
    pub stderr: String,
}

/// A line written by a leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum LeaderEvent {
    /// The leader runs; `sid` is the session id.
    Ready {
        /// Session id.
        sid: i32,
    },
    /// A spawn request succeeded.
    Spawned {
        /// Request id.
        id: u64,
        /// Pid of the new process.
        pid: i32,
    },
    /// A spawn request failed.
    SpawnFailed {
        /// Request id.
        id: u64,
        /// Why.
        error: String,
    },
    /// A child ended.
    Exited {
        /// Its pid.
        pid: i32,
        /// Exit code, when it exited.
        code: Option<i32>,
        /// Signal, when killed.
        signal: Option<i32>,
    },
}

fn emit(out: &Mutex<std::io::Stdout>, event: &LeaderEvent) {
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    let line = serde_json::to_string(event).unwrap_or_default();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs a leader until its stdin closes, then kills the whole session.
pub fn run() -> anyhow::Result<()> {
    // SAFETY: setsid only changes this process's own session.
    let sid = unsafe { libc::setsid() };
    if sid < 0 {
        anyhow::bail!(
            "Cannot start a session: {}",
            std::io::Error::last_os_error()
        );
    }
    // No parent-death signal here: the agent thread that started us may end before we do.
    let out: &'static Mutex<std::io::Stdout> = Box::leak(Box::new(Mutex::new(std::io::stdout())));
    emit(out, &LeaderEvent::Ready { sid });
    std::thread::spawn(move || reap_forever(out));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let event = match serde_json::from_str::<SpawnRequest>(&line) {
            Ok(request) => match spawn(&request) {
                Ok(pid) => LeaderEvent::Spawned {
                    id: request.id,
                    pid,
                },
                Err(e) => LeaderEvent::SpawnFailed {
                    id: request.id,
                    error: format!("{e:#}"),
                },
            },
            Err(e) => LeaderEvent::SpawnFailed {
                id: 0,
                error: format!("Bad request: {e}"),
            },
        };
        emit(out, &event);
    }
    // SAFETY: kill(0, …) signals our own process group, which is this session.
    unsafe { libc::kill(0, libc::SIGKILL) };
    Ok(())
}

fn spawn(request: &SpawnRequest) -> anyhow::Result<i32> {
    let (program, args) = request
        .argv
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("Empty argv"))?;
    let stdout = std::fs::File::create(&request.stdout)?;
    let stderr = std::fs::File::create(&request.stderr)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(child.id() as i32)
}

fn reap_forever(out: &Mutex<std::io::Stdout>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a pointer to a local status word.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid <= 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            continue;
        };
        emit(out, &LeaderEvent::Exited { pid, code, signal });
    }
}
