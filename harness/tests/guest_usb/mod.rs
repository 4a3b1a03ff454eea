//! What the tests and benchmarks of dongles in real QEMU guests share: the skip rule, a world of
//! one host with guests and a dongle, and the runtime's own probe run inside a guest.
#![allow(dead_code)] // each test crate uses its own part

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil::backend::World;
use vigil::backend::qemu::QemuDriver;
use vigil::backend::{Backend, GuestSpec, HostSpec, Role, WorldConfig};
use vigil::identity::{IdentityMint, cpu_profile};

/// The guest image folder: `VIGIL_IMAGE_DIR`, else `images/out` of this checkout.
pub fn image_dir() -> PathBuf {
    std::env::var_os("VIGIL_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

/// Why guests cannot run here, if they cannot; where QEMU is required (`VIGIL_REQUIRE_QEMU=1`,
/// as in CI) a reason to skip is a failure.
pub fn skip_reason() -> Option<String> {
    let why = vigil::backend::qemu::vm::missing_prerequisite(&image_dir())?;
    if std::env::var_os("VIGIL_REQUIRE_QEMU").is_some_and(|v| v == "1") {
        panic!("QEMU is required here (VIGIL_REQUIRE_QEMU=1) but cannot run: {why}");
    }
    Some(why)
}

/// The secret of the vendor key that certifies the test dongle.
const VENDOR_SEED: [u8; 32] = [5; 32];

/// The vendor key that certifies the test dongle.
pub fn vendor_key() -> dongle::SigningKey {
    dongle::SigningKey::from_bytes(&VENDOR_SEED)
}

/// The root the guests' runtimes trust in these tests (given to them as the world root).
fn test_root() -> meter_core::firm_certificate::RootKey {
    meter_core::firm_certificate::RootKey::from_seed([6; 32])
}

/// The test vendor's firm certificate (firm 10), signed by the test root.
fn firm_certificate() -> String {
    let vendor = meter_core::licence::VendorKey::from_seeds(VENDOR_SEED, [7; 32]);
    test_root().certify(10, vendor.public(), 0).to_json()
}

/// A qemu backend with host `host-a`, the given guests on it, and dongle `d1` with `serial`.
pub fn world(scratch: &Path, seed: u64, guests: &[&str], serial: u64) -> World {
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("VIGIL_IMAGE_DIR", image_dir()) };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vigil"));
    let config = WorldConfig {
        runtime_bin: exe.parent().unwrap().to_path_buf(),
        builtin_runtime: true,
        harness_exe: exe.clone(),
        work_dir: scratch.join("work"),
        log_dir: scratch.join("logs"),
        seed,
        harness_root: Some(test_root().public().to_hex()),
    };
    let mut backend =
        vigil::backend::assemble(vigil::backend::BackendKind::Qemu, config).expect("qemu backend");
    let mint = IdentityMint::new(seed);
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
                hide_hypervisor: false,
            })
            .unwrap();
    }
    let flash = dongle::Flash::manufacture(dongle::Serial(serial), [1; 32], [2; 32], &vendor_key());
    let flash_path = scratch.join("d1.flash.json");
    std::fs::write(&flash_path, serde_json::to_vec(&flash).unwrap()).unwrap();
    backend.add_dongle("d1", &flash_path).unwrap();
    backend
}

/// The guest's first hidraw device (`uevent`), waiting until it is there (or gone).
pub fn hidraw_uevent(backend: &mut World, guest: &str, present: bool) -> Option<String> {
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

/// Asserts a hidraw `uevent` is the test dongle's: USB, our vendor and product, its serial.
pub fn assert_is_test_dongle(uevent: &str, serial: u64) {
    assert!(
        uevent.contains("HID_ID=0003:00001209:00004D54"),
        "USB bus, our vendor and product: {uevent}"
    );
    assert!(uevent.contains(&format!("HID_UNIQ={serial}")), "{uevent}");
}

/// The world's qemu driver (for programs run in a guest past the backend trait).
pub fn guest_driver(backend: &mut World) -> &mut QemuDriver {
    backend
        .driver_mut::<QemuDriver>()
        .expect("a qemu world has a qemu driver")
}

/// The accelerator the world's guests run with.
pub fn accelerator(backend: &mut World) -> &'static str {
    guest_driver(backend).accelerator()
}

/// Stops the guest's runtime and gives the guest the vendor's firm certificate: the probe binds
/// the dongle for real, so the runtime must not hold it too.
pub fn prepare_probe(backend: &mut World, guest: &str) {
    let stopped = guest_driver(backend)
        .guest_exec(guest, &["/bin/killall", "meterd"], Duration::from_secs(10))
        .unwrap();
    assert_eq!(stopped.code, Some(0), "stop the guest runtime: {stopped:?}");
    backend
        .put_file(guest, "firm.cert", firm_certificate().as_bytes())
        .unwrap();
}

/// Runs `meter dongle probe` (a session, then `count` round trips) in the guest; its report.
pub fn probe(backend: &mut World, guest: &str, count: u32) -> serde_json::Value {
    let count = count.to_string();
    let out = guest_driver(backend)
        .guest_exec(
            guest,
            &[
                "/bin/meter",
                "--json",
                "dongle",
                "probe",
                "--platform",
                "host",
                "--vendor",
                "/disk/home/firm.cert",
                "--count",
                &count,
            ],
            Duration::from_secs(120),
        )
        .expect("probe runs");
    assert_eq!(out.code, Some(0), "probe: {}{}", out.stdout, out.stderr);
    let report: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).expect("probe prints one JSON object");
    assert_eq!(report["transport"], "hidraw", "{report}");
    report
}
