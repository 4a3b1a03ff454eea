//! A login-session leader inside the guest: a process that starts its own session (setsid) and
//! a login session of its own (it sets its audit login uid, as `pam_loginuid` does at a real
//! login), and spawns the session's processes, so they all carry both ids as on a real login.
//! A process that calls `setsid` leaves the first, never the second.
//!
//! The agent starts one per session (`vigil-agent leader`) and speaks newline-delimited JSON on
//! its stdin/stdout. Closing its stdin ends the session and kills its processes.

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};

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
    /// The process leaves the session (`setsid`) as it starts: it stays in the login session.
    #[serde(default)]
    pub leave_session: bool,
}

/// What a session's leader has reported: spawn answers by request id and exits by pid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderLedger {
    /// Spawn answers not yet taken: the new pid, or why the spawn failed.
    pub spawned: std::collections::HashMap<u64, Result<i32, String>>,
    /// How the session's processes ended.
    pub exits: std::collections::HashMap<i32, crate::protocol::Exit>,
}

impl LeaderLedger {
    /// Records one event (a `Ready` carries nothing to keep).
    pub fn record(&mut self, event: LeaderEvent) {
        match event {
            LeaderEvent::Ready { .. } => {}
            LeaderEvent::Spawned { id, pid } => {
                self.spawned.insert(id, Ok(pid));
            }
            LeaderEvent::SpawnFailed { id, error } => {
                self.spawned.insert(id, Err(error));
            }
            LeaderEvent::Exited { pid, code, signal } => {
                self.exits
                    .insert(pid, crate::protocol::Exit { code, signal });
            }
        }
    }
}

/// A line written by a leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum LeaderEvent {
    /// The leader runs; `sid` is the session id.
    Ready {
        /// Session id.
        sid: i32,
        /// The audit login session id, when the kernel let the leader open one.
        #[serde(default)]
        login: Option<u32>,
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

/// Children spawned and not yet reaped; the reaper sleeps on it while there are none.
struct Children {
    alive: Mutex<usize>,
    spawned: Condvar,
}

/// Runs a leader until its stdin closes, then kills the whole session. With `parent`, the
/// leader dies with that process (its parent): a harness that ends takes its sessions along.
/// With `login` it opens a login session of its own; without, it keeps the one it inherited
/// (an unattended console: a process session, no login). With `user`, the session's processes
/// run as that uid (and a group of the same number, no others), as a login manager starts them;
/// the leader itself keeps its privileges to open the login session and end the session.
pub fn run(parent: Option<i32>, login: bool, user: Option<u32>) -> anyhow::Result<()> {
    if let Some(parent) = parent {
        // SAFETY: prctl and getppid only concern this process.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                anyhow::bail!(
                    "Cannot tie the leader to its parent: {}",
                    std::io::Error::last_os_error()
                );
            }
            if libc::getppid() != parent {
                // The parent ended before the signal was armed.
                std::process::exit(1);
            }
        }
    }
    // SAFETY: setsid only changes this process's own session.
    let sid = unsafe { libc::setsid() };
    if sid < 0 {
        anyhow::bail!(
            "Cannot start a session: {}",
            std::io::Error::last_os_error()
        );
    }
    let out: &'static Mutex<std::io::Stdout> = Box::leak(Box::new(Mutex::new(std::io::stdout())));
    let children: &'static Children = Box::leak(Box::new(Children {
        alive: Mutex::new(0),
        spawned: Condvar::new(),
    }));
    let login = if login {
        open_login_session(user)
    } else {
        own_login_session()
    };
    emit(out, &LeaderEvent::Ready { sid, login });
    std::thread::spawn(move || reap_forever(out, children));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let event = match serde_json::from_str::<SpawnRequest>(&line) {
            Ok(request) => match spawn(&request, user) {
                Ok(pid) => {
                    *children.alive.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                    children.spawned.notify_one();
                    LeaderEvent::Spawned {
                        id: request.id,
                        pid,
                    }
                }
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

/// The audit session id the kernel has for no login session.
const NO_LOGIN_SESSION: u32 = u32::MAX;

/// Opens a login session for this process and its descendants: writing a login uid (the
/// session's user, else the leader's own) makes the kernel assign a fresh audit session id,
/// which no later `setsid` changes. Where the kernel refuses (no audit support, or no
/// CAP_AUDIT_CONTROL) the process keeps the login session it inherited, if any: the one
/// returned is what the runtime will see.
fn open_login_session(user: Option<u32>) -> Option<u32> {
    // SAFETY: getuid has no preconditions.
    let uid = user.unwrap_or_else(|| unsafe { libc::getuid() });
    if let Err(e) = std::fs::write("/proc/self/loginuid", uid.to_string()) {
        eprintln!("vigil leader: cannot open a login session: {e}");
    }
    own_login_session()
}

/// The audit login session of this process, if it has one.
fn own_login_session() -> Option<u32> {
    std::fs::read_to_string("/proc/self/sessionid")
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|id| *id != NO_LOGIN_SESSION)
}

/// The key of a session in the runtime's session table: its login session where there is one
/// (the runtime counts a process in its login session), else its process session.
pub fn table_key(sid: i32, login: Option<u32>) -> i32 {
    login.and_then(|id| i32::try_from(id).ok()).unwrap_or(sid)
}

fn spawn(request: &SpawnRequest, user: Option<u32>) -> anyhow::Result<i32> {
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
    let leave_session = request.leave_session;
    let leader = std::process::id();
    // SAFETY: prctl, setsid, setgroups, setgid and setuid are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if leave_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(uid) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After the user change, which clears the parent-death signal; a leader that died
            // before it was armed leaves the child to the init process: end it now.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if u32::try_from(libc::getppid()).ok() != Some(leader) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(child.id() as i32)
}

fn reap_forever(out: &Mutex<std::io::Stdout>, children: &Children) {
    loop {
        {
            let mut alive = children.alive.lock().unwrap_or_else(|e| e.into_inner());
            while *alive == 0 {
                alive = children
                    .spawned
                    .wait(alive)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        let mut status = 0;
        // SAFETY: waitpid with a pointer to a local status word.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid <= 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                // No child left though some were counted (reaped elsewhere): do not spin on it.
                *children.alive.lock().unwrap_or_else(|e| e.into_inner()) = 0;
            }
            continue;
        }
        {
            let mut alive = children.alive.lock().unwrap_or_else(|e| e.into_inner());
            *alive = alive.saturating_sub(1);
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
