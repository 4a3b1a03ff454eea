//! A vendor is trusted only through a firm certificate from a root the runtime carries: the
//! licensee's own root, key and licences are refused however they reach the runtime.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Machine, SelfMadeVendor, TEST_ROOT, Vendor};
use serde_json::Value;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CAD: &str =
    "{code: 1001, name: cad-pro, container: soft, quantity: 50, counting: user-limit}";

#[test]
fn a_certificate_from_a_self_made_root_is_refused_and_its_licences_with_it() {
    let machine = Machine::new("ws1", "workstation", "127.0.9.1");
    let _daemon = machine.start(&[]);
    let forged = SelfMadeVendor::new();

    let (code, refused) = machine.meter(&["trust", path(&forged.certificate)]);
    assert_eq!(code, 1, "{refused}");
    assert_eq!(refused["reason"], "signature-invalid", "{refused}");
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains("which this runtime does not trust"),
        "{message}"
    );
    assert!(!machine.state().join("trust/10.cert").exists());

    let licence = forged.vendor.issue("forged", &[CAD]);
    let (code, refused) = machine.meter(&["activate", "apply", path(&licence)]);
    assert_eq!(code, 1, "{refused}");
    assert_eq!(refused["reason"], "signature-invalid", "{refused}");
    assert_eq!(
        machine.meter(&["status"]).1["containers"],
        Value::Array(vec![])
    );
}

#[test]
fn a_certificate_written_into_the_state_folder_is_checked_at_use() {
    let machine = Machine::new("ws1", "workstation", "127.0.9.2");
    let _daemon = machine.start(&[]);
    let real = Vendor::new();
    machine.install(&real, &real.issue("real", &[CAD]));
    // The licensee, root on the machine, replaces the installed certificate with their own.
    let forged = SelfMadeVendor::new();
    std::fs::copy(&forged.certificate, machine.state().join("trust/10.cert")).unwrap();

    let licence = forged.vendor.issue("forged", &[CAD]);
    let (code, refused) = machine.meter(&["activate", "apply", path(&licence)]);
    assert_eq!(code, 1, "{refused}");
    assert_eq!(refused["reason"], "signature-invalid", "{refused}");
    let message = refused["error"].as_str().unwrap();
    assert!(message.contains("does not trust"), "{message}");
}

#[test]
fn a_tampered_certificate_is_refused() {
    let machine = Machine::new("ws1", "workstation", "127.0.9.3");
    let _daemon = machine.start(&[]);
    let vendor = Vendor::new();
    let mut certificate: Value =
        serde_json::from_slice(&std::fs::read(vendor.certificate()).unwrap()).unwrap();
    certificate["firm"] = 11.into();
    let tampered = vendor.dir.path().join("tampered.cert");
    std::fs::write(&tampered, certificate.to_string()).unwrap();
    let (code, refused) = machine.meter(&["trust", path(&tampered)]);
    assert_eq!(code, 1, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("tampered"),
        "{refused}"
    );
}

/// Starts `binary` on the real machine with the tests' root offered in `METER_HARNESS_ROOT`
/// and asks it to trust a vendor that root certified; returns `meter trust`'s answer.
fn trust_on_host(binary: &str) -> (i32, Value) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("meterd.sock");
    let state = dir.path().join("state");
    let mut daemon = Command::new(binary)
        .args(["--platform", "host", "--state", path(&state), "--socket"])
        .arg(&socket)
        .env("METER_HARNESS_ROOT", &TEST_ROOT.public_hex)
        .env("METER_LOG", "warn")
        .env_remove("METER_WEAKEN")
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !state.join("meterd.ready").exists() {
        assert!(started.elapsed().as_secs() < 20, "meterd did not get ready");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let vendor = Vendor::new();
    let answer = common::meter_at(&socket, &["trust", path(&vendor.certificate())]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    answer
}

#[test]
fn only_a_harness_build_trusts_the_harness_root() {
    let (code, refused) = trust_on_host(env!("CARGO_BIN_EXE_meterd"));
    assert_eq!(
        code, 1,
        "the shipped meterd trusted a root from its environment: {refused}"
    );
    assert_eq!(refused["reason"], "signature-invalid", "{refused}");
    let (code, trusted) = trust_on_host(common::METERD);
    assert_eq!(code, 0, "{trusted}");
    assert_eq!(trusted["firm"], 10, "{trusted}");
}
