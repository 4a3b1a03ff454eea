//! `make bench-vm`: the dongle's USB paths into a real guest (usbredir passthrough, USB/IP
//! import), measured from inside it with `meter dongle probe` (session establishment, report
//! round trips), plus the time from plug to enumerated; into reports/bench/usb.json. Ignored by
//! default; skips with a printed reason when QEMU or the guest image is missing.

mod guest_usb;

use std::path::Path;
use std::time::Instant;

use vigil::backend::{Backend, UsbMode};

const ROUND_TRIPS: u32 = 500;

fn ms_since(started: Instant) -> serde_json::Value {
    serde_json::json!((started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0)
}

#[test]
#[ignore = "boots a real guest; run by `make bench-vm`"]
fn usb_path_timings() {
    if let Some(why) = vigil::backend::qemu::vm::missing_prerequisite(&guest_usb::image_dir()) {
        println!("SKIPPED usb benchmark: {why}");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut backend = guest_usb::world(scratch.path(), 13, &["vm1"], 4_711_002);
    backend.boot("vm1").expect("boot");
    guest_usb::prepare_probe(&mut backend, "vm1");
    let mut paths = serde_json::Map::new();

    let started = Instant::now();
    backend
        .usb_attach("d1", &["vm1".into()], UsbMode::Exclusive)
        .expect("usbredir attach");
    let attached = ms_since(started);
    let mut report = guest_usb::probe(&mut backend, "vm1", ROUND_TRIPS);
    report["plug_to_enumerated_ms"] = attached;
    let started = Instant::now();
    backend.usb_detach("d1").expect("usbredir detach");
    report["unplug_to_gone_ms"] = ms_since(started);
    paths.insert("usbredir".into(), report);

    let started = Instant::now();
    backend.usbip_attach("d1", "vm1").expect("usbip attach");
    let attached = ms_since(started);
    let mut report = guest_usb::probe(&mut backend, "vm1", ROUND_TRIPS);
    report["plug_to_enumerated_ms"] = attached;
    let started = Instant::now();
    backend.usbip_disconnect("d1").expect("usbip disconnect");
    report["disconnect_to_gone_ms"] = ms_since(started);
    paths.insert("usbip".into(), report);

    backend.teardown().unwrap();
    let report = serde_json::json!({
        "accelerator": guest_usb::accelerator(&mut backend),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "round_trips_per_probe": ROUND_TRIPS,
        "paths": paths,
    });
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../reports/bench");
    std::fs::create_dir_all(&out).unwrap();
    let text = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(out.join("usb.json"), &text).unwrap();
    println!("{text}");
}
