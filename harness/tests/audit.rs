//! `vigil audit` through the real binary on sim: the sample policy's matrix matches what the
//! built-in scenarios prove, its weak product shows "allowed by your policy", and a weakened
//! runtime turns cells undefended with exit code 1.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn vigil() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vigil"))
}

fn sample_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/sample.yaml")
}

/// Runs an audit; its exit code and matrix.
fn audit(runtime: Option<(&Path, &str)>) -> (Option<i32>, Value) {
    let reports = tempfile::tempdir().unwrap();
    let mut command = Command::new(vigil());
    command
        .arg("audit")
        .arg(sample_policy())
        .arg("--report-dir")
        .arg(reports.path())
        .env_remove("METER_WEAKEN");
    if let Some((dir, defence)) = runtime {
        command
            .arg("--runtime")
            .arg(dir)
            .env("METER_WEAKEN", defence);
    }
    let out = command.output().unwrap();
    let run = std::fs::read_dir(reports.path())
        .unwrap()
        .next()
        .expect("a run folder")
        .unwrap()
        .path();
    let text = std::fs::read_to_string(run.join("audit.json")).unwrap_or_else(|e| {
        panic!(
            "no audit.json ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for file in ["audit.md", "audit.html", "report.html"] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    (out.status.code(), serde_json::from_str(&text).unwrap())
}

/// The label of a cell, by threat and product code.
fn cell(matrix: &Value, threat: &str, code: u64) -> String {
    let column = matrix["products"]
        .as_array()
        .unwrap()
        .iter()
        .position(|p| p[0] == code)
        .unwrap();
    let row = matrix["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["threat"] == threat)
        .unwrap();
    row["cells"][column]["cell"].as_str().unwrap().to_owned()
}

#[test]
fn the_sample_policy_is_defended_where_it_forbids_and_allowed_where_it_allows() {
    let (code, matrix) = audit(None);
    assert_eq!(code, Some(0), "{matrix:#}");
    let expected = [
        ("clone-other-hardware", 1001, "defended"),
        ("move-other-host", 1001, "defended"),
        ("move-other-host", 1005, "allowed-by-policy"),
        ("vm-activation", 1001, "allowed-by-policy"),
        ("vm-activation", 1002, "defended"),
        ("state-restore", 1003, "defended"),
        ("state-restore", 1004, "defended"),
        ("state-restore-unwitnessed", 1003, "defended"),
        ("state-restore-unwitnessed", 1004, "allowed-by-policy"),
        ("crash", 1001, "defended"),
        ("forged-licence", 1002, "defended"),
        ("terminal-server-sessions", 1002, "defended"),
        ("terminal-server-sessions", 1006, "not-applicable"),
        ("dongle-in-vm", 2001, "defended"),
        ("dongle-in-vm", 1001, "not-applicable"),
        ("dongle-in-vm", 2002, "allowed-by-policy"),
        ("snapshot-revert", 1003, "defended"),
        ("local-licence-network", 1008, "defended"),
        ("spoofed-station", 1007, "defended"),
        ("partition", 1001, "defended"),
        ("dongle-shared", 2002, "defended"),
    ];
    for (threat, product, label) in expected {
        assert_eq!(
            cell(&matrix, threat, product),
            label,
            "{threat} on {product}"
        );
    }
    let cells = matrix["rows"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["cells"].as_array().unwrap().iter());
    for c in cells {
        assert!(
            !matches!(c["cell"].as_str(), Some("undefended" | "error")),
            "{c}"
        );
    }
}

#[test]
fn a_weakened_runtime_turns_cells_undefended() {
    let weakened = vigil().with_file_name("meter-weakened");
    if !weakened.exists() {
        eprintln!("SKIPPED: no weakened runtime; `make weakened` builds it (`make test` does)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in ["meter", "meterd"] {
        std::os::unix::fs::symlink(&weakened, dir.path().join(name)).unwrap();
    }
    let (code, matrix) = audit(Some((dir.path(), "vm-activation-switch")));
    assert_eq!(code, Some(1));
    assert_eq!(cell(&matrix, "vm-activation", 1002), "undefended");
    assert_eq!(cell(&matrix, "dongle-in-vm", 2001), "undefended");
    let (code, matrix) = audit(Some((dir.path(), "station-authentication")));
    assert_eq!(code, Some(1));
    assert_eq!(cell(&matrix, "spoofed-station", 1007), "undefended");
}

#[test]
fn the_threat_list_names_every_template() {
    let out = Command::new(vigil())
        .args(["audit", "--list-threats"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for file in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../threats")).unwrap()
    {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            assert!(
                text.contains(&format!("threats/{stem}.yaml")),
                "{stem} not listed"
            );
        }
    }
}
