//! `meter dongle probe` against dongles emulated in the test and served on a sim platform's
//! `usb/<serial>.sock` as the harness does: real processes, real sessions, real reports.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{METER, METER_SIM, Vendor};
use dongle::{DevicePort, Firmware, Flash, REPORT_LEN};
use serde_json::Value;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A dongle programmed by `meter vendor dongle program`, served on `<sim>/usb/<serial>.sock`.
struct ServedDongle {
    firmware: Arc<Mutex<Firmware>>,
    reports_in: Arc<AtomicUsize>,
}

impl ServedDongle {
    fn plug(vendor: &Vendor, serial: u64, sim: &Path) -> Self {
        let policy = vendor.dir.path().join("dongle-policy.yaml");
        std::fs::write(
            &policy,
            "firm: 10\nfirm-name: acme\nproducts:\n  - {code: 2001, name: cam-suite, container: dongle, quantity: 1, counting: user-limit}\n",
        )
        .unwrap();
        let flash_path = vendor
            .dir
            .path()
            .join(format!("dongle-{serial}.flash.json"));
        let out = Command::new(METER)
            .args(["--json", "vendor", "dongle", "program", "--policy"])
            .arg(&policy)
            .arg("--key")
            .arg(vendor.dir.path().join("vendor.key"))
            .args([
                "--serial",
                &serial.to_string(),
                "--products",
                "2001",
                "--out",
            ])
            .arg(&flash_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let flash: Flash = serde_json::from_slice(&std::fs::read(&flash_path).unwrap()).unwrap();
        let firmware = Arc::new(Mutex::new(Firmware::power_on(flash, now_ms())));
        let reports_in = Arc::new(AtomicUsize::new(0));
        let usb = sim.join("usb");
        std::fs::create_dir_all(&usb).unwrap();
        let listener = UnixListener::bind(usb.join(format!("{serial}.sock"))).unwrap();
        let (served, counted) = (Arc::clone(&firmware), Arc::clone(&reports_in));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (firmware, counted) = (Arc::clone(&served), Arc::clone(&counted));
                std::thread::spawn(move || serve(stream, &firmware, &counted));
            }
        });
        ServedDongle {
            firmware,
            reports_in,
        }
    }

    fn status(&self) -> Value {
        serde_json::to_value(self.firmware.lock().unwrap().status(now_ms())).unwrap()
    }
}

fn serve(mut stream: UnixStream, firmware: &Mutex<Firmware>, counted: &AtomicUsize) {
    let mut port = DevicePort::new();
    let mut report = [0u8; REPORT_LEN];
    while stream.read_exact(&mut report).is_ok() {
        counted.fetch_add(1, Ordering::SeqCst);
        let replies = {
            let mut firmware = firmware.lock().unwrap();
            port.receive_report(&mut firmware, &report, now_ms())
        };
        for reply in replies {
            if stream.write_all(&reply).is_err() {
                return;
            }
        }
    }
}

/// Runs `meter --json dongle probe --platform sim:<sim> <args>`; exit code and JSON document.
fn probe(sim: &Path, args: &[&str]) -> (i32, Value) {
    let out = Command::new(METER_SIM.as_path())
        .args(["--json", "dongle", "probe", "--platform"])
        .arg(format!("sim:{}", sim.display()))
        .args(args)
        .env("METER_HARNESS_ROOT", &common::TEST_ROOT.public_hex)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON document expected: {out:?}");
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {out:?}")),
    )
}

