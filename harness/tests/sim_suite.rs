//! Every built-in scenario on the sim backend, through the real `vigil` binary, plus proofs that
//! a wrong expectation fails (exit 1) and a broken file stops the harness (exit 2).

use std::path::Path;
use std::process::Command;

mod long_names;
mod runtime_copy;

fn vigil() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
}

fn report_of(dir: &Path) -> serde_json::Value {
    let latest = dir.join("latest").join("report.json");
    let text = std::fs::read_to_string(&latest)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", latest.display()));
    serde_json::from_str(&text).expect("report.json is JSON")
}

#[test]
fn every_builtin_scenario_passes_on_sim() {
    let reports = tempfile::tempdir().unwrap();
    let out = vigil()
        .args(["suite", "--backend", "sim", "--report-dir"])
        .arg(reports.path())
        .output()
        .unwrap();
    let report = report_of(reports.path());
    let failing: Vec<String> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["verdict"] != "pass")
        .map(|s| format!("{} ({}): {}", s["name"], s["verdict"], s["error"]))
        .collect();
    assert!(
        failing.is_empty() && out.status.code() == Some(0),
        "scenarios not passing: {failing:#?}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports_dir = reports.path().join("latest");
    for file in ["report.json", "junit.xml", "summary.md", "report.html"] {
        assert!(reports_dir.join(file).exists(), "{file} missing");
    }
}

#[test]
fn a_wrong_expectation_fails_with_exit_1_and_names_the_assertion() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("wrong.yaml");
    std::fs::write(
        &scenario,
        r#"name: wrong
description: Expects a second grant of a quantity-1 user-limit licence, which must be denied.
policy:
  products:
    - { code: 7, name: tool, container: soft, quantity: 1, counting: user-limit,
        binding: { scheme: random } }
hosts:
  - { name: pc, cpu: { vendor: GenuineIntel, model: "Core i7-12700" } }
steps:
  - activate: { machine: pc, product: 7 }
  - start-app: { machine: pc, product: 7, as: first }
  - start-app: { machine: pc, product: 7, as: second }
  - expect: { granted: second }
"#,
    )
    .unwrap();
    let reports = dir.path().join("reports");
    let out = vigil()
        .arg("scenario")
        .arg(&scenario)
        .arg("--report-dir")
        .arg(&reports)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = std::fs::read_to_string(reports.join("latest").join("summary.md")).unwrap();
    assert!(summary.contains("| wrong | FAIL |"), "{summary}");
    assert!(
        summary.contains("second is granted") && summary.contains("denied (quantity-exhausted)"),
        "{summary}"
    );
}

#[test]
fn an_invalid_scenario_stops_before_running_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("broken.yaml");
    std::fs::write(
        &scenario,
        "name: broken\npolicy: { products: [] }\nsteps:\n  - boot: nowhere\n",
    )
    .unwrap();
    let out = vigil()
        .arg("scenario")
        .arg(&scenario)
        .arg("--report-dir")
        .arg(dir.path().join("reports"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nowhere"), "{stderr}");
    assert!(stderr.contains(":4:"), "no line:column in {stderr}");
    assert!(!dir.path().join("reports").exists(), "nothing may run");
}

#[test]
fn long_names_with_dongles_run_on_sim() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("long.yaml");
    std::fs::write(&scenario, long_names::dongle_hop()).unwrap();
    let out = vigil()
        .args(["scenario", "--backend", "sim", "--report-dir"])
        .arg(dir.path().join("reports"))
        .arg(&scenario)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a built-in scenario on sim with another runtime folder; returns the exit code.
fn run_with_runtime(scenario: &str, runtime: &Path, weaken: Option<&str>) -> Option<i32> {
    let reports = tempfile::tempdir().unwrap();
    let mut command = vigil();
    command
        .args(["scenario", scenario, "--backend", "sim", "--runtime"])
        .arg(runtime)
        .arg("--report-dir")
        .arg(reports.path())
        .env_remove("METER_WEAKEN");
    if let Some(defence) = weaken {
        command.env("METER_WEAKEN", defence);
    }
    let out = command.output().unwrap();
    if out.status.code() != Some(0) {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.code()
}

#[test]
fn another_runtime_folder_keeps_the_verdicts_on_sim() {
    let dir = tempfile::tempdir().unwrap();
    let copy = runtime_copy::reference(&dir.path().join("reference"));
    for scenario in ["clone-guest", "dongle-hop"] {
        assert_eq!(
            run_with_runtime(scenario, &copy, None),
            Some(0),
            "{scenario}"
        );
    }
    let weakened = runtime_copy::weakened(&dir.path().join("weakened"));
    assert_eq!(
        run_with_runtime("clone-guest", &weakened, Some("trait-binding")),
        Some(1),
        "a weakened runtime given with --runtime was not the one that ran"
    );
}
