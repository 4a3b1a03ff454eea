//! `make bench-vm`: the dongle's USB paths into a real guest (usbredir passthrough, USB/IP
//! import), measured from inside it with
//! `meter dongle probe` (session establishment, report round trips), plus the time from plug to
//! enumerated; into reports/bench/usb.json. Ignored by default; skips with a printed reason when
//! QEMU or the guest image is missing.

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

const ROUND_TRIPS: &str = "500";

/// Runs `meter dongle probe` in the guest and returns its JSON report.
fn probe(backend: &mut QemuBackend, guest: &str) -> serde_json::Value {
    let out = backend
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
                "/disk/home/vendor.pub",
                "--count",
                ROUND_TRIPS,
            ],
            Duration::from_secs(120),
        )
        .expect("probe runs");
    assert_eq!(
        out.code,
        Some(0),
        "probe failed: {}{}",
        out.stdout,
        out.stderr
    );
    serde_json::from_str(out.stdout.trim()).expect("probe prints one JSON object")
}

#[test]
#[ignore = "boots a real guest; run by `make bench-vm`"]
fn usb_path_timings() {
    let image = image_dir();
    if let Some(why) = vigil::backend::qemu::vm::missing_prerequisite(&image) {
        println!("SKIPPED usb benchmark: {why}");
        return;
    }
    // SAFETY: set before any thread of this test reads the environment.
    unsafe { std::env::set_var("VIGIL_IMAGE_DIR", &image) };
    let scratch = tempfile::tempdir().unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vigil"));
    let config = WorldConfig {
        runtime_bin: exe.parent().unwrap().to_path_buf(),
        harness_exe: exe.clone(),
        work_dir: scratch.path().join("work"),
        log_dir: scratch.path().join("logs"),
        seed: 13,
    };
    let mut backend = QemuBackend::new(config).expect("qemu backend");
    let mint = IdentityMint::new(13);
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
    let flash = dongle::Flash::manufacture(dongle::Serial(4_711_002), [1; 32], [2; 32], &vendor);
    let flash_path = scratch.path().join("d1.flash.json");
    std::fs::write(&flash_path, serde_json::to_vec(&flash).unwrap()).unwrap();
    backend.add_dongle("d1", &flash_path).unwrap();
    backend.boot("vm1").expect("boot");
    // The probe binds the dongle for real: the guest's own runtime must not hold it too.
    let stopped = backend
        .guest_exec("vm1", &["/bin/killall", "meterd"], Duration::from_secs(10))
        .unwrap();
    assert_eq!(stopped.code, Some(0), "stop the guest runtime: {stopped:?}");
    let key = serde_json::json!({ "signing-key": hex::encode(vendor.verifying_key().to_bytes()) });
    backend
        .put_file("vm1", "vendor.pub", key.to_string().as_bytes())
        .unwrap();

    let mut paths = serde_json::Map::new();
    let started = Instant::now();
    backend
        .usb_attach("d1", &["vm1".into()], UsbMode::Exclusive)
        .expect("usbredir attach");
    let attach_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut report = probe(&mut backend, "vm1");
    report["plug_to_enumerated_ms"] = serde_json::json!((attach_ms * 10.0).round() / 10.0);
    assert_eq!(report["transport"], "hidraw", "{report}");
    paths.insert("usbredir".into(), report);
    let started = Instant::now();
    backend.usb_detach("d1").expect("usbredir detach");
    paths["usbredir"]["unplug_to_gone_ms"] =
        serde_json::json!((started.elapsed().as_secs_f64() * 10000.0).round() / 10.0);

    let started = Instant::now();
    backend.usbip_attach("d1", "vm1").expect("usbip attach");
    let attach_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut report = probe(&mut backend, "vm1");
    report["plug_to_enumerated_ms"] = serde_json::json!((attach_ms * 10.0).round() / 10.0);
    assert_eq!(report["transport"], "hidraw", "{report}");
    paths.insert("usbip".into(), report);
    let started = Instant::now();
    backend.usbip_disconnect("d1").expect("usbip disconnect");
    paths["usbip"]["disconnect_to_gone_ms"] =
        serde_json::json!((started.elapsed().as_secs_f64() * 10000.0).round() / 10.0);

    backend.teardown().unwrap();
    let report = serde_json::json!({
        "accelerator": backend.accelerator(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "round_trips_per_probe": ROUND_TRIPS.parse::<u32>().unwrap(),
        "paths": paths,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/bench");
    std::fs::create_dir_all(&out).unwrap();
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(out.join("usb.json"), &text).unwrap();
    println!("{text}");
}
