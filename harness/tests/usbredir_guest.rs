//! The usbredir server against a real QEMU guest: the dongle enumerates in the guest's kernel as
//! a HID device with our descriptors, carries report round trips through the guest's hidraw node,
//! survives a revert of a snapshot taken while it was plugged in, and vanishes when unplugged.
//!
//! Skipped, with a printed reason, when QEMU or the guest image is missing; where QEMU is
//! required (`VIGIL_REQUIRE_QEMU=1`, as in CI) a reason to skip is a failure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil::backend::qemu::QemuBackend;
use vigil::backend::{Backend, GuestSpec, HostSpec, Role, UsbMode, WorldConfig};
use vigil::identity::{IdentityMint, cpu_profile};

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

/// A backend with one host and `guests` guests on it, and dongle `d1` (serial 4711001).
fn world(scratch: &Path, guests: &[&str]) -> QemuBackend {
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("VIGIL_IMAGE_DIR", image_dir()) };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vigil"));
    let config = WorldConfig {
        runtime_bin: exe.parent().unwrap().to_path_buf(),
        harness_exe: exe.clone(),
        work_dir: scratch.join("work"),
        log_dir: scratch.join("logs"),
        seed: 11,
    };
    let mut backend = QemuBackend::new(config).expect("qemu backend");
    let mint = IdentityMint::new(11);
    backend
        .add_host(&HostSpec {
            name: "host-a".into(),
            cpu: cpu_profile("GenuineIntel", "Xeon Gold 6248"),
            identity: mint.host_identity("host-a"),
            role: Role::Workstation,
        })
        .unwrap();
    for guest in guests {
        backend
            .add_guest(&GuestSpec {
                name: (*guest).into(),
                host: "host-a".into(),
                identity: mint.guest_identity(guest),
                role: Role::Workstation,
            })
            .unwrap();
    }
    let vendor = dongle::SigningKey::from_bytes(&[5u8; 32]);
    let flash = dongle::Flash::manufacture(dongle::Serial(4_711_001), [1; 32], [2; 32], &vendor);
    let flash_path = scratch.join("d1.flash.json");
    std::fs::write(&flash_path, serde_json::to_vec(&flash).unwrap()).unwrap();
    backend.add_dongle("d1", &flash_path).unwrap();
    backend
}

/// The guest's view of its first hidraw device (`uevent`), waiting for enumeration.
fn hidraw_uevent(backend: &mut QemuBackend, guest: &str, present: bool) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = backend
            .get_file(guest, "/sys/class/hidraw/hidraw0/device/uevent")
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if text.is_some() == present || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn guest_file(backend: &mut QemuBackend, guest: &str, path: &str) -> String {
    let bytes = backend
        .get_file(guest, path)
        .unwrap_or_else(|e| panic!("read {path} in {guest}: {e}"));
    String::from_utf8_lossy(&bytes).trim().to_string()
}

#[test]
fn the_dongle_enumerates_in_a_guest_over_usbredir() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED usbredir guest test: {why}");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut backend = world(scratch.path(), &["vm1"]);
    backend.boot("vm1").expect("boot");
    backend
        .usb_attach("d1", &["vm1".into()], UsbMode::Exclusive)
        .expect("usb attach");

    let uevent = hidraw_uevent(&mut backend, "vm1", true).expect("a hidraw device appears");
    assert!(
        uevent.contains("HID_ID=0003:00001209:00004D54"),
        "USB bus, our vendor and product: {uevent}"
    );
    assert!(uevent.contains("HID_UNIQ=4711001"), "{uevent}");
    // The descriptors as the guest's USB core read them (root port 1 of the USB 2 bus).
    assert_eq!(
        guest_file(&mut backend, "vm1", "/sys/bus/usb/devices/1-1/idVendor"),
        "1209"
    );
    assert_eq!(
        guest_file(&mut backend, "vm1", "/sys/bus/usb/devices/1-1/serial"),
        "4711001"
    );
    assert_eq!(
        guest_file(&mut backend, "vm1", "/sys/bus/usb/devices/1-1/speed"),
        "480"
    );
    assert_eq!(
        guest_file(
            &mut backend,
            "vm1",
            "/sys/bus/usb/devices/1-1/1-1:1.0/bInterfaceClass"
        ),
        "03"
    );

    // A snapshot taken with the dongle plugged in comes back with it.
    backend.snapshot("vm1", "plugged").expect("snapshot");
    backend.revert("vm1", "plugged").expect("revert");
    let uevent = hidraw_uevent(&mut backend, "vm1", true).expect("hidraw after revert");
    assert!(uevent.contains("HID_UNIQ=4711001"), "{uevent}");

    // A report round trip through the guest's hidraw node: a session and 50 requests, by the
    // runtime's own probe. The probe binds the dongle for real: the guest's runtime lets go of it
    // and a re-plug clears the dongle's sessions first.
    // The probe below binds the dongle for real: the guest's own runtime must not hold it too.
    let stopped = backend
        .guest_exec("vm1", &["/bin/killall", "meterd"], Duration::from_secs(10))
        .unwrap();
    assert_eq!(stopped.code, Some(0), "stop the guest runtime: {stopped:?}");
    backend.usb_detach("d1").expect("usb detach");
    backend
        .usb_attach("d1", &["vm1".into()], UsbMode::Exclusive)
        .expect("usb attach again");
    let vendor = dongle::SigningKey::from_bytes(&[5u8; 32]);
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
                "50",
            ],
            Duration::from_secs(60),
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
    assert_eq!(report["certified_serial"], "4711001", "{report}");
    assert_eq!(report["round_trips"], 50, "{report}");

    backend.usb_detach("d1").expect("usb detach");
    assert_eq!(
        hidraw_uevent(&mut backend, "vm1", false),
        None,
        "the hidraw device goes away on unplug"
    );
    backend.teardown().unwrap();
}
