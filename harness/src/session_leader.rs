//! A login-session leader: a process that starts its own session and spawns apps inside it.
//!
//! The sim backend runs one leader per login session (console, RDP). Apps spawned by the leader
//! inherit its session id, so the runtime sees them as members of that session exactly as it would
//! on a real machine. The leader speaks newline-delimited JSON on stdin/stdout.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// A request to a session leader.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// Caller-chosen id echoed in the answer.
    pub id: u64,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// File that receives the program's stdout.
    pub stdout: String,
    /// File that receives the program's stderr.
    pub stderr: String,
}

/// A line written by a session leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum LeaderEvent {
    /// The leader is ready; `sid` is its session id.
    Ready { sid: i32 },
    /// A spawn request succeeded.
    Spawned { id: u64, pid: i32 },
    /// A spawn request failed.
    SpawnFailed { id: u64, error: String },
    /// A child exited (`code`) or was killed (`signal`).
    Exited {
        pid: i32,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

fn emit(out: &Mutex<std::io::Stdout>, event: &LeaderEvent) {
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    let line = serde_json::to_string(event).unwrap_or_default();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a flag on the calling process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs the leader: new session, then serve spawn requests until stdin closes.
pub fn run() -> anyhow::Result<()> {
    nix::unistd::setsid().map_err(|e| anyhow::anyhow!("Cannot start a session: {e}"))?;
    die_with_parent()?;
    let sid = nix::unistd::getsid(None)?.as_raw();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    emit(&out, &LeaderEvent::Ready { sid });

    let children: Arc<Mutex<HashMap<i32, ()>>> = Arc::default();
    let reaper_out = Arc::clone(&out);
    std::thread::spawn(move || reap_forever(&reaper_out));

    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let request: SpawnRequest = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                emit(
                    &out,
                    &LeaderEvent::SpawnFailed {
                        id: 0,
                        error: format!("Bad request: {e}"),
                    },
                );
                continue;
            }
        };
        match spawn(&request) {
            Ok(pid) => {
                children
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(pid, ());
                emit(
                    &out,
                    &LeaderEvent::Spawned {
                        id: request.id,
                        pid,
                    },
                );
            }
            Err(e) => emit(
                &out,
                &LeaderEvent::SpawnFailed {
                    id: request.id,
                    error: format!("{e:#}"),
                },
            ),
        }
    }
    // The harness closed our stdin: the session ends, and its processes with it.
    // SAFETY: kill(0, SIGKILL) signals our own process group (this session).
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
    // SAFETY: the closure only calls async-signal-safe prctl.
    unsafe {
        command.pre_exec(die_with_parent);
    }
    let child = command.spawn()?;
    Ok(child.id() as i32)
}

fn reap_forever(out: &Mutex<std::io::Stdout>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a local status word.
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
