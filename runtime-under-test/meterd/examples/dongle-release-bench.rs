//! Benchmark: how fast a runtime takes licences back when its dongle moves to another runtime.
//!
//! Two real meterd processes on sim platforms, a dongle emulated here on their `usb/` sockets.
//! - hop: the dongle is unplugged from vm1 (holder present) and plugged into vm2; measured from
//!   the unplug to vm1's holder printing its revocation, and from the plug to vm2's first grant.
//! - rebind: vm1's runtime is paused past the dongle's active window while vm2 binds; measured
//!   from vm1 resuming to its holder printing `binding-broken` (bounded by the keepalive period).
//!
//! Run: `cargo run --release -p meterd --example dongle-release-bench` (writes
//! reports/bench/dongle-release.json).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use dongle::{DevicePort, Firmware, Flash, REPORT_LEN};

const ROUNDS: usize = 20;
const SERIAL: u64 = 9001;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os();
    let _exe = args.next();
    match args.next().as_deref().and_then(|a| a.to_str()) {
        Some("__meterd") => {
            let mut argv: Vec<std::ffi::OsString> = vec!["meterd".into()];
            argv.extend(args);
            meterd::harness_build::enable();
            return meterd::cli::run_daemon(argv);
        }
        Some("__meter") => {
            let mut argv: Vec<std::ffi::OsString> = vec!["meter".into()];
            argv.extend(args);
            std::process::exit(meterd::cli::run_meter(argv));
        }
        _ => {}
    }
    let work = tempfile::tempdir()?;
    let vendor = work.path().join("vendor");
    meter(None, &["vendor", "keygen", "--out", path(&vendor)])?;
    // The bench's world root: its daemons trust it (METER_HARNESS_ROOT) and it certifies the vendor.
    let root_dir = work.path().join("root");
    meter(None, &["root", "keygen", "--out", path(&root_dir)])?;
    meter(
        None,
        &[
            "root",
            "certify",
            "--root",
            path(&root_dir.join("root.key")),
            "--firm",
            "10",
            "--vendor",
            path(&vendor.join("vendor.pub")),
            "--out",
            path(&vendor.join("firm.cert")),
        ],
    )?;
    let policy = work.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "firm: 10\nfirm-name: acme\nproducts:\n  - {code: 2001, name: cam, container: dongle, quantity: 1, counting: user-limit}\n",
    )?;
    let flash_path = work.path().join("flash.json");
    meter(
        None,
        &[
            "vendor",
            "dongle",
            "program",
            "--policy",
            path(&policy),
            "--key",
            path(&vendor.join("vendor.key")),
            "--serial",
            &SERIAL.to_string(),
            "--products",
            "2001",
            "--max-rebinds",
            "100000",
            "--out",
            path(&flash_path),
        ],
    )?;
    let flash: Flash = serde_json::from_slice(&std::fs::read(&flash_path)?)?;
    let mut dongle = Emulator::power_on(flash);
    let vm1 = Machine::start(work.path(), "vm1", "127.0.4.1", &vendor)?;
    let vm2 = Machine::start(work.path(), "vm2", "127.0.4.2", &vendor)?;

    let mut unplug_to_revoked = Vec::new();
    let mut plug_to_granted = Vec::new();
    for round in 0..ROUNDS {
        let (from, to) = if round % 2 == 0 {
            (&vm1, &vm2)
        } else {
            (&vm2, &vm1)
        };
        dongle.plug(from)?;
        let mut holder = from.hold()?;
        let unplugged = Instant::now();
        dongle.unplug(from);
        holder.wait_revoked("dongle-removed")?;
        unplug_to_revoked.push(unplugged.elapsed());
        let plugged = Instant::now();
        dongle.plug(to)?;
        let probe = to.hold()?;
        plug_to_granted.push(plugged.elapsed());
        drop(probe);
        dongle.unplug(to);
    }

    let mut resume_to_revoked = Vec::new();
    for _ in 0..ROUNDS / 4 {
        dongle.plug(&vm1)?;
        let mut holder = vm1.hold()?;
        vm1.signal(libc::SIGSTOP);
        dongle.advance(Duration::from_secs(11));
        dongle.plug(&vm2)?;
        let taker = vm2.hold()?;
        let resumed = Instant::now();
        vm1.signal(libc::SIGCONT);
        holder.wait_revoked("binding-broken")?;
        resume_to_revoked.push(resumed.elapsed());
        drop(taker);
        dongle.unplug(&vm2);
        dongle.unplug(&vm1);
    }

    let transport = sim_transport(&mut dongle, work.path(), &vendor)?;

    let report = serde_json::json!({
        "benchmark": "dongle-release",
        "sim_transport": transport,
        "rounds": ROUNDS,
        "hop_unplug_to_revoked_ms": summary(&unplug_to_revoked),
        "hop_plug_to_first_grant_ms": summary(&plug_to_granted),
        "rebind_resume_to_revoked_ms": summary(&resume_to_revoked),
        "notes": "hop = unplug from one runtime and plug into another (release is event-driven); \
                  rebind = the old runtime learns of the new binding on its next keepalive (every 50 ms, at once after a pause); \
                  a first grant waits 250 ms after the bind (shared-use settle)",
    });
    std::fs::create_dir_all("reports/bench")?;
    std::fs::write(
        "reports/bench/dongle-release.json",
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Session establishment and frame round trips through the sim transport (the machine's Unix
/// socket, 64-byte reports, the runtime's link and session on one side, the firmware on the other).
fn sim_transport(
    dongle: &mut Emulator,
    root: &Path,
    vendor: &Path,
) -> anyhow::Result<serde_json::Value> {
    use dongle::{Request, RuntimeId, VerifyingKey};
    use meterd::dongles::Link;
    use meterd::platform::UsbEndpoint;

    const ROUND_TRIPS: usize = 5_000;
    let usb = root.join("bench-usb");
    std::fs::create_dir_all(&usb)?;
    dongle.plug_into("bench", &usb)?;
    let text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vendor.join("vendor.pub"))?)?;
    let key_bytes = hex::decode(text["signing-key"].as_str().context("no signing-key")?)?;
    let key = VerifyingKey::from_bytes(
        &<[u8; 32]>::try_from(key_bytes.as_slice()).context("signing-key is not 32 bytes")?,
    )?;
    let endpoint = UsbEndpoint {
        serial: SERIAL.to_string(),
        path: usb.join(format!("{SERIAL}.sock")),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (sessions, round_trips, elapsed) = runtime.block_on(async {
        let link = Link::start(meterd::transport::open(&endpoint)?, || {})?;
        let mut sessions = Vec::new();
        for _ in 0..50 {
            let started = Instant::now();
            link.hello(
                RuntimeId::new("bench-runtime".to_owned())?,
                &dongle::SigningKey::from_bytes(&[0x42; 32]),
                vec![key],
            )
            .await?;
            sessions.push(started.elapsed());
        }
        let mut round_trips = Vec::with_capacity(ROUND_TRIPS);
        let all = Instant::now();
        for _ in 0..ROUND_TRIPS {
            let started = Instant::now();
            link.call(&Request::ReadClock).await?;
            round_trips.push(started.elapsed());
        }
        anyhow::Ok((sessions, round_trips, all.elapsed()))
    })?;
    dongle.unplug_from("bench");
    Ok(serde_json::json!({
        "path": "Unix socket per machine, 64-byte reports, meterd's Link + Session <-> DevicePort + Firmware",
        "session_establishment_ms": summary(&sessions),
        "round_trip_ms": summary(&round_trips),
        "round_trips_per_second": ROUND_TRIPS as f64 / elapsed.as_secs_f64(),
    }))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn summary(samples: &[Duration]) -> serde_json::Value {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    serde_json::json!({"n": ms.len(), "p50": at(0.5), "p90": at(0.9), "max": at(1.0)})
}

fn meter(socket: Option<&Path>, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("__meter").arg("--json").args(args);
    if let Some(socket) = socket {
        command.env("METER_SOCKET", socket);
    }
    let out = command.output()?;
    anyhow::ensure!(out.status.success(), "meter {args:?} failed: {out:?}");
    Ok(serde_json::from_slice(&out.stdout)?)
}

struct Machine {
    name: String,
    dir: PathBuf,
    daemon: Child,
}

struct Holder {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Holder {
    fn wait_revoked(&mut self, reason: &str) -> anyhow::Result<()> {
        let mut line = String::new();
        self.lines.read_line(&mut line)?;
        let event: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("holder printed {line:?}"))?;
        anyhow::ensure!(event["reason"] == reason, "unexpected event {event}");
        Ok(())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Machine {
    fn start(root: &Path, name: &str, address: &str, vendor: &Path) -> anyhow::Result<Self> {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("platform/usb"))?;
        std::fs::write(
            dir.join("platform/machine.json"),
            serde_json::json!({"kind": "guest", "name": name, "address": address}).to_string(),
        )?;
        let daemon = Command::new(std::env::current_exe()?)
            .arg("__meterd")
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("run/meterd.sock"))
            .arg("--platform")
            .arg(format!("sim:{}", dir.join("platform").display()))
            .env("METER_HARNESS_ROOT", root_key(&root.join("root/root.pub"))?)
            .env("METER_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?;
        let started = Instant::now();
        while !dir.join("state/meterd.ready").exists() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "meterd not ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let machine = Machine {
            name: name.to_owned(),
            dir,
            daemon,
        };
        meter(
            Some(&machine.socket()),
            &["trust", path(&vendor.join("firm.cert"))],
        )?;
        Ok(machine)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/meterd.sock")
    }

    fn usb(&self) -> PathBuf {
        self.dir.join("platform/usb")
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signalling a child process we started.
        unsafe { libc::kill(self.daemon.id() as i32, signal) };
    }

    fn hold(&self) -> anyhow::Result<Holder> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["__meter", "--json", "hold", "--product", "2001"])
            .env("METER_SOCKET", self.socket())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        lines.read_line(&mut line)?;
        let first: serde_json::Value = serde_json::from_str(line.trim())?;
        anyhow::ensure!(
            first["granted"] == true,
            "{} not granted: {first}",
            self.name
        );
        Ok(Holder { child, lines })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// One plug: the machine's socket, its stop flag and its open connections.
type Plug = (PathBuf, Arc<AtomicBool>, Arc<Mutex<Vec<UnixStream>>>);

/// The dongle: firmware behind one listening socket per machine it is plugged into.
struct Emulator {
    firmware: Arc<Mutex<Firmware>>,
    offset: Arc<AtomicI64>,
    plugs: BTreeMap<String, Plug>,
}

fn dongle_now(offset: &AtomicI64) -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    (real + offset.load(Ordering::SeqCst)).max(0) as u64
}

impl Emulator {
    fn power_on(flash: Flash) -> Self {
        let offset = Arc::new(AtomicI64::new(0));
        Emulator {
            firmware: Arc::new(Mutex::new(Firmware::power_on(flash, dongle_now(&offset)))),
            offset,
            plugs: BTreeMap::new(),
        }
    }

    fn bus_reset(&self) {
        let now = dongle_now(&self.offset);
        self.firmware
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bus_reset(now);
    }

    fn advance(&self, by: Duration) {
        self.offset
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    fn plug(&mut self, machine: &Machine) -> anyhow::Result<()> {
        self.plug_into(&machine.name, &machine.usb())
    }

    /// Plugs the dongle into a machine's USB folder (`<usb>/<serial>.sock`).
    fn plug_into(&mut self, name: &str, usb: &Path) -> anyhow::Result<()> {
        if self.plugs.is_empty() {
            self.bus_reset();
        }
        let socket = usb.join(format!("{SERIAL}.sock"));
        let listener = UnixListener::bind(&socket)?;
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (firmware, offset) = (Arc::clone(&self.firmware), Arc::clone(&self.offset));
        let (stopped, open) = (Arc::clone(&stop), Arc::clone(&streams));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(clone) = stream.try_clone() {
                    open.lock().unwrap_or_else(|e| e.into_inner()).push(clone);
                }
                let (firmware, offset) = (Arc::clone(&firmware), Arc::clone(&offset));
                std::thread::spawn(move || serve(stream, &firmware, &offset));
            }
        });
        self.plugs.insert(name.to_owned(), (socket, stop, streams));
        Ok(())
    }

    fn unplug(&mut self, machine: &Machine) {
        self.unplug_from(&machine.name);
    }

    fn unplug_from(&mut self, name: &str) {
        if let Some((socket, stop, streams)) = self.plugs.remove(name) {
            stop.store(true, Ordering::SeqCst);
            let _ = std::fs::remove_file(&socket);
            for stream in streams.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            let _ = UnixStream::connect(&socket);
        }
        if self.plugs.is_empty() {
            self.bus_reset();
        }
    }
}

fn serve(mut stream: UnixStream, firmware: &Mutex<Firmware>, offset: &AtomicI64) {
    let mut port = DevicePort::new();
    let mut report = [0u8; REPORT_LEN];
    while stream.read_exact(&mut report).is_ok() {
        let replies = {
            let mut firmware = firmware.lock().unwrap_or_else(|e| e.into_inner());
            port.receive_report(&mut firmware, &report, dongle_now(offset))
        };
        for reply in replies {
            if stream.write_all(&reply).is_err() {
                return;
            }
        }
    }
}

/// The key in a root public key file (`root.pub`), hex.
fn root_key(file: &Path) -> anyhow::Result<String> {
    let text: serde_json::Value = serde_json::from_slice(&std::fs::read(file)?)?;
    text["root-key"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("{} has no root-key", file.display()))
}
