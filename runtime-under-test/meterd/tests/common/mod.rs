//! Real daemons and real processes for the integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const METERD: &str = env!("CARGO_BIN_EXE_meterd-sim");
pub const METER: &str = env!("CARGO_BIN_EXE_meter");

/// `meter` as the harness build answers it (on simulated platforms too): `meterd-sim` linked
/// under the name `meter`, for the commands that take `--platform sim:<dir>`.
pub static METER_SIM: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("meterd-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("meter");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(METERD, &link).unwrap();
    link
});

/// The root of the tests' world: harness builds trust it when `METER_HARNESS_ROOT` names it.
pub struct TestRoot {
    pub dir: PathBuf,
    pub public_hex: String,
}

/// One root for every daemon and vendor of a test process.
pub static TEST_ROOT: std::sync::LazyLock<TestRoot> = std::sync::LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("meterd-tests-root-{}", std::process::id()));
    let out = Command::new(METER)
        .args(["--json", "root", "keygen", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    TestRoot {
        dir,
        public_hex: made["root_key"].as_str().unwrap().to_owned(),
    }
});

/// A vendor with a key pair and a way to issue licences.
pub struct Vendor {
    pub dir: tempfile::TempDir,
}

impl Vendor {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(METER)
            .args(["--json", "vendor", "keygen", "--out"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let vendor = Vendor { dir };
        let out = Command::new(METER)
            .args(["--json", "root", "certify", "--firm", "10", "--root"])
            .arg(TEST_ROOT.dir.join("root.key"))
            .arg("--vendor")
            .arg(vendor.public())
            .arg("--out")
            .arg(vendor.certificate())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        vendor
    }

    pub fn public(&self) -> PathBuf {
        self.dir.path().join("vendor.pub")
    }

    /// The vendor's firm certificate for firm 10, signed by the tests' root.
    pub fn certificate(&self) -> PathBuf {
        self.dir.path().join("firm.cert")
    }

    /// Issues an unbound licence for `products` (YAML flow items) and returns its path.
    pub fn issue(&self, name: &str, products: &[&str]) -> PathBuf {
        let policy = self.dir.path().join(format!("{name}.yaml"));
        let mut yaml = String::from("firm: 10\nfirm-name: acme\nproducts:\n");
        for p in products {
            yaml.push_str(&format!("  - {p}\n"));
        }
        std::fs::write(&policy, yaml).unwrap();
        let out_path = self.dir.path().join(format!("{name}.json"));
        let out = Command::new(METER)
            .args(["--json", "vendor", "issue", "--policy"])
            .arg(&policy)
            .arg("--key")
            .arg(self.dir.path().join("vendor.key"))
            .arg("--out")
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out_path
    }
}

/// A simulated machine folder plus the state of its runtime.
pub struct Machine {
    pub dir: tempfile::TempDir,
    pub name: String,
}

impl Machine {
    /// A machine of `role` (`workstation`, or `terminal-server`: its session table starts with
    /// a console login besides the sessions the test opens, so it shows many sessions).
    pub fn new(name: &str, role: &str, address: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("platform")).unwrap();
        let machine = serde_json::json!({
            "kind": "guest", "name": name, "address": address,
            "traits": {"cpu.vendor": "GenuineIntel", "product.uuid": format!("uuid-{name}")},
        });
        std::fs::write(
            dir.path().join("platform/machine.json"),
            machine.to_string(),
        )
        .unwrap();
        let table = match role {
            "terminal-server" => r#"{"1": {"kind": "console", "user": "admin"}}"#,
            _ => "{}",
        };
        std::fs::write(dir.path().join("platform/sessions.json"), table).unwrap();
        Machine {
            dir,
            name: name.to_owned(),
        }
    }

    pub fn platform(&self) -> PathBuf {
        self.dir.path().join("platform")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("meterd.sock")
    }