fn path_arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn probe_opens_a_session_like_meterd_and_times_twenty_round_trips() {
    let vendor = Vendor::new();
    let sim = tempfile::tempdir().unwrap();
    let dongle = ServedDongle::plug(&vendor, 4711, sim.path());
    let certificate = vendor.certificate();

    let (code, report) = probe(
        sim.path(),
        &["--count", "20", "--vendor", path_arg(&certificate)],
    );
    assert_eq!(code, 0, "{report}");
    let socket: PathBuf = sim.path().join("usb/4711.sock");
    assert_eq!(report["platform"], format!("sim:{}", sim.path().display()));
    assert_eq!(
        report["scanned"],
        format!("{}/*.sock", sim.path().join("usb").display())
    );
    assert_eq!(
        report["endpoints"],
        serde_json::json!([{"serial": "4711", "path": socket}])
    );
    assert_eq!(report["serial"], "4711");
    assert_eq!(report["path"], serde_json::json!(socket));
    assert_eq!(report["transport"], "socket");
    assert_eq!(report["certified_serial"], "4711");
    assert_eq!(report["items"], 1);
    assert_eq!(report["round_trips"], 20);
    let ms = |field: &str| {
        report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field}: {report}"))
    };
    assert!(ms("session_ms") > 0.0, "{report}");
    assert!(ms("rtt_p50_ms") > 0.0, "{report}");
    assert!(ms("rtt_p50_ms") <= ms("rtt_p90_ms"), "{report}");
    assert!(ms("rtt_p90_ms") <= ms("rtt_max_ms"), "{report}");
    // Back-to-back round trips cannot be faster than the median allows by much, nor slower
    // than the slowest one.
    let per_second = ms("round_trips_per_s");
    assert!(
        per_second > 0.0 && per_second <= 1000.0 / ms("rtt_p50_ms") * 2.0,
        "{report}"
    );
    assert!(per_second >= 1000.0 / ms("rtt_max_ms") / 2.0, "{report}");
    let fields: Vec<&String> = report.as_object().unwrap().keys().collect();
    assert_eq!(
        fields.len(),
        14,
        "the document's fields are stable: {fields:?}"
    );

    // The dongle really served it: bound to the probe, session closed at the end, and at least
    // hello + item list + 20 clock reads + close arrived as reports.
    let status = dongle.status();
    assert_eq!(status["binding"]["runtime"], "meter-probe", "{status}");
    assert_eq!(status["bound-active"], false, "{status}");
    assert!(dongle.reports_in.load(Ordering::SeqCst) >= 23);
}

#[test]
fn probe_picks_the_dongle_named_by_serial_and_binds_as_told() {
    let vendor = Vendor::new();
    let sim = tempfile::tempdir().unwrap();
    let first = ServedDongle::plug(&vendor, 100, sim.path());
    let second = ServedDongle::plug(&vendor, 200, sim.path());
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(state.path().join("trust")).unwrap();
    std::fs::copy(vendor.certificate(), state.path().join("trust/10.cert")).unwrap();

    let (code, report) = probe(
        sim.path(),
        &[
            "--serial",
            "200",
            "--count",
            "3",
            "--state",
            path_arg(state.path()),
            "--runtime-id",
            "guest-probe",
        ],
    );
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["serial"], "200");
    assert_eq!(report["certified_serial"], "200");
    assert_eq!(report["round_trips"], 3);
    let serials: Vec<&Value> = report["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["serial"])
        .collect();
    assert_eq!(serials, ["100", "200"]);
    assert_eq!(second.status()["binding"]["runtime"], "guest-probe");
    assert_eq!(first.status()["binding"], Value::Null);
    assert_eq!(first.reports_in.load(Ordering::SeqCst), 0);
}

#[test]
fn no_dongle_is_an_error_naming_what_was_scanned() {
    let vendor = Vendor::new();
    let sim = tempfile::tempdir().unwrap();
    let certificate = vendor.certificate();
    let (code, report) = probe(sim.path(), &["--vendor", path_arg(&certificate)]);
    assert_eq!(code, 2, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("No dongle found"), "{error}");
    assert!(
        error.contains(&format!("{}/*.sock", sim.path().join("usb").display())),
        "{error}"
    );

    let _dongle = ServedDongle::plug(&vendor, 7, sim.path());
    let (code, report) = probe(
        sim.path(),
        &["--serial", "8", "--vendor", path_arg(&certificate)],
    );
    assert_eq!(code, 2, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("No dongle with serial 8"), "{error}");
    assert!(error.contains("found [7]"), "{error}");
}

#[test]
fn a_dongle_certified_by_an_untrusted_vendor_is_refused() {
    let vendor = Vendor::new();
    let stranger = Vendor::new();
    let sim = tempfile::tempdir().unwrap();
    let _dongle = ServedDongle::plug(&vendor, 9, sim.path());
    let (code, report) = probe(sim.path(), &["--vendor", path_arg(&stranger.certificate())]);
    assert_eq!(code, 2, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("Cannot open a session with dongle 9"),
        "{error}"
    );
    assert!(error.contains("certificate"), "{error}");
}

#[test]
fn a_firm_certificate_from_a_self_made_root_is_refused() {
    // The dongle's own vendor, but certified by a root the licensee made.
    let forged = common::SelfMadeVendor::new();
    let sim = tempfile::tempdir().unwrap();
    let _dongle = ServedDongle::plug(&forged.vendor, 11, sim.path());
    let (code, report) = probe(sim.path(), &["--vendor", path_arg(&forged.certificate)]);
    assert_eq!(code, 2, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("not a firm certificate this runtime trusts"),
        "{error}"
    );
}
