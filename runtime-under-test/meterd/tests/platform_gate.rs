//! The shipped `meterd` runs only on the real machine: a simulated platform, whose machine facts
//! (kind, traits, clock, vmgenid, sessions) are plain files, is refused.

use std::process::Command;

#[test]
fn the_meterd_binary_refuses_a_simulated_platform() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("platform")).unwrap();
    let state = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .arg("--state")
        .arg(&state)
        .arg("--socket")
        .arg(dir.path().join("meterd.sock"))
        .arg("--platform")
        .arg(format!("sim:{}", dir.path().join("platform").display()))
        .env_remove("METER_WEAKEN")
        .output()
        .unwrap();
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
    std::fs::create_dir_all(dir.path().join("platform")).unwrap();
    // Only the gate is wanted here, not a running daemon: with a state folder that cannot be
    // made, the harness build gets past the platform and stops at the folder.
    let state = dir.path().join("state-is-a-file");
    std::fs::write(&state, b"").unwrap();
    let run = |binary: &str| {
        let out = Command::new(binary)
            .arg("--state")
            .arg(&state)
            .arg("--socket")
            .arg(dir.path().join("meterd.sock"))
            .arg("--platform")
            .arg(format!("sim:{}", dir.path().join("platform").display()))
            .env_remove("METER_WEAKEN")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run(env!("CARGO_BIN_EXE_meterd")).contains("runs only on the real machine"));
    assert!(!run(env!("CARGO_BIN_EXE_meterd-sim")).contains("runs only on the real machine"));
}
