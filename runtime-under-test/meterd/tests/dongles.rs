//! Real daemons with a licence dongle emulated in the test: its firmware served on the sim
//! platform's `usb/<serial>.sock`, 64-byte HID reports over a Unix socket, as the harness does.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{METER, Machine, Vendor, wait_until};
use dongle::{DevicePort, Firmware, Flash, REPORT_LEN};
use serde_json::Value;

const SERIAL: u64 = 4711;

/// A dongle emulator: one firmware, one listening socket per machine it is plugged into.
struct EmulatedDongle {
    firmware: Arc<Mutex<Firmware>>,
    clock_offset: Arc<AtomicI64>,
    plugs: BTreeMap<String, Plug>,
    /// While set, reports are read and never answered.
    hung: Arc<AtomicBool>,
}

struct Plug {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<UnixStream>>>,
}

fn dongle_now(offset: &AtomicI64) -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    (real + offset.load(Ordering::SeqCst)) as u64
}

impl EmulatedDongle {
    /// Programs a dongle with `meter vendor dongle program` and powers it on.
    fn program(vendor: &Vendor, products: &[&str]) -> Self {
        let policy = vendor.dir.path().join("dongle-policy.yaml");
        let mut yaml = String::from("firm: 10\nfirm-name: acme\nproducts:\n");
        for p in products {
            yaml.push_str(&format!("  - {p}\n"));
        }
        std::fs::write(&policy, yaml).unwrap();
        let flash_path = vendor.dir.path().join("dongle.flash.json");
        let out = Command::new(METER)
            .args(["--json", "vendor", "dongle", "program", "--policy"])
            .arg(&policy)
            .arg("--key")
            .arg(vendor.dir.path().join("vendor.key"))
            .args(["--serial", &SERIAL.to_string(), "--products", "2001"])
            .args(["--max-rebinds", "3", "--rebind-window-ms", "60000"])
            .args(["--lockout-ms", "300000", "--out"])
            .arg(&flash_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer["serial"], SERIAL);
        let flash: Flash = serde_json::from_slice(&std::fs::read(&flash_path).unwrap()).unwrap();
        assert_eq!(flash.items().len(), 1);
        let clock_offset = Arc::new(AtomicI64::new(0));
        EmulatedDongle {
            firmware: Arc::new(Mutex::new(Firmware::power_on(
                flash,
                dongle_now(&clock_offset),
            ))),
            clock_offset,
            plugs: BTreeMap::new(),
            hung: Arc::default(),
        }
    }

    /// Plugs the dongle into a machine; a plug into an idle bus resets it.
    fn plug(&mut self, machine: &Machine) {
        if self.plugs.is_empty() {
            self.bus_reset();
        }
        let usb = machine.platform().join("usb");
        std::fs::create_dir_all(&usb).unwrap();
        let socket = usb.join(format!("{SERIAL}.sock"));
        let listener = UnixListener::bind(&socket).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (firmware, offset) = (Arc::clone(&self.firmware), Arc::clone(&self.clock_offset));
        let (stop_flag, open_streams) = (Arc::clone(&stop), Arc::clone(&streams));
        let hung = Arc::clone(&self.hung);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop_flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                open_streams
                    .lock()
                    .unwrap()
                    .push(stream.try_clone().unwrap());
                let (firmware, offset) = (Arc::clone(&firmware), Arc::clone(&offset));
                let hung = Arc::clone(&hung);
                std::thread::spawn(move || serve(stream, &firmware, &offset, &hung));
            }
        });
        self.plugs.insert(
            machine.name.clone(),
            Plug {
                socket,
                stop,
                streams,
            },
        );
    }

    /// Unplugs the dongle from one machine; the last unplug resets its bus.
    fn unplug(&mut self, machine: &Machine) {
        if let Some(plug) = self.plugs.remove(&machine.name) {
            plug.stop.store(true, Ordering::SeqCst);
            let _ = std::fs::remove_file(&plug.socket);
            for stream in plug.streams.lock().unwrap().drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            let _ = UnixStream::connect(&plug.socket);
        }
        if self.plugs.is_empty() {
            self.bus_reset();
        }
    }

    fn bus_reset(&self) {
        let now = dongle_now(&self.clock_offset);
        self.firmware.lock().unwrap().bus_reset(now);
    }

    /// Stops (or resumes) answering, the connection left open: a stalled device.
    fn hang(&self, hung: bool) {
        self.hung.store(hung, Ordering::SeqCst);
    }

    fn advance(&self, by: Duration) {
        self.clock_offset
            .fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }

    fn status(&self) -> Value {
        let now = dongle_now(&self.clock_offset);
        serde_json::to_value(self.firmware.lock().unwrap().status(now)).unwrap()
    }
}

