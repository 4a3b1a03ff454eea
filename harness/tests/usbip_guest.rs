//! The USB/IP server against a real guest kernel: the guest's agent imports the dongle into
//! vhci_hcd, it enumerates as a HID device with our descriptors, the guest's runtime tooling
//! talks to it through hidraw, a cut connection removes it, and it can be attached again.
//!
//! Skipped, with a printed reason, when QEMU or the guest image is missing; where QEMU is
//! required (`VIGIL_REQUIRE_QEMU=1`, as in CI) a reason to skip is a failure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil::backend::qemu::QemuBackend;
use vigil::backend::{Backend, GuestSpec, HostSpec, Role, WorldConfig};
use vigil::identity::{IdentityMint, cpu_profile};

const SERIAL: u64 = 4_711_003;

fn image_dir() -> PathBuf {
    std::env::var_os("VIGIL_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

fn skip_reason() -> Option<String> {
    let why = vigil::backend::qemu::vm::missing_prerequisite(&image_dir())?;
    if std::env::var_os("VIGIL_REQUIRE_QEMU").is_some_and(|v| v == "1") {
        panic!("QEMU is required here (VIGIL_REQUIRE_QEMU=1) but cannot run: {why}");
    }
    Some(why)
}

/// A backend with one host, guest `vm1` on it, and dongle `d1`; returns the vendor key too.
fn world(scratch: &Path) -> (QemuBackend, dongle::SigningKey) {
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("VIGIL_IMAGE_DIR", image_dir()) };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vigil"));
    let config = WorldConfig {
        runtime_bin: exe.parent().unwrap().to_path_buf(),
        harness_exe: exe.clone(),
        work_dir: scratch.join("work"),
        log_dir: scratch.join("logs"),
        seed: 17,
    };
    let mut backend = QemuBackend::new(config).expect("qemu backend");
    let mint = IdentityMint::new(17);
    backend
        .add_host(&HostSpec {
            name: "host-a".into(),
            cpu: cpu_profile("GenuineIntel", "Xeon Gold 6248"),
            identity: mint.host_identity("host-a"),
            role: Role::Workstation,
        })
        .unwrap();
    backend
        .add_guest(&GuestSpec {
            name: "vm1".into(),
            host: "host-a".into(),
            identity: mint.guest_identity("vm1"),
            role: Role::Workstation,
        })
        .unwrap();
    let vendor = dongle::SigningKey::from_bytes(&[5u8; 32]);
    let flash = dongle::Flash::manufacture(dongle::Serial(SERIAL), [1; 32], [2; 32], &vendor);
    let flash_path = scratch.join("d1.flash.json");
    std::fs::write(&flash_path, serde_json::to_vec(&flash).unwrap()).unwrap();
    backend.add_dongle("d1", &flash_path).unwrap();
    (backend, vendor)
}

/// The guest's view of its first hidraw device (`uevent`), waiting until it is there or gone.
fn hidraw_uevent(backend: &mut QemuBackend, present: bool) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = backend
            .get_file("vm1", "/sys/class/hidraw/hidraw0/device/uevent")
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if text.is_some() == present || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_is_our_dongle(uevent: &str) {
    assert!(
        uevent.contains("HID_ID=0003:00001209:00004D54"),
        "USB bus, our vendor and product: {uevent}"
    );
    assert!(uevent.contains(&format!("HID_UNIQ={SERIAL}")), "{uevent}");
}

#[test]
fn the_dongle_attaches_to_a_guest_kernel_over_usbip() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED USB/IP guest test: {why}");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let (mut backend, vendor) = world(scratch.path());
    backend.boot("vm1").expect("boot");
    // The guest's own runtime would bind the dongle; the probe below needs it alone.
    let stopped = backend
        .guest_exec("vm1", &["/bin/killall", "meterd"], Duration::from_secs(10))
        .unwrap();
    assert_eq!(stopped.code, Some(0), "stop the guest runtime: {stopped:?}");

    let started = Instant::now();
    backend.usbip_attach("d1", "vm1").expect("usbip attach");
    let attach_ms = started.elapsed().as_millis();
    let uevent = hidraw_uevent(&mut backend, true).expect("a hidraw device appears");
    assert_is_our_dongle(&uevent);
    let status = backend
        .get_file("vm1", "/sys/devices/platform/vhci_hcd.0/status")
        .unwrap();
    let status = String::from_utf8_lossy(&status);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("hs") && l.split_whitespace().nth(2) == Some("006")),
        "a vhci port is in use: {status}"
    );

    assert!(
        uevent.contains("HID_NAME=Vigil test devices meter licence dongle"),
        "{uevent}"
    );
    // Reports both ways through the guest kernel: a session and timed round trips.
    let key = serde_json::json!({ "signing-key": hex::encode(vendor.verifying_key().to_bytes()) });
    backend
        .put_file("vm1", "vendor.pub", key.to_string().as_bytes())
        .unwrap();
    let probe = backend
        .guest_exec(
            "vm1",
            &[
                "/bin/meter",
                "--json",
                "dongle",
                "probe",
                "--platform",
                "host",
                "--vendor",
                "/disk/home/vendor.pub",
                "--count",
                "200",
            ],
            Duration::from_secs(120),
        )
        .expect("probe runs");
    assert_eq!(
        probe.code,
        Some(0),
        "probe: {}{}",
        probe.stdout,
        probe.stderr
    );
    let report: serde_json::Value = serde_json::from_str(probe.stdout.trim()).unwrap();
    assert_eq!(report["transport"], "hidraw", "{report}");
    assert_eq!(report["certified_serial"], SERIAL.to_string(), "{report}");
    println!(
        "USB/IP ({}): attach to enumerated {attach_ms} ms; session {} ms; round trip p50 {} ms, \
         p90 {} ms, max {} ms; {} round trips/s",
        backend.accelerator(),
        report["session_ms"],
        report["rtt_p50_ms"],
        report["rtt_p90_ms"],
        report["rtt_max_ms"],
        report["round_trips_per_s"]
    );

    // A cut connection: the guest's kernel drops the device.
    let started = Instant::now();
    backend.usbip_disconnect("d1").expect("usbip disconnect");
    assert_eq!(
        hidraw_uevent(&mut backend, false),
        None,
        "the hidraw device goes away when the connection dies"
    );
    println!(
        "USB/IP: disconnect to gone {} ms",
        started.elapsed().as_millis()
    );

    // The export is free again: a new attach works, and a clean detach removes it.
    backend.usbip_attach("d1", "vm1").expect("attach again");
    let uevent = hidraw_uevent(&mut backend, true).expect("hidraw after re-attach");
    assert_is_our_dongle(&uevent);
    backend.usbip_detach("d1").expect("usbip detach");
    assert_eq!(
        hidraw_uevent(&mut backend, false),
        None,
        "the hidraw device goes away on detach"
    );
    backend.teardown().unwrap();
}
