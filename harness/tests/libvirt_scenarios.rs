//! Built-in scenarios on guests through real libvirt daemons, one per host, through the real
//! `vigil` binary (`make test-libvirt`): each must give the verdict it gives on sim and qemu.
//!
//! Skipped, with a printed reason, without libvirtd, root, QEMU or the guest image; with
//! `VIGIL_REQUIRE_LIBVIRT=1` (CI) a reason to skip is a failure instead.
//! `VIGIL_LIBVIRT_SCENARIOS` (comma-separated scenario names) runs only those: `make test` runs
//! one scenario per libvirt operation, `make test-libvirt-all` every one.
#![cfg(feature = "libvirt")]

#[macro_use]
mod guest_scenarios;
mod libvirt_common;

/// Whether `VIGIL_LIBVIRT_SCENARIOS` (unset: all) includes `name`.
fn chosen(name: &str) -> bool {
    std::env::var("VIGIL_LIBVIRT_SCENARIOS")
        .map(|list| {
            list.split(',')
                .any(|n| n.trim() == name || n.trim() == "all")
        })
        .unwrap_or(true)
}

fn scenario_passes(name: &str) {
    if !chosen(name) {
        println!("not chosen: libvirt scenario {name} (VIGIL_LIBVIRT_SCENARIOS)");
        return;
    }
    if libvirt_common::image_dir_or_skip().is_none() {
        println!("SKIPPED libvirt scenario {name}");
        return;
    }
    guest_scenarios::scenario_file_passes("libvirt", name, name);
}

guest_scenarios!(scenario_passes_on_libvirt, scenario_passes);

#[test]
fn a_revert_brings_a_guest_back_in_its_snapshots_power_state() {
    if libvirt_common::image_dir_or_skip().is_none() {
        println!("SKIPPED libvirt revert power states");
        return;
    }
    let name = "guest-revert-power";
    guest_scenarios::scenario_file_passes("libvirt", &guest_scenarios::fixture(name), name);
}

/// Processes whose command line names `needle` (the run's scratch folder).
fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            found.push(line.chars().take(160).collect());
        }
    }
    found
}

/// A scenario that fails (a wrong expectation) still stops every daemon and guest it started.
#[test]
fn a_failing_scenario_leaves_no_daemon_or_guest_running() {
    if libvirt_common::image_dir_or_skip().is_none() {
        return;
    }
    let _turn = guest_scenarios::turn("");
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("wrong-on-libvirt.yaml");
    std::fs::write(
        &scenario,
        guest_scenarios::wrong_expectation("wrong-on-libvirt"),
    )
    .unwrap();
    let (code, report, output) = guest_scenarios::run_scenario_file(
        "libvirt",
        scenario.to_str().unwrap(),
        "wrong-on-libvirt",
    );
    assert_eq!(
        code,
        Some(1),
        "a wrong expectation fails the run:\n{output}"
    );
    let run_id = report["events"][0]["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run id in {report}"))
        .to_owned();
    let left = processes_naming(&format!("vigil-{run_id}-"));
    assert!(left.is_empty(), "left running after the run: {left:#?}");
}
