//! Built-in scenarios on real QEMU guests, through the real `vigil` binary (`make test-vm`).
//!
//! Skipped, with a printed reason, when `qemu-system-x86_64` or the guest image (`make images`)
//! is missing. Each scenario must give the same verdict as on the sim backend: pass.

use std::path::Path;
use std::process::Command;

use guest_scenarios::image_dir;

#[macro_use]
mod guest_scenarios;
mod long_names;
mod runtime_copy;

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

fn scenario_passes(name: &str) {
    scenario_file_passes(name, name);
}

fn scenario_file_passes(scenario: &str, name: &str) {
    if let Some(why) = skip_reason() {
        println!("SKIPPED qemu scenario {name}: {why}");
        return;
    }
    guest_scenarios::scenario_file_passes("qemu", scenario, name);
}

guest_scenarios!(scenario_passes_on_qemu, scenario_passes);

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

/// The fixture scenario `name` passes on sim, where its machines are simulated ones, and on
/// qemu: one verdict.
fn fixture_passes_on_sim_and_qemu(name: &str) {
    let scenario = guest_scenarios::fixture(name);
    guest_scenarios::scenario_file_passes("sim", &scenario, name);
    scenario_file_passes(&scenario, name);
}

#[test]
fn a_server_in_a_guest_stops_starts_again_and_ends_with_its_guest() {
    fixture_passes_on_sim_and_qemu("guest-server-stop");
}

#[test]
fn a_revert_brings_a_guest_back_in_its_snapshots_power_state() {
    fixture_passes_on_sim_and_qemu("guest-revert-power");
}

/// Runs `scenario` on qemu with the runtime folder `runtime`; returns the exit code and output.
fn run_with_runtime(scenario: &str, runtime: &Path, weaken: Option<&str>) -> (Option<i32>, String) {
    let _turn = guest_scenarios::turn(scenario);
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
        guest_scenarios::wrong_expectation("wrong-in-guest"),
    )
    .unwrap();
    let _turn = guest_scenarios::turn("");
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
