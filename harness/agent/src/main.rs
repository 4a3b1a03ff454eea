//! `vigil-agent`: the harness's hands inside a QEMU guest.
//!
//! `vigil-agent [--port <device>]` serves the protocol of [`vigil_agent::protocol`] on the
//! virtio-serial port named `vigil`; `vigil-agent leader` is a session leader it starts itself.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use vigil_agent::leader::{LeaderEvent, LeaderLedger, SpawnRequest};
use vigil_agent::protocol::{
    Answer, CommandTimedOut, Exit, Hello, Op, Outcome, PORT_NAME, Reply, Request, SESSION_TABLE,
    VMGENID_FILE,
};
use vigil_agent::sessions::{SessionTable, write_atomic};

/// Scratch folder for command output inside the guest.
const SCRATCH: &str = "/run/vigil";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("leader") => {
            let login = !args.iter().any(|a| a == "--no-login");
            let user = match args.iter().find_map(|a| a.strip_prefix("--uid=")) {
                Some(uid) => Some(uid.parse::<u32>().context("--uid= needs a number")?),
                None => None,
            };
            vigil_agent::leader::run(None, login, user)
        }
        Some("--port") => {
            let port = args.get(1).context("--port needs a device path")?;
            serve(PathBuf::from(port))
        }
        Some(other) => bail!("Unknown argument `{other}`; usage: vigil-agent [--port <device>]"),
        None => serve(find_port(Duration::from_secs(30))?),
    }
}

