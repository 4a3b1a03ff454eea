//! The USB/IP server against a real guest kernel: the guest's agent imports the dongle into
//! vhci_hcd, it enumerates as a HID device with our descriptors, the guest's runtime tooling
//! talks to it through hidraw, a cut connection removes it, and it can be attached again.
//!
//! Skipped, with a printed reason, when QEMU or the guest image is missing; where QEMU is
//! required (`VIGIL_REQUIRE_QEMU=1`, as in CI) a reason to skip is a failure.

mod guest_usb;

use std::time::Instant;

use guest_usb::{assert_is_test_dongle, hidraw_uevent, prepare_probe, probe, skip_reason, world};
use vigil::backend::Backend;

const SERIAL: u64 = 4_711_003;

#[test]
fn the_dongle_attaches_to_a_guest_kernel_over_usbip() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED USB/IP guest test: {why}");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut backend = world(scratch.path(), 17, &["vm1"], SERIAL);
    backend.boot("vm1").expect("boot");
    prepare_probe(&mut backend, "vm1");

    let started = Instant::now();
    backend.usbip_attach("d1", "vm1").expect("usbip attach");
    let attach_ms = started.elapsed().as_millis();
    let uevent = hidraw_uevent(&mut backend, "vm1", true).expect("a hidraw device appears");
    assert_is_test_dongle(&uevent, SERIAL);
    assert!(
        uevent.contains("HID_NAME=Vigil test devices meter licence dongle"),
        "{uevent}"
    );
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

    // Reports both ways through the guest kernel: a session and timed round trips.
    let report = probe(&mut backend, "vm1", 200);
    assert_eq!(report["certified_serial"], SERIAL.to_string(), "{report}");
    println!(
        "USB/IP ({}): attach to enumerated {attach_ms} ms; session {} ms; round trip p50 {} ms, \
         p90 {} ms, max {} ms; {} round trips/s",
        guest_usb::accelerator(&mut backend),
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
        hidraw_uevent(&mut backend, "vm1", false),
        None,
        "the hidraw device goes away when the connection dies"
    );
    println!(
        "USB/IP: disconnect to gone {} ms",
        started.elapsed().as_millis()
    );

    // The export is free again: a new attach works, and a clean detach removes it.
    backend.usbip_attach("d1", "vm1").expect("attach again");
    let uevent = hidraw_uevent(&mut backend, "vm1", true).expect("hidraw after re-attach");
    assert_is_test_dongle(&uevent, SERIAL);
    backend.usbip_detach("d1").expect("usbip detach");
    assert_eq!(
        hidraw_uevent(&mut backend, "vm1", false),
        None,
        "the hidraw device goes away on detach"
    );
    backend.teardown().unwrap();
}