fn serve(
    mut stream: UnixStream,
    firmware: &Mutex<Firmware>,
    offset: &AtomicI64,
    hung: &AtomicBool,
) {
    let mut port = DevicePort::new();
    let mut report = [0u8; REPORT_LEN];
    while stream.read_exact(&mut report).is_ok() {
        if hung.load(Ordering::SeqCst) {
            continue;
        }
        let replies = {
            let mut firmware = firmware.lock().unwrap();
            port.receive_report(&mut firmware, &report, dongle_now(offset))
        };
        for reply in replies {
            if stream.write_all(&reply).is_err() {
                return;
            }
        }
    }
}

fn machine(name: &str, address: &str, vendor: &Vendor) -> (Machine, common::Daemon) {
    let machine = Machine::new(name, "workstation", address);
    let daemon = machine.start(&[]);
    let (code, out) = machine.meter(&["trust", vendor.certificate().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    (machine, daemon)
}

fn runtime_id(machine: &Machine) -> String {
    let (_, status) = machine.meter(&["status"]);
    status["machine"]["runtime_id"].as_str().unwrap().to_owned()
}

fn dongle_container(machine: &Machine) -> Option<Value> {
    let (_, status) = machine.meter(&["status"]);
    status["containers"]
        .as_array()?
        .iter()
        .find(|c| c["kind"] == "dongle")
        .cloned()
}

/// Waits for the holder's next line (the revocation event).
fn next_event(holder: &mut common::Holder) -> Value {
    let mut line = String::new();
    holder.stdout.read_line(&mut line).unwrap();
    serde_json::from_str(line.trim()).unwrap_or(Value::Null)
}

const PRODUCT: &str =
    "{code: 2001, name: cam-suite, container: dongle, quantity: 1, counting: user-limit}";

#[test]
fn an_exclusive_dongle_binds_to_its_machine_and_unplugging_revokes_its_holders() {
    let vendor = Vendor::new();
    let mut dongle = EmulatedDongle::program(&vendor, &[PRODUCT]);
    let (vm1, _d1) = machine("vm1", "127.0.3.1", &vendor);
    let (vm2, _d2) = machine("vm2", "127.0.3.2", &vendor);
    dongle.plug(&vm1);

    let mut holder = vm1.hold(2001, None);
    assert!(holder.granted(), "{}", holder.first);
    assert_eq!(holder.first["container"], format!("dongle:{SERIAL}"));
    assert_eq!(dongle.status()["binding"]["runtime"], runtime_id(&vm1));
    let container = dongle_container(&vm1).unwrap();
    assert_eq!(container["state"], "valid");
    assert_eq!(container["products"][0]["code"], 2001);
    assert_eq!(container["products"][0]["in_use"]["accesses"], 1);
    // Quantity 1, user-limit: a second access on the same machine is refused by the table.
    let (code, second) = vm1.meter(&["access", "--product", "2001"]);
    assert_eq!(
        (code, second["reason"].as_str()),
        (1, Some("quantity-exhausted"))
    );
    // The other guest has no dongle: the product does not exist there.
    let (code, other) = vm2.meter(&["access", "--product", "2001"]);
    assert_eq!(
        (code, other["reason"].as_str()),
        (1, Some("unknown-product"))
    );

    dongle.unplug(&vm1);
    let event = next_event(&mut holder);
    assert_eq!(event["event"], "revoked", "{event}");
    assert_eq!(event["reason"], "dongle-removed");
    assert_eq!(holder.child.wait().unwrap().code(), Some(1));
    assert!(wait_until(Duration::from_secs(3), || dongle_container(&vm1).is_none()).is_some());
    let (code, gone) = vm1.meter(&["access", "--product", "2001"]);
    assert_eq!(
        (code, gone["reason"].as_str()),
        (1, Some("unknown-product"))
    );
}

#[test]
fn a_rebind_from_a_second_daemon_releases_the_first_daemons_holders() {
    let vendor = Vendor::new();
    let mut dongle = EmulatedDongle::program(&vendor, &[PRODUCT]);
    let (vm1, d1) = machine("vm1", "127.0.3.3", &vendor);
    let (vm2, _d2) = machine("vm2", "127.0.3.4", &vendor);
    dongle.plug(&vm1);
    let mut holder = vm1.hold(2001, None);
    assert!(holder.granted(), "{}", holder.first);

    // vm1's runtime goes quiet past the dongle's active window (a paused guest), then the
    // dongle is also offered to vm2: that bind is a rebind, not shared use.
    d1.freeze();
    dongle.advance(Duration::from_secs(11));
    dongle.plug(&vm2);
    let mut taken = vm2.hold(2001, None);
    assert!(taken.granted(), "{}", taken.first);
    assert_eq!(dongle.status()["binding"]["runtime"], runtime_id(&vm2));
    assert_eq!(dongle.status()["recent-rebinds"], 1);

    // vm1 wakes up: its next frame is answered "binding broken" and its holder is told.
    let woke = Instant::now();
    d1.signal(nix::sys::signal::Signal::SIGCONT);
    let event = next_event(&mut holder);
    assert_eq!(event["event"], "revoked", "{event}");
    assert_eq!(event["reason"], "binding-broken");
    assert!(
        woke.elapsed() < Duration::from_secs(3),
        "{:?}",
        woke.elapsed()
    );
    // While the dongle stays with vm2, vm1 does not bind it back (that would be shared use).
    let (code, denied) = vm1.meter(&["access", "--product", "2001"]);
    assert_eq!(
        (code, denied["reason"].as_str()),
        (1, Some("binding-broken")),
        "{denied}"
    );
    assert_eq!(dongle.status()["lockout"], Value::Null);
    assert_eq!(dongle.status()["binding"]["runtime"], runtime_id(&vm2));
    taken.kill9();
}

#[test]
fn a_dongle_shared_by_two_daemons_at_once_locks_out() {
    let vendor = Vendor::new();
    let mut dongle = EmulatedDongle::program(&vendor, &[PRODUCT]);
    let (vm1, _d1) = machine("vm1", "127.0.3.5", &vendor);
    let (vm2, _d2) = machine("vm2", "127.0.3.6", &vendor);
    dongle.plug(&vm1);
    dongle.plug(&vm2);

    assert!(
        wait_until(Duration::from_secs(3), || {
            dongle.status()["lockout"]["reason"] == "shared"
        })
        .is_some(),
        "{}",
        dongle.status()
    );
    for vm in [&vm1, &vm2] {
        let (code, answer) = vm.meter(&["access", "--product", "2001"]);
        assert_eq!(
            (code, answer["reason"].as_str()),
            (1, Some("dongle-shared")),
            "{answer}"
        );
        let container = dongle_container(vm).unwrap();
        assert_eq!(container["state"], "locked");
        assert_eq!(container["reason"], "dongle-shared");
    }
    let lockout = &dongle.status()["lockout"];
    let left =
        lockout["until-ms"].as_u64().unwrap() - dongle.status()["oscillator-ms"].as_u64().unwrap();
    assert!((299_000..=300_000).contains(&left), "{left}");

    // Passed through to vm1 alone, the dongle stays locked out until the lockout ends.
    dongle.unplug(&vm2);
    dongle.unplug(&vm1);
    dongle.plug(&vm1);
    let (code, answer) = vm1.meter(&["access", "--product", "2001"]);
    assert_eq!(
        (code, answer["reason"].as_str()),
        (1, Some("dongle-locked-out")),
        "{answer}"
    );
    // The dongle refused what the table offered: the app's denial is in the usage log.
    let (code, report) = vm1.meter(&["usage", "report"]);
    assert_eq!(code, 0, "{report}");
    assert!(
        report["denials"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["reason"] == "dongle-locked-out"),
        "{report}"
    );
    dongle.advance(Duration::from_secs(301));
    let (code, answer) = vm1.meter(&["access", "--product", "2001"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(dongle.status()["binding"]["runtime"], runtime_id(&vm1));
}

#[test]
fn a_dongle_that_stops_answering_revokes_its_holders_and_is_used_again_once_it_answers() {
    let vendor = Vendor::new();
    let mut dongle = EmulatedDongle::program(&vendor, &[PRODUCT]);
    let (vm1, _d1) = machine("vm1", "127.0.3.21", &vendor);
    dongle.plug(&vm1);
    let mut holder = vm1.hold(2001, None);
    assert!(holder.granted(), "{}", holder.first);
    assert_eq!(dongle_container(&vm1).unwrap()["answered"], true);

    dongle.hang(true);
    let event = next_event(&mut holder);
    assert_eq!(event["event"], "revoked", "{event}");
    assert_eq!(event["reason"], "dongle-unresponsive");
    let container = dongle_container(&vm1).unwrap();
    assert_eq!(
        (container["state"].as_str(), container["reason"].as_str()),
        (Some("unreachable"), Some("dongle-unresponsive")),
        "{container}"
    );
    let (code, denied) = vm1.meter(&["access", "--product", "2001"]);
    assert_eq!(
        (code, denied["reason"].as_str()),
        (1, Some("dongle-unresponsive")),
        "{denied}"
    );

    // The stall ends without a re-plug: the runtime's next hello finds the dongle again.
    dongle.hang(false);
    let back = wait_until(Duration::from_secs(10), || {
        vm1.meter(&["access", "--product", "2001"]).0 == 0
    });
    assert!(back.is_some(), "{:?}", dongle_container(&vm1));
    assert_eq!(dongle_container(&vm1).unwrap()["state"], "valid");
    assert_eq!(dongle.status()["binding"]["runtime"], runtime_id(&vm1));
}

#[test]
fn the_vendors_switches_travel_inside_the_dongle() {
    let vendor = Vendor::new();
    let mut dongle = EmulatedDongle::program(
        &vendor,
        &[
            "{code: 2001, name: cam-suite, container: dongle, quantity: 3, counting: user-limit, virtual-machines: deny, terminal-server: deny}",
        ],
    );
    let flash_path = vendor.dir.path().join("dongle.flash.json");
    let flash: Flash = serde_json::from_slice(&std::fs::read(&flash_path).unwrap()).unwrap();
    assert!(flash.items()[0].deny_virtual_machines);
    assert!(flash.items()[0].deny_terminal_server);
    // The tests' machines are guests: the product is refused there, whatever the runtime holds.
    let (vm1, _d1) = machine("vm1", "127.0.3.9", &vendor);
    dongle.plug(&vm1);
    let (code, refused) = vm1.meter(&["access", "--product", "2001"]);
    assert_eq!(
        (code, refused["reason"].as_str()),
        (1, Some("vm-not-allowed")),
        "{refused}"
    );
}

#[test]
fn a_dongle_refused_for_an_untrusted_vendor_is_used_once_the_vendor_is_trusted() {
    let vendor = Vendor::new();
    let mut dongle = EmulatedDongle::program(&vendor, &[PRODUCT]);
    let vm1 = Machine::new("vm1", "workstation", "127.0.3.11");
    let _daemon = vm1.start(&[]);
    dongle.plug(&vm1);
    // No vendor is trusted yet: the dongle's certificate is refused.
    let refused = wait_until(Duration::from_secs(5), || {
        dongle_container(&vm1).is_some_and(|c| c["state"] != "valid")
    });
    assert!(refused.is_some(), "{:?}", dongle_container(&vm1));
    let (code, out) = vm1.meter(&["trust", vendor.certificate().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    // Asked again without a re-plug (every REFUSED_RETRY_INTERVAL).
    let granted = wait_until(Duration::from_secs(20), || {
        vm1.meter(&["access", "--product", "2001"]).0 == 0
    });
    assert!(granted.is_some(), "{:?}", dongle_container(&vm1));
}