/// Finds the device of the virtio-serial port named `vigil`.
fn find_port(wait: Duration) -> anyhow::Result<PathBuf> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    return Ok(Path::new("/dev").join(entry.file_name()));
                }
            }
        }
        if Instant::now() > deadline {
            bail!("No virtio-serial port named `{PORT_NAME}` after {wait:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Session {
    sid: i32,
    /// The audit login session its processes stay in, if the kernel let the leader open one.
    login: Option<u32>,
    child: Child,
    stdin: Option<ChildStdin>,
    ledger: LeaderLedger,
}

struct App {
    session: String,
    pid: i32,
    stdout: PathBuf,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    apps: HashMap<String, App>,
    table: SessionTable,
    next_id: u64,
    /// Exits of leaders' children whose session is gone (a closed session killed them).
    orphan_exits: HashMap<i32, Exit>,
}

struct Agent {
    state: Mutex<State>,
    changed: Condvar,
    out: Mutex<std::fs::File>,
}

impl Agent {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_line(&self, line: &str) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = out.write_all(line.as_bytes());
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
}

fn serve(port: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(SCRATCH).context("create the scratch folder")?;
    std::fs::create_dir_all(Path::new(SCRATCH).join("apps"))?;
    let table = SessionTable::default();
    table
        .write(Path::new(SESSION_TABLE))
        .context("write the empty session table")?;
    refresh_vmgenid();
    // A virtio console port opens once: one descriptor, cloned for the writer.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .with_context(|| format!("open {}", port.display()))?;
    let writer = reader.try_clone().context("clone the port descriptor")?;
    let agent = Arc::new(Agent {
        state: Mutex::new(State {
            table,
            ..State::default()
        }),
        changed: Condvar::new(),
        out: Mutex::new(writer),
    });
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            refresh_vmgenid();
        }
    });
    let hello = Hello {
        hello: "vigil-agent".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    agent.send_line(&serde_json::to_string(&hello)?);
    eprintln!("vigil-agent: serving {}", port.display());
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            // No host connected: the port reads end-of-file until one connects.
            Ok(0) => std::thread::sleep(Duration::from_millis(50)),
            Ok(_) => {
                let text = line.trim();
                if text.is_empty() {
                    continue;
                }
                match serde_json::from_str::<Request>(text) {
                    Ok(request) => {
                        let agent = Arc::clone(&agent);
                        std::thread::spawn(move || {
                            let id = request.id;
                            let reply = match handle(&agent, request) {
                                Ok(outcome) => Reply::Ok(outcome),
                                Err(e) if e.downcast_ref::<CommandTimedOut>().is_some() => {
                                    Reply::TimedOut(format!("{e:#}"))
                                }
                                Err(e) => Reply::Error(format!("{e:#}")),
                            };
                            let answer = Answer { id, reply };
                            agent.send_line(&serde_json::to_string(&answer).unwrap_or_default());
                        });
                    }
                    Err(e) => {
                        let answer = Answer {
                            id: 0,
                            reply: Reply::Error(format!("Bad request: {e}")),
                        };
                        agent.send_line(&serde_json::to_string(&answer)?);
                    }
                }
            }
            Err(e) => {
                eprintln!("vigil-agent: read {}: {e}", port.display());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle(agent: &Arc<Agent>, request: Request) -> anyhow::Result<Outcome> {
    let deadline = Instant::now() + Duration::from_millis(request.timeout_ms);
    match request.op {
        Op::Ready { ready_file } => Ok(Outcome::Ready {
            runtime_ready: Path::new(&ready_file).exists(),
            vmgenid: refresh_vmgenid(),
            uptime_s: std::fs::read_to_string("/proc/uptime")
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0),
        }),
        Op::Exec { argv, env, session } => match session {
            Some(session) => exec_in_session(agent, &session, &argv, &env, deadline),
            None => exec_plain(&argv, &env, deadline),
        },
        Op::SessionOpen {
            name,
            session,
            login,
            uid,
        } => {
            if let Some(uid) = uid {
                vigil_agent::accounts::ensure(Path::new("/etc"), session.user(), uid)?;
            }
            // The table names the session by its login session where it has one; a session
            // opened without a login (an unattended console) is not in it.
            let sid = open_session(agent, &name, login, uid)?;
            if login {
                let mut state = agent.lock();
                state.table.insert(sid, session);
                state.table.write(Path::new(SESSION_TABLE))?;
            }
            Ok(Outcome::SessionOpened { sid })
        }
        Op::SessionClose { name } => {
            close_session(agent, &name)?;
            Ok(Outcome::Done)
        }
        Op::Spawn {
            app,
            session,
            argv,
            env,
            leave_session,
        } => {
            let stdout = Path::new(SCRATCH).join("apps").join(format!("{app}.out"));
            let stderr = Path::new(SCRATCH).join("apps").join(format!("{app}.err"));
            if leave_session
                && agent
                    .lock()
                    .sessions
                    .get(&session)
                    .is_some_and(|s| s.login.is_none())
            {
                bail!(
                    "Session `{session}` has no login session (writing /proc/self/loginuid was refused): an app leaving it could not be told from the machine's own"
                );
            }
            let request = SpawnRequest {
                id: 0,
                argv,
                env,
                stdout: stdout.display().to_string(),
                stderr: stderr.display().to_string(),
                leave_session,
            };
            let pid = spawn_in_session(agent, &session, request, deadline)?;
            agent.lock().apps.insert(
                app,
                App {
                    session,
                    pid,
                    stdout,
                },
            );
            Ok(Outcome::Spawned { pid })
        }
        Op::AppStatus { app } => {
            let state = agent.lock();
            let record = state
                .apps
                .get(&app)
                .ok_or_else(|| anyhow!("No app `{app}`"))?;
            let exit = match state.sessions.get(&record.session) {
                Some(session) => session.ledger.exits.get(&record.pid).copied(),
                None => Some(
                    state
                        .orphan_exits
                        .get(&record.pid)
                        .copied()
                        .unwrap_or(Exit {
                            code: None,
                            signal: Some(libc::SIGKILL),
                        }),
                ),
            };
            let stdout = std::fs::read_to_string(&record.stdout).unwrap_or_default();
            Ok(Outcome::AppStatus { exit, stdout })
        }
        Op::AppSignal { app, signal } => {
            let pid = agent
                .lock()
                .apps
                .get(&app)
                .map(|a| a.pid)
                .ok_or_else(|| anyhow!("No app `{app}`"))?;
            // SAFETY: signalling a process this agent started.
            if unsafe { libc::kill(pid, signal) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    bail!("Cannot signal app `{app}` (pid {pid}): {e}");
                }
            }
            Ok(Outcome::Done)
        }
        Op::SetClock { epoch_ms } => {
            set_clock(epoch_ms)?;
            Ok(Outcome::Done)
        }
        Op::DropSessionTable => {
            agent
                .lock()
                .table
                .drop_file(Path::new(SESSION_TABLE))
                .context("delete the session table")?;
            Ok(Outcome::Done)
        }
        Op::ReadFile { path } => {
            let data = std::fs::read(&path).with_context(|| format!("read {path}"))?;
            Ok(Outcome::File {
                data_hex: hex::encode(data),
            })
        }
        Op::WriteFile { path, data_hex } => {
            let data = hex::decode(&data_hex).context("file contents are not hex")?;
            write_atomic(Path::new(&path), &data).with_context(|| format!("write {path}"))?;
            Ok(Outcome::Done)
        }
        Op::RefreshVmgenid => Ok(Outcome::Vmgenid {
            vmgenid: refresh_vmgenid(),
        }),
        Op::UsbipAttach { host, port, busid } => {
            let vhci = Path::new(vigil_agent::usbip::VHCI_DIR);
            let vhci_port = vigil_agent::usbip::attach(vhci, &host, port, &busid, deadline)
                .with_context(|| format!("attach USB/IP device {busid} from {host}:{port}"))?;
            Ok(Outcome::UsbipAttached { vhci_port })
        }
        Op::UsbipDetach { vhci_port } => {
            let vhci = Path::new(vigil_agent::usbip::VHCI_DIR);
            vigil_agent::usbip::detach(vhci, vhci_port)
                .with_context(|| format!("detach USB/IP port {vhci_port}"))?;
            Ok(Outcome::Done)
        }
        Op::PowerOff { daemon } => {
            power_off_prepare(&daemon, deadline);
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                // SAFETY: powering the machine off is the point.
                unsafe { libc::reboot(libc::RB_POWER_OFF) };
            });
            Ok(Outcome::Done)
        }
    }
}

