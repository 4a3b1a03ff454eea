//! The usbredir server against a real QEMU guest: the dongle enumerates in the guest's kernel as
//! a HID device with our descriptors, carries report round trips through the guest's hidraw node,
//! survives a revert of a snapshot taken while it was plugged in, and vanishes when unplugged.
//!
//! Skipped, with a printed reason, when QEMU or the guest image is missing; where QEMU is
//! required (`VIGIL_REQUIRE_QEMU=1`, as in CI) a reason to skip is a failure.

mod guest_usb;

use guest_usb::{assert_is_test_dongle, hidraw_uevent, prepare_probe, probe, skip_reason, world};
use vigil::backend::World;
use vigil::backend::{Backend, UsbMode};

const SERIAL: u64 = 4_711_001;

fn guest_file(backend: &mut World, guest: &str, path: &str) -> String {
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
    let mut backend = world(scratch.path(), 11, &["vm1"], SERIAL);
    backend.boot("vm1").expect("boot");
    backend
        .usb_attach("d1", &["vm1".into()], UsbMode::Exclusive)
        .expect("usb attach");

    let uevent = hidraw_uevent(&mut backend, "vm1", true).expect("a hidraw device appears");
    assert_is_test_dongle(&uevent, SERIAL);
    // The descriptors as the guest's USB core read them (root port 1 of the USB 2 bus).
    for (file, expected) in [
        ("idVendor", "1209"),
        ("idProduct", "4d54"),
        ("serial", "4711001"),
        ("speed", "480"),
        ("1-1:1.0/bInterfaceClass", "03"),
    ] {
        let path = format!("/sys/bus/usb/devices/1-1/{file}");
        assert_eq!(guest_file(&mut backend, "vm1", &path), expected, "{path}");
    }

    // A snapshot taken with the dongle plugged in comes back with it.
    backend.snapshot("vm1", "plugged").expect("snapshot");
    backend.revert("vm1", "plugged").expect("revert");
    let uevent = hidraw_uevent(&mut backend, "vm1", true).expect("hidraw after revert");
    assert_is_test_dongle(&uevent, SERIAL);

    // A report round trip through the guest's hidraw node: a session and 50 requests, by the
    // runtime's own probe. The guest's runtime lets go of the dongle, and a re-plug clears the
    // dongle's sessions first.
    prepare_probe(&mut backend, "vm1");
    backend.usb_detach("d1").expect("usb detach");
    backend
        .usb_attach("d1", &["vm1".into()], UsbMode::Exclusive)
        .expect("usb attach again");
    let report = probe(&mut backend, "vm1", 50);
    assert_eq!(report["certified_serial"], SERIAL.to_string(), "{report}");
    assert_eq!(report["round_trips"], 50, "{report}");

    backend.usb_detach("d1").expect("usb detach");
    assert_eq!(
        hidraw_uevent(&mut backend, "vm1", false),
        None,
        "the hidraw device goes away on unplug"
    );
    backend.teardown().unwrap();
}