    /// Lets every user reach the machine's socket (the test folders are private).
    pub fn open_to_every_user(&self) {
        use std::os::unix::fs::PermissionsExt;
        for dir in [
            self.dir.path().to_path_buf(),
            self.socket().parent().unwrap().to_path_buf(),
        ] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    /// Adds a login session to those the simulated kernel shows alive (`logins.json`).
    pub fn add_login(&self, id: u32) {
        let path = self.platform().join("logins.json");
        let mut logins: Vec<u32> = std::fs::read_to_string(&path)
            .map(|text| serde_json::from_str(&text).unwrap())
            .unwrap_or_default();
        logins.push(id);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(&logins).unwrap()).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// Adds a session to the session table (atomic replace).
    pub fn add_session(&self, sid: u32, kind: &str) {
        let path = self.platform().join("sessions.json");
        let mut table: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        table.insert(
            sid.to_string(),
            serde_json::json!({"kind": kind, "user": format!("user{sid}"), "client_name": "pc", "client_ip": "10.0.0.7"}),
        );
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, Value::Object(table).to_string()).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    /// Starts this machine's meterd.
    pub fn start(&self, extra: &[&str]) -> Daemon {
        let ready = self.state().join("meterd.ready");
        let _ = std::fs::remove_file(&ready);
        let child = Command::new(METERD)
            .arg("--state")
            .arg(self.state())
            .arg("--socket")
            .arg(self.socket())
            .arg("--platform")
            .arg(format!("sim:{}", self.platform().display()))
            .args(extra)
            .env("METER_HARNESS_ROOT", &TEST_ROOT.public_hex)
            // METER_TEST_LOG=info shows what the daemons did when a test fails.
            .env(
                "METER_LOG",
                std::env::var("METER_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !ready.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "meterd did not get ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child: Some(child),
            socket: self.socket(),
        }
    }

    /// Runs `meter --json <args>` against this machine's daemon.
    pub fn meter(&self, args: &[&str]) -> (i32, Value) {
        meter_at(&self.socket(), args)
    }

    /// Trusts the vendor and installs a licence.
    pub fn install(&self, vendor: &Vendor, licence: &Path) {
        let (code, out) = self.meter(&["trust", vendor.certificate().to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
        let (code, out) = self.meter(&["activate", "apply", licence.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
    }

    /// Starts `meter hold` in a new session of the given kind (None = the test's own session).
    pub fn hold(&self, product: u32, session: Option<&str>) -> Holder {
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                "read go; exec \"$0\" \"$@\"",
                METER,
                "--json",
                "hold",
                "--product",
            ])
            .arg(product.to_string())
            .env("METER_SOCKET", self.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if session.is_some() {
            // SAFETY: setsid and open_login_session are async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    nix::unistd::setsid().map_err(std::io::Error::from)?;
                    // Where it fails the runtime counts the process in its process session.
                    let _ = open_login_session();
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().unwrap();
        if let Some(kind) = session {
            self.add_session(session_key(child.id()), kind);
        }
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "go").unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let first: Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("hold printed {line:?}: {e}"));
        Holder {
            child,
            first,
            stdout,
            _stdin: stdin,
        }
    }
}

/// Opens a login session for the calling process, as a real login does (`pam_loginuid`);
/// fails where the kernel has no audit support or refuses. Async-signal-safe, for `pre_exec`.
pub fn open_login_session() -> std::io::Result<()> {
    // SAFETY: open, write and close are async-signal-safe.
    unsafe {
        let fd = libc::open(c"/proc/self/loginuid".as_ptr(), libc::O_WRONLY);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, c"0".as_ptr().cast(), 1);
        libc::close(fd);
        if written != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `meter --json <args>` against `machine`'s daemon, run as `uid`.
pub fn meter_as(uid: u32, machine: &Machine, args: &[&str]) -> (i32, Value) {
    let out = Command::new(METER)
        .uid(uid)
        .gid(uid)
        .arg("--json")
        .args(args)
        .env("METER_SOCKET", machine.socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("meter printed no JSON: {out:?}"));
    (out.status.code().unwrap_or(-1), value)
}

/// The session the runtime counts a process in: its login session, else its process session.
pub fn session_key(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|id| *id != u32::MAX)
        .unwrap_or_else(|| {
            nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32)))
                .map(|sid| sid.as_raw() as u32)
                .unwrap_or(pid)
        })
}

pub fn meter_at(socket: &Path, args: &[&str]) -> (i32, Value) {
    let out = Command::new(METER)
        .arg("--json")
        .args(args)
        .env("METER_SOCKET", socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = text
        .lines()
        .last()
        .map(|l| serde_json::from_str(l).unwrap_or(Value::String(l.to_owned())))
        .unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value)
}

pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Stops the daemon (SIGSTOP) and returns once the kernel shows it stopped and what it
    /// sent just before has had time to arrive (a signal is delivered asynchronously).
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        let stat = format!("/proc/{}/stat", self.pid());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // The state follows the command name's closing parenthesis: `T` once stopped.
        while !std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| Some(s.rsplit_once(") ")?.1.starts_with('T')))
            .unwrap_or(false)
        {
            assert!(std::time::Instant::now() < deadline, "{stat} never stopped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        self.kill9();
    }
}