/// Reads the ACPI vmgenid and records it where the runtime looks; returns it.
fn refresh_vmgenid() -> Option<String> {
    let id = vigil_agent::vmgenid::read(
        Path::new("/sys/firmware/acpi/tables"),
        Path::new("/dev/mem"),
    )
    .ok()
    .flatten()?;
    let current = std::fs::read_to_string(VMGENID_FILE).unwrap_or_default();
    if current.trim() != id
        && let Err(e) = write_atomic(Path::new(VMGENID_FILE), id.as_bytes())
    {
        eprintln!("vigil-agent: write {VMGENID_FILE}: {e}");
    }
    Some(id)
}

fn set_clock(epoch_ms: i64) -> anyhow::Result<()> {
    let ts = libc::timespec {
        tv_sec: epoch_ms.div_euclid(1000),
        tv_nsec: epoch_ms.rem_euclid(1000) * 1_000_000,
    };
    // SAFETY: clock_settime with a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        bail!("Cannot set the clock: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_session(
    agent: &Arc<Agent>,
    name: &str,
    login: bool,
    uid: Option<u32>,
) -> anyhow::Result<i32> {
    let exe = std::env::current_exe().context("find the agent executable")?;
    let mut child = Command::new(exe)
        .arg("leader")
        .args((!login).then_some("--no-login"))
        .args(uid.map(|uid| format!("--uid={uid}")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start a session leader")?;
    let stdout = child.stdout.take().context("leader stdout")?;
    let mut lines = BufReader::new(stdout);
    let mut first = String::new();
    lines.read_line(&mut first)?;
    let (sid, login) = match serde_json::from_str::<LeaderEvent>(&first) {
        Ok(LeaderEvent::Ready { sid, login }) => (sid, login),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("Session leader did not start: {other:?} ({first:?})");
        }
    };
    let stdin = child.stdin.take();
    let old = agent.lock().sessions.insert(
        name.to_string(),
        Session {
            sid,
            login,
            child,
            stdin,
            ledger: LeaderLedger::default(),
        },
    );
    if let Some(old) = old {
        end_session(agent, old);
    }
    let agent = Arc::clone(agent);
    let name = name.to_string();
    std::thread::spawn(move || {
        for line in lines.lines() {
            let Ok(line) = line else { break };
            let Ok(event) = serde_json::from_str::<LeaderEvent>(&line) else {
                continue;
            };
            let mut state = agent.lock();
            let Some(session) = state.sessions.get_mut(&name).filter(|s| s.sid == sid) else {
                if let LeaderEvent::Exited { pid, code, signal } = event {
                    state.orphan_exits.insert(pid, Exit { code, signal });
                }
                continue;
            };
            session.ledger.record(event);
            drop(state);
            agent.changed.notify_all();
        }
    });
    Ok(vigil_agent::leader::table_key(sid, login))
}

fn end_session(agent: &Agent, mut session: Session) {
    // Closing the leader's stdin ends the session: it kills its process group.
    drop(session.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = session.child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: the session's process group id is the leader's pid, which we started.
    unsafe { libc::kill(-session.sid, libc::SIGKILL) };
    let _ = session.child.kill();
    let _ = session.child.wait();
    let mut state = agent.lock();
    state
        .table
        .remove(vigil_agent::leader::table_key(session.sid, session.login));
    if let Err(e) = state.table.write(Path::new(SESSION_TABLE)) {
        eprintln!("vigil-agent: write the session table: {e}");
    }
}

fn close_session(agent: &Arc<Agent>, name: &str) -> anyhow::Result<()> {
    let session = agent
        .lock()
        .sessions
        .remove(name)
        .ok_or_else(|| anyhow!("No session `{name}`"))?;
    end_session(agent, session);
    Ok(())
}

/// Has a session's leader spawn `request` (its id is chosen here); returns the pid.
fn spawn_in_session(
    agent: &Arc<Agent>,
    session: &str,
    mut request: SpawnRequest,
    deadline: Instant,
) -> anyhow::Result<i32> {
    let mut state = agent.lock();
    state.next_id += 1;
    let id = state.next_id;
    request.id = id;
    let argv = request.argv.clone();
    let entry = state
        .sessions
        .get_mut(session)
        .ok_or_else(|| anyhow!("No session `{session}`"))?;
    let stdin = entry
        .stdin
        .as_mut()
        .ok_or_else(|| anyhow!("Session `{session}` is closing"))?;
    writeln!(stdin, "{}", serde_json::to_string(&request)?)?;
    stdin.flush()?;
    loop {
        let entry = state
            .sessions
            .get_mut(session)
            .ok_or_else(|| anyhow!("Session `{session}` closed during the spawn"))?;
        if let Some(result) = entry.ledger.spawned.remove(&id) {
            return result.map_err(|e| anyhow!("Cannot start {}: {e}", argv.join(" ")));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "Session `{session}` did not start {} in time",
                argv.join(" ")
            );
        }
        state = agent
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn exec_in_session(
    agent: &Arc<Agent>,
    session: &str,
    argv: &[String],
    env: &[(String, String)],
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    let n = {
        let mut state = agent.lock();
        state.next_id += 1;
        state.next_id
    };
    let stdout = Path::new(SCRATCH).join(format!("cmd-{n}.out"));
    let stderr = Path::new(SCRATCH).join(format!("cmd-{n}.err"));
    let request = SpawnRequest {
        id: 0,
        argv: argv.to_vec(),
        env: env.to_vec(),
        stdout: stdout.display().to_string(),
        stderr: stderr.display().to_string(),
        leave_session: false,
    };
    let pid = spawn_in_session(agent, session, request, deadline)?;
    let mut state = agent.lock();
    let exit = loop {
        let exit = match state.sessions.get(session) {
            Some(s) => s.ledger.exits.get(&pid).copied(),
            None => bail!("Session `{session}` closed while {} ran", argv.join(" ")),
        };
        if let Some(exit) = exit {
            if let Some(s) = state.sessions.get_mut(session) {
                s.ledger.exits.remove(&pid);
            }
            break exit;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // SAFETY: killing a process this agent started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(CommandTimedOut {
                command: argv.join(" "),
            }
            .into());
        }
        state = agent
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    };
    drop(state);
    let out = std::fs::read_to_string(&stdout).unwrap_or_default();
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    let _ = std::fs::remove_file(&stdout);
    let _ = std::fs::remove_file(&stderr);
    Ok(Outcome::Exited {
        exit,
        stdout: out,
        stderr: err,
    })
}

fn exec_plain(
    argv: &[String],
    env: &[(String, String)],
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    let (program, args) = argv.split_first().ok_or_else(|| anyhow!("Empty argv"))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {program}"))?;
    let mut out_pipe = child.stdout.take().context("stdout")?;
    let mut err_pipe = child.stderr.take().context("stderr")?;
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CommandTimedOut {
                command: argv.join(" "),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(Outcome::Exited {
        exit: Exit {
            code: status.code(),
            signal: status.signal(),
        },
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    })
}

/// Stops the daemon (SIGTERM, then SIGKILL), syncs and unmounts the data disk.
fn power_off_prepare(daemon: &str, deadline: Instant) {
    let pids = processes_named(daemon);
    for pid in &pids {
        // SAFETY: signalling the runtime daemon before power-off.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let soft = Instant::now() + Duration::from_secs(3);
    while Instant::now() < soft.min(deadline) && !processes_named(daemon).is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in processes_named(daemon) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        for line in mounts.lines() {
            let mut fields = line.split_whitespace();
            let (Some(dev), Some(dir)) = (fields.next(), fields.next()) else {
                continue;
            };
            if dev.starts_with("/dev/vd")
                && let Ok(path) = std::ffi::CString::new(dir)
            {
                // SAFETY: unmounting by a valid C path.
                unsafe { libc::umount2(path.as_ptr(), 0) };
            }
        }
    }
}

fn processes_named(name: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let argv0 = String::from_utf8_lossy(argv0);
        if Path::new(argv0.as_ref())
            .file_name()
            .and_then(|n| n.to_str())
            == Some(name)
        {
            pids.push(pid);
        }
    }
    pids
}
