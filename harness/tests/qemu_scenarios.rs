//! Built-in scenarios on real QEMU guests, through the real `vigil` binary (`make test-vm`).
//!
//! Skipped, with a printed reason, when `qemu-system-x86_64` or the guest image (`make images`)
//! is missing. Each scenario must give the same verdict as on the sim backend: pass.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The scenarios the qemu suite runs (the ones issue 6 names first).
const SCENARIOS: &[&str] = &[
    "clone-guest",
    "guest-move-same-host",
    "guest-live-migration",
    "crash-release",
    "snapshot-rollback-units",
];

fn image_dir() -> PathBuf {
    std::env::var_os("VIGIL_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

/// Why the qemu suite cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !matches!(qemu, Ok(ref out) if out.status.success()) {
        return Some("qemu-system-x86_64 is not installed (run `make deps` as root)".into());
    }
    let dir = image_dir();
    for file in ["vmlinux", "initramfs.cpio.gz", "data.qcow2"] {
        if !dir.join(file).exists() {
            return Some(format!(
                "{} is missing (run `make images`)",
                dir.join(file).display()
            ));
        }
    }
    None
}

fn run_scenario(name: &str) -> (Option<i32>, serde_json::Value, String) {
    let reports = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["scenario", name, "--backend", "qemu", "--report-dir"])
        .arg(reports.path())
        .env("VIGIL_IMAGE_DIR", image_dir())
        .output()
        .unwrap();
    let text = std::fs::read_to_string(reports.path().join("latest").join("report.json"))
        .unwrap_or_else(|e| {
            panic!(
                "{name}: no report ({e}); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let logs = reports.path().join("latest").join("logs").join(name);
    // Keep the guests' consoles and runtime logs where a failing CI run can show them.
    if let Some(keep) = std::env::var_os("VIGIL_QEMU_TEST_LOGS") {
        let target = Path::new(&keep).join(name);
        let _ = std::fs::create_dir_all(&target);
        let _ = Command::new("cp")
            .arg("-r")
            .arg(&logs)
            .arg(&target)
            .status();
    }
    (
        out.status.code(),
        report,
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn scenario_passes(name: &str) {
    if let Some(why) = skip_reason() {
        println!("SKIPPED qemu scenario {name}: {why}");
        return;
    }
    let (code, report, output) = run_scenario(name);
    let scenario = &report["scenarios"][0];
    assert_eq!(
        (code, scenario["verdict"].as_str()),
        (Some(0), Some("pass")),
        "{name} on qemu: {}\n{output}",
        scenario["error"]
    );
    assert_eq!(report["events"][0]["backend"], "qemu", "{report}");
}

#[test]
fn clone_guest_on_qemu() {
    scenario_passes(SCENARIOS[0]);
}

#[test]
fn guest_move_same_host_on_qemu() {
    scenario_passes(SCENARIOS[1]);
}

#[test]
fn guest_live_migration_on_qemu() {
    scenario_passes(SCENARIOS[2]);
}

#[test]
fn crash_release_on_qemu() {
    scenario_passes(SCENARIOS[3]);
}

#[test]
fn snapshot_rollback_units_on_qemu() {
    scenario_passes(SCENARIOS[4]);
}

#[test]
fn a_wrong_expectation_fails_on_qemu_too() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED qemu wrong-expectation check: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("wrong-in-guest.yaml");
    std::fs::write(
        &scenario,
        r#"name: wrong-in-guest
description: Expects a clone on other hardware to keep a medium-bound licence, which it must not.
policy:
  products:
    - { code: 1001, name: cad-pro, container: soft, quantity: 1, counting: station-share,
        binding: { scheme: smartbind, tolerance: medium } }
hosts:
  - { name: host-a, cpu: { vendor: GenuineIntel, model: "Xeon Gold 6248" } }
  - { name: host-b, cpu: { vendor: AuthenticAMD, model: "EPYC 7543" } }
guests:
  - { name: vm1, host: host-a }
steps:
  - boot: vm1
  - activate: { machine: vm1, product: 1001 }
  - clone: { from: vm1, to: vm1-copy, host: host-b }
  - boot: vm1-copy
  - access: { machine: vm1-copy, product: 1001, as: copied }
  - expect: { granted: copied }
"#,
    )
    .unwrap();
    let reports = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("scenario")
        .arg(&scenario)
        .args(["--backend", "qemu", "--report-dir"])
        .arg(reports.path())
        .env("VIGIL_IMAGE_DIR", image_dir())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a wrong expectation must fail the run:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
