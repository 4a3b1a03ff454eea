//! The shipped `meterd` runs only on the real machine: a simulated platform, whose machine facts
//! (kind, traits, clock, vmgenid, sessions) are plain files, is refused.

use std::path::Path;
use std::process::{Command, Output};

/// Starts `binary` as a daemon on a simulated platform in `dir` with `state` as its state folder.
fn start_on_sim(binary: &str, dir: &Path, state: &Path) -> Output {
    std::fs::create_dir_all(dir.join("platform")).unwrap();
    Command::new(binary)
        .arg("--state")
        .arg(state)
        .arg("--socket")
        .arg(dir.join("meterd.sock"))
        .arg("--platform")
        .arg(format!("sim:{}", dir.join("platform").display()))
        .env_remove("METER_WEAKEN")
        .output()
        .unwrap()
}

#[test]
fn the_meterd_binary_refuses_a_simulated_platform() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = start_on_sim(env!("CARGO_BIN_EXE_meterd"), dir.path(), &state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(
        stderr.contains("runs only on the real machine"),
        "stderr: {stderr}"
    );
    assert!(!state.exists(), "a refused start touched nothing");
}

#[test]
fn the_harness_build_runs_on_a_simulated_platform() {
    let dir = tempfile::tempdir().unwrap();
    // Only the gate is wanted here, not a running daemon: with a state folder that cannot be
    // made, the harness build gets past the platform and stops at the folder.
    let state = dir.path().join("state-is-a-file");
    std::fs::write(&state, b"").unwrap();
    let refused = |binary: &str| {
        let out = start_on_sim(binary, dir.path(), &state);
        String::from_utf8_lossy(&out.stderr).contains("runs only on the real machine")
    };
    assert!(refused(env!("CARGO_BIN_EXE_meterd")));
    assert!(!refused(env!("CARGO_BIN_EXE_meterd-sim")));
}

#[test]
fn the_meterd_binary_refuses_to_present_another_runtime_id() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(["--platform", "host", "--runtime-id", "abcd", "--state"])
        .arg(&state)
        .arg("--socket")
        .arg(dir.path().join("meterd.sock"))
        .env_remove("METER_WEAKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(
        stderr.contains("--runtime-id is for harness builds only"),
        "stderr: {stderr}"
    );
    assert!(!state.exists(), "a refused start touched nothing");
}