pub struct Holder {
    pub child: Child,
    pub first: Value,
    pub stdout: BufReader<ChildStdout>,
    _stdin: ChildStdin,
}

impl Holder {
    pub fn granted(&self) -> bool {
        self.first["granted"] == Value::Bool(true)
    }

    pub fn reason(&self) -> String {
        self.first["reason"].as_str().unwrap_or("").to_owned()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The next JSON line the holder prints (an event), if one comes within `limit`.
    pub fn next_event(&mut self, limit: Duration) -> Option<Value> {
        use std::os::fd::AsFd;
        if self.stdout.buffer().is_empty() {
            let timeout =
                nix::poll::PollTimeout::from(u16::try_from(limit.as_millis()).unwrap_or(u16::MAX));
            let mut fds = [nix::poll::PollFd::new(
                self.stdout.get_ref().as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut fds, timeout).ok()? == 0 {
                return None;
            }
        }
        let mut line = String::new();
        self.stdout.read_line(&mut line).ok()?;
        serde_json::from_str(line.trim()).ok()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `check` holds, up to `limit`; returns the time it took.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// The server's listen address and pin from its status.
pub fn server_endpoint(machine: &Machine) -> (String, String) {
    let (code, status) = machine.meter(&["status"]);
    assert_eq!(code, 0, "{status}");
    (
        status["server"]["listen"].as_str().unwrap().to_owned(),
        status["server"]["cert_sha256"].as_str().unwrap().to_owned(),
    )
}

/// Waits until `machine`'s runtime is linked to its server (its remote container is valid).
pub fn wait_linked(machine: &Machine) {
    wait_until(Duration::from_secs(10), || {
        let (_, status) = machine.meter(&["status"]);
        status["containers"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["kind"] == "remote" && c["state"] == "valid")
        })
    })
    .unwrap_or_else(|| panic!("{} linked to its server", machine.name));
}

pub fn allocations(machine: &Machine) -> Vec<Value> {
    let (code, list) = machine.meter(&["list"]);
    assert_eq!(code, 0, "{list}");
    list["allocations"].as_array().cloned().unwrap_or_default()
}

/// A vendor key the licensee made, certified by a root the licensee made.
pub struct SelfMadeVendor {
    /// The vendor, whose key the licensee made.
    pub vendor: Vendor,
    /// Its firm certificate (firm 10), signed by the licensee's own root.
    pub certificate: PathBuf,
}

impl SelfMadeVendor {
    pub fn new() -> Self {
        let vendor = Vendor::new();
        let root = vendor.dir.path().join("own-root");
        meter_ok(&["root", "keygen", "--out", path_str(&root)]);
        let certificate = vendor.dir.path().join("own.cert");
        meter_ok(&[
            "root",
            "certify",
            "--root",
            path_str(&root.join("root.key")),
            "--firm",
            "10",
            "--vendor",
            path_str(&vendor.public()),
            "--out",
            path_str(&certificate),
        ]);
        SelfMadeVendor {
            vendor,
            certificate,
        }
    }
}

/// Runs `meter --json <args>`, which must succeed.
fn meter_ok(args: &[&str]) {
    let out = Command::new(METER)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}
