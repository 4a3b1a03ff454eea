//! Built-in scenarios on real QEMU guests, through the real `vigil` binary (`make test-vm`).
//!
//! Skipped, with a printed reason, when `qemu-system-x86_64` or the guest image (`make images`)
//! is missing. Each scenario must give the same verdict as on the sim backend: pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use rstest::rstest;

mod long_names;
mod runtime_copy;

fn image_dir() -> PathBuf {
    std::env::var_os("VIGIL_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/out"))
}

/// Why the qemu suite cannot run here, if it cannot. Where QEMU is required (CI sets
/// `VIGIL_REQUIRE_QEMU=1`), a reason to skip is a failure instead.
fn skip_reason() -> Option<String> {
    let reason = missing_prerequisite();
    if let Some(why) = &reason
        && std::env::var_os("VIGIL_REQUIRE_QEMU").is_some_and(|v| v == "1")
    {
        panic!("the qemu suite is required here (VIGIL_REQUIRE_QEMU=1) but cannot run: {why}");
    }
    reason
}

fn missing_prerequisite() -> Option<String> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !matches!(qemu, Ok(ref out) if out.status.success()) {
        return Some("qemu-system-x86_64 is not installed (run `make deps` as root)".into());
    }
    let dir = image_dir();
    for file in ["vmlinux", "initramfs.cpio", "data.qcow2"] {
        if !dir.join(file).exists() {
            return Some(format!(
                "{} is missing (run `make images`)",
                dir.join(file).display()
            ));
        }
    }
    None
}

/// Runs `scenario` (a built-in name or a file) whose scenario name is `name`.
fn run_scenario_file(scenario: &str, name: &str) -> (Option<i32>, serde_json::Value, String) {
    let reports = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["scenario", scenario, "--backend", "qemu", "--report-dir"])
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
    scenario_file_passes(name, name);
}

fn scenario_file_passes(scenario: &str, name: &str) {
    if let Some(why) = skip_reason() {
        println!("SKIPPED qemu scenario {name}: {why}");
        return;
    }
    let (code, report, output) = run_scenario_file(scenario, name);
    let scenario = &report["scenarios"][0];
    assert_eq!(
        (code, scenario["verdict"].as_str()),
        (Some(0), Some("pass")),
        "{name} on qemu: {}\n{output}",
        scenario["error"]
    );
    assert_eq!(report["events"][0]["backend"], "qemu", "{report}");
}

/// Every built-in scenario with a guest (dongles reach guests over usbredir and USB/IP); the
/// host-only ones run the same machines as on sim and stay in the sim suite.
#[rstest]
#[case::clone_guest("clone-guest")]
#[case::clone_guest_loose("clone-guest-loose")]
#[case::guest_move_same_host("guest-move-same-host")]
#[case::guest_move_other_host("guest-move-other-host")]
#[case::guest_live_migration("guest-live-migration")]
#[case::host_licence_in_guest("host-licence-in-guest")]
#[case::vm_activation_denied("vm-activation-denied")]
#[case::vm_hidden_hypervisor("vm-hidden-hypervisor")]
#[case::snapshot_rollback_units("snapshot-rollback-units")]
#[case::witness_empty_server("witness-empty-server")]
#[case::witness_claimed_first("witness-claimed-first")]
#[case::snapshot_rollback_time("snapshot-rollback-time")]
#[case::snapshot_rollback_many("snapshot-rollback-many")]
#[case::state_restore("state-restore")]
#[case::state_restore_dongle("state-restore-dongle")]
#[case::licence_reapply("licence-reapply")]
#[case::licence_forged("licence-forged")]
#[case::trial_expiry("trial-expiry")]
#[case::stationshare_ts_guest("stationshare-ts-guest")]
#[case::terminal_server_setsid("terminal-server-setsid")]
#[case::terminal_server_untabled("terminal-server-untabled")]
#[case::stationshare_mixed("stationshare-mixed")]
#[case::crash_release("crash-release")]
#[case::holder_release("holder-release")]
#[case::holder_other_user("holder-other-user")]
#[case::access_rules("access-rules")]
#[case::access_rules_network("access-rules-network")]
#[case::usage_log_tampered("usage-log-tampered")]
#[case::server_keepalive("server-keepalive")]
#[case::partition_short("partition-short")]
#[case::partition_reset("partition-reset")]
#[case::remote_revocation("remote-revocation")]
#[case::server_flood("server-flood")]
#[case::station_spoof("station-spoof")]
#[case::dongle_host_server("dongle-host-server")]
#[case::dongle_exclusive_guest("dongle-exclusive-guest")]
#[case::dongle_vm_denied("dongle-vm-denied")]
#[case::dongle_shared_lockout("dongle-shared-lockout")]
#[case::dongle_hop("dongle-hop")]
#[case::dongle_hop_cloned_state("dongle-hop-cloned-state")]
#[case::dongle_impersonated_runtime("dongle-impersonated-runtime")]
#[case::dongle_units("dongle-units")]
#[case::dongle_rebind("dongle-rebind")]
#[case::usb_over_ethernet("usb-over-ethernet")]
#[case::dongle_hang("dongle-hang")]
fn scenario_passes_on_qemu(#[case] name: &str) {
    scenario_passes(name);
}

#[test]
fn long_names_with_dongles_run_on_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("long.yaml");
    let text = long_names::dongle_hop();
    std::fs::write(&scenario, &text).unwrap();
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("name: "))
        .unwrap()
        .to_owned();
    scenario_file_passes(scenario.to_str().unwrap(), &name);
}

/// Runs `scenario` on qemu with the runtime folder `runtime`; returns the exit code and output.
fn run_with_runtime(scenario: &str, runtime: &Path, weaken: Option<&str>) -> (Option<i32>, String) {
    let reports = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_vigil"));
    command
        .args(["scenario", scenario, "--backend", "qemu", "--runtime"])
        .arg(runtime)
        .arg("--report-dir")
        .arg(reports.path())
        .env("VIGIL_IMAGE_DIR", image_dir())
        .env_remove("METER_WEAKEN");
    if let Some(defence) = weaken {
        command.env("METER_WEAKEN", defence);
    }
    let out = command.output().unwrap();
    let output =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), output)
}

#[test]
fn another_runtime_folder_reaches_the_guests() {
    if let Some(why) = skip_reason() {
        println!("SKIPPED qemu --runtime: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = runtime_copy::reference(&dir.path().join("reference"));
    let (code, output) = run_with_runtime("clone-guest", &copy, None);
    assert_eq!(
        code,
        Some(0),
        "clone-guest with a copied runtime:\n{output}"
    );
    // The guests run the folder's runtime, not the image's: a weakened one is caught.
    let weakened = runtime_copy::weakened(&dir.path().join("weakened"));
    let (code, output) = run_with_runtime("clone-guest", &weakened, Some("trait-binding"));
    assert_eq!(
        code,
        Some(1),
        "clone-guest with a weakened runtime:\n{output}"
    );
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
