//! The harness's side of a session leader process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use crate::backend::types::BackendError;
use crate::session_leader::{LeaderEvent, SpawnRequest};
use vigil_agent::leader::LeaderLedger;

/// How a process ended.
pub use vigil_agent::protocol::Exit as ExitInfo;

/// A running session leader and the processes it spawned.
pub struct LeaderHandle {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<LeaderEvent>,
    /// The session id every process of this session shares.
    pub sid: i32,
    /// The audit login session every process of this session stays in, if the kernel let the
    /// leader open one.
    pub login: Option<u32>,
    ledger: LeaderLedger,
    next_id: u64,
}

impl LeaderHandle {
    /// Starts a leader (`<exe> session-leader`) and waits until it reports its session id;
    /// without `login` it opens no login session (an unattended console). The session's
    /// processes run as `uid`.
    pub fn start(
        exe: &Path,
        stderr_log: &Path,
        login: bool,
        uid: u32,
    ) -> Result<Self, BackendError> {
        let stderr = std::fs::File::create(stderr_log)
            .map_err(BackendError::io(format!("create {}", stderr_log.display())))?;
        // No pre-exec hook, so the standard library spawns without forking the harness (whose
        // many threads and mappings make a fork costly); the leader arms its own parent-death
        // signal, which survives its setsid.
        let mut command = Command::new(exe);
        command
            .arg("session-leader")
            .arg("--parent")
            .arg(std::process::id().to_string())
            .args((!login).then_some("--no-login"))
            .arg("--uid")
            .arg(uid.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = command.spawn().map_err(BackendError::io(format!(
            "start session leader {}",
            exe.display()
        )))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<LeaderEvent>(&line) {
                    Ok(event) => {
                        if tx.send(event).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!("session leader said something odd: {line}: {e}"),
                }
            }
        });
        let mut handle = LeaderHandle {
            child,
            stdin,
            events: rx,
            sid: 0,
            login: None,
            ledger: LeaderLedger::default(),
            next_id: 1,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match handle.next_event(deadline)? {
                LeaderEvent::Ready { sid, login } => {
                    handle.sid = sid;
                    handle.login = login;
                    return Ok(handle);
                }
                other => handle.record(other),
            }
        }
    }

    fn next_event(&mut self, deadline: Instant) -> Result<LeaderEvent, BackendError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(wait) {
            Ok(event) => Ok(event),
            Err(RecvTimeoutError::Timeout) => Err(BackendError::Timeout {
                what: "the session leader".into(),
                after: wait,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(BackendError::Runtime {
                machine: String::new(),
                message: "the session leader exited".into(),
            }),
        }
    }

    fn record(&mut self, event: LeaderEvent) {
        if let LeaderEvent::Ready { sid, login } = event {
            self.sid = sid;
            self.login = login;
        }
        self.ledger.record(event);
    }

    /// Takes every event that has arrived, without waiting.
    pub fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.record(event);
        }
    }

    /// Spawns a process inside the session; returns its pid.
    pub fn spawn(
        &mut self,
        argv: &[String],
        env: &[(String, String)],
        stdout: &Path,
        stderr: &Path,
        leave_session: bool,
    ) -> Result<i32, BackendError> {
        let id = self.next_id;
        self.next_id += 1;
        let request = SpawnRequest {
            id,
            argv: argv.to_vec(),
            env: env.to_vec(),
            stdout: stdout.display().to_string(),
            stderr: stderr.display().to_string(),
            leave_session,
        };
        let line = serde_json::to_string(&request).expect("serializable request");
        let stdin = self.stdin.as_mut().ok_or_else(|| BackendError::Runtime {
            machine: String::new(),
            message: "the session is closed".into(),
        })?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(BackendError::io("talk to the session leader"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(result) = self.ledger.spawned.remove(&id) {
                return result.map_err(|message| BackendError::Runtime {
                    machine: String::new(),
                    message: format!("cannot start {}: {message}", argv.join(" ")),
                });
            }
            let event = self.next_event(deadline)?;
            self.record(event);
        }
    }

    /// How a spawned process ended, if it has.
    pub fn exit_of(&mut self, pid: i32) -> Option<ExitInfo> {
        self.drain();
        self.ledger.exits.get(&pid).copied()
    }

    /// Waits until a spawned process ends, up to a deadline.
    pub fn wait_exit(&mut self, pid: i32, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.ledger.exits.get(&pid) {
                return Some(*exit);
            }
            match self.next_event(deadline) {
                Ok(event) => self.record(event),
                Err(_) => return None,
            }
        }
    }

    /// The session's key in the runtime's session table (its login session where it has one).
    pub fn table_key(&self) -> i32 {
        vigil_agent::leader::table_key(self.sid, self.login)
    }

    /// Stops or continues every process of the session.
    pub fn signal_all(&self, signal: i32) {
        // SAFETY: kill on the session's process group id.
        unsafe { libc::kill(-self.sid, signal) };
    }

    /// Ends the session and all of its processes.
    pub fn close(mut self) {
        self.stdin.take();
        self.signal_all(libc::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LeaderHandle {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            self.signal_all(libc::SIGKILL);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Paths where one spawned process writes its output.
#[derive(Debug, Clone)]
pub struct OutputFiles {
    /// Standard output file.
    pub stdout: PathBuf,
    /// Standard error file.
    pub stderr: PathBuf,
}
